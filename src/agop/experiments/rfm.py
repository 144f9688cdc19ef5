"""The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

Sections 5.1–5.2, Figures 2, 3, 6. The estimator is :class:`agop.models.deep_rfm.DeepRFM`,
which fits and measures nothing; this module measures what its layer iterator yields
(:class:`LayerMeter`: the collapse metrics of every stage, f_l's test accuracy, the fit
information, one metrics row per layer and stage) and owns the settings, the run folder, the
Gram snapshots and the headline numbers. The run skeleton is :mod:`agop.experiments.common`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from agop._validate import check_int, finite_positive, metric_float, to_numpy
from agop.backend import dtype_name, free_memory, resolve_device, strict_fp32, synchronize
from agop.allocator import release_freed_memory, retained_memory
from agop import distributed
from agop.experiments.common import (Refused, checked, checkpoint_loop, data_config, load_data,
                                     load_shard, on_root, record_device, record_threads,
                                     start_run, write_config)
from agop.models.deep_rfm import FIT_INFO, NYSTROM_INFO, DeepRFM, LayerStep, normalize_rows

RFM_DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "n": None, "test_n": None, "depth": 10, "bandwidth": 2.0,
    "width": 512, "ridge": 0.0, "features": "gaussian", "standardize": True, "seed": 0,
    "solver": "auto", "centers": None, "nystrom_ridge": 1e-6, "agop_points": None,
    "device": "auto", "dtype": "auto", "data_dir": None,
}
# settings that may differ when a run is resumed (the device changes numbers by rounding only)
_FREE_ON_RESUME = ("data_dir", "device")
TEST_N_DEFAULT = 1000  # test_n=None: up to this many test points
GRAM_POINTS = 500  # class-balanced training subset whose Gram matrices are kept (Figure 2)
GRAM_PANELS = 6
CENTERS_FILE = "centers.npy"  # a Nyström run's centers: global row indices (int64)
STEP_FIGURE = "step_seconds"  # figures/<this>.png: seconds per step and layer


def gram_layers(depth: int, panels: int = GRAM_PANELS) -> list[int]:
    """The layers (1..depth+1) whose input Gram matrices are kept: evenly spaced, first and last."""
    return sorted({int(round(v)) for v in np.linspace(1, depth + 1, min(panels, depth + 1))})


def gram_subset(y: np.ndarray, num_classes: int, points: int = GRAM_POINTS) -> np.ndarray:
    """Indices of the first ⌊points/K⌋ training points of each class (file order), sorted."""
    per = max(1, points // num_classes)
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per] for c in range(num_classes)]))


def _metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    first = ["layer", "stage", "nc1", "nc2"]
    return first + [k for k in rows[0] if k not in first] if rows else first


def _save_gram(run: Any, layer: int, H: torch.Tensor, y: np.ndarray) -> None:
    import io

    from agop.collapse import gram
    from agop.experiments.records import atomic_write_bytes

    G, order = gram(H, y)
    buf = io.BytesIO()
    np.savez(buf, gram=G.astype(np.float32), labels=y[order])
    atomic_write_bytes(run.path / "gram" / f"layer_{layer:03d}.npz", buf.getvalue())


def load_grams(path: Any) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The stored Gram matrices of a run folder: (layer, G, labels in G's order), by layer.

    Read with ``allow_pickle=False``; a file that is not such a Gram snapshot (damaged, object
    arrays, other contents) raises ValueError naming it.
    """
    from pathlib import Path

    out = []
    for f in sorted((Path(path) / "gram").glob("layer_*.npz")):
        try:
            layer = int(f.stem.split("_")[1])
            with np.load(f, allow_pickle=False) as z:
                G, labels = z["gram"], z["labels"]
        except Exception as exc:  # noqa: BLE001 - numpy/zipfile raise many kinds
            raise ValueError(f"{f} is not a Gram snapshot agop wrote ({type(exc).__name__}: "
                             f"{_first_line(exc)}); remove it (it is redrawn when its layer "
                             f"runs again) or the gram/ folder") from None
        n = G.shape[0] if G.ndim == 2 else -1
        if G.ndim != 2 or G.shape[1] != n or labels.shape != (n,):
            raise ValueError(f"{f} is not a Gram snapshot agop wrote (gram {G.shape}, labels "
                             f"{labels.shape})")
        out.append((layer, G, labels))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of a Deep RFM run from its metrics rows (Figures 3, 6; Section 5.2).

    With m the last layer that has an input row (L + 1 for a finished run), log NC1(X_1) −
    log NC1(X_m) is the sum over l < m of three steps: input → agop (M^{1/2}), agop → features
    (random features and ReLU), features → next input (row normalization); ``share_*`` is each
    step's sum over that total (a negative share raised NC1). Counts are over the layers with
    both stages.

    Parameters
    ----------
    rows : list of dict
        ``agop rfm`` metrics rows (``layer`` from 1, ``stage`` in input/agop/features,
        ``nc1``, ``nc2``, ``train_acc``, ``test_acc``), of a finished run or not.

    Returns
    -------
    dict
        Empty without an input row.
    """
    by = {(r.get("layer"), r.get("stage")): r for r in rows}
    inputs = sorted(l for l, s in by if s == "input")
    if not inputs:
        return {}
    m = inputs[-1]
    nc1 = {k: metric_float(r.get("nc1")) for k, r in by.items()}
    staged = [l for l in range(1, m) if all((l, s) in by for s in ("input", "agop", "features"))
              and (l + 1, "input") in by]
    out: dict[str, Any] = {
        "layers": len([l for l in inputs if (l, "agop") in by]),
        "last_layer": m,
        "nc1_first": nc1[(inputs[0], "input")],
        "nc1_last": nc1[(m, "input")],
        "nc2_first": metric_float(by[(inputs[0], "input")].get("nc2")),
        "nc2_last": metric_float(by[(m, "input")].get("nc2")),
        "train_acc": metric_float(by[(m, "input")].get("train_acc")),
        "test_acc": metric_float(by[(m, "input")].get("test_acc")),
    }
    out["nc1_reduction"] = (out["nc1_first"] / out["nc1_last"]
                            if finite_positive(out["nc1_first"], out["nc1_last"]) else math.nan)
    both = [l for l in inputs if (l, "agop") in by]
    out["agop_below_input"] = sum(nc1[(l, "agop")] < nc1[(l, "input")] for l in both)
    with_features = [l for l in both if (l, "features") in by]
    out["features_not_below_agop"] = sum(nc1[(l, "features")] >= nc1[(l, "agop")]
                                         for l in with_features)
    out["layers_with_features"] = len(with_features)
    values = [nc1[(l, s)] for l in staged for s in ("input", "agop", "features")]
    if staged and staged == list(range(1, m)) and finite_positive(*values, out["nc1_last"]):
        lg = {k: math.log(v) for k, v in nc1.items() if finite_positive(v)}
        total = lg[(1, "input")] - lg[(m, "input")]
        steps = {
            "agop": sum(lg[(l, "input")] - lg[(l, "agop")] for l in staged),
            "features": sum(lg[(l, "agop")] - lg[(l, "features")] for l in staged),
            "normalize": sum(lg[(l, "features")] - lg[(l + 1, "input")] for l in staged),
        }
        for k, v in steps.items():  # a share of an increase would read backwards
            out[f"share_{k}"] = v / total if total > 0 else math.nan
    else:
        out.update(share_agop=math.nan, share_features=math.nan, share_normalize=math.nan)
    return out


def gram_summary(grams: list[tuple[int, np.ndarray, np.ndarray]],
                 num_classes: int | None = None) -> dict[str, Any] | None:
    """The last stored Gram matrix (Figure 2) against the collapsed one: mean same-class and
    other-class entries (ideal 1 and −1/(K−1)) and the RMS distance. None without Grams."""
    if not grams:
        return None
    layer, G, labels = grams[-1]
    K = num_classes or len(np.unique(labels))
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    ideal = np.where(same, 1.0, -1.0 / (K - 1))
    return {
        "layer": layer,
        "points": int(len(labels)),
        "same_class_mean": float(G[same & off].mean()),
        "other_class_mean": float(G[~same].mean()),
        "other_class_ideal": -1.0 / (K - 1),
        "rms_from_collapsed": float(np.sqrt(np.mean((G - ideal)[off] ** 2))),
    }


def _seconds(v: Any) -> float:
    """A recorded time as a float; missing, None, text or non-finite: 0."""
    v = metric_float(v)
    return v if math.isfinite(v) else 0.0


def step_names(rows: list[dict[str, Any]]) -> list[str]:
    """The steps with a ``seconds_<step>`` column in ``rows``: :data:`COLUMN_STEPS` first (all
    of them, recorded or not), then any other such column in the order it first appears."""
    names = list(COLUMN_STEPS)
    for r in rows:
        names += [k[8:] for k in r if k.startswith("seconds_") and k[8:] and k[8:] not in names]
    return names


def layer_step_seconds(rows: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Seconds per step of each layer: layer → {step: seconds} over :func:`step_names`.

    Every stage row of a layer carries the layer's times, so each layer is read once (its first
    row). A time that is missing, None, not a number or not finite counts as 0 (a step that did
    not run, e.g. ``predict`` without test points, or a record written before the column).
    """
    names = step_names(rows)
    out: dict[int, dict[str, float]] = {}
    for r in rows:
        layer = r.get("layer")
        if layer in out or layer is None:
            continue
        out[layer] = {k: _seconds(r.get(f"seconds_{k}")) for k in names}
    return dict(sorted(out.items()))


