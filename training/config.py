"""One YAML schema for a training run, loaded into dataclasses, with dotted command-line overrides.

    cfg = load_config("configs/tiny_llama_demo.yaml", ["parallel.tp=2", "training.train_iters=50"],
                      world_size=4)
    cfg.parallel.dp                # 2, derived: world / (tp * cp * pp)
    cfg.training.grad_accum_steps  # derived: global_batch / (micro_batch * dp)

The file has one mapping per section (``model``, ``parallel``, ``data``, ``training``,
``optimizer``, ``checkpoint``, ``logging``, ``lora``); a missing key keeps its default. An
override is
``section.key=value`` where ``value`` is read with ``yaml.safe_load`` (``2``, ``true``, ``null``,
``3e-4`` all do what they look like). Every problem -- an unknown key, a value of the wrong type,
sizes that do not divide, a key written twice, a file that is a directory or not UTF-8 --
raises ``ConfigError`` with one line that names the key or file, before any work starts. Each field's documentation lives in its ``doc`` metadata, so ``schema_rows()`` (and
the table in docs/training_infra.md) is generated from the code.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Literal

import yaml

from training.config_cli import parse_cli
from training.config_sections import (CheckpointConfig, Config, DataConfig, LoggingConfig,
                                      LoRAConfig, MLASection, ModelConfig, MoESection,
                                      MTPSection, OptimizerConfig, ParallelConfig, SECTIONS,
                                      SFTConfig, TrainingConfig)
from training.config_validate import ConfigError, validate
from training.config_yaml import loads_strict, read_yaml

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "parse_cli", "schema_rows",
           "schema_markdown", "SECTIONS", "MoESection", "MTPSection", "MLASection", "ModelConfig",
           "ParallelConfig", "DataConfig", "TrainingConfig", "OptimizerConfig", "CheckpointConfig",
           "LoggingConfig", "SFTConfig", "LoRAConfig"]


# ----------------------------------------------------------------------------- schema helpers

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaves(prefix: str, cls):
    """``(dotted key, field, annotation)`` of every leaf field of ``cls`` (nested dataclass
    fields, e.g. ``model.moe``, are expanded)."""
    hints = _hints(cls)
    for n, f in _fields(cls).items():
        if dataclasses.is_dataclass(hints[n]):
            yield from _leaves(f"{prefix}.{n}", hints[n])
        else:
            yield f"{prefix}.{n}", f, hints[n]


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``'training.train_iters'``, ``'model.moe.top_k'``."""
    return [k for s, cls in SECTIONS.items() for k, _, _ in _leaves(s, cls)]


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    return tp.__name__


def schema_rows() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, doc)`` for every field; the docs table is generated from this."""
    rows = []
    for s, cls in SECTIONS.items():
        for key, f, tp in _leaves(s, cls):
            default = "null" if f.default is None else yaml.safe_dump(f.default).splitlines()[0]
            rows.append((key, _type_name(tp), default, f.metadata["doc"]))
    return rows


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys() + list(SECTIONS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}")


def _coerce(key: str, value: Any, tp) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float). Raise naming key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(key, value, tp)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                              f"{value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if args:  # X | Y | None: the first alternative that accepts the value
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:
            try:
                return _coerce(key, value, alternative)
            except ConfigError:
                pass
        try:
            return _coerce(key, value, inner[-1])
        except ConfigError:
            if len(inner) == 1:
                raise
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} "
                          f"{value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2 ** 63:
                raise ConfigError(f"{key}: {value} is out of range for an int")
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite float, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


# ----------------------------------------------------------------------------- loading

def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = loads_strict(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot parse value {raw!r}") from None
    return key, value


def _build(where: str, body: Any, cls):
    """``cls(**body)`` with every value checked (``_coerce``) and unknown keys refused; ``where``
    names the mapping (``model``, ``model.moe``) in errors."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ConfigError(f"key '{where}' must be a mapping of fields, got {type(body).__name__}")
    hints, fields = _hints(cls), _fields(cls)
    kwargs = {}
    for k, v in body.items():
        key = f"{where}.{k}"
        if k not in fields:
            raise _unknown(key)
        kwargs[k] = _coerce(key, v, hints[k])
    return cls(**kwargs)


def _set(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 3 and parts[0] in SECTIONS and key in all_keys():  # e.g. model.moe.top_k
        section = raw.get(parts[0])
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, dict):
            raise ConfigError(f"key '{parts[0]}' must be a mapping of fields")
        if section.get(parts[1]) is None:
            section[parts[1]] = {}
        if not isinstance(section[parts[1]], dict):
            raise ConfigError(f"key '{parts[0]}.{parts[1]}' must be a mapping of fields")
        section[parts[1]][parts[2]] = value
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        if parts[0] in SECTIONS and len(parts) == 1:
            first = next(iter(_fields(SECTIONS[key])))
            raise ConfigError(f"key '{key}' is a section; set one field, e.g. '{key}.{first}=...'")
        raise _unknown(key)
    if raw.get(parts[0]) is None:  # absent, or an empty "section:" line in the YAML
        raw[parts[0]] = {}
    if not isinstance(raw[parts[0]], dict):
        raise ConfigError(f"key '{parts[0]}' must be a mapping of fields")
    raw[parts[0]][parts[1]] = value


def config_from_dict(raw: dict, world_size: int = 1) -> Config:
    """Build and validate a ``Config`` from a nested dict (the parsed YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, body in raw.items():
        if name not in SECTIONS:
            raise _unknown(str(name))
        sections[name] = _build(str(name), body, SECTIONS[name])
    cfg = Config(**sections)
    validate(cfg, world_size)
    return cfg


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int = 1) -> Config:
    """Read YAML ``path`` (``None``: defaults only), apply ``key=value`` overrides, validate.

    ``world_size`` is the number of ranks of the launch; ``parallel.dp`` and
    ``training.grad_accum_steps`` are derived from it.
    """
    raw = read_yaml(path) if path is not None else {}
    for item in overrides:
        key, value = _parse_override(item)
        _set(raw, key, value)
    return config_from_dict(raw, world_size)


def schema_markdown() -> str:
    """The schema as a Markdown table (docs/training_infra.md embeds it verbatim)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, doc in schema_rows():
        lines.append(f"| `{key}` | {typ.replace('|', chr(92) + '|')} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m training.config ...``: see ``training.config_cli.main``."""
    from training.config_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
