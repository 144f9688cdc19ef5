"""Run folders: records written as they go, atomically, and resume after an interruption.

Every experiment command (``agop rfm``, ``agop mlp``, ``agop theory``) writes one folder::

    DIR/config.json      every setting, package version, seed, device, dtype, kind
    DIR/metrics.csv      one row per measurement (rewritten atomically after each step)
    DIR/checkpoint.pt    the state needed to continue (torch.save; read with weights_only=True)
    DIR/figures/*.png    figures (regenerated at the end and on resume)
    DIR/summary.json     headline numbers; present (with "complete": true) once the run ended

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, so an interrupted run never leaves a half-written file: after a kill, the folder
holds the records of every finished step and the checkpoint that matches them.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import platform
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


# ----------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Read a metrics CSV; numeric fields become int/float, empty fields None."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


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
        """Start a new run in ``path`` (created; must be empty or absent) and write config.json."""
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"run folder {path} exists and is not a folder")
            if (path / CONFIG).exists():
                raise ValueError(
                    f"{path} already holds a run ({CONFIG} exists); continue it with "
                    f"--resume {path} or choose another --out"
                )
            if any(path.iterdir()):
                raise ValueError(f"run folder {path} exists and is not empty; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "kind": kind,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            **environment(),
            "settings": dict(settings),
        }
        atomic_write_json(path / CONFIG, config)
        return cls(path, json.loads((path / CONFIG).read_text()))

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
        """Reopen an existing run; ``kind`` (``"rfm"``, ``"mlp"``…) must match if given."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise FileNotFoundError(
                f"cannot resume: {path / CONFIG} does not exist (is {path} a run folder?)"
            )
        config = read_json(path / CONFIG)
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
        d = self.path / FIGURES
        d.mkdir(parents=True, exist_ok=True)
        return d

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
        """The last checkpoint, loaded with ``weights_only=True`` (never executes code); None if absent."""
        f = self.path / CHECKPOINT
        if not f.exists():
            return None
        return torch.load(f, map_location="cpu", weights_only=True)

    def write_summary(self, summary: Mapping[str, Any], complete: bool = True) -> None:
        atomic_write_json(self.path / SUMMARY, {"kind": self.kind, "complete": complete, **summary})

    def read_summary(self) -> dict[str, Any] | None:
        f = self.path / SUMMARY
        return read_json(f) if f.exists() else None

    @property
    def is_complete(self) -> bool:
        s = self.read_summary()
        return bool(s and s.get("complete"))

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, kind={self.kind!r})"
