"""A run's configuration built from the method's preset, YAML and the command line, and resolved to its method.

The order, later wins: the method's preset (``sonocl/methods/``, the original paper or reference code defaults,
``docs/methods.md``) → ``--config YAML`` → the command-line overrides → ``--set key=value``. The resolved
configuration (`sonocl.methods.config.PretrainConfig`) is written to ``RUN/config.yaml`` and into every checkpoint.
A bad value is a `ConfigError` naming its key when the configuration is loaded, before anything is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from sonocl.errors import ConfigError
from sonocl.files import atomic_write_text
from sonocl.methods import Method, get_method, method_names, registry
from sonocl.methods.config import Options, PretrainConfig, plain
from sonocl.options import load_yaml_text

# --------------------------------------------------------------------------------------------- presets


def preset(method: str) -> PretrainConfig:
    """The original defaults of ``method``: its module's preset (``sonocl/methods/<method>.py``)."""
    return get_method(method).preset()


def resolve(cfg: PretrainConfig) -> Method:
    """The method ``cfg`` names, checked against its options: what a run resolves once and passes along."""
    method = get_method(cfg.method)
    if type(cfg.options) is not method.options:
        raise ConfigError(f"options are {type(cfg.options).__name__}, not {cfg.method}'s {method.options.__name__}")
    return method


# --------------------------------------------------------------------------------------- dict / YAML


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as the type ``hint`` of field ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, key + ".")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # any length; one value is a list of one
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(values))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """``cls(**data)`` with every value coerced to its field's type; errors name the dotted key."""
    hints = _field_types(cls)
    if cls is PretrainConfig and isinstance(data.get("options", {}), dict):
        method = data.get("method")
        if method in method_names():  # the options type is the method's; an unknown method is reported below
            hints["options"] = get_method(method).options
    unknown = sorted(set(data) - set(hints))
    if unknown:
        owners = _option_owners(unknown) if issubclass(cls, Options) else ""
        raise ConfigError(
            f"unknown configuration key(s) {', '.join(prefix + u for u in unknown)}{owners}; "
            f"valid keys here: {', '.join(prefix + k for k in hints)}"
        )
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as error:
        raise ConfigError(f"{prefix[:-1]}: {error}" if prefix else str(error)) from None


def _option_owners(names: list[str]) -> str:
    """`` (max_dist is an option of meta-uscl)`` for option names that other methods have."""
    owners = {name: [m.name for m in registry().values() if name in m.option_names()] for name in names}
    said = [f"{name} is an option of {', '.join(methods)}" for name, methods in owners.items() if methods]
    return f" ({'; '.join(said)})" if said else ""


def merge(cfg: PretrainConfig, data: dict[str, Any]) -> PretrainConfig:
    """``cfg`` updated by the (nested, possibly partial) mapping ``data``; unknown keys are an error.

    When ``data`` changes the method, the options start from the new method's defaults (another method's options
    do not carry over)."""
    base = cfg.to_dict()
    method = data.get("method", cfg.method)
    if method != cfg.method and method in method_names():
        base["options"] = plain(dataclasses.asdict(get_method(method).options()))
    merged = _from_dict(PretrainConfig, _deep_update(base, data))
    resolve(merged)
    return merged


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> PretrainConfig:
    """A full configuration from a mapping; missing keys take the preset of ``data['method']``."""
    if "method" not in data:
        raise ConfigError(f"no method key; set one of {', '.join(method_names())}")
    return merge(preset(data["method"]), data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the configuration ({reason})") from error
    data = load_yaml_text(text, str(path)) or {}  # refuses aliases: a YAML bomb never expands
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping of keys to values")
    return data


def load_run_config(path: str | Path) -> PretrainConfig:
    """A run's saved ``config.yaml`` (`save_yaml`) as its configuration: what ``--resume``, ``sonocl export`` and
    ``sonocl report`` read. A file that cannot be read, or is not a valid configuration, is one `ConfigError` line
    naming it, the key and the fix."""
    path = Path(path)
    data = load_yaml(path)  # its errors name the file
    try:
        method = data.get("method")
        if method is None:
            raise ConfigError(f"no method key; set one of {', '.join(method_names())}")
        if not isinstance(method, str):
            raise ConfigError(f"method: expected a string, got {method!r}")
        return merge(preset(method), data)
    except ConfigError as error:
        raise ConfigError(
            f"{path}: {error}; this run's configuration is damaged: correct that key (each of its checkpoints "
            "keeps the configuration under 'config')"
        ) from None


def parse_assignment(text: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}``, the value parsed as YAML (``0.1``, ``true``, ``[0.5, 1]``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.weight_decay=1e-5")
    key, raw = text.split("=", 1)
    value = load_yaml_text(raw, f"--set {key.strip()}") if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def save_yaml(cfg: PretrainConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), cfg.to_yaml())
