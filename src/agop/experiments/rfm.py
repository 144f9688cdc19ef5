"""The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

Sections 5.1–5.2, Figures 2, 3, 6. The estimator is :class:`agop.models.deep_rfm.DeepRFM`;
this module owns the settings, the run folder, the Gram snapshots and the headline numbers.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np
import torch

from agop._validate import check_int, finite_positive, metric_float, to_numpy
from agop.backend import dtype_name
from agop.models.deep_rfm import DeepRFM

RFM_DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "n": None, "test_n": None, "depth": 10, "bandwidth": 2.0,
    "width": 512, "ridge": 0.0, "features": "gaussian", "seed": 0, "device": "auto",
    "dtype": "auto", "data_dir": None,
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


def _load_data(dataset: str, n: int | None, test_n: int | None, data_dir: Any):
    from agop import datasets

    train = datasets.load(dataset, "train", n=n, root=data_dir)
    if test_n == 0:
        return train, None
    have = datasets.count(dataset, "test", data_dir)  # from the headers: read only what is used
    if have is None and test_n is None:  # the default asks for test points only where there are some
        return train, None
    want = test_n if test_n is not None else min(TEST_N_DEFAULT, have)
    return train, datasets.load(dataset, "test", n=want, root=data_dir)


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

    ``rows``: ``agop rfm`` metrics rows (``layer`` from 1, ``stage`` in input/agop/features,
    ``nc1``, ``nc2``, ``train_acc``, ``test_acc``). With m the last layer that has an input row
    (L + 1 for a finished run), log NC1(X_1) − log NC1(X_m) is the sum over l < m of three
    steps: input → agop (M^{1/2}), agop → features (random features and ReLU), features → next
    input (row normalization); ``share_*`` is each step's sum over that total (a negative share
    raised NC1). Counts are over the layers with both stages.
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


def run_rfm(out: Any = None, resume: Any = None, progress: bool = True, *,
            dataset: str | None = None, n: int | None = None, test_n: int | None = None,
            depth: int | None = None, bandwidth: float | None = None, width: int | None = None,
            ridge: float | None = None, features: str | None = None, seed: int | None = None,
            device: str | None = None, dtype: str | None = None, data_dir: Any = None,
            pdf: bool = False) -> Any:
    """The ``agop rfm`` experiment: Deep RFM on a dataset, measured per layer and stage.

    Sections 5.1–5.2, Figures 2, 3, 6. Trains on the first ``n`` training points (all if
    None), records f_l's accuracy on the first ``test_n`` test points (None: up to 1,000 where
    the dataset has a test split; 0: none). Writes into the run folder ``out`` (default
    ``runs/rfm-<time>``): config.json, metrics.csv and checkpoint.pt after every layer,
    gram/layer_XXX.npz (the Figure 2 Gram of a class-balanced subset of ≤ 500 training
    points at a few layers), figures/ and summary.json at the end.

    Settings left None take :data:`RFM_DEFAULTS` (digits, depth 10, bandwidth 2, width 512,
    ridgeless, Gaussian features, seed 0, device and dtype "auto").

    ``resume=DIR`` continues an interrupted run from its last finished layer and ends with
    exactly the numbers of an uninterrupted run (times aside). Settings passed with a resume
    must equal the run's, except ``data_dir`` and ``device`` (a run continued on another
    device than it started on warns: its numbers then differ by rounding). Returns the
    :class:`agop.experiments.records.RunDir`.
    """
    from pathlib import Path

    from tqdm.auto import tqdm

    from agop.experiments.records import RunDir, default_run_dir

    given = dict(dataset=dataset, n=n, test_n=test_n, depth=depth, bandwidth=bandwidth,
                 width=width, ridge=ridge, features=features, seed=seed, device=device,
                 dtype=dtype, data_dir=None if data_dir is None else str(data_dir))
    explicit = {k: v for k, v in given.items() if v is not None}
    ckpt = None
    if resume is not None:
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise ValueError(f"give either out or resume, not both ({out} vs {resume})")
        run = RunDir.resume(resume, "rfm")
        RunDir.check_settings(run.settings, {k: v for k, v in explicit.items()
                                             if k not in _FREE_ON_RESUME})
        settings = {**RFM_DEFAULTS, **run.settings,
                    **{k: v for k, v in explicit.items() if k in _FREE_ON_RESUME}}
        ckpt = run.load_checkpoint()
    else:
        settings = {**RFM_DEFAULTS, **explicit}
    for key in ("n", "test_n"):
        if settings[key] is not None:
            check_int(settings[key], key, minimum=0 if key == "test_n" else 2)
    model = DeepRFM(settings["depth"], settings["bandwidth"], settings["width"],
                    settings["ridge"], settings["features"], settings["seed"],
                    settings["device"], dtype=settings["dtype"])
    model._check_params()
    if resume is not None and run.config.get("device") not in (None, str(model.device_)):
        warnings.warn(f"{resume} started on {run.config['device']} and continues on "
                      f"{model.device_}: its numbers will differ from an uninterrupted run by "
                      "rounding", stacklevel=2)
        run.update_config(device=str(model.device_))
    started = time.perf_counter()
    if model.device_.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device_)

    if ckpt is None:
        train, test = _load_data(settings["dataset"], settings["n"], settings["test_n"],
                                 settings["data_dir"])
        steps = model.fit_iter(train.X, train.y, None if test is None else test.X,
                               None if test is None else test.y)  # checks memory first
        if resume is None:
            run = RunDir.create(out if out is not None else default_run_dir("rfm"), "rfm", settings)
        n_test = 0 if test is None else len(test)
        run.update_config(
            device=str(model.device_), dtype=dtype_name(model.dtype_),
            threads=torch.get_num_threads(),
            data={"name": train.name, "train": len(train), "test": n_test,
                  "dim": int(train.X.shape[1]), "classes": len(model.classes_),
                  "class_names": [train.classes[c] for c in model.classes_],
                  "image_shape": list(train.image_shape)},
            memory_needed_bytes=model.memory_needed(len(train), int(train.X.shape[1]),
                                                    len(model.classes_), n_test),
            gram={"layers": gram_layers(model.depth),
                  "points_per_class": max(1, GRAM_POINTS // len(model.classes_))},
        )
    else:
        model = DeepRFM.from_state_dict(ckpt["model"], device=settings["device"])
        steps = model.resume_iter() if model.layers_done_ <= model.depth else iter(())
    data = run.config["data"]
    title = f"{data['name']}, N = {data['train']:,}"
    y = to_numpy(model._y)  # class indices of the training points
    subset = gram_subset(y, len(model.classes_))
    keep = set(gram_layers(model.depth))

    bar = tqdm(total=model.depth + 1, initial=model.layers_done_, disable=not progress,
               desc="agop rfm", unit="layer")
    try:
        for step in steps:
            if step.layer in keep:
                rows_idx = torch.as_tensor(subset, device=step.inputs.device)
                _save_gram(run, step.layer, step.inputs[rows_idx], y[subset])
            run.write_metrics(model.history_, _metric_columns(model.history_))
            run.save_checkpoint({"model": model.state_dict()})
            bar.update(1)
            bar.set_postfix(nc1=f"{step.rows[0]['nc1']:.3g}")
    finally:
        bar.close()

    rows = model.history_
    _figures(run, rows, data["class_names"], title, pdf)
    summary = summarize(rows, load_grams(run.path), len(model.classes_))
    summary["wall_seconds"] = time.perf_counter() - started  # this invocation, data loading included
    if model.device_.type == "cuda":
        summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(model.device_))
    run.write_summary(summary)
    return run
