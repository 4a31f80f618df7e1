"""Typed run configuration: sections, YAML files, CLI overrides, and the seed's flat flag names.

A job's config is a pydantic model whose fields are *sections* (data, model, train, ...). Every section field
is reachable on the command line two ways:

    --train.lr 1e-5        the dotted path, always
    --lr 1e-5              the bare field name, when it is unique within the job (this is how the seed's
                           ColossalChat flags such as --pretrain, --batch_size, --max_len keep working)

Values are merged in this order: section defaults < YAML file (--config FILE) < command-line flags.
Unknown keys and bad values are refused with the dotted field name, the value received and what is allowed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the field and the fix."""


class Section(BaseModel):
    """One block of settings. Unknown keys are refused; assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class JobConfig(Section):
    """Base for a whole job's config: its fields are Sections."""

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

    def section_for(self, name: str) -> Section:
        return getattr(self, name)


# ---------------------------------------------------------------- field introspection


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple)


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _field_paths(config_cls: type[JobConfig]) -> dict[str, tuple[str, str, Any]]:
    """Map every dotted path 'section.field' to (section, field, annotation)."""
    paths = {}
    for section_name, section_field in config_cls.model_fields.items():
        section_cls = section_field.annotation
        if not (isinstance(section_cls, type) and issubclass(section_cls, Section)):
            raise TypeError(f"{config_cls.__name__}.{section_name} must be a Section")
        for field_name, field in section_cls.model_fields.items():
            paths[f"{section_name}.{field_name}"] = (section_name, field_name, field.annotation)
    return paths


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# ---------------------------------------------------------------- CLI


def build_parser(config_cls: type[JobConfig], prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with --section.field and unique bare --field flags for every config field."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with section: {field: value} entries")
    paths = _field_paths(config_cls)
    bare_counts: dict[str, int] = {}
    for _, field_name, _ in paths.values():
        bare_counts[field_name] = bare_counts.get(field_name, 0) + 1

    for section_name in config_cls.model_fields:
        section_cls = config_cls.model_fields[section_name].annotation
        group = parser.add_argument_group(section_name, (section_cls.__doc__ or "").strip().splitlines()[0] if section_cls.__doc__ else None)
        for field_name, field in section_cls.model_fields.items():
            dotted = f"{section_name}.{field_name}"
            flags = [f"--{dotted}"]
            if bare_counts[field_name] == 1:
                flags.insert(0, f"--{field_name}")
            annotation, _ = _unwrap_optional(field.annotation)
            kwargs: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": field.description or ""}
            if _is_bool(annotation):
                # `--grad_checkpoint` alone means true (the seed's store_true style); `--grad_checkpoint false` works too.
                kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
            elif _is_list(annotation):
                kwargs.update(nargs="+", metavar="VALUE")
            elif get_origin(annotation) is Literal:
                kwargs.update(metavar="{" + ",".join(str(a) for a in get_args(annotation)) + "}")
            if not field.is_required() and field.default is not None and field.default_factory is None:
                kwargs["help"] = f"{kwargs['help']} (default: {field.default})"
            group.add_argument(*flags, **kwargs)
    return parser


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    section, field = dotted.split(".", 1)
    tree.setdefault(section, {})[field] = value


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path, config_cls: type[JobConfig]) -> dict:
    """Read a YAML config; accept both nested sections and flat seed-style keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    paths = _field_paths(config_cls)
    by_bare: dict[str, list[str]] = {}
    for dotted in paths:
        by_bare.setdefault(dotted.split(".", 1)[1], []).append(dotted)
    tree: dict = {}
    for key, value in raw.items():
        if key in config_cls.model_fields:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: section '{key}' must be a mapping, got {value!r}")
            tree = _merge(tree, {key: value})
        elif len(by_bare.get(key, [])) == 1:
            _set_dotted(tree, by_bare[key][0], value)
        else:
            raise ConfigError(_unknown_key_message(str(path), key, list(config_cls.model_fields) + list(by_bare)))
    return tree


def _unknown_key_message(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"{where}: unknown key '{key}'.{hint}"


def format_validation_error(exc: ValidationError, flag_style: bool = True) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        received = err.get("input")
        shown = "" if isinstance(received, dict) else f" (got {received!r})"
        lines.append(f"  {'--' if flag_style else ''}{loc}: {err['msg']}{shown}")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(config_cls: type[JobConfig], tree: dict) -> JobConfig:
    try:
        return config_cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def parse_config(config_cls: type[JobConfig], argv: list[str] | None, prog: str, description: str = "") -> JobConfig:
    """YAML (--config) then CLI flags on top; returns a validated config or raises ConfigError."""
    parser = build_parser(config_cls, prog, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known_flags = [opt for action in parser._actions for opt in action.option_strings]
        flag = unknown[0].split("=", 1)[0]
        raise ConfigError(_unknown_key_message(prog, flag, known_flags).replace("key", "flag", 1))
    tree = load_yaml(args.config, config_cls) if args.config else {}
    for dotted, value in vars(args).items():
        if dotted == "config":
            continue
        _set_dotted(tree, dotted, value)
    return build_config(config_cls, tree)


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
