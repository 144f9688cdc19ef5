"""The skeleton every ``run_xxx`` experiment shares, so that each keeps only its differences.

A run goes through the same five steps whatever it measures::

    start = start_run("rfm", DEFAULTS, given, out=out, resume=resume, free=("data_dir", "device"))
    train, test = load_data(s["dataset"], s["n"], s["test_n"], s["data_dir"], test_cap=1000)
    run = start.create()                   # a new run's folder, once the data has loaded
    write_config(run, device=dev, dtype=dtype, data=data_config(train, test), ...)
    record_device(start, dev)              # on resume: warn and record a device change
    checkpoint_loop(steps, on_step, total=..., initial=..., progress=..., desc=...)

- :func:`merge_settings`: defaults, then the settings given (None means "not given").
- :func:`start_run`: the out/resume rules. Give ``out`` (a new run) or ``resume`` (an existing
  one), not both; on resume, every explicit setting must equal the run's stored one (a setting
  the stored config lacks counts as its default) except the ``free`` keys, and the checkpoint
  is loaded (``weights_only=True``).
- :func:`load_data`: the train split and, by one rule for every run kind, the test split.
- :func:`data_config`: ``config["data"]``, one schema for every run kind: ``name``, ``train``,
  ``test``, ``dim``, ``classes``, ``class_names``, ``image_shape``.
- :func:`write_config`: the device, dtype, threads and data of a run, into config.json.
- :func:`record_device`: one rule for a device change on resume: warn and record the new one.
- :func:`checkpoint_loop`: run a step iterator, recording and checkpointing after each step
  (through the caller's ``on_step``), with a tqdm progress bar.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from agop.experiments.records import RunDir, default_run_dir

__all__ = ["RunStart", "checkpoint_loop", "data_config", "explicit_settings", "load_data",
           "merge_settings", "record_device", "start_run", "write_config"]


def explicit_settings(given: Mapping[str, Any]) -> dict[str, Any]:
    """The settings actually given: ``given`` without its None values.

    Parameters
    ----------
    given : mapping
        Setting name to value; None means "not given" (take the default, or the stored value
        on resume).

    Returns
    -------
    dict
        The entries of ``given`` whose value is not None, in their order.
    """
    return {k: v for k, v in given.items() if v is not None}


def merge_settings(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` overridden by the settings of ``given`` that are not None.

    Parameters
    ----------
    defaults : mapping
        Every setting of the run kind with its default value (defines the key order).
    given : mapping
        Settings passed by the caller; None values are ignored.

    Returns
    -------
    dict
        A new dict: the defaults' keys first, then any given key the defaults lack.
    """
    return {**defaults, **explicit_settings(given)}


@dataclass
class RunStart:
    """Where a run starts, as decided by :func:`start_run`.

    Attributes
    ----------
    kind : str
        The run kind (``"rfm"``, ``"mlp"``, ...), stored as config.json's ``"kind"``.
    settings : dict
        The complete settings of the run: for a new run the defaults merged with the given
        ones (and completed by ``complete``); on resume the run's stored settings, with the
        given values of the free keys on top.
    out : str or os.PathLike or None
        The folder of a new run (None: ``runs/<kind>-<time>``, chosen by :meth:`create`).
    run : RunDir or None
        The run folder: the resumed one, or None for a new run until :meth:`create`.
    checkpoint : dict or None
        The resumed run's last checkpoint (None for a new run, or a run that stopped before
        its first checkpoint).
    resumed : bool
        Whether this continues an existing run.
    """

    kind: str
    settings: dict[str, Any]
    out: str | os.PathLike | None = None
    run: RunDir | None = None
    checkpoint: dict[str, Any] | None = None
    resumed: bool = False

    def create(self) -> RunDir:
        """The run folder: created now for a new run (config.json with the settings), else the
        resumed one. Call it once the data has loaded, so that bad input leaves no folder."""
        if self.run is None:
            path = self.out if self.out is not None else default_run_dir(self.kind)
            self.run = RunDir.create(path, self.kind, self.settings)
        return self.run


