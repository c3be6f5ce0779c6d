"""Typed configs: dataclasses filled from YAML files and dotted command-line overrides.

    python prepare.py --config configs/data/shakespeare.yaml --val_fraction=0.1 --source.kind files

One generic builder walks the dataclass fields: an unknown key, a wrong type or a value outside a
Literal's choices is a ConfigError naming the dotted key and what is valid. A dataclass with a
`preset_values(name)` static method gets the preset's values under the keys given beside `preset`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

from modeconn.atomic import atomic_write_text
from modeconn.errors import ConfigError

T = TypeVar("T")


class _CliText(str):
    """A value typed on the command line: text that may be parsed into the field's type."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    from_cli = isinstance(value, _CliText)

    if tp is Any:
        return yaml.safe_load(value) if from_cli else value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (from_cli and value.lower() in ("null", "none", "~"))):
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _coerce(value, rest[0], key)
        for a in rest:  # first member that accepts the value
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} fits none of {', '.join(map(_type_name, rest))}")
    if origin is Literal:
        choices = list(args)
        for choice in choices:  # a CLI "2" selects the choice 2
            if value == choice or (from_cli and value == str(choice)):
                return choice
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid choice; valid choices: "
                          f"{', '.join(map(str, choices))}")
    if dataclasses.is_dataclass(tp):
        if from_cli:
            value = yaml.safe_load(value)
        return build(tp, value, key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if from_cli:
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_tp = args[0] if args else Any
        items = [_coerce(_CliText(v) if from_cli and isinstance(v, str) else v, item_tp, f"{key}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if from_cli:
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"config key {key!r} expects a string, got {value!r} ({type(value).__name__})")
    raise TypeError(f"config field {key!r} has a type the builder does not know: {tp}")


def build(cls: type[T], raw: Any, prefix: str = "") -> T:
    """Make `cls` from a mapping, checking every key and type; `prefix` is the dotted path for errors."""
    where = f"{prefix}." if prefix else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config key {prefix or '<top level>'!r} expects a mapping of "
                          f"{', '.join(f.name for f in dataclasses.fields(cls))}, got {raw!r}")
    raw = dict(raw)
    if hasattr(cls, "preset_values") and raw.get("preset") is not None:
        raw = {**cls.preset_values(raw["preset"]), **raw}

    hints = typing.get_type_hints(cls)
    by_key = {config_key(f): f.name for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in by_key:
            near = difflib.get_close_matches(str(key), list(by_key), n=1)
            hint = f" (did you mean '{where}{near[0]}'?)" if near else ""
            raise ConfigError(f"unknown config key '{where}{key}'{hint}; valid keys under "
                              f"{prefix or 'the top level'}: {', '.join(by_key)}")
    kwargs = {by_key[k]: _coerce(v, hints[by_key[k]], f"{where}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without a default was not given
        raise ConfigError(f"config {prefix or 'top level'}: {e}") from None


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override --{dotted}: {'.'.join(parents[: i + 1])!r} is not a section")
        node = child
    node[leaf] = value


def parse_overrides(argv: Sequence[str]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """Split argv into (--config path, [(dotted key, text)]). Accepts --key=value and --key value."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; use --config FILE and --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            value, i = argv[i + 1], i + 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
        i += 1
    return config_path, overrides


def load(cls: type[T], config_path: Optional[str] = None, overrides: Sequence[tuple[str, str]] = ()) -> T:
    raw: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for key, text in overrides:
        _set_dotted(raw, key, _CliText(text))
    try:
        return build(cls, raw)
    except ConfigError as e:
        origin = f" (in config file {config_path} or the command line)" if config_path else ""
        raise ConfigError(f"{e}{origin}") from None


def from_cli(cls: type[T], argv: Optional[Sequence[str]] = None, description: str = "") -> T:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(description.strip() + "\n\nusage: --config FILE.yaml [--section.key=value ...]\n")
        if _all_defaults(cls):
            print("keys and their defaults:\n" + dump(cls()))
        sys.exit(0)
    return load(cls, *parse_overrides(argv))


def _all_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def config_key(f: dataclasses.Field) -> str:
    """The key a field has in YAML: its name, or `metadata["key"]` where the name is a Python
    keyword (e.g. `init.from`)."""
    return f.metadata.get("key", f.name)


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {config_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Any, path: Path) -> None:
    """Write the resolved config; it loads back (`load(cls, path)`) to an equal object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump(cfg))


# --- sections shared by the commands ----------------------------------------------------------

@dataclasses.dataclass
class SeedConfig:
    """Separate seeds, so runs can share an initialisation and differ in data order, or the reverse."""

    init: int = 0  # model weights
    data: int = 0  # order of the training windows


@dataclasses.dataclass
class DataConfig:
    dir: str = "data/shakespeare"  # a directory written by prepare.py
    val_windows: int = 64  # fixed validation windows, spread evenly over the val split (0: all)
    eval_batch_size: int = 8

    def __post_init__(self):
        if self.val_windows < 0 or self.eval_batch_size < 1:
            raise ConfigError("data.val_windows must be >= 0 and data.eval_batch_size >= 1")
