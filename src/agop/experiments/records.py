"""Run folders: records written as they go, atomically, and resume after an interruption.

Every experiment command (``agop rfm``, ``agop mlp``, ``agop theory``) writes one folder::

    DIR/config.json      every setting, package version, seed, device, dtype, kind
    DIR/metrics.csv      one row per measurement (rewritten atomically after each step)
    DIR/checkpoint.pt    the state needed to continue (torch.save; read with weights_only=True)
    DIR/figures/*.png    figures (regenerated at the end and on resume)
    DIR/summary.json     headline numbers; present (with "complete": true) once the run ended,
                         with "records": the rows and SHA-256 of the run's table as it wrote them

Every file is written to a temporary name in the same folder (``.NAME.XXXXXXXX.tmp``) and moved
into place with ``os.replace``, so an interrupted run never leaves a half-written file: after a
kill, the folder holds the records of every finished step and the checkpoint that matches them,
and perhaps a temporary file, which a resumed run removes (:func:`remove_temporaries`).
:meth:`RunDir.create` claims its folder atomically (two processes given one folder: exactly
one starts a run there), and :meth:`RunDir.record_problems` says when a run's table is not the
one it wrote (cut short, changed, missing).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from agop import __version__
from agop._validate import metric_float  # noqa: F401  (records read metrics with it)

CONFIG = "config.json"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
FIGURES = "figures"
THEORY_TABLE = "theory.csv"  # agop theory's table (its metrics.csv)
# the names atomic_write_bytes gives its temporary files: ".<name>.<8 characters>.tmp"
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


# ----------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    ensure_folder(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; records are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the temporary may already be gone
            os.unlink(tmp)
        raise


def ensure_folder(folder: str | os.PathLike) -> Path:
    """``folder`` and its parents, created where missing; NotADirectoryError naming the file
    that stands where one of them must be (``mkdir`` itself says only "File exists")."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        for p in (folder, *folder.parents):
            if p.exists() and not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder is needed",
                                         str(p)) from None
        raise
    return folder


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write_bytes`' temporary names."""
    return bool(_TEMPORARY.match(name))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted writer left in a run folder.

    A kill between :func:`atomic_write_bytes`' ``mkstemp`` and its ``os.replace`` leaves
    ``.NAME.XXXXXXXX.tmp`` beside NAME; nothing reads it. Looks in ``folder`` and its ``gram/``
    and ``figures/`` subfolders, and removes only files with such names.

    Returns
    -------
    list of Path
        The files removed.
    """
    folder = Path(folder)
    removed = []
    for where in (folder, folder / "gram", folder / FIGURES):
        if not where.is_dir():
            continue
        for f in where.iterdir():
            if is_temporary(f.name) and f.is_file() and not f.is_symlink():
                with contextlib.suppress(FileNotFoundError):  # another process was quicker
                    f.unlink()
                    removed.append(f)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def _clean_json(obj: Any) -> Any:
    """Replace NaN/inf floats by None so that the file is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(_clean_json(json.loads(json.dumps(obj, default=_json_default))), indent=2)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
              columns: list[str] | None = None) -> None:
    """Write ``rows`` (dicts) as CSV atomically; columns default to the union in first-seen order."""
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # full precision, round-trips exactly
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics CSV that :func:`write_csv` wrote; numeric fields become int/float, empty
    fields None.

    Raises
    ------
    ValueError
        Naming the file, when it is not such a CSV: not UTF-8 text, empty (not even the header
        line), cut short (the last line does not end; :func:`write_csv` ends every line), or a
        row whose number of fields is not the header's.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a CSV file agop wrote: byte {exc.start} is not UTF-8 "
                         f"text (the file is damaged or another kind of file)") from None
    if not text:
        raise ValueError(f"{path} is empty (not even a header line): it is damaged")
    if not text.endswith("\n"):
        raise ValueError(f"{path} ends in the middle of a line: it was cut short (agop ends "
                         f"every line it writes)")
    try:
        lines = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ValueError(f"{path} is not a valid CSV file: {exc}") from None
    header, body = lines[0], lines[1:]
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {i}: {len(row)} field(s) but the header has "
                             f"{len(header)}: the file is damaged")
    return [{k: _parse(v) for k, v in zip(header, row)} for row in body]


def table_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"rows", "bytes", "sha256"}`` of a table as it is now (summary.json's "records")."""
    data = Path(path).read_bytes()
    return {"rows": len(read_csv(path)), "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def _parse(v: str | None) -> Any:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _claim(target: Path, data: bytes, taken: Any) -> None:
    """Create ``target`` holding ``data`` if no file of that name exists, atomically: the data
    goes to a temporary file, fsynced, which is hard-linked to ``target`` (``os.link`` fails if
    ``target`` exists). ``taken()`` is the exception raised when it exists. On a file system
    without hard links, ``target`` is created with ``O_EXCL`` and written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:  # by descriptor: the winner may remove the name
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        try:
            os.link(tmp, target)
        except (FileExistsError, FileNotFoundError):
            # FileNotFoundError: the winner removed our temporary (remove_temporaries)
            if target.exists():
                raise taken() from None
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                                 errno.EXDEV):
                raise
            try:  # no hard links here: exclusive creation, then the data
                out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise taken() from None
            with os.fdopen(out, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- run folders
def environment() -> dict[str, Any]:
    """Package and machine versions recorded in every config.json."""
    return {
        "agop_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def default_run_dir(kind: str, base: str | os.PathLike = "runs") -> Path:
    """``runs/<kind>-YYYYmmdd-HHMMSS`` (a suffix is added if that folder exists)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{kind}-{stamp}"
    i = 1
    while path.exists():
        i += 1
        path = Path(base) / f"{kind}-{stamp}-{i}"
    return path


class RunDir:
    """One experiment's folder. Create with :meth:`create`, reopen with :meth:`resume`."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        self.config = config

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, kind: str, settings: Mapping[str, Any]) -> "RunDir":
        """Start a new run in ``path`` (created; must be empty or absent) and write config.json.

        Atomic: the folder is made with ``os.mkdir`` and claimed by hard-linking a complete
        config.json into it (``os.link`` fails where the name exists), so of several processes
        given the same folder exactly one starts a run there and the others get ValueError.
        An empty folder, or one holding only temporary files of a creation that was killed
        (:func:`is_temporary`), counts as empty.

        Raises
        ------
        ValueError
            ``path`` is a file, holds a run (config.json), or holds anything else.
        OSError
            The folder cannot be made or written (read-only, a file as its parent, ...).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"run folder {path} exists and is not a folder; choose another --out")
        ensure_folder(path.parent)
        try:
            os.mkdir(path)
        except FileExistsError:
            if not path.is_dir():
                raise ValueError(f"run folder {path} exists and is not a folder; choose "
                                 f"another --out") from None
        cls._check_unused(path)
        config = {
            "kind": kind,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            **environment(),
            "settings": dict(settings),
        }
        text = json.dumps(_clean_json(json.loads(json.dumps(config, default=_json_default))),
                          indent=2) + "\n"
        _claim(path / CONFIG, text.encode("utf-8"), lambda: cls._held(path))
        remove_temporaries(path)  # of an earlier creation that was killed; the folder is ours
        return cls(path, json.loads(text))

    @staticmethod
    def _held(path: Path) -> ValueError:
        return ValueError(f"{path} already holds a run ({CONFIG} exists); continue it with "
                          f"--resume {path} or choose another --out")

    @classmethod
    def _check_unused(cls, path: Path) -> None:
        if (path / CONFIG).exists():
            raise cls._held(path)
        if any(not is_temporary(p.name) for p in path.iterdir()):
            raise ValueError(f"run folder {path} exists and is not empty; choose another --out")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """Open an existing run folder to read its records (writes nothing); ValueError if
        ``path`` is not a folder or has no config.json."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder (expected a run folder of agop rfm, "
                             f"agop mlp or agop theory)")
        if not (path / CONFIG).is_file():
            raise ValueError(f"{path} is not a run folder: it has no {CONFIG} (expected a "
                             f"folder written by agop rfm, agop mlp or agop theory)")
        config = read_json(path / CONFIG)
        if not isinstance(config, dict):
            raise ValueError(f"{path / CONFIG} does not hold a JSON object")
        return cls(path, config)

    @classmethod
    def resume(cls, path: str | os.PathLike, kind: str | None = None) -> "RunDir":
        """Reopen an existing run; ``kind`` (``"rfm"``, ``"mlp"``…) must match if given.
        Writes nothing (a run that continues removes its temporaries:
        :func:`remove_temporaries`)."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(
                f"cannot resume: {path / CONFIG} does not exist (is {path} a run folder?)"
            )
        config = read_json(path / CONFIG)
        if not isinstance(config, dict):
            raise ValueError(f"{path / CONFIG} does not hold a JSON object: it is damaged")
        if kind is not None and config.get("kind") != kind:
            raise ValueError(
                f"cannot resume {path} as a {kind!r} run: it is a {config.get('kind')!r} run"
            )
        return cls(path, config)

    @staticmethod
    def check_settings(stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
        """On resume, settings given explicitly must equal the stored ones (else ValueError)."""
        diff = {k: (stored.get(k), v) for k, v in given.items()
                if v is not None and k in stored and stored.get(k) != v}
        if diff:
            lines = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"settings differ from the run being resumed ({lines})")

    # -- contents -----------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        return self.config.get("settings", {})

    @property
    def kind(self) -> str:
        return self.config.get("kind", "")

    @property
    def figures_dir(self) -> Path:
        return ensure_folder(self.path / FIGURES)

    def update_config(self, **fields: Any) -> None:
        """Add top-level fields to config.json (e.g. the device and dtype actually used)."""
        self.config.update(fields)
        atomic_write_json(self.path / CONFIG, self.config)

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS
        return read_csv(f) if f.exists() else []

    def write_metrics(self, rows: Iterable[Mapping[str, Any]], columns: list[str] | None = None) -> None:
        write_csv(self.path / METRICS, rows, columns)

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Save ``state`` (tensors, numbers, strings, lists, dicts) atomically."""
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        atomic_write_bytes(self.path / CHECKPOINT, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, loaded with ``weights_only=True`` (never executes code); None if
        absent.

        Raises
        ------
        ValueError
            One line naming the file and what to do, when it cannot be read (cut short,
            damaged), asks to run code or build objects other than tensors (not written by
            agop, or altered), or does not hold a dict.
        """
        f = self.path / CHECKPOINT
        if not f.exists():
            return None
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's own message suggests weights_only=False, i.e. running the file's code
            wanted = re.search(r"GLOBAL (\S+)", str(exc))
            if wanted is None:  # not a pickle torch can read: damaged or another file
                raise self.bad_checkpoint("cannot be read (it is damaged or not a "
                                          "checkpoint)") from None
            raise self.bad_checkpoint(f"was refused: it asks to run or build "
                                      f"{wanted.group(1)}, which no agop checkpoint holds (it "
                                      f"was not written by agop, or was altered)") from None
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
            raise self.bad_checkpoint(f"cannot be read ({type(exc).__name__}: "
                                      f"{_first_line(exc)})") from None
        if not isinstance(state, dict):
            raise self.bad_checkpoint(f"holds a {type(state).__name__}, not an agop checkpoint")
        return state

    def bad_checkpoint(self, why: str) -> ValueError:
        """The error for a checkpoint that cannot be used: the file, why, and what to do."""
        f = self.path / CHECKPOINT
        return ValueError(f"{f} {why}; delete it and run --resume {self.path} again to start "
                          f"this run over from its first step, or start a new run with another "
                          f"--out")

    @property
    def table(self) -> Path:
        """The run's table of numbers: theory.csv for ``agop theory``, else metrics.csv."""
        return self.path / (THEORY_TABLE if self.kind == "theory" else METRICS)

    def write_summary(self, summary: Mapping[str, Any], complete: bool = True) -> None:
        """Write summary.json; a complete one also records the run's table as it is now (its
        rows, bytes and SHA-256, under "records"), so that a reader can tell when the table
        it finds is not the one the run ended with (:meth:`record_problems`)."""
        records = {}
        if complete and self.table.is_file():
            records[self.table.name] = table_record(self.table)
        atomic_write_json(self.path / SUMMARY, {"kind": self.kind, "complete": complete,
                                                **summary, "records": records})

    def read_summary(self) -> dict[str, Any] | None:
        f = self.path / SUMMARY
        return read_json(f) if f.exists() else None

    @property
    def is_complete(self) -> bool:
        s = self.read_summary()
        return bool(s and s.get("complete"))

    def record_problems(self) -> list[str]:
        """What is wrong with the run's records, one sentence each (empty: nothing found).

        Checks the table (:attr:`table`) and summary.json: a table that is missing, cannot be
        read (:func:`read_csv`: not UTF-8, cut in the middle of a line, damaged rows), holds
        no rows, or, in a finished run, differs from the table the run ended with (the rows,
        bytes and SHA-256 summary.json recorded); a summary.json that is not valid JSON.
        Writes nothing.
        """
        table = self.table
        try:
            summary = self.read_summary()
        except ValueError as exc:
            return [str(exc)]
        finished = isinstance(summary, dict) and bool(summary.get("complete"))
        records = (summary.get("records") or {}) if finished else {}
        wrote = records.get(table.name) if isinstance(records, dict) else None
        if not table.is_file():
            if finished:
                return [f"{table} is missing, but summary.json says the run finished"]
            return [f"{table} is missing: the run has not recorded a step"]
        try:
            rows = read_csv(table)
        except ValueError as exc:
            return [str(exc)]
        problems = []
        if not rows:
            problems.append(f"{table} holds no rows (only its header)")
        if isinstance(wrote, dict):
            now = table_record(table)
            if now["rows"] != wrote.get("rows"):
                problems.append(f"{table} holds {now['rows']} row(s) but the finished run wrote "
                                f"{wrote.get('rows')}: it was cut or changed after the run")
            elif now["sha256"] != wrote.get("sha256"):
                problems.append(f"{table} is not the file the run wrote (its SHA-256 differs "
                                f"from the one in summary.json): it was changed after the run")
        return problems

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, kind={self.kind!r})"
