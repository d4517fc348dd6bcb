"""The README's Python snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_projector_snippet_runs_as_written():
    (snippet,) = [block for block in python_blocks() if "from ct2x.projector import" in block]
    namespace: dict = {}
    exec(compile(snippet, "README.md (projector snippet)", "exec"), namespace)
    assert tuple(namespace["images"].shape) == (1, 2, 3, 128, 128)
    assert tuple(namespace["adjoint"].shape) == (1, 3, 64, 64, 64)
    assert namespace["images"].amax() > 0 and namespace["films"].shape == namespace["images"].shape
