"""Typed dataclass configs: YAML files, `key=value` overrides, strict unknown-key errors.

Any dataclass is a config. A field whose type is a dataclass (or `Optional` of one) is a nested
section: in YAML a mapping, in overrides a dotted key (`train.lr=3e-4`, `model.preset=tiny`).
Values are parsed with `yaml.safe_load` semantics and then checked and coerced against the field
type (int, float, bool, str, Optional/Union, Literal, tuple/list, dict, Enum). Mistakes raise
`ConfigError` with a one-line message naming the key, e.g.

    unknown config key 'train.lrr' (did you mean 'lr'?); valid keys in 'train': batch_size, lr
    bad value for 'train.lr': 'fast' (expected float)

Variants of one job live in one base file plus short override files. A top-level `defaults:`
key names a file (a path relative to the including file) or a list of them; they are loaded
first (recursively, each with its own `defaults:`), in list order, then the file's own keys are
deep-merged over them, then the command-line overrides apply. Deep merge: mappings merge key by
key, anything else (scalars, lists, null) replaces. Example:

    # configs/rl_nvila_qwen2.5-3b.yaml
    defaults: rl_nvila_base.yaml
    name: rl_nvila_qwen2.5-3b
    sft:
      model:
        name: nvila-qwen2.5-3b

A missing included file or an include cycle is a ConfigError naming the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_MISSING = object()  # a field without a default


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override's right-hand side, kept as text until its field type is known."""

    text: str


def _section_type(tp: Any) -> type | None:
    """The dataclass type if `tp` is a dataclass or Optional[dataclass], else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        dcs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return dcs[0] if len(dcs) == 1 else None
    return None


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of an init field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown(key: str, prefix: str, valid: Sequence[str]) -> ConfigError:
    where = f"in '{prefix[:-1]}'" if prefix else "at top level"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(
        f"unknown config key '{prefix + key}'{hint}; valid keys {where}: {', '.join(valid)}"
    )


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp` (converting where lossless); raise ConfigError if not."""
    bad = ConfigError(f"bad value for '{key}': {value!r} (expected {_type_name(tp)})")
    if isinstance(value, _Raw):  # an override: str fields keep the text verbatim
        if value.text.strip() in ("null", "~", "None") and _allows_none(tp):
            return None
        parsed = value.text if _is_str_like(tp) else yaml.safe_load(value.text)
        return _coerce(parsed, tp, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if _section_type(tp) is tp:
        if isinstance(value, Mapping):
            return _build(tp, value, key + ".")
        raise ConfigError(f"'{key}' is a section: expected a mapping, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"bad value for '{key}': {value!r} (expected one of {list(args)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.value, member.name):
                return member
        raise ConfigError(
            f"bad value for '{key}': {value!r} (expected one of {[m.value for m in tp]})"
        )
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise bad
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            elem = args[0] if args else Any
            items = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list or tp is list else tuple(items)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, dict):
            raise bad
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _allows_none(tp: Any) -> bool:
    return tp is Any or type(None) in typing.get_args(tp)


def _is_str_like(tp: Any) -> bool:
    return tp is str or (_allows_none(tp) and str in typing.get_args(tp))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _build(cls: type[T], data: Any, prefix: str, base: Any = None) -> T:
    """Instantiate dataclass `cls` from a (raw) mapping, recursing into sections.

    base: an instance whose values fill the keys `data` leaves out (a section's default);
    without it the class defaults do.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix[:-1]}' is a section: expected a mapping, got {data!r}")
    fields = _fields(cls)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(str(key), prefix, list(fields))
        tp, section = fields[key], _section_type(fields[key])
        if section is not None and isinstance(value, Mapping):
            sub_base = getattr(base, key) if base is not None else _field_default(defaults[key])
            sub_base = sub_base if isinstance(sub_base, section) else None
            kwargs[key] = _build(section, value, f"{prefix}{key}.", sub_base)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ConfigError(f"cannot build '{prefix[:-1] or cls.__name__}': {e}") from None
    except ValueError as e:  # __post_init__ validation
        raise ConfigError(f"invalid '{prefix[:-1] or cls.__name__}': {e}") from None


def _set_override(cls: type, data: dict, item: str) -> None:
    """Apply one `a.b.c=value` override to the raw nested mapping `data` (in place)."""
    if "=" not in item:
        raise ConfigError(f"bad override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    dotted, text = item.split("=", 1)
    *path, last = dotted.strip().split(".")
    prefix = ""
    for part in path:
        fields = _fields(cls)
        if part not in fields:
            raise _unknown(part, prefix, list(fields))
        section = _section_type(fields[part])
        if section is None:
            raise ConfigError(f"'{prefix + part}' is not a section; cannot set '{dotted}'")
        if not isinstance(data.get(part), dict):
            data[part] = {}
        data, cls, prefix = data[part], section, f"{prefix}{part}."
    fields = _fields(cls)
    if last not in fields:
        raise _unknown(last, prefix, list(fields))
    data[last] = _Raw(text.strip())


def _read_yaml(path: str) -> dict:
    """The mapping held by the YAML file at `path` ({} for an empty file)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"bad YAML in {path!r}: {e}".replace("\n", " ")) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping, got {data!r}")
    return data


def _deep_merge(base: dict, over: Mapping) -> dict:
    """`base` with `over` merged in: mappings merge key by key, other values replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _load_file(path: str, chain: tuple[str, ...] = ()) -> dict:
    """The raw mapping of the YAML file at `path` with its `defaults:` includes resolved.

    chain: the files that (transitively) include `path`, outermost first, for cycle errors.
    """
    data = _read_yaml(path)
    includes = data.pop("defaults", None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(
            f"bad 'defaults' in {path!r}: {includes!r} (expected a path or a list of paths)"
        )
    here = os.path.realpath(path)
    merged: dict = {}
    for rel in includes:
        inc = os.path.join(os.path.dirname(path), rel)
        if os.path.realpath(inc) in (*chain, here):
            cycle = " -> ".join([*chain, here, os.path.realpath(inc)])
            raise ConfigError(f"config include cycle in {path!r}: {cycle}")
        if not os.path.isfile(inc):
            raise ConfigError(f"config file {path!r} includes missing file {inc!r}")
        merged = _deep_merge(merged, _load_file(inc, (*chain, here)))
    return _deep_merge(merged, data)


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> T:
    """Build config dataclass `cls` from the YAML file at `path` (optional) plus overrides.

    The file's `defaults:` includes (see the module docstring) are merged first, then its own
    keys. overrides: strings "dotted.key=value"; applied in order after the file, later wins.
    Raises ConfigError (a ValueError) for unknown keys, bad values, unreadable files, missing
    includes and include cycles.
    """
    data: Any = {} if path is None else _load_file(os.fspath(path))
    for item in overrides:
        _set_override(cls, data, item)
    return _build(cls, data, "")


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-safe data (dicts, lists, scalars) for a config dataclass, recursively."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)
