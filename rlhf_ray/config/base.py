"""Typed run configuration: sections, YAML files, CLI overrides, and the seed's flat flag names.

A job's config is a pydantic model whose fields are *sections* (data, model, train, ...). Each section field is a
flag `--section.field`, and a bare `--field` under its own name or an entry of the job's `aliases` (bare name ->
dotted path): the seed's ColossalChat flags (--pretrain, --train_batch_size, --ref_num_workers, ...). A field name
that several sections share is refused when the job class is defined unless `aliases` names its owner, so that no
flag vanishes silently. Values merge as: the job's section defaults < YAML (--config FILE; nested sections or bare
names) < flags. Unknown flags and keys and bad values are refused naming the flag (or file and key), the value and
what is allowed, with close names.

argparse, not pydantic-settings' CLI source or jsonargparse: both were tried, and neither takes several values after
one flag (`--dataset a b`), a bare `--grad_checkpoint` beside `--grad_checkpoint false`, or suggests close names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and the fix."""


class Section(BaseModel):
    """One block of settings. Unknown keys are refused; assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _changed(section: Section) -> dict[str, Any]:
    fresh = type(section)().model_dump()
    return {name: value for name, value in section.model_dump().items() if value != fresh[name]}


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


class JobConfig(Section):
    """Base for a whole job's config: its fields are Sections.

    A section's default may change a few fields (`train: TrainSection = TrainSection(lr=9e-6)`): those stay the
    job's defaults when a YAML file or a flag sets other fields of that section (section_defaults).
    """

    #: bare flag name -> dotted path, besides each field's own unique name: the seed's other names for a field,
    #: and the owner of a name that several sections share.
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.flag_names()            # a shared field name without an owner fails here, when the job is defined

    @classmethod
    def field_paths(cls) -> dict[str, FieldInfo]:
        """Every 'section.field' of the job, with its pydantic field."""
        return {f"{section}.{name}": field for section, info in cls.model_fields.items()
                for name, field in info.annotation.model_fields.items()}

    @classmethod
    def flag_names(cls) -> dict[str, str]:
        """Bare flag name -> dotted path: every field under its own name where that is unique, then `aliases`."""
        owners: dict[str, list[str]] = {}
        for dotted in cls.field_paths():
            owners.setdefault(dotted.split(".", 1)[1], []).append(dotted)
        shared = {name: found for name, found in owners.items() if len(found) > 1 and name not in cls.aliases}
        if shared:
            raise TypeError(f"{cls.__name__}: field names in several sections need their owner in `aliases`, or "
                            f"their bare flag would vanish: {shared}")
        dangling = {name: dotted for name, dotted in cls.aliases.items() if dotted not in cls.field_paths()}
        if dangling:
            raise TypeError(f"{cls.__name__}.aliases point at no field: {dangling}")
        return {name: found[0] for name, found in owners.items() if len(found) == 1} | cls.aliases

    @classmethod
    def section_defaults(cls) -> dict[str, dict[str, Any]]:
        """Per section, the fields where the job's default instance differs from a fresh section (e.g. {'train':
        {'lr': 9e-6}}); compared rather than read from the fields set, so that values a section's validator fills
        in (DPOSection's beta) stay derived."""
        return {name: _changed(field.default) for name, field in cls.model_fields.items()
                if isinstance(field.default, Section)}

    @model_validator(mode="before")
    @classmethod
    def _job_defaults_under(cls, data: Any) -> Any:
        return _merge(cls.section_defaults(), data) if isinstance(data, dict) else data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        """Write the resolved config (JSON, or YAML when the suffix says so)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        text = yaml.safe_dump(data, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        path.write_text(text)
        return path


def settings_from(settings_cls: type, section: Section, **derived: Any) -> Any:
    """A settings dataclass for the math, filled from the section's fields of the same names; `derived` gives the
    fields the section does not hold as they are (resolved values, another section's). A dataclass field found in
    neither is an AttributeError naming it; a `derived` name that is no dataclass field is a TypeError."""
    names = [f.name for f in dataclasses.fields(settings_cls) if f.name not in derived]
    return settings_cls(**{name: getattr(section, name) for name in names}, **derived)


# ---------------------------------------------------------------- CLI


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_bool(text: str) -> bool:
    if str(text).strip().lower() not in _BOOLS:
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return _BOOLS[str(text).strip().lower()]


def _argparse_kwargs(field: FieldInfo) -> dict[str, Any]:
    annotation = field.annotation
    if get_origin(annotation) in (typing.Union, types.UnionType):      # X | None: parse as X
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if annotation is bool:
        # `--grad_checkpoint` alone means true (the seed's store_true style); `--grad_checkpoint false` works too.
        return {"nargs": "?", "const": True, "type": _parse_bool, "metavar": "BOOL"}
    if get_origin(annotation) in (list, tuple):
        return {"nargs": "+", "metavar": "VALUE"}
    if get_origin(annotation) is Literal:
        return {"metavar": "{" + ",".join(str(a) for a in get_args(annotation)) + "}"}
    return {}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:      # one message and exit status 2 through run_cli
        raise ConfigError(message)


def build_parser(config_cls: type[JobConfig], prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with --section.field and the bare names of every config field."""
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file: section: {field: value} entries, or "
                                                              "the flags' bare names as keys")
    bare_names: dict[str, list[str]] = {}
    for name, dotted in config_cls.flag_names().items():
        bare_names.setdefault(dotted, []).append(f"--{name}")
    job_defaults = config_cls.section_defaults()
    for section_name, section_field in config_cls.model_fields.items():
        section_cls = section_field.annotation
        summary = " ".join((section_cls.__doc__ or "").strip().split("\n\n")[0].split())   # the first paragraph
        group = parser.add_argument_group(section_name, summary or None)
        for field_name, field in section_cls.model_fields.items():
            dotted = f"{section_name}.{field_name}"
            default = job_defaults.get(section_name, {}).get(field_name, field.default)
            shown = "" if field.is_required() or field.default_factory or default is None else f" (default: {default})"
            group.add_argument(*bare_names.get(dotted, []), f"--{dotted}", dest=dotted,
                               default=argparse.SUPPRESS, help=(field.description or "") + shown,
                               **_argparse_kwargs(field))
    return parser


def _unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"unknown {what} '{name}'." + (f" Did you mean: {', '.join(close)}?" if close else "")


def load_yaml(path: str | Path, config_cls: type[JobConfig]) -> tuple[dict, dict[str, str]]:
    """Read a YAML config: nested sections, or the flags' bare names as keys (also inside their section).

    Returns the section tree and, per dotted path, "FILE: key" to name in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    paths, bare = config_cls.field_paths(), config_cls.flag_names()
    tree: dict = {}
    origins: dict[str, str] = {}
    for key, value in raw.items():
        if key in config_cls.model_fields and not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{key}' must be a mapping, got {value!r}")
        entries = [(f"{key}.{name}", item) for name, item in value.items()] if key in config_cls.model_fields \
            else [(str(key), value)]
        for written, item in entries:
            section, _, name = written.rpartition(".")
            dotted = written if written in paths else bare.get(name)
            if dotted is None or (section and not dotted.startswith(section + ".")):
                known = [p for p in paths if p.startswith(section + ".")] if section \
                    else list(config_cls.model_fields) + list(bare)
                raise ConfigError(f"{path}: {_unknown('key', written, known)}")
            section, field = dotted.split(".", 1)
            tree.setdefault(section, {})[field] = item
            origins[dotted] = f"{path}: {written}"
    return tree, origins


def format_validation_error(exc: ValidationError, origins: dict[str, str] | None = None, prefix: str = "--") -> str:
    """One line per error: where the value came from (the flag, or the YAML file and key), the rule, the value."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        received = err.get("input")
        shown = "" if isinstance(received, dict) else f" (got {received!r})"
        lines.append(f"  {(origins or {}).get(loc, prefix + loc)}: {err['msg']}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_config(config_cls: type[JobConfig], argv: list[str] | None, prog: str, description: str = "") -> JobConfig:
    """YAML (--config) then CLI flags on top; returns a validated config or raises ConfigError."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(config_cls, prog, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known_flags = [opt for action in parser._actions for opt in action.option_strings]
        raise ConfigError(_unknown("flag", unknown[0].split("=", 1)[0], known_flags))
    flags = vars(args)
    config_file = flags.pop("config", None)
    tree, origins = load_yaml(config_file, config_cls) if config_file else ({}, {})
    bare = config_cls.flag_names()
    typed = {bare[name]: name for name in (arg.split("=", 1)[0][2:] for arg in argv if arg[:2] == "--")
             if name in bare}
    for dotted, value in flags.items():
        section, field = dotted.split(".", 1)
        tree.setdefault(section, {})[field] = value
        # errors name the flag as typed, and the field it sets
        origins[dotted] = f"--{typed[dotted]} ({dotted})" if dotted in typed else f"--{dotted}"
    try:
        return config_cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origins)) from None


def run_cli(config_cls: type[JobConfig], run: typing.Callable[[JobConfig], Any], argv: list[str] | None, prog: str,
            description: str = "") -> int:
    """Parse, then run; a ConfigError becomes one message on stderr and exit status 2."""
    try:
        config = parse_config(config_cls, argv, prog, description)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    result = run(config)
    return int(result) if isinstance(result, int) else 0
