"""A name -> function table for the real extension points (advantage estimators, policy losses, KL estimators,
reward sources). Register with a decorator; a duplicate name is refused; a miss lists the known names.

    ADVANTAGE_ESTIMATORS = Registry("advantage estimator", setting="algorithm.advantage_estimator")

    @ADVANTAGE_ESTIMATORS.register("gae")
    def compute_gae_advantages(...): ...

    ADVANTAGE_ESTIMATORS.get("gae")
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind. `kind` and `setting` only shape error messages."""

    def __init__(self, kind: str, setting: str | None = None):
        self.kind = kind
        self.setting = setting
        self._entries: dict[str, T] = {}
        # Names that are claimed by a part built elsewhere, with a hint of where: a miss on one says so.
        self._reserved: dict[str, str] = {}

    def register(self, name: str, *aliases: str) -> Callable[[T], T]:
        """Decorator: register the object under `name` (and `aliases`). Refuses a name already taken."""

        def decorate(obj: T) -> T:
            for key in (name, *aliases):
                self.add(key, obj)
            return obj

        return decorate

    def add(self, name: str, obj: T) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {_describe(self._entries[name])}); "
                             f"pick another name")
        self._entries[name] = obj

    def reserve(self, name: str, hint: str) -> None:
        """Claim `name` for an entry registered later by another package; `get` before then explains `hint`."""
        self._reserved[name] = hint

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            pass
        setting = f"{self.setting}={name!r}" if self.setting else repr(name)
        if name in self._reserved:
            raise ValueError(f"{self.kind} {setting} is not available yet: {self._reserved[name]}")
        raise ValueError(f"unknown {self.kind} {setting}; known: {', '.join(self.names()) or '(none)'}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _describe(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else repr(obj)
