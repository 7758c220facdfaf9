"""The command-line side of ``training.config``: ``parse_cli`` (an entry point's arguments ->
config path and overrides) and ``main`` (``python -m training.config``: print the resolved config
or the schema table)."""
from __future__ import annotations

from training.config_validate import ConfigError


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split an entry point's arguments into ``(config_path, overrides)``.

    Accepts ``--config FILE`` / ``--config=FILE`` and ``section.key=value`` items, as in
    ``python training/pretrain.py --config configs/x.yaml parallel.tp=2``; anything else is a
    ``ConfigError`` naming the argument.
    """
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("argument '--config' needs a file name")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("-") or "=" not in arg:
            raise ConfigError(f"unknown argument '{arg}' (expected --config FILE or section.key=value)")
        else:
            overrides.append(arg)
        i += 1
    return path, overrides


def main(argv: list[str] | None = None) -> int:
    """``python -m training.config [--world-size N] [--schema] [FILE] [key=value ...]``: print the
    resolved config as YAML (or the schema table); exit 2 with the one-line error if invalid."""
    import argparse
    import sys

    import yaml

    from training.config import load_config, schema_markdown
    ap = argparse.ArgumentParser(prog="python -m training.config")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--schema", action="store_true", help="print the schema as a Markdown table")
    ap.add_argument("args", nargs="*", help="[config.yaml] [section.key=value ...]")
    ns = ap.parse_args(argv)
    if ns.schema:
        print(schema_markdown(), end="")
        return 0
    path = ns.args[0] if ns.args and "=" not in ns.args[0] else None
    try:
        cfg = load_config(path, ns.args[1:] if path else ns.args, world_size=ns.world_size)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0