def step_seconds(rows: list[dict[str, Any]]) -> tuple[dict[str, float], str | None]:
    """Where a Deep RFM run's time went: total seconds per step over all layers, and the step
    with the most (None when nothing was timed).

    Steps as :func:`layer_step_seconds` reads them: Algorithm 1's ``kernel``, ``solve``,
    ``agop``, ``sqrt``, ``features`` and the measurement's ``predict`` (test accuracy) and
    ``metrics``; a Nyström layer books its center kernels under ``kernel`` and its QR solve
    under ``solve``. Ties go to the earlier step.
    """
    totals = {k: 0.0 for k in step_names(rows)}
    for per_step in layer_step_seconds(rows).values():
        for k, v in per_step.items():
            totals[k] += v
    top = max(totals, key=totals.__getitem__) if totals else None
    return totals, top if top is not None and totals[top] > 0 else None


def summarize(rows: list[dict[str, Any]], grams: list[tuple[int, np.ndarray, np.ndarray]],
              num_classes: int) -> dict[str, Any]:
    """summary.json of a finished run: :func:`headline` under the run's names, the seconds
    (``step_seconds``, ``dominant_step``: :func:`step_seconds`), the precision fallbacks and
    :func:`gram_summary`."""
    h = headline(rows)
    depth = h["last_layer"] - 1
    steps, dominant = step_seconds(rows)
    inputs = [r for r in rows if r["stage"] == "input"]
    out: dict[str, Any] = {
        "depth": depth,
        "nc1_first_input": h["nc1_first"],
        "nc1_last_input": h["nc1_last"],
        "nc1_reduction": h["nc1_reduction"],
        **{k: h[k] for k in ("share_agop", "share_features", "share_normalize")},
        "layers_agop_below_input": h["agop_below_input"],
        "layers_features_not_below_agop": h["features_not_below_agop"],
        "nc2_first_input": h["nc2_first"],
        "nc2_last_input": h["nc2_last"],
        "final_train_acc": h["train_acc"],
        "final_test_acc": inputs[-1]["test_acc"],
        "layer_seconds": sum(_seconds(r.get("seconds")) for r in inputs),
        "metric_seconds": sum(_seconds(r.get("seconds_metrics")) for r in inputs),
        "step_seconds": steps,
        "dominant_step": dominant,
        "fallbacks": [{"layer": r["layer"], "kernel_dtype": r["kernel_dtype"],
                       "solve_dtype": r["solve_dtype"], "jitter": r["jitter"]}
                      for r in inputs if r["jitter"] or r["kernel_dtype"] != r["dtype"]
                      # the Nyström QR runs in float64 by design: not a fallback
                      or (r["solve_dtype"] != r["dtype"] and r.get("solver") != "nystrom")],
    }
    if any(r.get("solver") == "nystrom" for r in inputs):
        out["solver"] = "nystrom"
        out["untrusted_layers"] = [r["layer"] for r in inputs
                                   if r.get("trusted") in (False, "False")]
    gram = gram_summary(grams, num_classes)
    if gram is not None:
        out["gram_last"] = gram
    return out


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal from :func:`summarize`'s dict.

    A number that is undefined (None or NaN in the summary: e.g. shares of a reduction when NC1
    did not fall, or a metric that is undefined at some layer) prints as "n/a", never fails.
    """
    s = summary

    def f(key: str, spec: str) -> str:
        v = s.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return format(v, spec) if ok else "n/a"

    lines = [
        f"NC1 of the layer input: {f('nc1_first_input', '.3g')} (layer 1) -> "
        f"{f('nc1_last_input', '.3g')} (layer {s['depth'] + 1}), "
        f"x{f('nc1_reduction', '.3g')} smaller",
        f"share of the log-NC1 reduction: agop {f('share_agop', '+.2f')}, features "
        f"{f('share_features', '+.2f')}, normalization {f('share_normalize', '+.2f')}",
        f"agop stage below input in {s['layers_agop_below_input']}/{s['depth']} layers; "
        f"features stage not below agop in {s['layers_features_not_below_agop']}/{s['depth']}",
        f"NC2: {f('nc2_first_input', '.3g')} -> {f('nc2_last_input', '.3g')}",
        f"final train accuracy {f('final_train_acc', '.4f')}"
        + ("" if s["final_test_acc"] is None else f", test accuracy {f('final_test_acc', '.4f')}"),
        f"{f('layer_seconds', '.1f')} s in the layers, {f('metric_seconds', '.1f')} s in metrics",
    ]
    steps = {k: v for k, v in (s.get("step_seconds") or {}).items()
             if isinstance(v, (int, float)) and math.isfinite(v) and v > 0}
    if steps:
        total = sum(steps.values())
        top = sorted(steps.items(), key=lambda kv: -kv[1])
        parts = [f"{k} {100 * v / total:.0f}% ({v:.1f} s)" if v >= 0.1
                 else f"{k} {100 * v / total:.0f}% ({v:.2g} s)" for k, v in top[:3]]
        if len(top) > 3:
            parts.append(f"other {100 * sum(v for _, v in top[3:]) / total:.0f}%")
        lines.append("time by step: " + ", ".join(parts))
    if "gram_last" in s:
        g = s["gram_last"]
        lines.append(f"Gram of layer {g['layer']} ({g['points']} points): same class "
                     f"{g['same_class_mean']:.3f} (ideal 1), other classes "
                     f"{g['other_class_mean']:.3f} (ideal {g['other_class_ideal']:.3f})")
    if s["fallbacks"]:
        lines.append(f"precision fallbacks: {s['fallbacks']}")
    if s.get("untrusted_layers"):
        lines.append(f"Nyström solves not trusted (see metrics.csv: condition, residual) in "
                     f"layers {s['untrusted_layers']}")
    return "\n".join(lines)


def _figures(run: Any, rows: list[dict[str, Any]], classes: list[str] | None, title: str,
             pdf: bool) -> None:
    from agop.experiments import figures

    figures.rfm_collapse(rows, run.figures_dir / "collapse", title=title, pdf=pdf)
    figures.rfm_step_seconds(rows, run.figures_dir / STEP_FIGURE, title=title, pdf=pdf)
    grams = load_grams(run.path)
    if grams:
        figures.rfm_gram(grams, run.figures_dir / "gram", classes=classes, title=title, pdf=pdf)




# ----------------------------------------------------------------------------- measurement
# the metrics row's time columns: the layer's steps (DeepRFM), then the experiment's own
COLUMN_STEPS = ("kernel", "solve", "agop", "sqrt", "features", "predict", "metrics")


def class_indices(classes: np.ndarray, labels: Any) -> np.ndarray:
    """Labels as indices into ``classes`` (sorted, e.g. ``DeepRFM.classes_``).

    Parameters
    ----------
    classes : numpy.ndarray
        The K sorted class labels of a fit.
    labels : array-like
        n labels.

    Returns
    -------
    numpy.ndarray
        n int64 indices; −1 for a label not among ``classes`` (no prediction can match it).
    """
    arr = np.asarray(to_numpy(labels)).reshape(-1)
    idx = np.searchsorted(classes, arr)
    K = len(classes)
    seen = (idx < K) & (classes[np.minimum(idx, K - 1)] == arr)
    return np.where(seen, idx, -1).astype(np.int64)


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == y).double().mean())


def _stage_metrics(H: torch.Tensor, y: torch.Tensor, K: int, where: str,
                   comm: Any = None) -> dict[str, float]:
    """:func:`agop.collapse.measure` of one stage; an undefined metric is recorded as NaN with a
    warning, as the MLP study does (``strict=False``).

    Distributed (``comm`` of world size > 1, H and y this rank's rows): the same metrics from a
    :class:`agop.collapse.CollapseAccumulator` fed this rank's rows and all-reduced, identical
    on every rank and equal to ``measure`` on all rows up to rounding. (The accumulator keeps
    the D × D within-class scatter for ``nc1_pinv``.)
    """
    from agop.collapse import CollapseAccumulator, measure

    if comm is None or comm.world == 1:
        values = measure(H, y, num_classes=K, strict=False)
    else:
        acc = CollapseAccumulator(K, H.shape[1], pinv=True, device=H.device)
        acc.update(H, y)
        values = acc.all_reduce(comm.group).compute(strict=False)
    undefined = sorted(k for k, v in values.items() if math.isnan(v))
    if undefined:
        warnings.warn(f"collapse metrics {undefined} undefined at {where}; recorded as NaN",
                      stacklevel=3)
    return values


class LayerMeter:
    """Measures what :meth:`DeepRFM.fit_iter` yields, layer by layer (Sections 5.1–5.2).

    Per layer l it returns one metrics row per stage (``"input"``, ``"agop"``, ``"features"``;
    the final solve ``"input"`` only) with ``layer``, ``stage``, every
    :func:`agop.collapse.measure` value of that stage, ``train_acc`` and ``test_acc`` of f_l,
    the layer's fit information (:data:`agop.models.deep_rfm.FIT_INFO`) and the times
    ``seconds`` (the layer's Algorithm 1 work) and ``seconds_<step>`` for
    :data:`COLUMN_STEPS` (``predict``: test accuracy, ``metrics``: this measurement).

    Test points are carried through the layers beside the fit: each layer normalizes them,
    predicts with f_l (:meth:`LayerStep.predict`) and maps them to the next layer's features
    (:meth:`LayerStep.forward`), exactly as :meth:`DeepRFM.transform` would. Between layers
    :meth:`state_dict` holds them for a checkpoint.

    Distributed fits (``step.comm`` of world size P > 1): the stages and the test points are
    this rank's rows; the collapse metrics come from all-reduced accumulators
    (:func:`_stage_metrics`) and the test accuracy from all-reduced counts, so every rank
    returns the same metrics (its own ``seconds``). :meth:`state_dict` then leaves the test
    points out (they are per rank): a resumed run rebuilds them with
    :meth:`DeepRFM.features_after`.

    Parameters
    ----------
    num_classes : int
        K of the fit (``len(model.classes_)``).
    test : torch.Tensor, optional
        The test points entering the next layer before its row normalization (n × D, on the
        model's device): :meth:`DeepRFM.preprocess` of the test inputs before layer 1.
    y_test : torch.Tensor, optional
        Their class indices (:func:`class_indices`; −1 for a class not in training).
    """

    def __init__(self, num_classes: int, test: torch.Tensor | None = None,
                 y_test: torch.Tensor | None = None):
        if (test is None) != (y_test is None):
            raise ValueError("test and y_test must be given together (test accuracy needs both)")
        self.num_classes = int(num_classes)
        self.test = test
        self.y_test = y_test
        self.world = 1  # the world size of the last step measured

    @classmethod
    def for_model(cls, model: DeepRFM, X_test: Any = None, y_test: Any = None) -> "LayerMeter":
        """A meter for a fit just started by ``model.fit_iter`` (test inputs validated here).

        Parameters
        ----------
        model : DeepRFM
            After :meth:`DeepRFM.fit_iter` was called (its preprocessing is known).
        X_test, y_test : array-like, optional
            Raw test inputs (n × d) and labels, given together.

        Returns
        -------
        LayerMeter
        """
        if (X_test is None) != (y_test is None):
            raise ValueError("X_test and y_test must be given together (test accuracy needs both)")
        if X_test is None:
            return cls(len(model.classes_))
        test = model.preprocess(X_test)
        idx = class_indices(model.classes_, y_test)
        if idx.shape[0] != test.shape[0]:
            raise ValueError(f"y_test has {idx.shape[0]} label(s) but X_test has "
                             f"{test.shape[0]} row(s); they must match one label per sample")
        return cls(len(model.classes_), test, torch.as_tensor(idx, device=test.device))

    def __call__(self, step: LayerStep) -> list[dict[str, Any]]:
        """The metrics rows of one layer (see the class docstring); advances the test points."""
        l = step.layer
        comm = getattr(step, "comm", None)
        self.world = 1 if comm is None else comm.world
        seconds = dict(step.info["seconds"])
        test_acc = None
        with strict_fp32():
            if self.test is not None:
                t = time.perf_counter()
                Xte = normalize_rows(self.test, f"layer {l} test features")
                scores = step.predict(Xte)
                if self.world == 1:
                    test_acc = _accuracy(scores, self.y_test)
                else:  # (correct, points) summed over the ranks: exact integers in float64
                    hits = torch.stack([(scores.argmax(dim=1) == self.y_test).sum(),
                                        torch.tensor(len(self.y_test), device=scores.device)])
                    hits = comm.all_reduce_sum(hits.to(torch.float64))
                    test_acc = float(hits[0]) / float(hits[1])
                self.test = None if step.final else step.forward(Xte)
                synchronize(Xte.device)
                seconds["predict"] = time.perf_counter() - t
            t = time.perf_counter()
            metrics = {s: _stage_metrics(H, step.y, self.num_classes, f"layer {l} {s}", comm)
                       for s, H in step.stages.items()}
            seconds["metrics"] = time.perf_counter() - t
        common = {
            "train_acc": step.train_acc,
            "test_acc": test_acc,
            **{k: step.info[k] for k in FIT_INFO if k not in ("layer", "seconds")},
            # Nyström layers only: the solver and its checks (exact runs keep their columns)
            **{k: step.info[k] for k in NYSTROM_INFO if k in step.info},
            # Algorithm 1's own work; test predictions and metrics are measurement
            "seconds": sum(v for k, v in seconds.items() if k not in ("predict", "metrics")),
            **{f"seconds_{k}": seconds.get(k) for k in COLUMN_STEPS},
        }
        return [{"layer": l, "stage": s, **metrics[s], **common} for s in step.stages]

    def state_dict(self) -> dict[str, Any]:
        """The test points between layers, as CPU tensors (None without a test set, and in a
        distributed fit, whose test points are per rank)."""
        def cpu(t):
            return None if t is None or self.world > 1 else t.detach().cpu()

        return {"num_classes": self.num_classes, "test": cpu(self.test),
                "y_test": cpu(self.y_test)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: Any) -> "LayerMeter":
        """Rebuild a meter from :meth:`state_dict` on ``device`` (the model's ``device_``)."""
        def put(t):
            return None if t is None else t.to(device)

        meter = cls(int(state["num_classes"]))
        meter.test, meter.y_test = put(state["test"]), put(state["y_test"])
        return meter


def measure_fit(model: DeepRFM, X: Any, y: Any, X_test: Any = None,
                y_test: Any = None) -> list[dict[str, Any]]:
    """Fit ``model`` on (X, y) layer by layer and return the metrics rows of every layer.

    The rows of ``agop rfm``'s metrics.csv (:class:`LayerMeter`), without a run folder.

    Parameters
    ----------
    model : DeepRFM
        Fitted in place.
    X, y : array-like
        Training inputs (N × d) and labels.
    X_test, y_test : array-like, optional
        Test inputs and labels for each layer's test accuracy (given together).

    Returns
    -------
    list of dict
        One row per layer and stage, in order.
    """
    steps = model.fit_iter(X, y)
    meter = LayerMeter.for_model(model, X_test, y_test)
    rows: list[dict[str, Any]] = []
    for step in steps:
        rows.extend(meter(step))
    return rows


# what a checkpoint that loads but does not hold a Deep RFM state raises when it is restored
# (an unknown or missing parameter, a wrong type or shape)
_UNUSABLE = (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError)


def _not_a_state(exc: BaseException) -> str:
    """Why a checkpoint that loaded cannot be restored, for :meth:`RunDir.bad_checkpoint`."""
    detail = (f"no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args
              else _first_line(exc))
    return f"does not hold the state of a Deep RFM run ({type(exc).__name__}: {detail})"


def _restore(ckpt: dict[str, Any], device: Any) -> tuple[DeepRFM, LayerMeter, list[dict[str, Any]]]:
    """The model, meter and rows of a run's checkpoint (this format, or the format-1 one whose
    model state also held the rows and the test points)."""
    model = DeepRFM.from_state_dict(ckpt["model"], device=device)
    if "measure" in ckpt:
        meter = LayerMeter.from_state_dict(ckpt["measure"], model.device_)
        rows = [dict(r) for r in ckpt["rows"]]
    else:
        old = ckpt["model"]
        meter = LayerMeter.from_state_dict({"num_classes": len(model.classes_),
                                            "test": old.get("test"),
                                            "y_test": old.get("y_test")}, model.device_)
        rows = [dict(r) for r in old["history"]]
    return model, meter, rows


# ----------------------------------------------------------------------------- the experiment
def _check_settings(s: dict[str, Any]) -> None:
    """The run's settings that no library call checks before the work starts."""
    from agop.choices import SOLVERS

    for key in ("n", "test_n"):
        if s[key] is not None:
            check_int(s[key], key, minimum=0 if key == "test_n" else 2)
    if s["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {s['solver']!r}")
    for key in ("centers", "agop_points"):
        if s[key] is not None:
            check_int(s[key], key, minimum=1)


def _check_sizes(s: dict[str, Any], N: int, K: int) -> None:
    """Centers and AGOP points against the N training points of K classes."""
    M = s["centers"]
    if M is not None and M > N:
        raise ValueError(f"centers = {M} but there are only N = {N:,} training points; use "
                         f"--centers {N} or fewer")
    if M is not None and M < K:
        raise ValueError(f"centers = {M} but the training points hold K = {K} classes; use "
                         f"--centers {K} or more (at least one center per class)")
    if s["agop_points"] is not None and s["agop_points"] > N:
        raise ValueError(f"agop_points = {s['agop_points']} but there are only N = {N:,} "
                         f"training points")


def run_rfm(out: Any = None, resume: Any = None, progress: bool = True, *,
            dataset: str | None = None, n: int | None = None, test_n: int | None = None,
            depth: int | None = None, bandwidth: float | None = None, width: int | None = None,
            ridge: float | None = None, features: str | None = None,
            standardize: bool | None = None, seed: int | None = None,
            solver: str | None = None, centers: int | None = None,
            nystrom_ridge: float | None = None, agop_points: int | None = None,
            device: str | None = None, dtype: str | None = None, data_dir: Any = None,
            pdf: bool = False) -> Any:
    """The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

    Sections 5.1–5.2, Figures 2, 3, 6. Trains on the first ``n`` training points (all if
    None), records f_l's accuracy on the first ``test_n`` test points (None: up to 1,000 where
    the dataset has a test split; 0: none). Writes into the run folder ``out`` (default
    ``runs/rfm-<time>``): config.json, metrics.csv (:class:`LayerMeter`'s rows) and
    checkpoint.pt after every layer, gram/layer_XXX.npz (the Figure 2 Gram of a
    class-balanced subset of ≤ 500 training points at a few layers), figures/ and
    summary.json at the end; a Nyström run also centers.npy (the centers' global row
    indices). config.json records the solver that ran, the world size and the backend.

    Settings left None take :data:`RFM_DEFAULTS` (digits, depth 10, bandwidth 2, width 512,
    ridgeless, Gaussian features, standardized inputs, seed 0, solver "auto", device and dtype
    "auto"); ``standardize=False`` runs Algorithm 1 as printed (rows only normalized).
    ``solver``, ``centers``, ``nystrom_ridge``, ``agop_points``: as
    :class:`agop.models.deep_rfm.DeepRFM` ("auto": the exact solver where it fits, which is
    today's behaviour for small data).

    Data-parallel under ``torchrun`` (``torch.distributed`` environment set): every rank joins
    the process group (:func:`agop.distributed.session`: gloo on CPUs, NCCL on GPUs), the ranks
    check that they were given the same settings (``data_dir`` may differ between machines),
    each loads only its rows of the training and test points, and rank 0 alone creates and
    writes the run folder (its path is rank 0's) and reads it on resume. A bad input is
    refused on every rank before any work; a rank that fails later leaves the group, and the
    others fail at their next collective instead of waiting.

    ``resume=DIR`` continues an interrupted run from its last finished layer and ends with
    exactly the numbers of an uninterrupted run (times aside), with the same number of
    processes as it started with. Settings passed with a resume must equal the run's, except
    ``data_dir`` and ``device`` (a run continued on another device than it started on warns
    and records the new one: its numbers then differ by rounding).

    Returns
    -------
    agop.experiments.records.RunDir or None
        The run folder (None on the ranks other than 0 of a distributed run).
    """
    given = dict(dataset=dataset, n=n, test_n=test_n, depth=depth, bandwidth=bandwidth,
                 width=width, ridge=ridge, features=features, standardize=standardize,
                 seed=seed, solver=solver, centers=centers, nystrom_ridge=nystrom_ridge,
                 agop_points=agop_points, device=device, dtype=dtype,
                 data_dir=None if data_dir is None else str(data_dir))
    started = time.perf_counter()
    refused: BaseException | None = None
    # the group's device, by one rule on every rank before anything is read: the backend
    # (gloo, NCCL) depends on it
    where = device if device is not None else RFM_DEFAULTS["device"]
    if distributed.launched_by_torchrun():
        group = distributed.session(where)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        group = contextlib.nullcontext(_callers_group(where))  # a group the caller made
    else:
        group = contextlib.nullcontext(distributed.local())
    with group as comm:
        try:
            with warnings.catch_warnings():
                if not comm.is_root:  # rank 0 says it once
                    warnings.simplefilter("ignore")
                plan = _prepare(comm, given, out, resume)
                return _execute(comm, plan, progress=progress and comm.is_root, pdf=pdf,
                                started=started)
        except Refused as exc:  # raised on every rank alike: leave the group cleanly, then raise
            refused = exc.error
    raise refused


def _callers_group(device: str) -> Any:
    """The default process group a caller made without torchrun's environment, as a Comm
    computing on ``device`` (CUDA: the current device, as NCCL uses it)."""
    comm = distributed.current()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    comm.device = dev
    return comm


class _Plan:
    """A bag of named values: what :func:`_prepare` decided (the start, the model, the device,
    the data) and this rank's data."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def _prepare(comm: Any, given: dict[str, Any], out: Any, resume: Any) -> _Plan:
    """Everything before the first layer; every error is :class:`Refused` on every rank."""
    grouped = comm.enabled  # in a process group (torchrun), even of one process
    if comm.world > 1:
        same = {k: v for k, v in given.items() if k != "data_dir"}  # roots differ by machine
        same.update(out=None if out is None else str(out),
                    resume=None if resume is None else str(resume))
        try:
            comm.agree(same, "settings")
        except ValueError as exc:
            raise Refused(exc) from None

    def open_run():
        start = start_run("rfm", RFM_DEFAULTS, given, out=out, resume=resume,
                          free=_FREE_ON_RESUME)
        _check_settings(start.settings)
        if start.resumed:
            ran = int(start.run.config.get("world_size", 1))
            if ran != comm.world:
                raise ValueError(f"{start.run.path} ran on {ran} process(es) but this resume has "
                                 f"{comm.world}; resume it with the same number of processes "
                                 f"(torchrun --nproc-per-node / --nnodes), which gives the "
                                 f"numbers of an uninterrupted run")
            stored = start.settings["device"]
            if (grouped and given["device"] is None
                    and resolve_device(stored).type != comm.device.type):
                raise ValueError(f"{start.run.path} ran with device {stored!r}; resume it with "
                                 f"--device {stored} (or name the device to continue on)")
        return start

    start = on_root(comm, open_run)
    if not comm.is_root:
        start.run = None  # rank 0 alone touches the run folder
    s = start.settings
    dev = comm.device if grouped else resolve_device(s["device"])
    model = DeepRFM(depth=s["depth"], bandwidth=s["bandwidth"], width=s["width"],
                    ridge=s["ridge"], features=s["features"], standardize=s["standardize"],
                    seed=s["seed"], device=str(dev) if grouped else s["device"],
                    dtype=s["dtype"], solver=s["solver"], centers=s["centers"],
                    nystrom_ridge=s["nystrom_ridge"], agop_points=s["agop_points"])
    fresh = start.checkpoint is None

    def load():
        shard = train = test = None
        if comm.world > 1:
            shard = load_shard(s["dataset"], s["n"], s["test_n"], s["data_dir"],
                               test_cap=TEST_N_DEFAULT, rank=comm.rank, world=comm.world)
            N, n_test, labels = shard.n_train, shard.n_test, shard.labels
            dim = int(shard.train.X.shape[1])
        elif fresh:
            train, test = load_data(s["dataset"], s["n"], s["test_n"], s["data_dir"],
                                    test_cap=TEST_N_DEFAULT)
            N, n_test, labels = len(train), 0 if test is None else len(test), train.y
            dim = int(train.X.shape[1])
        else:  # one process: the checkpoint holds the features; no data is read
            return _Plan(shard=None, train=None, test=None)
        K = len(np.unique(labels))
        if fresh:
            _check_sizes(s, N, K)
            model.check_memory(N, dim, K, n_test, world=comm.world)  # before the run folder
        else:
            try:
                fitted = int(start.checkpoint["model"].get("n_total", N))
            except _UNUSABLE as exc:
                raise ValueError(f"the run's checkpoint.pt {_not_a_state(exc)}") from None
            if N != fitted:
                raise ValueError(f"the run was fitted on {fitted} training points but the data "
                                 f"now gives {N}; check --data-dir")
        return _Plan(shard=shard, train=train, test=test, N=N, n_test=n_test, dim=dim)

    data = checked(comm, load)
    if comm.world > 1:
        data.train, data.test = data.shard.train, data.shard.test
    return _Plan(start=start, model=model, dev=dev, fresh=fresh, data=data, grouped=grouped)


def _execute(comm: Any, plan: _Plan, *, progress: bool, pdf: bool, started: float) -> Any:
    """Fit and measure layer by layer, recording on rank 0 (see :func:`run_rfm`)."""
    start, model, dev, data = plan.start, plan.model, plan.dev, plan.data
    root = comm.is_root
    train, test = data.train, data.test
    if root:
        record_device(start, dev, stacklevel=4)
        record_threads(start, stacklevel=4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    if plan.fresh:
        steps = model.fit_iter(train.X, train.y)
        meter = LayerMeter.for_model(model, None if test is None else test.X,
                                     None if test is None else test.y)

        def create():  # only now: bad settings or data leave no folder behind
            run = start.create()
            n_test = data.n_test
            write_config(run, device=model.device_, dtype=dtype_name(model.dtype_),
                         data=data_config(train, test, model.classes_, n_train=data.N,
                                          n_test=n_test),
                         memory_needed_bytes=model.memory_needed(
                             data.N, data.dim, len(model.classes_), n_test,
                             solver=model.solver_, world=comm.world),
                         gram={"layers": gram_layers(model.depth),
                               "points_per_class": max(1, GRAM_POINTS // len(model.classes_))},
                         **_parallel_config(comm, model))
            if model.centers_ is not None:
                _save_centers(run, model.centers_)
            return run

        run = on_root(comm, create)
        rows: list[dict[str, Any]] = []
    else:
        run = start.run
        if comm.world == 1:
            try:
                model, meter, rows = _restore(start.checkpoint, str(dev) if plan.grouped
                                              else start.settings["device"])
                steps = model.resume_iter()
            except _UNUSABLE as exc:
                raise run.bad_checkpoint(_not_a_state(exc)) from None
        else:  # the checkpoint holds no per-rank features: replay the layers on this rank's rows
            ckpt = start.checkpoint
            try:
                model = DeepRFM.from_state_dict(ckpt["model"], device=str(dev))
                rows = [dict(r) for r in ckpt["rows"]]
            except _UNUSABLE as exc:  # every rank has rank 0's file: all fail alike
                if run is not None:
                    raise run.bad_checkpoint(_not_a_state(exc)) from None
                raise ValueError(f"the run's checkpoint.pt {_not_a_state(exc)}") from None
            meter = LayerMeter(len(model.classes_))
            meter.world = comm.world
            if test is not None and model.layers_done_ <= model.depth:
                meter.test = model.features_after(test.X, model.layers_done_)
                meter.y_test = torch.as_tensor(class_indices(model.classes_, test.y),
                                               device=model.device_)
            steps = model.resume_iter(train.X)
    if not root:
        run = None
    K = len(model.classes_)
    keep = set(gram_layers(model.depth))
    if comm.world > 1:  # the Gram subset's global rows, gathered to every rank at its layers
        labels = class_indices(model.classes_, data.shard.labels)
        subset = gram_subset(labels, K)
        row_start = data.shard.rows[0]

    def on_step(step: LayerStep) -> dict[str, str]:
        if retain:
            release_freed_memory()  # what a layer kept for reuse goes back between layers
        new = meter(step)
        rows.extend(new)
        if step.layer in keep:
            if comm.world == 1:
                y = to_numpy(step.y)  # class indices of the training points
                sub = gram_subset(y, K)
                idx = torch.as_tensor(sub, device=step.inputs.device)
                _save_gram(run, step.layer, step.inputs[idx], y[sub])
            else:
                from agop.nystrom import gather_rows

                H = gather_rows(step.inputs, subset, row_start, comm)  # a collective
                if root:
                    _save_gram(run, step.layer, H, labels[subset])
        if root:
            run.write_metrics(rows, _metric_columns(rows))
            run.save_checkpoint({"model": model.state_dict(), "measure": meter.state_dict(),
                                 "rows": rows})  # after the records it matches
        return {"nc1": f"{new[0]['nc1']:.3g}"}

    # every layer allocates the same large blocks again: keep freed memory for reuse
    # (agop.allocator; full MNIST with Nyström: 13:16 instead of ~15 min, 6.9 instead of 4.9
    # GB). Kept holes raise the peak (exact path: +60% at N = 8,000), so the exact path keeps
    # them only where twice its planned peak fits in the free memory
    # (a resumed single-process run read no data: the model knows its sizes)
    n, dim = getattr(data, "N", None) or model.n_total_, getattr(data, "dim", None)
    retain = model.device_.type == "cpu" and (
        model.solver_ == "nystrom" or 2 * model.memory_needed(
            n, dim or model.n_features_in_, K, getattr(data, "n_test", 0),
            solver=model.solver_, world=comm.world) <= free_memory(model.device_))
    with retained_memory() if retain else contextlib.nullcontext():
        checkpoint_loop(steps, on_step, total=model.depth + 1, initial=model.layers_done_,
                        progress=progress, desc="agop rfm", unit="layer")
    if not root:
        return None

    # the checkpoint's rows are the record: a resumed run rewrites metrics.csv from them even
    # when no layer was left to run (repairing a table damaged after the run)
    run.write_metrics(rows, _metric_columns(rows))
    data_info = run.config["data"]
    title = f"{data_info['name']}, N = {data_info['train']:,}"
    _figures(run, rows, data_info["class_names"], title, pdf)
    summary = summarize(rows, load_grams(run.path), K)
    summary["wall_seconds"] = time.perf_counter() - started  # this invocation, data loading included
    if model.device_.type == "cuda":
        summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(model.device_))
    run.write_summary(summary)
    return run


def _parallel_config(comm: Any, model: DeepRFM) -> dict[str, Any]:
    """config.json's record of how the run was computed: solver, processes, backend, centers."""
    out: dict[str, Any] = {"solver": model.solver_, "world_size": comm.world,
                           "backend": comm.backend}
    if model.centers_ is not None:
        out["centers"] = {"count": int(len(model.centers_)), "file": CENTERS_FILE}
    return out


def _save_centers(run: Any, centers: np.ndarray) -> None:
    import io

    from agop.experiments.records import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.asarray(centers, dtype=np.int64), allow_pickle=False)
    atomic_write_bytes(run.path / CENTERS_FILE, buf.getvalue())


def load_centers(path: Any) -> np.ndarray | None:
    """The global row indices of a Nyström run's centers (centers.npy), else None."""
    from pathlib import Path

    f = Path(path) / CENTERS_FILE
    if not f.exists():
        return None
    try:
        centers = np.load(f, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds for a damaged file
        raise ValueError(f"{f} is not the centers file agop wrote ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    if centers.ndim != 1 or centers.dtype.kind not in "iu":
        raise ValueError(f"{f} is not the centers file agop wrote (expected one row index per "
                         f"center; found {centers.dtype} of shape {centers.shape})")
    return centers
