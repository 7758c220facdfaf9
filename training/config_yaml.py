"""Read a YAML config file strictly: every problem is one ``ConfigError`` line naming the file.

``read_yaml(path)`` returns the parsed mapping (``{}`` for an empty file). It refuses, naming
``path``: a missing file, a directory, an unreadable file, bytes that are not UTF-8, text that
is not YAML, a top level that is not a mapping, a key that is not a string (``? `` alone, ``1:``,
``null:``), and a key written twice in one mapping (plain ``yaml.safe_load`` keeps the last one
silently; here the error names the key and both lines).
"""
from __future__ import annotations

import yaml

from training.config_validate import ConfigError

__all__ = ["read_yaml", "loads_strict"]


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicated keys in a mapping."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges are not duplicates
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key (a list): the base constructor reports it
            continue
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} on line {line} is not a name", key_node.start_mark)
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicated key '{key}' on line {line} (first on line {first})",
                key_node.start_mark)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _mapping_without_duplicates)


def _one_line(exc: yaml.YAMLError) -> str:
    """The YAML error's problem and where it is, on one line."""
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if problem.startswith(("duplicated key", "key ")):
        where = ""  # the problem already names the lines
    return f"{problem}{where}"


def loads_strict(text: str):
    """``yaml.safe_load`` that refuses duplicated keys (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass


def read_yaml(path: str) -> dict:
    """The mapping in YAML file ``path``; ``ConfigError`` naming ``path`` for any problem."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{path}' is a directory, not a YAML file") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise ConfigError(f"config file {path!r} cannot be read: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x} "
                          f"on line {line})") from None
    try:
        raw = loads_strict(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {_one_line(exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got "
                          f"{type(raw).__name__}")
    return raw
