"""Frozen dataclass configs from YAML plus dotted `key=value` overrides, with errors that name the key.

A config class is a frozen dataclass whose fields are scalars (`int`, `float`, `bool`, `str`), `Literal`
choices, `Optional[...]`, tuples, or nested config dataclasses. Each field documents itself once through
`doc(...)`; that text is the `--help`. Ranges are declared next to it (`ge`, `gt`, `le`, `lt`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

# Config keys that were renamed or moved: old dotted key -> new one, both relative to a stage's config. A config
# still giving an old key is told its new name; under a pipeline (`rlhf.data.max_eval_prompts`) the stage's
# prefix is kept.
MOVED_KEYS: dict[str, str] = {
    "data.max_eval_prompts": "eval.num_generate",
    # Every role's placement is one `placement` section (config.base.PlacementConfig).
    **{f"{role}.{old}": f"{role}.placement.{new}"
       for role, suffix in (("learner", "rank"), ("generator", "engine"), ("reference", "actor"), ("reward", "actor"))
       for old, new in ((f"cpus_per_{suffix}", "cpus"), (f"gpus_per_{suffix}", "gpus"),
                        (f"resources_per_{suffix}", "resources"))},
    "learner.placement_strategy": "learner.placement.strategy",
}


def _moved_key(key: str) -> str | None:
    """The new name of `key` when its tail (at a dot boundary) is an old key of MOVED_KEYS."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.endswith("." + old):
            return key[:len(key) - len(old)] + new
    return None


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what would be valid."""


def doc(help: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A dataclass field with its help text and optional numeric bounds."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected a number, got {value!r}")


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


SCALAR_CONVERTERS: dict[type, typing.Callable[[Any, str], Any]] = {
    bool: _to_bool, int: _to_int, float: _to_float, str: _to_str,
}


def _convert_union(value: Any, tp: Any, key: str) -> Any:
    """`value` as the first member of the union `tp` that accepts it (None only where `tp` allows it)."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    members = [arg for arg in args if arg is not type(None)]
    if len(members) == 1 and dataclasses.is_dataclass(members[0]) and isinstance(value, dict):
        return _convert(value, members[0], key)  # an optional section: its own error names the bad field
    for arg in members:
        try:
            return _convert(value, arg, key)
        except ConfigError:
            continue  # try the next member; the error below names them all
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _convert_tuple(value: Any, tp: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    item_tp = get_args(tp)[0]
    return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))


def _convert_section(value: Any, tp: type, key: str) -> Any:
    """A nested config dataclass: kept as is, or built from a mapping of its fields."""
    if isinstance(value, tp):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
    return _build(tp, value, key + ".")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a type annotation."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, tp, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return value
    if origin is tuple:
        return _convert_tuple(value, tp, key)
    if dataclasses.is_dataclass(tp):
        return _convert_section(value, tp, key)
    if isinstance(tp, type) and tp in SCALAR_CONVERTERS:
        return SCALAR_CONVERTERS[tp](value, key)
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
              ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<"))
    for name, ok, symbol in checks:
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ConfigError(f"{key}: must be {symbol} {bound}, got {value!r}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    for name in unknown:
        moved = _moved_key(prefix + name)
        if moved is not None:
            raise ConfigError(f"`{prefix}{name}` is now `{moved}`")
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        default = fields[name].default_factory
        if isinstance(value, dict) and dataclasses.is_dataclass(hints[name]) and default is not dataclasses.MISSING:
            value = _deep_merge(to_dict(default()), value)  # keys given override the section's own defaults
        converted = _convert(value, hints[name], key)
        _check_bounds(converted, fields[name].metadata, key)
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        raise ConfigError(f"missing required config key(s): {', '.join(prefix + m for m in missing)}") from err


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`learner.lr=3e-4` -> (["learner", "lr"], 3e-4). The value is read as YAML (`null`, `true`, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. learner.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return key.split("."), value


def _merge(base: dict, parts: list[str], value: Any) -> None:
    node = base
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `cls` from a YAML file (optional) and dotted overrides applied on top, validating everything."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for text in overrides:
        parts, value = parse_override(text)
        _merge(data, parts, value)
    try:
        return _build(cls, data)
    except ConfigError as err:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{err}{where}") from None


def to_dict(cfg: Any) -> dict:
    """A plain dict (tuples as lists) that `load_config` reads back to an equal config."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict (`to_dict`, or a loaded config.yaml) as dotted keys -> values; lists and empty
    sections stay whole values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def config_help(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Every key with its type, default and help text: the CLI's `--help`. `defaults`: the section's own
    default instance when its field builds one (e.g. a scorer's placement defaults to 0.5 CPUs)."""
    lines = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if defaults is not None:
                section = getattr(defaults, f.name)
            lines.append(f"\n{prefix}{f.name}:  {f.metadata.get('help', '')}".rstrip())
            lines.append(config_help(tp, prefix + f.name + ".", section))
            continue
        if defaults is not None:
            value = getattr(defaults, f.name)
            default = json.dumps(list(value) if isinstance(value, tuple) else value)
        elif f.default is not dataclasses.MISSING:
            default = json.dumps(f.default) if not isinstance(f.default, tuple) else json.dumps(list(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(to_dict(f.default_factory()))
        else:
            default = "(required)"
        bounds = ", ".join(f"{symbol} {f.metadata[name]}" for name, symbol in
                           (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if f.metadata.get(name) is not None)
        lines.append(f"  {prefix}{f.name} = {default}   [{_describe(tp)}{'; ' + bounds if bounds else ''}]")
        lines.append(f"      {f.metadata.get('help', '')}")
    return "\n".join(lines)
