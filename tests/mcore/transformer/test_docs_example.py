"""The custom-architecture example of docs/transformer.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path


import mindspore  # noqa: E402,F401  (the example needs it)

DOC = Path(__file__).resolve().parents[3] / "docs" / "transformer.md"


def test_custom_architecture_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "no python block in docs/transformer.md"
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "docs_example"})
