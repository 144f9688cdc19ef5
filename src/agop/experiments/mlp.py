"""The ``agop mlp`` experiment: the paper's MLP trained and measured every few epochs.

Section 4, Appendices B.2, B.3, C; Figures 1, 7, 8. The network, its trainer and its probes are
:mod:`agop.models.mlp`; this module owns the settings, the run folder, the checkpoints and the
headline numbers (:func:`headline`, the one place they are computed).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from agop import backend
from agop._validate import check_int, check_positive, finite_positive, metric_float
from agop.models.mlp import MLP, PRESETS, STAGES, Trainer, measurement_epochs

__all__ = ["MLP_DEFAULTS", "check_memory", "headline", "memory_needed", "run_mlp", "summarize",
           "summary_text"]

#: The settings of a new run that the preset does not fix (None: the dataset's default, all
#: training points, all test points). ``lr``, ``init_scale`` and ``reset_optimizer`` come from
#: :data:`agop.models.mlp.PRESETS` unless given.
MLP_DEFAULTS: dict[str, Any] = {"dataset": None, "n": None, "test_n": None, "epochs": 250,
                                "measure_every": 10, "width": 512, "depth": 5,
                                "batch_size": 128, "preset": "paper", "seed": 0}
# settings that may differ when a run is resumed: more epochs train a finished run further
_FREE_ON_RESUME = ("epochs",)
_PREPROCESSING = "flattened pixels in [0, 1], no standardization"


# ----------------------------------------------------------------------------- headline numbers
def _log_drop(a: float, b: float) -> float:
    """log10(a / b): the decades of NC1 removed going from ``a`` to ``b`` (NaN unless both and
    their ratio are finite and > 0)."""
    return math.log10(a / b) if finite_positive(a, b) and finite_positive(a / b) else math.nan


def _over_layers(values: list[float], how) -> float:
    """``how`` (min, max, a mean) of one value per layer; NaN if any layer's is NaN or none."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return how(values)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers of an MLP run, finished or not, from its metrics rows.

    Section 4, Figures 1, 7 (which part of a layer removes NC1: S Vᵀ, or U and the ReLU) and 8
    (the Neural Feature Ansatz correlations, tr Σ_W/tr Σ_T). The one place these numbers are
    computed: summary.json, ``agop mlp``'s printout and the report read them from here. A key
    names the epochs it is taken over; a key that names none is at the last measured epoch.

    Parameters
    ----------
    rows : list of dict
        :func:`agop.models.mlp.probe` rows with ``"epoch"``, as :class:`agop.models.mlp.Trainer`
        yields them or metrics.csv holds them: ``epoch``, ``layer`` (from 1), ``stage``
        (input/right/output), ``nc1``, ``within_total``, ``nfa``, ``nfa_sqrt``, ``loss``,
        ``train_acc``, ``test_acc``. Missing or undefined values (None, empty) count as NaN.

    Returns
    -------
    dict
        ``{}`` without rows; else exactly these keys (floats are NaN where undefined):

        - ``last_epoch``, ``first_epoch`` : int, the last and the first measured epochs.
        - ``num_layers`` : int, hidden layers measured at the last epoch.
        - ``loss``, ``train_acc``, ``test_acc`` : float, at the last epoch: the training MSE
          over all N·K entries, the accuracies (``test_acc`` NaN without a test set).
        - ``per_layer`` : list of dict, one per hidden layer, first to last:

          - ``layer`` : int, from 1.
          - ``nc1_input``, ``nc1_right``, ``nc1_output`` : NC1 of Φ_l(X), S Vᵀ Φ_l(X) and
            σ(U S Vᵀ Φ_l(X)) at the last epoch.
          - ``drop_right`` : log10(NC1 input / NC1 right), the decades of NC1 removed by S Vᵀ;
            ``drop_output`` : log10(NC1 right / NC1 output), removed by U and the ReLU (NaN
            unless both NC1 are finite and > 0).
          - ``right_dominates`` : bool, ``drop_right > |drop_output|`` (a tie does not).
          - ``nfa``, ``nfa_sqrt`` : ρ(W_lᵀW_l, AGOP_l) and ρ(W_lᵀW_l, AGOP_l^{1/2}) at the
            last epoch.
          - ``nfa_sqrt_min_over_epochs`` : the layer's lowest ``nfa_sqrt`` over all measured
            epochs (NaNs skipped).
        - ``layers_right_dominates`` : int, the number of layers with ``right_dominates``.
        - ``drop_right_total``, ``drop_output_total`` : ``drop_right`` and ``drop_output``
          summed over the layers (together: the network's log10 NC1 reduction).
        - ``share_right`` : drop_right_total / (drop_right_total + drop_output_total), NaN
          unless that sum is finite and > 0.
        - ``nfa_mean_last_epoch`` : the mean over layers of ``nfa``.
        - ``nfa_sqrt_mean_last_epoch``, ``nfa_sqrt_min_last_epoch``,
          ``nfa_sqrt_max_last_epoch`` : the mean, lowest and highest over layers of
          ``nfa_sqrt`` (NaN if a layer's is NaN).
        - ``nfa_sqrt_min_all_epochs`` : the lowest ``nfa_sqrt`` over all layers and measured
          epochs (non-finite values skipped).
        - ``within_total_first_epoch``, ``within_total_last_epoch`` : tr Σ_W/tr Σ_T of the
          last hidden layer's output at the first and the last measured epochs.
    """
    epochs = sorted({r.get("epoch") for r in rows if r.get("epoch") is not None})
    if not epochs:
        return {}
    first, last = epochs[0], epochs[-1]
    final = {(r.get("layer"), r.get("stage")): r for r in rows if r.get("epoch") == last}
    start = {(r.get("layer"), r.get("stage")): r for r in rows if r.get("epoch") == first}
    layer_ids = sorted({layer for layer, _ in final if layer is not None})
    inputs = [r for r in rows if r.get("stage") == "input"]
    per_layer = []
    for j in layer_ids:
        nc1 = {st: metric_float(final.get((j, st), {}).get("nc1")) for st in STAGES}
        drop_right = _log_drop(nc1["input"], nc1["right"])
        drop_output = _log_drop(nc1["right"], nc1["output"])
        head = final.get((j, "input"), {})
        over_epochs = [metric_float(r.get("nfa_sqrt")) for r in inputs if r.get("layer") == j]
        per_layer.append({
            "layer": j,
            **{f"nc1_{st}": v for st, v in nc1.items()},
            "drop_right": drop_right,
            "drop_output": drop_output,
            "right_dominates": bool(drop_right > abs(drop_output)),
            "nfa": metric_float(head.get("nfa")),
            "nfa_sqrt": metric_float(head.get("nfa_sqrt")),
            "nfa_sqrt_min_over_epochs": min((v for v in over_epochs if not math.isnan(v)),
                                            default=math.nan),
        })
    drop_right_total = sum(x["drop_right"] for x in per_layer)
    drop_output_total = sum(x["drop_output"] for x in per_layer)
    total = drop_right_total + drop_output_total
    nfa_sqrt = [x["nfa_sqrt"] for x in per_layer]
    all_epochs = [v for v in (metric_float(r.get("nfa_sqrt")) for r in inputs) if math.isfinite(v)]
    head = final.get((layer_ids[0], "input"), {}) if layer_ids else {}
    top = layer_ids[-1] if layer_ids else None
    return {
        "last_epoch": last,
        "first_epoch": first,
        "num_layers": len(per_layer),
        "loss": metric_float(head.get("loss")),
        "train_acc": metric_float(head.get("train_acc")),
        "test_acc": metric_float(head.get("test_acc")),
        "per_layer": per_layer,
        "layers_right_dominates": sum(x["right_dominates"] for x in per_layer),
        "drop_right_total": drop_right_total,
        "drop_output_total": drop_output_total,
        "share_right": drop_right_total / total if finite_positive(total) else math.nan,
        "nfa_mean_last_epoch": _over_layers([x["nfa"] for x in per_layer], _mean),
        "nfa_sqrt_mean_last_epoch": _over_layers(nfa_sqrt, _mean),
        "nfa_sqrt_min_last_epoch": _over_layers(nfa_sqrt, min),
        "nfa_sqrt_max_last_epoch": _over_layers(nfa_sqrt, max),
        "nfa_sqrt_min_all_epochs": min(all_epochs, default=math.nan),
        "within_total_first_epoch": metric_float(start.get((top, "output"), {}).get("within_total")),
        "within_total_last_epoch": metric_float(final.get((top, "output"), {}).get("within_total")),
    }


def summarize(rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """summary.json of a finished run: the dataset, the preset and :func:`headline` as it is."""
    return {"dataset": settings["dataset"], "preset": settings["preset"], **headline(rows)}


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for the terminal from :func:`summarize`'s dict (or summary.json, NaN as null)."""
    def g(v: float | None, spec: str = ".3g") -> str:
        return "nan" if v is None or math.isnan(v) else format(v, spec)

    s = summary
    no_test = s["test_acc"] is None or math.isnan(s["test_acc"])  # no test set
    test = "" if no_test else f", test acc {g(s['test_acc'], '.4f')}"
    lines = [f"epoch {s['last_epoch']}: train loss {g(s['loss'], '.4g')}, "
             f"train acc {g(s['train_acc'], '.4f')}{test}"]
    for lay in s["per_layer"]:
        lines.append(f"  layer {lay['layer']}: NC1 input {g(lay['nc1_input'])} -> right "
                     f"{g(lay['nc1_right'])} -> output {g(lay['nc1_output'])}; NFA rho(WtW, "
                     f"AGOP^1/2) {g(lay['nfa_sqrt'], '.3f')}, rho(WtW, AGOP) {g(lay['nfa'], '.3f')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run
def _complete(merged: dict[str, Any]) -> dict[str, Any]:
    """Complete and check a new run's settings: the preset's values where none was given."""
    from agop.datasets import DEFAULT_DATASET

    s = {k: merged[k] for k in MLP_DEFAULTS}
    s["dataset"] = s["dataset"] or DEFAULT_DATASET
    if s["preset"] not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {s['preset']!r}")
    for k, v in PRESETS[s["preset"]].items():
        s[k] = merged.get(k) if merged.get(k) is not None else v
    for k, lo in (("epochs", 0), ("measure_every", 1), ("width", 1), ("depth", 1),
                  ("batch_size", 1), ("seed", 0)):
        s[k] = check_int(s[k], k, minimum=lo)
    for k, lo in (("n", 1), ("test_n", 0)):
        if s[k] is not None:
            s[k] = check_int(s[k], k, minimum=lo)
    for k in ("lr", "init_scale"):
        check_positive(s[k], k)
        s[k] = float(s[k])
    return s


def _figures(run: Any, rows: list[dict[str, Any]], s: dict[str, Any], pdf: bool = False) -> None:
    from agop.experiments import figures

    where = (f"{s['dataset']}, N = {run.config['data']['train']}, {s['preset']} preset, "
             f"lr {s['lr']:g}, init gain {s['init_scale']:g}")
    figures.mlp_nc1_stages(rows, run.figures_dir / "fig1_nc1_stages", title=where, pdf=pdf)
    figures.mlp_training(rows, run.figures_dir / "fig8_nfa_training", title=where, pdf=pdf)


def memory_needed(dim: int, num_classes: int, n: int, n_test: int = 0, *, width: int = 512,
                  depth: int = 5, batch_size: int = 128, itemsize: int = 4) -> int:
    """Bytes an ``agop mlp`` run holds at its peak, estimated before anything is allocated.

    The sum of: the data (N × D inputs and N × K targets, the test inputs, in the compute
    dtype; int64 labels); the network's P parameters four times (weights, gradients, Adam's
    two moments); a training batch's activations, forward and backward; and the measurement
    (:func:`agop.models.mlp.probe`), which holds for every hidden layer at once the float64
    SVD of W (and W's float64 copy), the K-output Jacobian Gram (width × width) and the D × D
    within-class scatter of each of its three stages (input D_l, S Vᵀ r_l, output width),
    then works on the largest of those matrices (three more of its size). The measurement's
    batch is planned from the memory left (at least one row).

    Parameters
    ----------
    dim, num_classes, n, n_test : int
        D, K, N training and test points.
    width, depth, batch_size : int
        The network and the training batch.
    itemsize : int
        Bytes per element of the compute dtype (4: float32).

    Returns
    -------
    int
    """
    ins = [dim] + [width] * (depth - 1)
    params = sum(d * width for d in ins) + width * num_classes
    data = (n * (dim + num_classes) + n_test * dim) * itemsize + 8 * (n + n_test)
    train = 4 * params * itemsize + 2 * min(batch_size, n) * (dim + depth * width
                                                             + num_classes) * itemsize
    probe, largest = 0, 0
    for d in ins:
        r = min(width, d)
        svd = 8 * (2 * width * d + width * r + r * d + r)
        scatter = 8 * (d * d + r * r + width * width + 3 * num_classes * (d + r + width))
        probe += svd + scatter + 8 * width * width
        largest = max(largest, d, width)
    return int(data + train + probe + 3 * 8 * largest * largest)


def check_memory(dim: int, num_classes: int, n: int, n_test: int, settings: dict[str, Any],
                 device: torch.device) -> int:
    """Raise ``MemoryError`` (one line: the size needed, what is free, what to change) when
    :func:`memory_needed` exceeds the memory free on ``device`` (capped by
    ``$AGOP_MEMORY_GB``); else return the bytes needed."""
    s = settings
    need = memory_needed(dim, num_classes, n, n_test, width=s["width"], depth=s["depth"],
                         batch_size=s["batch_size"])
    have = backend.memory_budget(device, fraction=1.0)
    if need > have:
        raise MemoryError(
            f"the MLP (width {s['width']}, depth {s['depth']}, {dim} inputs, {num_classes} "
            f"classes) on {n:,} points needs about {backend.format_bytes(need)} on {device} "
            f"but only {backend.format_bytes(have)} is free; use a smaller --width or --depth, "
            f"or fewer points (--n)")
    return need


def run_mlp(out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
            progress: bool = True, *, dataset: str | None = None, n: int | None = None,
            test_n: int | None = None, epochs: int | None = None,
            measure_every: int | None = None, lr: float | None = None,
            init_scale: float | None = None, width: int | None = None,
            depth: int | None = None, batch_size: int | None = None,
            preset: str | None = None, seed: int | None = None,
            device: str | torch.device = "auto", data_dir: str | os.PathLike | None = None,
            pdf: bool = False):
    """The ``agop mlp`` experiment: train the paper's MLP and record Figures 1, 7, 8.

    Section 4, Appendices B.2, B.3, C. The seed draws the weights and then, from the same CPU
    generator, the order of every epoch. Writes a :class:`agop.experiments.records.RunDir`:
    config.json, metrics.csv (one row per measured epoch, layer and stage; see
    :func:`agop.models.mlp.probe`) and checkpoint.pt after every measurement, figures/ and
    summary.json (:func:`summarize`) at the end.

    Parameters
    ----------
    out : path, optional
        The folder of a new run (default ``runs/mlp-<time>``).
    resume : path, optional
        An interrupted run to continue from its last checkpoint; it ends with exactly the
        numbers of an uninterrupted run. Settings given with it must equal the stored ones,
        except ``epochs``, which may be raised to train a finished run further. A run
        continued on another device than it started on warns (its numbers then differ by
        rounding).
    progress : bool
        Show a progress bar.
    dataset, n, test_n, epochs, measure_every, lr, init_scale, width, depth, batch_size, preset, seed
        The settings; None means the default (on resume, the stored value): ``dataset``
        ``agop.datasets.DEFAULT_DATASET``, ``n`` all training points, ``test_n`` all test
        points (0: none), then :data:`MLP_DEFAULTS`; ``lr`` and ``init_scale`` from the
        preset (:data:`agop.models.mlp.PRESETS`).
    device : str or torch.device
        ``"auto"`` (the GPU if there is one), ``"cpu"``, ``"cuda"``.
    data_dir : path, optional
        The data root (on resume: the stored one unless given).
    pdf : bool
        Also write the figures as PDF.

    Returns
    -------
    RunDir
        The run folder.
    """
    from agop.experiments.common import (checkpoint_loop, data_config, load_data, record_device,
                                         record_threads, start_run, write_config)

    given = {"dataset": dataset, "n": n, "test_n": test_n, "epochs": epochs,
             "measure_every": measure_every, "lr": lr, "init_scale": init_scale,
             "width": width, "depth": depth, "batch_size": batch_size, "preset": preset,
             "seed": seed}
    dev = backend.resolve_device(device)
    start = start_run("mlp", MLP_DEFAULTS, given, out=out, resume=resume, free=_FREE_ON_RESUME,
                      complete=_complete)
    s = start.settings
    s["epochs"] = check_int(s["epochs"], "epochs", minimum=0)
    if start.resumed and data_dir is None:
        data_dir = start.run.config.get("data_dir")
    train, test = load_data(s["dataset"], s["n"], s["test_n"], data_dir)
    # every check before the run folder is made: bad sizes or too little memory leave nothing
    dtype = backend.default_dtype()
    need = check_memory(int(train.X.shape[1]), train.num_classes, len(train),
                        0 if test is None else len(test), s, dev)
    gen = torch.Generator().manual_seed(s["seed"])
    model = MLP(train.X.shape[1], train.num_classes, s["width"], s["depth"], s["init_scale"],
                generator=gen).to(device=dev, dtype=dtype)
    trainer = Trainer(model, train.X, train.y, num_classes=train.num_classes, lr=s["lr"],
                      batch_size=s["batch_size"], reset_optimizer=s["reset_optimizer"],
                      generator=gen, X_test=None if test is None else test.X,
                      y_test=None if test is None else test.y,
                      measure_batch_size=(start.run.config.get("measure_batch_size")
                                          if start.resumed else None))
    state = start.checkpoint
    if state is not None:
        try:
            at = int(state["epoch"])
            trainer.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                RuntimeError) as exc:
            detail = (f"no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args
                      else (str(exc).strip().splitlines() or ["no message"])[0])
            raise start.run.bad_checkpoint(f"does not hold the state of this MLP run "
                                           f"({type(exc).__name__}: {detail})") from None
        if at > s["epochs"]:
            raise ValueError(f"the run's checkpoint is at epoch {at}, beyond "
                             f"epochs = {s['epochs']}")
    run = start.create()
    rows: list[dict[str, Any]] = []
    if state is not None:
        schedule = set(measurement_epochs(s["epochs"], s["measure_every"]))
        try:
            recorded = run.read_metrics()
        except ValueError as exc:  # the rows the checkpoint follows are lost
            raise ValueError(f"{exc}; delete checkpoint.pt and --resume to start the run "
                             f"over") from None
        rows = [r for r in recorded if isinstance(r.get("epoch"), int)
                and r["epoch"] <= trainer.epoch and r["epoch"] in schedule]
        # the records the checkpoint follows: every scheduled epoch up to it, each stage of
        # each layer (metrics.csv is written before the checkpoint it matches)
        want = sum(e <= trainer.epoch for e in schedule) * s["depth"] * len(STAGES)
        if len(rows) != want:
            raise ValueError(f"{run.path / 'metrics.csv'} holds {len(rows)} row(s) up to epoch "
                             f"{trainer.epoch} but the checkpoint follows {want}: it was cut or "
                             f"changed; delete checkpoint.pt and --resume to start the run over")
    record_device(start, dev)
    record_threads(start)
    write_config(run, device=dev, dtype=backend.dtype_name(dtype), data=data_config(train, test),
                 settings=s, data_dir=None if data_dir is None else str(data_dir),
                 measure_batch_size=trainer.measure_batch_size, preprocessing=_PREPROCESSING,
                 memory_needed_bytes=need,
                 model={"hidden_bias": False, "readout_bias": False,
                        "hidden_init": f"xavier_uniform(gain={s['init_scale']})",
                        "readout_init": "pytorch default (kaiming_uniform, a=sqrt(5))"})

    def record(new: list[dict[str, Any]]) -> None:
        rows[:] = [r for r in rows if r["epoch"] != trainer.epoch] + new
        run.write_metrics(rows, list(rows[0]))
        run.save_checkpoint(trainer.state_dict())  # after the records it matches: see resume

    def on_step(step) -> dict[str, str]:
        if step.rows:
            record(step.rows)
        return {"loss": f"{step.loss:.4g}"}

    epoch0 = trainer.epoch
    with backend.strict_fp32():
        steps = trainer.iter_epochs(s["epochs"], s["measure_every"])
        if trainer.epoch == 0:
            record(trainer.measure())
        checkpoint_loop(steps, on_step, total=s["epochs"], initial=trainer.epoch,
                        progress=progress, desc="agop mlp", unit="epoch")
    _figures(run, rows, s, pdf)
    summary = summarize(rows, s)
    # this invocation only (a resumed run counts what it did itself)
    summary["seconds"] = {**trainer.seconds, "epochs": trainer.epoch - epoch0}
    run.write_summary(summary)
    return run
