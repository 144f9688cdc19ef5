"""agop: average gradient outer product as a mechanism for deep neural collapse.

Executable companion to Beaglehole, Súkeník, Mondelli, Belkin, *Average gradient outer product
as a mechanism for deep neural collapse*. Notation used everywhere: N samples (rows), K classes,
D features; ``H`` features (N × D), ``y`` integer labels in 0..K−1, ``M`` an AGOP (D × D),
``L`` a kernel bandwidth, ``l`` a layer index.

The public names below are imported lazily so that ``import agop`` and ``agop --version`` stay
fast; ``agop.DeepRFM`` and friends load their module on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "agop.datasets",
    "Dataset": "agop.datasets",
    "measure": "agop.collapse",
    "nc1": "agop.collapse",
    "nc2": "agop.collapse",
    "CollapseAccumulator": "agop.collapse",
    "LaplaceKernel": "agop.kernels",
    "GaussianKernel": "agop.kernels",
    "kernel_ridge": "agop.solve",
    "kernel_agop": "agop.agop",
    "model_agop": "agop.agop",
    "psd_power": "agop.linalg",
    "DeepRFM": "agop.models.deep_rfm",
    "run_rfm": "agop.experiments.rfm",
    "MLP": "agop.models.mlp",
    "Trainer": "agop.models.mlp",
    "train": "agop.models.mlp",
    "probe": "agop.models.mlp",
    "layer_agops": "agop.models.layers",
    "layer_collapse": "agop.models.layers",
    "nfa": "agop.models.layers",
    "run_mlp": "agop.experiments.mlp",
    "run_theory": "agop.experiments.theory",
    "reproduce": "agop.report",
    "build_report": "agop.report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'agop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
