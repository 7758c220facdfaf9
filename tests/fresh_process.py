"""Run Python code in a fresh interpreter with the repository importable (for checks that need
their own process: MindSpore's execution mode and device are process-global)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.multirank import REPO_ROOT


def run_python(code: str, cwd: Path = REPO_ROOT, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -c code`` with ``REPO_ROOT`` first on ``sys.path``; output captured as text."""
    prelude = f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
