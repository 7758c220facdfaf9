"""Run Python code in a fresh interpreter with the repository importable (for checks that need
their own process: MindSpore's execution mode and device are process-global)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.multirank import REPO_ROOT


def run_python(code: str, cwd: Path = REPO_ROOT, timeout: float = 240,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` with ``REPO_ROOT`` first on ``sys.path``; output captured as text;
    ``env``: the environment (default: this process's)."""
    prelude = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_check_passes(module: str, function: str, *args, marker: str, timeout: float = 180) -> None:
    """Run ``module.function(*args)`` (reprs as literals) in a fresh interpreter; fail unless it
    exits 0 and prints ``marker`` (the check's last line), showing the output's tail if not."""
    call = f"from {module} import {function}; {function}({', '.join(map(repr, args))})"
    res = run_python(call, timeout=timeout)
    assert res.returncode == 0 and marker in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