def start_run(kind: str, defaults: Mapping[str, Any], given: Mapping[str, Any], *,
              out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
              free: Iterable[str] = (),
              complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunStart:
    """Apply the out/resume rules shared by every experiment; nothing is written.

    Parameters
    ----------
    kind : str
        The run kind; a resumed folder must be of this kind.
    defaults : mapping
        Every setting of the run kind with its default.
    given : mapping
        The settings the caller passed, None meaning "not given".
    out, resume : path or None
        ``out``: the folder of a new run; ``resume``: an existing run folder to continue. Not
        both (unless they name the same folder).
    free : iterable of str
        Settings that may differ from the stored ones on resume (e.g. ``data_dir``, ``device``:
        they change no number, or numbers by rounding only); their given values win.
    complete : callable, optional
        ``complete(settings) -> settings``: completes and checks a new run's merged settings
        (presets, integer checks). Not called on resume: the stored settings are complete.

    Returns
    -------
    RunStart
        The settings, and on resume the opened :class:`RunDir` and its checkpoint.

    Raises
    ------
    ValueError
        ``out`` and ``resume`` name different folders; the folder is another kind of run; an
        explicit setting other than a free one differs from the stored value.
    FileNotFoundError
        ``resume`` is not a run folder.
    """
    free = tuple(free)
    chosen = explicit_settings(given)
    if resume is None:
        settings = merge_settings(defaults, chosen)
        if complete is not None:
            settings = complete(settings)
        return RunStart(kind, settings, out=out)
    if out is not None and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(f"give either out or resume, not both ({out} vs {resume})")
    run = RunDir.resume(resume, kind)
    # a setting the run's config lacks (added to the defaults later) has its default value
    stored = {**defaults, **run.settings}
    RunDir.check_settings(stored, {k: v for k, v in chosen.items() if k not in free})
    settings = {**stored, **{k: v for k, v in chosen.items() if k in free}}
    return RunStart(kind, settings, out=resume, run=run, checkpoint=run.load_checkpoint(),
                    resumed=True)


def load_data(dataset: str, n: int | None = None, test_n: int | None = None,
              data_dir: str | os.PathLike | None = None, *, test_cap: int | None = None):
    """The first ``n`` training points and, by one rule for every run kind, the test points.

    Parameters
    ----------
    dataset : str
        Any :data:`agop.datasets.DATASETS` name.
    n : int or None
        Training points, the first in file order (None: all).
    test_n : int or None
        Test points, the first in file order. 0: no test set. None: all of them, at most
        ``test_cap``, and no test set where the dataset has no test split.
    data_dir : path or None
        The data root (:func:`agop.datasets.load`'s ``root``).
    test_cap : int or None
        The most test points ``test_n=None`` asks for (None: no cap).

    Returns
    -------
    (Dataset, Dataset or None)
        The train split and the test split (None without one). Only the points used are read.
    """
    from agop import datasets

    train = datasets.load(dataset, "train", n=n, root=data_dir)
    if test_n == 0:
        return train, None
    if test_n is None:
        have = datasets.count(dataset, "test", data_dir)  # from the headers: no pixels read
        if have is None:
            return train, None
        test_n = have if test_cap is None else min(test_cap, have)
    return train, datasets.load(dataset, "test", n=test_n, root=data_dir)


def data_config(train: Any, test: Any = None,
                classes: Iterable[int] | None = None) -> dict[str, Any]:
    """``config["data"]`` of a run: one schema for every run kind.

    Parameters
    ----------
    train, test : Dataset
        The splits used (``test`` None: no test set).
    classes : iterable of int, optional
        The class indices the model was fitted on (e.g. ``DeepRFM.classes_``); default: all of
        ``train.classes``.

    Returns
    -------
    dict
        ``name``, ``train`` and ``test`` (numbers of points), ``dim`` (D), ``classes`` (K),
        ``class_names`` (of those classes, in index order) and ``image_shape`` (C, H, W).
    """
    idx = range(len(train.classes)) if classes is None else [int(c) for c in classes]
    return {"name": train.name, "train": len(train), "test": 0 if test is None else len(test),
            "dim": int(train.X.shape[1]), "classes": len(idx),
            "class_names": [train.classes[c] for c in idx],
            "image_shape": list(train.image_shape)}


def write_config(run: RunDir, *, device: Any, dtype: str, data: Mapping[str, Any] | None = None,
                 **extra: Any) -> None:
    """Record what a run actually used in config.json (atomically).

    Parameters
    ----------
    run : RunDir
        The run folder.
    device : str or torch.device
        The device resolved from the ``device`` setting (stored as a string).
    dtype : str
        The compute dtype's name (``agop.backend.dtype_name``).
    data : mapping, optional
        :func:`data_config` (omitted: left as stored, e.g. on resume).
    **extra
        Any further top-level fields (the memory estimate, the Gram layers, ...).
    """
    fields: dict[str, Any] = {"device": str(device), "dtype": dtype,
                              "threads": torch.get_num_threads()}
    if data is not None:
        fields["data"] = dict(data)
    run.update_config(**fields, **extra)


def record_device(start: RunStart, device: Any, *, stacklevel: int = 3) -> None:
    """One rule for a device change: a run continued on another device than its config.json
    names warns (its numbers then differ from an uninterrupted run by rounding) and records the
    new device. A new run, or the same device, does nothing.

    Parameters
    ----------
    start : RunStart
        From :func:`start_run`.
    device : str or torch.device
        The device this invocation computes on.
    stacklevel : int
        Passed to :func:`warnings.warn` (the default points at the caller of ``run_xxx``).
    """
    if not start.resumed or start.run is None:
        return
    before = start.run.config.get("device")
    if before not in (None, str(device)):
        warnings.warn(f"{start.run.path} started on {before} and continues on {device}: its "
                      "numbers will differ from an uninterrupted run by rounding",
                      stacklevel=stacklevel)
        start.run.update_config(device=str(device))


def checkpoint_loop(steps: Iterable[Any], on_step: Callable[[Any], Mapping[str, Any] | None], *,
                    total: int, initial: int = 0, progress: bool = True, desc: str = "",
                    unit: str = "step") -> int:
    """Run ``steps``, calling ``on_step(step)`` after each, with a tqdm progress bar.

    ``on_step`` writes the records of the step and then the checkpoint that matches them, in
    that order, so that an interruption at any point leaves records a resume can continue
    (records of a step whose checkpoint was not written are rewritten by the resumed run).

    Parameters
    ----------
    steps : iterable
        A step iterator, e.g. ``DeepRFM.fit_iter(X, y)`` or ``resume_iter()``.
    on_step : callable
        ``on_step(step) -> postfix``: records and checkpoints one step; the returned mapping
        (or None) is shown beside the bar.
    total, initial : int
        Steps in the whole run, and those done before this call (a resumed run).
    progress : bool
        Show the bar (on stderr).
    desc, unit : str
        The bar's label and unit.

    Returns
    -------
    int
        The number of steps run by this call.
    """
    from tqdm.auto import tqdm

    done = 0
    bar = tqdm(total=total, initial=initial, disable=not progress, desc=desc, unit=unit)
    try:
        for step in steps:
            postfix = on_step(step)
            done += 1
            bar.update(1)
            if postfix:
                bar.set_postfix(postfix)
    finally:
        bar.close()
    return done
