"""The README's Python example runs as written (on digits: no files needed)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["M"].shape == (64, 64)
    assert len(namespace["per_layer"]) == 4  # 3 hidden layers + the readout
    assert abs(namespace["acc"].compute()["nc1"] - namespace["collapse"].measure(
        namespace["H"], namespace["ds"].y)["nc1"]) < 1e-10 * namespace["acc"].compute()["nc1"]
