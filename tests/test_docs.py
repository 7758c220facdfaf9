"""Every code block of ``README.md`` and ``docs/*.md`` runs as written, or says why it does not.

Rules for the docs (checked here):

- every fenced block names its language; ``python`` and ``bash`` blocks are code, anything
  else (``text``, ``yaml``, ...) is not run;
- a code block runs unless the line right before its fence is ``<!-- not-run: <reason> -->``
  (multi-node commands, the full demo, the test suite itself, sketches needing several ranks);
- the python blocks of one file run in order in one fresh interpreter, from the repository
  root, sharing one namespace (a later block may use names of an earlier one);
- the bash blocks of one file run in order in one ``bash -euo pipefail``, from the repository
  root, with the virtual environment NOT on ``PATH`` (the commands must work after
  ``bash scripts/setup.sh`` alone); ``--master_port=N`` is replaced by a free port so that
  concurrent runs do not collide.

Each block prints a marker before it runs; a test fails unless every runnable block of its file
printed its marker and the process exited 0, naming the file and line of the failing block.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.multirank import REPO_ROOT, free_port

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
CODE = ("python", "bash")
FENCE = re.compile(r"^(\s*)```(.*)$")
NOT_RUN = re.compile(r"^\s*<!-- not-run: (\S.*\S) -->\s*$")
TIMEOUT = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file (fences may be indented, e.g. in a list)."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.name}:{i + 1}: fence is never closed")
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end]]
        marker = NOT_RUN.match(lines[i - 1]) if i else None
        out.append(Block(path, i + 1, lang, "\n".join(body) + "\n", marker and marker.group(1)))
        i = end + 1
    return out


ALL = [b for p in DOCS for b in blocks_of(p)]


def _runnable(path: Path, lang: str) -> list[Block]:
    return [b for b in ALL if b.path == path and b.lang == lang and b.not_run is None]


def _params(lang: str):
    out = []
    for path in DOCS:
        blocks = _runnable(path, lang)
        if blocks:
            marks = [pytest.mark.multirank] if any("msrun" in b.code for b in blocks) else []
            out.append(pytest.param(path, id=path.name, marks=marks))
    return out


def _check_ran(blocks: list[Block], proc: subprocess.CompletedProcess, marker: str):
    """Exit 0 and every block's marker printed; on failure, name the block that was running
    (the last one whose marker was printed)."""
    ran = re.findall(rf"^{marker} (\S+)$", proc.stdout, re.M)
    tail = proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, \
        f"block at {ran[-1] if ran else blocks[0].where} failed (exit {proc.returncode}):\n{tail}"
    missing = [b.where for b in blocks if b.where not in ran]
    assert not missing, f"blocks that did not run: {missing}\n{tail}"


def test_every_fence_names_its_language_and_every_marker_has_a_block():
    unnamed = [b.where for b in ALL if not b.lang]
    assert not unnamed, f"fenced blocks without a language (use text for non-code): {unnamed}"
    for path in DOCS:
        lines = path.read_text().splitlines()
        fences = {b.line - 1 for b in blocks_of(path)}  # 1-based line of each marker
        stray = [f"{path.name}:{n}" for n, ln in enumerate(lines, 1)
                 if re.match(r"\s*<!--.*not-run", ln)
                 and (not NOT_RUN.match(ln) or n not in fences)]
        assert not stray, ("not-run markers must be '<!-- not-run: reason -->' right before a "
                           f"fence: {stray}")
    assert any(b.not_run is None for b in ALL if b.lang in CODE)


@pytest.mark.parametrize("path", _params("python"))
def test_python_blocks_run(path):
    blocks = _runnable(path, "python")
    script = ["import sys, traceback", "ns = {'__name__': '__main__'}"]
    for b in blocks:
        script.append(f"print('@@ran {b.where}', flush=True)")
        script.append(f"exec(compile({b.code!r}, {b.where!r}, 'exec'), ns)")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GLOG_v": "3"}
    with tempfile.NamedTemporaryFile("w", suffix="_docs.py") as f:
        f.write("\n".join(script) + "\n")
        f.flush()
        proc = subprocess.run([sys.executable, f.name], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT)
    _check_ran(blocks, proc, "@@ran")


def _without_venv(env: dict) -> dict:
    venv_bins = {str(Path(sys.executable).parent), str(REPO_ROOT / ".venv" / "bin")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in venv_bins]
    env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path), "GLOG_v": "3"}


@pytest.mark.parametrize("path", _params("bash"))
def test_bash_blocks_run(path):
    blocks = _runnable(path, "bash")
    script = []
    for b in blocks:
        code = re.sub(r"--master_port=\d+", f"--master_port={free_port()}", b.code)
        script += [f"echo '@@ran {b.where}'", f"cd {str(REPO_ROOT)!r}", code]
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=REPO_ROOT,
                          env=_without_venv(dict(os.environ)), capture_output=True, text=True,
                          timeout=TIMEOUT)
    _check_ran(blocks, proc, "@@ran")
