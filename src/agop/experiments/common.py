"""The skeleton every ``run_xxx`` experiment shares, so that each keeps only its differences.

A run goes through the same five steps whatever it measures::

    start = start_run("rfm", DEFAULTS, given, out=out, resume=resume, free=("data_dir", "device"))
    train, test = load_data(s["dataset"], s["n"], s["test_n"], s["data_dir"], test_cap=1000)
    run = start.create()                   # a new run's folder, once the data has loaded
    write_config(run, device=dev, dtype=dtype, data=data_config(train, test), ...)
    record_device(start, dev)              # on resume: warn and record a device change
    record_threads(start)                  # ... and a change of torch's thread count
    checkpoint_loop(steps, on_step, total=..., initial=..., progress=..., desc=...)

- :func:`merge_settings`: defaults, then the settings given (None means "not given").
- :func:`start_run`: the out/resume rules. Give ``out`` (a new run) or ``resume`` (an existing
  one), not both; on resume, every explicit setting must equal the run's stored one (a setting
  the stored config lacks counts as its default; dataset names compare by their canonical
  name) except the ``free`` keys, the temporary files a killed writer left are removed, and
  the checkpoint is loaded (``weights_only=True``; a damaged one is a one-line ValueError).
- :func:`load_data`: the train split and, by one rule for every run kind, the test split.
- :func:`data_config`: ``config["data"]``, one schema for every run kind: ``name``, ``train``,
  ``test``, ``dim``, ``classes``, ``class_names``, ``image_shape``.
- :func:`write_config`: the device, dtype, threads and data of a run, into config.json.
- :func:`record_device`, :func:`record_threads`: one rule for a change of device or of torch's
  thread count on resume (both change numbers by rounding): warn and record the new one.
- :func:`checkpoint_loop`: run a step iterator, recording and checkpointing after each step
  (through the caller's ``on_step``), with a tqdm progress bar.

Data-parallel runs (under ``torchrun``, :mod:`agop.distributed`) add three pieces: every rank
loads only its rows (:func:`load_shard`), rank 0 alone opens and writes the run folder
(:func:`on_root`), and a check that fails on any rank before the work starts fails on every
rank at the same point (:func:`checked`), as :class:`Refused`, so that no rank is left waiting
in a collective. In one process all three are plain calls.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from agop.experiments.records import RunDir, default_run_dir, remove_temporaries

__all__ = ["Refused", "RunStart", "Shard", "checked", "checkpoint_loop", "data_config",
           "explicit_settings", "load_data", "load_shard", "merge_settings", "on_root",
           "record_device", "record_threads", "start_run", "test_size", "write_config"]


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
    if "dataset" in chosen:  # "MNIST" and "mnist" are one dataset (ValueError if none)
        chosen["dataset"] = _canonical_dataset(chosen["dataset"])
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
    if isinstance(stored.get("dataset"), str):  # a run stored before names were canonical
        try:
            stored["dataset"] = _canonical_dataset(stored["dataset"])
        except ValueError:
            pass  # not a known name: the loader says so
    remove_temporaries(run.path)  # left by a writer that was killed; this run continues
    RunDir.check_settings(stored, {k: v for k, v in chosen.items() if k not in free})
    settings = {**stored, **{k: v for k, v in chosen.items() if k in free}}
    return RunStart(kind, settings, out=resume, run=run, checkpoint=run.load_checkpoint(),
                    resumed=True)


def _canonical_dataset(name: Any) -> Any:
    from agop.datasets import canonical_name

    return canonical_name(name)


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
    n_test = test_size(dataset, test_n, data_dir, test_cap=test_cap)
    return train, (datasets.load(dataset, "test", n=n_test, root=data_dir) if n_test else None)


def test_size(dataset: str, test_n: int | None, data_dir: str | os.PathLike | None = None, *,
              test_cap: int | None = None) -> int:
    """The number of test points :func:`load_data` selects (0: none), from the files' headers."""
    from agop import datasets

    if test_n == 0:
        return 0
    if test_n is None:
        have = datasets.count(dataset, "test", data_dir)  # from the headers: no pixels read
        if have is None:
            return 0
        return have if test_cap is None else min(test_cap, have)
    return int(test_n)


