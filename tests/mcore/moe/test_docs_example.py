"""The example at the top of docs/moe.md runs as written and gives the shapes it states."""
from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[3] / "docs" / "moe.md"


def test_moe_doc_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "no python block in docs/moe.md"
    scope = {"__name__": "docs_example"}
    exec(compile(blocks[0], str(DOC), "exec"), scope)
    assert scope["y"].shape == (2, 5, 16)
    assert scope["aux"].shape == (3,) and float(scope["aux"][0].asnumpy()) > 0
    assert scope["counts"].shape == (4,) and int(scope["counts"].asnumpy().sum()) == 2 * 5 * 2
