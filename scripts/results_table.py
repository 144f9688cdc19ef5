"""The table of docs/results.md: every claim of the paper, at the paper's settings and at quick
scale, from the numbers files of two ``agop reproduce`` runs (``DIR/summary.json``) and,
optionally, of ``agop report`` pages (``report.json`` beside ``report.html``: e.g. the MLP with the
authors' preset).

    python scripts/results_table.py PAPER/summary.json QUICK/summary.json [--extra EXTRA/report.json]

Claims are matched by figure, statement and run (a cross-check's run, ``rfm-<ds>-exact`` or
``mlp-<ds>-authors``, with the quick run of its dataset); a verdict is "holds" when the paper-scale
number meets the report's criterion, "does not hold" when it does not, "n/a" when undefined.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _base(label: str) -> str:
    """A run's label without the suffix of a cross-check: "Deep RFM, MNIST (rfm-mnist-exact)"
    and the quick run "Deep RFM, MNIST (rfm-mnist)" make the same claim."""
    for suffix in ("-exact)", "-authors)"):
        if label.endswith(suffix):
            return label[: -len(suffix)] + ")"
    return label


def _verdict(v) -> str:
    return {True: "holds", False: "**does not hold**"}.get(v, "n/a")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(paper: dict, quick: dict, extra: list[dict]) -> str:
    """Markdown: one row per paper-scale claim, with its quick-scale counterpart."""
    def key(c):
        return c["figure"], c["paper"], _base(c["run"])

    quick_by = {}
    for c in quick.get("claims", []):
        quick_by.setdefault(key(c), c)
    lines = ["| figure | the paper says | run (scale; solver) | at the paper's settings | "
             "verdict | at quick scale | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for source in [paper, *extra]:
        for c in source.get("claims", []):
            q = quick_by.get(key(c))
            mark = c.get("scale", "") + (f"; {c['solver']}" if c.get("solver") else "")
            lines.append(" | ".join([
                f"| {c['figure']}", _cell(c["paper"]), f"{c['run']} ({mark})",
                _cell(c["measured"]), _verdict(c["consistent"]),
                _cell(q["measured"]) if q else "—", (_verdict(q["consistent"]) if q else "—")
                + " |"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paper")
    p.add_argument("quick")
    p.add_argument("--extra", action="append", default=[])
    a = p.parse_args()
    print(table(_load(a.paper), _load(a.quick), [_load(e) for e in a.extra]))


if __name__ == "__main__":
    main()