@dataclass
class Shard:
    """One rank's share of a run's data (:func:`load_shard`).

    Attributes
    ----------
    train : Dataset
        This rank's rows ``row_range(n_train, rank, world)`` of the training points selected.
    test : Dataset or None
        This rank's rows ``row_range(n_test, rank, world)`` of the test points (None: no test).
    n_train, n_test : int
        The numbers of training and test points over all ranks.
    labels : numpy.ndarray
        All ``n_train`` training labels (int64), the same on every rank.
    rows : tuple of int
        ``(start, stop)``: this rank's training rows.
    """

    train: Any
    test: Any
    n_train: int
    n_test: int
    labels: Any
    rows: tuple[int, int]


def load_shard(dataset: str, n: int | None = None, test_n: int | None = None,
               data_dir: str | os.PathLike | None = None, *, test_cap: int | None = None,
               rank: int = 0, world: int = 1) -> Shard:
    """The points :func:`load_data` selects, as rank ``rank`` of ``world`` holds them.

    Every rank reads all training labels (headers and label files only where the format
    allows) and the pixels of its own contiguous block of rows
    (:func:`agop.distributed.row_range`) of the training and the test points; concatenated
    in rank order the blocks are :func:`load_data`'s splits. Communicates with no other rank.

    Raises
    ------
    ValueError
        More processes than training points, or than test points (each rank needs one of
        each; ``test_n=0`` runs without a test set).
    """
    from agop import datasets
    from agop.distributed import check_world_size, row_range

    labels = datasets.load_labels(dataset, "train", n=n, root=data_dir)
    N = len(labels)
    check_world_size(N, world, "training points")
    n_test = test_size(dataset, test_n, data_dir, test_cap=test_cap)
    if 0 < n_test < world:
        raise ValueError(f"{world} processes but only {n_test} test points: each process needs "
                         f"at least one of them; use --test-n 0 (no test set) or a test set of "
                         f"at least {world} points")
    rows = row_range(N, rank, world)
    train = datasets.load(dataset, "train", n=n, root=data_dir, rows=rows)
    test = (datasets.load(dataset, "test", n=n_test, root=data_dir,
                          rows=row_range(n_test, rank, world)) if n_test else None)
    return Shard(train, test, N, n_test, labels, rows)


