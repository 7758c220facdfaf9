"""The benchmark gate: save the gated ratios of a pytest-benchmark run as a baseline, and fail a
later run whose ratios regressed beyond a threshold.

    .venv/bin/python -m pytest benchmarks/bench_train_step.py --benchmark-enable \\
        --benchmark-json=run.json
    python benchmarks/gate.py save run.json benchmarks/baseline.json
    python benchmarks/gate.py check new.json benchmarks/baseline.json --threshold 0.15

Only ratios are gated, each measured against a reference from the same run (PyTorch eager on
the same model, the one-process layer beside its tp=2 split, ...), so a busy machine, which
slows both sides, does not fail the gate while a real regression does. A benchmark declares a
gated value with ``gate_value(benchmark, name, value, better)``; it lands in the record's
``extra_info["gate"][name] = {"value": float, "better": "higher" | "lower"}`` of the JSON.

``check`` compares every metric of the baseline: a ``higher``-is-better value fails below
``baseline * (1 - threshold)``, a ``lower``-is-better one above ``baseline * (1 + threshold)``.
A baseline metric missing from the run fails too (a skipped benchmark is not a pass), unless
``--allow-missing``. Exit status: 0 pass, 1 regression or missing metric, 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

BETTER = ("higher", "lower")
DEFAULT_THRESHOLD = 0.15


class GateInputError(ValueError):
    """A run or baseline file that cannot be read; the message names the file and the key."""


def gate_value(benchmark, name: str, value: float, better: str = "higher") -> None:
    """Declare ``value`` (a ratio to an in-run reference) as gated metric ``name`` of this
    benchmark record (``extra_info["gate"]``)."""
    if better not in BETTER:
        raise ValueError(f"gate_value(better={better!r}): expected 'higher' or 'lower'")
    benchmark.extra_info.setdefault("gate", {})[name] = {"value": float(value), "better": better}


def _metric(source: str, name: str, rec) -> dict:
    if not isinstance(rec, dict) or rec.get("better") not in BETTER:
        raise GateInputError(f"{source}: gate metric {name!r} needs 'better': 'higher' or 'lower'")
    try:
        value = float(rec["value"])
    except (KeyError, TypeError, ValueError):
        raise GateInputError(f"{source}: gate metric {name!r} has no numeric 'value'") from None
    return {"value": value, "better": rec["better"]}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise GateInputError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise GateInputError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise GateInputError(f"{path}: expected a JSON object")
    return data


def run_metrics(data: dict, source: str = "run") -> dict[str, dict]:
    """The gated metrics of a pytest-benchmark JSON document (``benchmarks[*].extra_info.gate``);
    a metric name given by two records is an error."""
    if not isinstance(data.get("benchmarks"), list):
        raise GateInputError(f"{source}: no 'benchmarks' list (is it a --benchmark-json file?)")
    out: dict[str, dict] = {}
    for bench in data["benchmarks"]:
        for name, rec in (bench.get("extra_info") or {}).get("gate", {}).items():
            if name in out:
                raise GateInputError(f"{source}: gate metric {name!r} given twice")
            out[name] = _metric(source, name, rec)
    return out


def baseline_metrics(data: dict, source: str = "baseline") -> dict[str, dict]:
    """The metrics of a baseline written by ``save`` (``{"metrics": {name: {...}}}``)."""
    if not isinstance(data.get("metrics"), dict) or not data["metrics"]:
        raise GateInputError(f"{source}: no 'metrics' (write it with 'gate.py save')")
    return {name: _metric(source, name, rec) for name, rec in data["metrics"].items()}


@dataclass(frozen=True)
class Verdict:
    """One metric's comparison; ``new`` is None when the run lacks it."""

    name: str
    base: float
    new: float | None
    better: str
    ok: bool

    def line(self) -> str:
        if self.new is None:
            return f"MISSING  {self.name}: baseline {self.base:.4g}, not in this run"
        change = self.new / self.base - 1.0 if self.base else math.inf
        return (f"{'ok' if self.ok else 'REGRESSED':<8} {self.name}: {self.new:.4g} vs baseline "
                f"{self.base:.4g} ({change:+.1%}, {self.better} is better)")


def compare(base: dict[str, dict], run: dict[str, dict], threshold: float,
            allow_missing: bool = False) -> list[Verdict]:
    """One ``Verdict`` per baseline metric (see the module docstring for the rule)."""
    if not 0.0 <= threshold < 1.0:
        raise GateInputError(f"--threshold={threshold}: expected a fraction in [0, 1)")
    verdicts = []
    for name, b in sorted(base.items()):
        r = run.get(name)
        if r is None:
            verdicts.append(Verdict(name, b["value"], None, b["better"], allow_missing))
            continue
        if b["better"] == "higher":
            ok = r["value"] >= b["value"] * (1.0 - threshold)
        else:
            ok = r["value"] <= b["value"] * (1.0 + threshold)
        verdicts.append(Verdict(name, b["value"], r["value"], b["better"], ok and math.isfinite(r["value"])))
    return verdicts


def save(run_path: Path, baseline_path: Path) -> dict[str, dict]:
    """Write the gated metrics of ``run_path`` to ``baseline_path``; returns them."""
    metrics = run_metrics(_read_json(run_path), str(run_path))
    if not metrics:
        raise GateInputError(f"{run_path}: no gated metrics (did the benchmarks run with "
                             "--benchmark-enable?)")
    data = _read_json(run_path)
    doc = {"source": str(run_path), "machine": data.get("machine_info", {}).get("cpu", {}).get("brand_raw"),
           "datetime": data.get("datetime"), "metrics": metrics}
    Path(baseline_path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return metrics


def check(run_path: Path, baseline_path: Path, threshold: float = DEFAULT_THRESHOLD,
          allow_missing: bool = False) -> list[Verdict]:
    """Compare ``run_path`` against the baseline at ``baseline_path``."""
    base = baseline_metrics(_read_json(baseline_path), str(baseline_path))
    run = run_metrics(_read_json(run_path), str(run_path))
    return compare(base, run, threshold, allow_missing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gate.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write the run's gated metrics as the baseline")
    s.add_argument("run")
    s.add_argument("baseline")
    c = sub.add_parser("check", help="fail when a ratio regressed beyond the threshold")
    c.add_argument("run")
    c.add_argument("baseline")
    c.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"allowed relative regression (default {DEFAULT_THRESHOLD})")
    c.add_argument("--allow-missing", action="store_true", help="a metric absent from the run passes")
    ns = ap.parse_args(argv)
    try:
        if ns.cmd == "save":
            metrics = save(Path(ns.run), Path(ns.baseline))
            print(f"saved {len(metrics)} gated metrics to {ns.baseline}")
            return 0
        verdicts = check(Path(ns.run), Path(ns.baseline), ns.threshold, ns.allow_missing)
    except GateInputError as exc:
        print(f"gate error: {exc}", file=sys.stderr)
        return 2
    for v in verdicts:
        print(v.line())
    failed = [v for v in verdicts if not v.ok]
    print(f"gate: {'FAIL' if failed else 'pass'} ({len(verdicts) - len(failed)}/{len(verdicts)} "
          f"within {ns.threshold:.0%})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
