"""``agop reproduce`` and ``agop report``: the paper's figures and headline numbers in one page.

Three modules, imports going one way (plan → page → numbers):

- :mod:`agop.report.plan`: :func:`reproduce` runs the experiments of the paper at a chosen scale
  (:data:`SCALES`; Deep RFM and the MLP study on every dataset found, and the theory checks),
  keeping each run folder under ``DIR/runs/`` so that an interrupted call continues where it
  stopped, then calls :func:`build_report`.
- :mod:`agop.report.page`: :func:`build_report` reads run folders (``config.json`` "kind":
  ``rfm``, ``mlp`` or ``theory``), draws the cross-dataset figures and writes one
  self-contained HTML page from ``templates/report.html.j2`` (figures as base64 data URIs,
  ``templates/report.css`` inlined, no scripts, nothing fetched) plus a JSON file with the
  same numbers.
- :mod:`agop.report.numbers`: :func:`load_run`, the headline numbers of each run (from the
  experiments' own ``headline`` functions) and the :class:`Claim` rows beside the paper.

The names of :mod:`~agop.report.page` and :mod:`~agop.report.numbers` load their module on
first use (as in :mod:`agop`), so that the CLI reads :data:`SCALES` without importing torch.
``agop.report.plan`` is the function :func:`plan`; its module is reached with
``from agop.report.plan import ...``.
"""

from __future__ import annotations

import importlib

# the plan imports nothing heavy; importing it here also makes ``agop.report.plan`` the function
from agop.report.plan import PAPER_DATASETS, SCALES, Experiment, plan, reproduce

_EXPORTS = {
    "build_report": "agop.report.page",
    "KINDS": "agop.report.numbers",
    "Run": "agop.report.numbers",
    "load_run": "agop.report.numbers",
    "Claim": "agop.report.numbers",
    "rfm_claims": "agop.report.numbers",
    "mlp_claims": "agop.report.numbers",
    "theory_claims": "agop.report.numbers",
    "theory_numbers": "agop.report.numbers",
}

__all__ = ["PAPER_DATASETS", "SCALES", "Experiment", "plan", "reproduce", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'agop.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