def data_config(train: Any, test: Any = None,
                classes: Iterable[int] | None = None, *, n_train: int | None = None,
                n_test: int | None = None) -> dict[str, Any]:
    """``config["data"]`` of a run: one schema for every run kind.

    Parameters
    ----------
    train, test : Dataset
        The splits used (``test`` None: no test set).
    classes : iterable of int, optional
        The class indices the model was fitted on (e.g. ``DeepRFM.classes_``); default: all of
        ``train.classes``.
    n_train, n_test : int, optional
        The numbers of points over all ranks (:class:`Shard`), where ``train`` and ``test``
        hold one rank's rows; default: their lengths.

    Returns
    -------
    dict
        ``name``, ``train`` and ``test`` (numbers of points), ``dim`` (D), ``classes`` (K),
        ``class_names`` (of those classes, in index order) and ``image_shape`` (C, H, W).
    """
    idx = range(len(train.classes)) if classes is None else [int(c) for c in classes]
    if n_train is None:
        n_train = len(train)
    if n_test is None:
        n_test = 0 if test is None else len(test)
    return {"name": train.name, "train": int(n_train), "test": int(n_test),
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


def record_threads(start: RunStart, *, stacklevel: int = 3) -> None:
    """One rule for a change of torch's CPU thread count on resume, as for a device change.

    The thread count changes how float sums are split, so a run continued with another count
    than config.json's ``threads`` (recorded by :func:`write_config`) ends with numbers that
    differ from an uninterrupted run by rounding: warn, and record the new count (``threads``)
    and the change (``threads_changed``: every count the run has used, in order). Results are
    not made independent of the count; ``OMP_NUM_THREADS`` set to the recorded one continues a
    run exactly. A new run, or the same count, does nothing.

    Parameters
    ----------
    start : RunStart
        From :func:`start_run`.
    stacklevel : int
        Passed to :func:`warnings.warn`.
    """
    if not start.resumed or start.run is None:
        return
    before, now = start.run.config.get("threads"), torch.get_num_threads()
    if before is None or int(before) == now:
        return
    warnings.warn(f"{start.run.path} ran with {before} CPU thread(s) and continues with {now}: "
                  f"its numbers will differ from an uninterrupted run by rounding (set "
                  f"OMP_NUM_THREADS={before} to continue it exactly)", stacklevel=stacklevel)
    used = list(start.run.config.get("threads_changed") or [int(before)])
    start.run.update_config(threads=now, threads_changed=used + [now])


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


# ----------------------------------------------------------------------------- distributed runs
class Refused(Exception):
    """A check that failed before the work started, raised on every rank at the same point.

    ``error`` is the exception to report: the rank's own where it failed, else a copy of the
    first failing rank's (same type for ``ValueError``, ``FileNotFoundError`` and
    ``MemoryError``, else ``RuntimeError``; the message names that rank unless every rank
    failed alike). The caller leaves the process group cleanly and raises ``error``.
    """

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


_SENT_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "MemoryError": MemoryError,
}


def _report(exc: BaseException) -> tuple[str, str, str]:
    """(the type to rebuild, its name, the message) of an exception, to send to other ranks."""
    kind = next((name for name, t in _SENT_TYPES.items() if isinstance(exc, t)), "")
    return kind, type(exc).__name__, str(exc)


def _rebuilt(report: tuple[str, str, str], rank: int | None, world: int) -> Exception:
    kind, name, message = report
    where = "" if rank is None else f"rank {rank} of {world}: "
    if kind:
        return _SENT_TYPES[kind](where + message)
    return RuntimeError(f"{where}{name}: {message}")


def on_root(comm: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 alone (reading or writing the run folder), its result on every rank.

    The result travels by :meth:`agop.distributed.Comm.broadcast_object` (objects rank 0
    made: settings, a path, a checkpoint it loaded with ``weights_only=True``). An exception
    on rank 0 becomes :class:`Refused` on every rank. In one process: ``fn()``, its exception
    wrapped in :class:`Refused`.
    """
    result, report, own = None, None, None
    if comm.is_root:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - every kind must reach the other ranks
            own, report = exc, _report(exc)
    if comm.world > 1:
        result, report = comm.broadcast_object((result, report) if comm.is_root else None)
    if own is not None:
        raise Refused(own) from own
    if report is not None:
        raise Refused(_rebuilt(report, None, comm.world))
    return result


def checked(comm: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank, then one collective to learn whether any rank failed.

    ``fn`` must not communicate (its ranks may fail at different points). If any rank raised,
    every rank raises :class:`Refused` (see its notes) instead of going on to a collective that
    the failed rank would never join. Returns this rank's result.
    """
    result, own = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - every kind must reach the other ranks
        own = exc
    if comm.world == 1:
        if own is not None:
            raise Refused(own) from own
        return result
    reports = comm.all_gather_object(None if own is None else _report(own))
    failed = [r for r, rep in enumerate(reports) if rep is not None]
    if own is not None:
        raise Refused(own) from own
    if failed:
        first = failed[0]
        alike = len(failed) == comm.world and all(reports[r] == reports[first] for r in failed)
        raise Refused(_rebuilt(reports[first], None if alike else first, comm.world))
    return result
