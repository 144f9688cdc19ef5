"""The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

Sections 5.1–5.2, Figures 2, 3, 6. The estimator is :class:`agop.models.deep_rfm.DeepRFM`,
which fits and measures nothing; this module measures what its layer iterator yields
(:class:`LayerMeter`: the collapse metrics of every stage, f_l's test accuracy, the fit
information, one metrics row per layer and stage) and owns the settings, the run folder, the
Gram snapshots and the headline numbers. The run skeleton is :mod:`agop.experiments.common`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from agop._validate import check_int, finite_positive, metric_float, to_numpy
from agop.backend import dtype_name, resolve_device, strict_fp32, synchronize
from agop.experiments.common import (checkpoint_loop, data_config, load_data, record_device,
                                     start_run, write_config)
from agop.models.deep_rfm import FIT_INFO, DeepRFM, LayerStep, normalize_rows

RFM_DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "n": None, "test_n": None, "depth": 10, "bandwidth": 2.0,
    "width": 512, "ridge": 0.0, "features": "gaussian", "standardize": True, "seed": 0,
    "device": "auto", "dtype": "auto", "data_dir": None,
}
# settings that may differ when a run is resumed (the device changes numbers by rounding only)
_FREE_ON_RESUME = ("data_dir", "device")
TEST_N_DEFAULT = 1000  # test_n=None: up to this many test points
GRAM_POINTS = 500  # class-balanced training subset whose Gram matrices are kept (Figure 2)
GRAM_PANELS = 6


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
    """The stored Gram matrices of a run folder: (layer, G, labels in G's order), by layer."""
    from pathlib import Path

    out = []
    for f in sorted((Path(path) / "gram").glob("layer_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            out.append((int(f.stem.split("_")[1]), z["gram"], z["labels"]))
    return out


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


def summarize(rows: list[dict[str, Any]], grams: list[tuple[int, np.ndarray, np.ndarray]],
              num_classes: int) -> dict[str, Any]:
    """summary.json of a finished run: :func:`headline` under the run's names, the seconds,
    the precision fallbacks and :func:`gram_summary`."""
    h = headline(rows)
    depth = h["last_layer"] - 1
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
        "layer_seconds": sum(r["seconds"] for r in inputs),
        "metric_seconds": sum(r["seconds_metrics"] for r in inputs),
        "fallbacks": [{"layer": r["layer"], "kernel_dtype": r["kernel_dtype"],
                       "solve_dtype": r["solve_dtype"], "jitter": r["jitter"]}
                      for r in inputs if r["jitter"] or r["solve_dtype"] != r["dtype"]
                      or r["kernel_dtype"] != r["dtype"]],
    }
    gram = gram_summary(grams, num_classes)
    if gram is not None:
        out["gram_last"] = gram
    return out


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal from :func:`summarize`'s dict."""
    s = summary
    lines = [
        f"NC1 of the layer input: {s['nc1_first_input']:.3g} (layer 1) -> "
        f"{s['nc1_last_input']:.3g} (layer {s['depth'] + 1}), x{s['nc1_reduction']:.3g} smaller",
        f"share of the log-NC1 reduction: agop {s['share_agop']:+.2f}, features "
        f"{s['share_features']:+.2f}, normalization {s['share_normalize']:+.2f}",
        f"agop stage below input in {s['layers_agop_below_input']}/{s['depth']} layers; "
        f"features stage not below agop in {s['layers_features_not_below_agop']}/{s['depth']}",
        f"NC2: {s['nc2_first_input']:.3g} -> {s['nc2_last_input']:.3g}",
        f"final train accuracy {s['final_train_acc']:.4f}"
        + ("" if s["final_test_acc"] is None else f", test accuracy {s['final_test_acc']:.4f}"),
        f"{s['layer_seconds']:.1f} s in the layers, {s['metric_seconds']:.1f} s in metrics",
    ]
    if "gram_last" in s:
        g = s["gram_last"]
        lines.append(f"Gram of layer {g['layer']} ({g['points']} points): same class "
                     f"{g['same_class_mean']:.3f} (ideal 1), other classes "
                     f"{g['other_class_mean']:.3f} (ideal {g['other_class_ideal']:.3f})")
    if s["fallbacks"]:
        lines.append(f"precision fallbacks: {s['fallbacks']}")
    return "\n".join(lines)


def _figures(run: Any, rows: list[dict[str, Any]], classes: list[str] | None, title: str,
             pdf: bool) -> None:
    from agop.experiments import figures

    figures.rfm_collapse(rows, run.figures_dir / "collapse", title=title, pdf=pdf)
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


def _stage_metrics(H: torch.Tensor, y: torch.Tensor, K: int, where: str) -> dict[str, float]:
    """:func:`agop.collapse.measure` of one stage; an undefined metric is recorded as NaN with a
    warning, as the MLP study does (``strict=False``)."""
    from agop.collapse import measure

    values = measure(H, y, num_classes=K, strict=False)
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
        seconds = dict(step.info["seconds"])
        test_acc = None
        with strict_fp32():
            if self.test is not None:
                t = time.perf_counter()
                Xte = normalize_rows(self.test, f"layer {l} test features")
                test_acc = _accuracy(step.predict(Xte), self.y_test)
                self.test = None if step.final else step.forward(Xte)
                synchronize(Xte.device)
                seconds["predict"] = time.perf_counter() - t
            t = time.perf_counter()
            metrics = {s: _stage_metrics(H, step.y, self.num_classes, f"layer {l} {s}")
                       for s, H in step.stages.items()}
            seconds["metrics"] = time.perf_counter() - t
        common = {
            "train_acc": step.train_acc,
            "test_acc": test_acc,
            **{k: step.info[k] for k in FIT_INFO if k not in ("layer", "seconds")},
            # Algorithm 1's own work; test predictions and metrics are measurement
            "seconds": sum(v for k, v in seconds.items() if k not in ("predict", "metrics")),
            **{f"seconds_{k}": seconds.get(k) for k in COLUMN_STEPS},
        }
        return [{"layer": l, "stage": s, **metrics[s], **common} for s in step.stages]

    def state_dict(self) -> dict[str, Any]:
        """The test points between layers, as CPU tensors (None without a test set)."""
        def cpu(t):
            return None if t is None else t.detach().cpu()

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
def run_rfm(out: Any = None, resume: Any = None, progress: bool = True, *,
            dataset: str | None = None, n: int | None = None, test_n: int | None = None,
            depth: int | None = None, bandwidth: float | None = None, width: int | None = None,
            ridge: float | None = None, features: str | None = None,
            standardize: bool | None = None, seed: int | None = None,
            device: str | None = None, dtype: str | None = None, data_dir: Any = None,
            pdf: bool = False) -> Any:
    """The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

    Sections 5.1–5.2, Figures 2, 3, 6. Trains on the first ``n`` training points (all if
    None), records f_l's accuracy on the first ``test_n`` test points (None: up to 1,000 where
    the dataset has a test split; 0: none). Writes into the run folder ``out`` (default
    ``runs/rfm-<time>``): config.json, metrics.csv (:class:`LayerMeter`'s rows) and
    checkpoint.pt after every layer, gram/layer_XXX.npz (the Figure 2 Gram of a
    class-balanced subset of ≤ 500 training points at a few layers), figures/ and
    summary.json at the end.

    Settings left None take :data:`RFM_DEFAULTS` (digits, depth 10, bandwidth 2, width 512,
    ridgeless, Gaussian features, standardized inputs, seed 0, device and dtype "auto");
    ``standardize=False`` runs Algorithm 1 as printed (rows only normalized).

    ``resume=DIR`` continues an interrupted run from its last finished layer and ends with
    exactly the numbers of an uninterrupted run (times aside). Settings passed with a resume
    must equal the run's, except ``data_dir`` and ``device`` (a run continued on another
    device than it started on warns and records the new one: its numbers then differ by
    rounding).

    Returns
    -------
    agop.experiments.records.RunDir
        The run folder.
    """
    given = dict(dataset=dataset, n=n, test_n=test_n, depth=depth, bandwidth=bandwidth,
                 width=width, ridge=ridge, features=features, standardize=standardize,
                 seed=seed, device=device, dtype=dtype,
                 data_dir=None if data_dir is None else str(data_dir))
    start = start_run("rfm", RFM_DEFAULTS, given, out=out, resume=resume, free=_FREE_ON_RESUME)
    s = start.settings
    for key in ("n", "test_n"):
        if s[key] is not None:
            check_int(s[key], key, minimum=0 if key == "test_n" else 2)
    model = DeepRFM(depth=s["depth"], bandwidth=s["bandwidth"], width=s["width"],
                    ridge=s["ridge"], features=s["features"], standardize=s["standardize"],
                    seed=s["seed"], device=s["device"], dtype=s["dtype"])
    dev = resolve_device(s["device"])
    record_device(start, dev)
    started = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    if start.checkpoint is None:
        train, test = load_data(s["dataset"], s["n"], s["test_n"], s["data_dir"],
                                test_cap=TEST_N_DEFAULT)
        n_test = 0 if test is None else len(test)
        dim = int(train.X.shape[1])
        model.check_memory(len(train), dim, len(np.unique(train.y)), n_test)
        steps = model.fit_iter(train.X, train.y)
        meter = LayerMeter.for_model(model, None if test is None else test.X,
                                     None if test is None else test.y)
        run = start.create()  # only now: bad settings or data leave no folder behind
        write_config(run, device=model.device_, dtype=dtype_name(model.dtype_),
                     data=data_config(train, test, model.classes_),
                     memory_needed_bytes=model.memory_needed(len(train), dim,
                                                             len(model.classes_), n_test),
                     gram={"layers": gram_layers(model.depth),
                           "points_per_class": max(1, GRAM_POINTS // len(model.classes_))})
        rows: list[dict[str, Any]] = []
    else:
        run = start.run
        model, meter, rows = _restore(start.checkpoint, s["device"])
        steps = model.resume_iter()
    data = run.config["data"]
    title = f"{data['name']}, N = {data['train']:,}"
    K = len(model.classes_)
    keep = set(gram_layers(model.depth))

    def on_step(step: LayerStep) -> dict[str, str]:
        new = meter(step)
        rows.extend(new)
        if step.layer in keep:
            y = to_numpy(step.y)  # class indices of the training points
            subset = gram_subset(y, K)
            idx = torch.as_tensor(subset, device=step.inputs.device)
            _save_gram(run, step.layer, step.inputs[idx], y[subset])
        run.write_metrics(rows, _metric_columns(rows))
        run.save_checkpoint({"model": model.state_dict(), "measure": meter.state_dict(),
                             "rows": rows})  # after the records it matches
        return {"nc1": f"{new[0]['nc1']:.3g}"}

    checkpoint_loop(steps, on_step, total=model.depth + 1, initial=model.layers_done_,
                    progress=progress, desc="agop rfm", unit="layer")

    _figures(run, rows, data["class_names"], title, pdf)
    summary = summarize(rows, load_grams(run.path), K)
    summary["wall_seconds"] = time.perf_counter() - started  # this invocation, data loading included
    if model.device_.type == "cuda":
        summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(model.device_))
    run.write_summary(summary)
    return run
