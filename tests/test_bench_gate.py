"""benchmarks/gate.py: baselines from pytest-benchmark JSON, the ratio rule, the CLI's exit codes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gate import GateInputError, compare, gate_value, main, run_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeBenchmark:  # the part of pytest-benchmark's fixture gate_value uses
    def __init__(self):
        self.extra_info = {}


def run_doc(**metrics):
    """A pytest-benchmark JSON document with one record per metric ``name=(value, better)``."""
    benches = []
    for name, (value, better) in metrics.items():
        b = FakeBenchmark()
        gate_value(b, name, value, better)
        benches.append({"name": f"test_{name}", "extra_info": b.extra_info})
    return {"datetime": "2026-12-03T00:00:00", "benchmarks": benches}


def write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_gate_value_lands_in_extra_info():
    b = FakeBenchmark()
    gate_value(b, "speed", 1.25)
    gate_value(b, "rss", 0.8, "lower")
    assert b.extra_info == {"gate": {"speed": {"value": 1.25, "better": "higher"},
                                     "rss": {"value": 0.8, "better": "lower"}}}
    with pytest.raises(ValueError, match="better='up'"):
        gate_value(b, "x", 1.0, "up")


def test_threshold_rule_both_directions():
    base = run_metrics(run_doc(speed=(1.0, "higher"), rss=(2.0, "lower")))
    ok = {v.name: v.ok for v in compare(base, run_metrics(run_doc(speed=(0.91, "higher"),
                                                                  rss=(2.19, "lower"))), 0.1)}
    assert ok == {"speed": True, "rss": True}  # within 10 %
    bad = {v.name: v.ok for v in compare(base, run_metrics(run_doc(speed=(0.89, "higher"),
                                                                   rss=(2.21, "lower"))), 0.1)}
    assert bad == {"speed": False, "rss": False}  # beyond 10 %
    better = {v.name: v.ok for v in compare(base, run_metrics(run_doc(speed=(5.0, "higher"),
                                                                      rss=(0.1, "lower"))), 0.0)}
    assert better == {"speed": True, "rss": True}  # improvements always pass
    nan = compare(base, run_metrics(run_doc(speed=(float("nan"), "higher"), rss=(2.0, "lower"))), 0.1)
    assert [v.ok for v in nan] == [True, False]  # sorted: rss, speed; a NaN ratio fails


def test_missing_metric_fails_unless_allowed():
    base = run_metrics(run_doc(speed=(1.0, "higher"), tp2=(1.5, "higher")))
    run = run_metrics(run_doc(speed=(1.0, "higher")))
    verdicts = compare(base, run, 0.1)
    assert [(v.name, v.ok, v.new) for v in verdicts] == [("speed", True, 1.0), ("tp2", False, None)]
    assert "MISSING" in verdicts[1].line()
    assert all(v.ok for v in compare(base, run, 0.1, allow_missing=True))


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(GateInputError, match="no 'benchmarks' list"):
        run_metrics({"metrics": {}}, "x.json")
    doc = run_doc(speed=(1.0, "higher"))
    doc["benchmarks"].append(doc["benchmarks"][0])
    with pytest.raises(GateInputError, match="'speed' given twice"):
        run_metrics(doc)
    with pytest.raises(GateInputError, match="'speed' needs 'better'"):
        run_metrics({"benchmarks": [{"extra_info": {"gate": {"speed": {"value": 1.0}}}}]})
    with pytest.raises(GateInputError, match=r"--threshold=1.5"):
        compare({}, {}, 1.5)
    assert main(["check", write(tmp_path, "r.json", doc), str(tmp_path / "none.json")]) == 2


def test_cli_save_then_check(tmp_path, capsys):
    first = write(tmp_path, "first.json", run_doc(speed=(1.3, "higher"), rss=(1.4, "lower")))
    baseline = str(tmp_path / "baseline.json")
    assert main(["save", first, baseline]) == 0
    assert json.loads(open(baseline).read())["metrics"]["rss"] == {"value": 1.4, "better": "lower"}
    same = write(tmp_path, "same.json", run_doc(speed=(1.2, "higher"), rss=(1.5, "lower")))
    assert main(["check", same, baseline, "--threshold", "0.1"]) == 0
    worse = write(tmp_path, "worse.json", run_doc(speed=(1.0, "higher"), rss=(1.5, "lower")))
    assert main(["check", worse, baseline, "--threshold", "0.1"]) == 1
    assert "REGRESSED speed" in capsys.readouterr().out
    empty = write(tmp_path, "empty.json", {"benchmarks": [{"extra_info": {}}]})
    assert main(["save", empty, str(tmp_path / "b2.json")]) == 2


def test_runs_as_a_script(tmp_path):
    run = write(tmp_path, "r.json", run_doc(speed=(1.0, "higher")))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gate.py"), "save", run,
                          str(tmp_path / "b.json")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "saved 1 gated metrics" in out.stdout, out.stderr
