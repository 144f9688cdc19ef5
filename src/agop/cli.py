"""The ``agop`` command: a thin shell over the library.

Every subcommand parses its flags and calls one library function; every number it writes can be
produced from Python with the same names (see the README).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from agop import __version__, choices


def _die(msg: str) -> int:
    print(f"agop: error: {msg}", file=sys.stderr)
    return 2


def _os_error(exc: OSError) -> str:
    """One line for a file that could not be written or read (an unwritable --out: a read-only
    file system, a file where a folder should be, /proc or /sys, a full disk)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename
    if where is None:
        return what
    also = f" -> {exc.filename2}" if getattr(exc, "filename2", None) else ""
    return f"{where}{also}: {what}"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning of a command as one line on stderr (``agop: warning: ...``)."""
    return f"agop: warning: {message}\n"


# ----------------------------------------------------------------------------- datasets
def _add_datasets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="show which datasets are found, where, and their sizes")
    p.add_argument("--root", default=None,
                   help="data root (default: $AGOP_DATA, else ~/.cache/agop)")
    p.set_defaults(func=_cmd_datasets)


def _cmd_datasets(args: argparse.Namespace) -> int:
    from agop import datasets

    print(datasets.describe(root=args.root))
    return 0


# ----------------------------------------------------------------------------- runs
def _run_flags(p: argparse.ArgumentParser, kind: str, *, test_n: str, seed: str) -> None:
    """Flags shared by ``agop rfm`` and ``agop mlp``. Absent flags are not passed on (SUPPRESS),
    so the library's defaults apply, and on --resume the run's stored settings."""
    S = argparse.SUPPRESS
    p.add_argument("--dataset", default=S, metavar="NAME",
                   help="digits (default, built in), mnist, fashion-mnist, cifar10, svhn")
    # --n-train: the same flag under a name torchrun's parser does not take for its --nnodes
    p.add_argument("--n", "--n-train", dest="n", type=int, default=S, metavar="N",
                   help="train on the first N points in file order (default: all)")
    p.add_argument("--test-n", dest="test_n", type=int, default=S, metavar="N", help=test_n)
    p.add_argument("--seed", type=int, default=S, help=seed)
    p.add_argument("--device", default=S, choices=choices.DEVICES, help="auto (default: the GPU if there is one), cpu or cuda")
    p.add_argument("--data-dir", dest="data_dir", default=S, metavar="DIR",
                   help="data root (default: $AGOP_DATA, else ~/.cache/agop)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"run folder (default: runs/{kind}-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _settings(args: argparse.Namespace, fn) -> dict:
    """The flags given that are keyword parameters of the run function ``fn``."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in vars(args).items()
            if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}


# ----------------------------------------------------------------------------- rfm
def _add_rfm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rfm", help="Deep RFM (Algorithm 1), measured layer by layer",
        description="Run Deep RFM (Algorithm 1) and measure NC1/NC2 at every layer's input, "
                    "after M^{1/2} (agop) and after the random features (Sections 5.1-5.2, "
                    "Figures 2, 3, 6). With no flags: digits, 10 layers, well under a minute.")
    _run_flags(p, "rfm", seed="seed of the random features (default: 0)",
               test_n="test accuracy on the first N test points (default: up to 1000; 0: none)")
    S = argparse.SUPPRESS
    p.add_argument("--depth", type=int, default=S, help="number of AGOP layers L (default: 10)")
    p.add_argument("--bandwidth", type=float, default=S,
                   help="Laplace kernel bandwidth (default: 2.0)")
    p.add_argument("--width", type=int, default=S, help="random-feature width (default: 512)")
    p.add_argument("--ridge", type=float, default=S,
                   help="ridge μ (default: 0, ridgeless as the paper; the authors' code used 1e-3)")
    p.add_argument("--features", choices=choices.FEATURES, default=S,
                   help="W ~ N(0, 2/width) (default, Prop. 5.1) or nn.Linear's uniform init")
    p.add_argument("--no-standardize", dest="standardize", action="store_false", default=S,
                   help="Algorithm 1 as printed: rows only normalized (default: standardize "
                        "each feature first, as the authors' scripts do)")
    p.add_argument("--dtype", default=S, choices=choices.DTYPES,
                   help="compute dtype: float32 or float64 in every layer, or auto "
                        "(default): with the exact solver a depth-1 fit and every final solve "
                        "in float32 and the AGOP layers of a deeper fit in float64; with "
                        "nystrom the kernel blocks and features in float32, the solve and "
                        "M^{1/2} in float64")
    p.add_argument("--solver", default=S, choices=choices.SOLVERS,
                   help="exact: the N × N kernel solve (Algorithm 1); nystrom: M centers, "
                        "data-parallel under torchrun; auto (default): exact where it fits in "
                        "one process, else nystrom (docs/scaling.md)")
    p.add_argument("--centers", type=int, default=S, metavar="M",
                   help="Nyström centers, class-balanced from the seed (default: min(N, 4000))")
    p.add_argument("--nystrom-ridge", dest="nystrom_ridge", type=float, default=S,
                   metavar="L", help="ridge λ of the Nyström solve (default: 1e-06)")
    p.add_argument("--agop-points", dest="agop_points", type=int, default=S, metavar="N",
                   help="Nyström: evaluate the AGOP at a seeded sample of N training points "
                        "(default: all)")
    p.add_argument("--pdf", action="store_true", help="also write the figures as PDF")
    p.set_defaults(func=_cmd_rfm)


def _cmd_rfm(args: argparse.Namespace) -> int:
    from agop.distributed import launched_by_torchrun
    from agop.experiments.rfm import run_rfm, summary_text

    try:
        run = run_rfm(out=args.out, resume=args.resume, progress=args.progress,
                      **_settings(args, run_rfm))
    except (ValueError, OSError, MemoryError):
        # under torchrun rank 0 prints: a refused input is refused on every rank alike, and a
        # rank that fails alone has named itself on stderr (agop.distributed.session)
        if launched_by_torchrun() and os.environ["RANK"] != "0":
            return 2
        raise
    if run is None:  # a rank other than 0 of a distributed run: rank 0 wrote and prints
        return 0
    print(summary_text(run.read_summary()))
    print(f"run folder: {run.path}  (metrics.csv, figures/, summary.json)")
    return 0


# ----------------------------------------------------------------------------- mlp
def _add_mlp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mlp", help="train the paper's MLP and measure collapse and the NFA",
        description="Train the paper's MLP (Section 4, Appendix C) and record, every few epochs, "
                    "NC1/NC2 of each hidden layer's input, S Vᵀ stage and output (Figures 1, 7) "
                    "and the NFA correlations (Figure 8). Unset flags take the preset's / "
                    "paper's values, or the stored ones with --resume.")
    _run_flags(p, "mlp", seed="seed of the weights and the batch order (default: 0)",
               test_n="first N test points for test accuracy (default: all; 0: none)")
    S = argparse.SUPPRESS
    p.add_argument("--epochs", type=int, default=S, metavar="E", help="epochs (default: 250)")
    p.add_argument("--measure-every", type=int, default=S, metavar="K",
                   help="measure every K epochs, and at epoch 0 and the last (default: 10)")
    p.add_argument("--lr", type=float, default=S,
                   help="Adam learning rate (paper 2e-5, authors 5e-5)")
    p.add_argument("--init-scale", type=float, default=S,
                   help="Xavier-uniform gain of the hidden layers (paper 0.01, authors 0.1)")
    p.add_argument("--width", type=int, default=S, help="hidden width (default: 512)")
    p.add_argument("--depth", type=int, default=S, help="number of hidden layers (default: 5)")
    p.add_argument("--batch-size", type=int, default=S, help="minibatch size (default: 128)")
    p.add_argument("--preset", choices=choices.MLP_PRESETS, default=S,
                   help="paper: Appendix C (default); authors: their job scripts (lr 5e-5, "
                        "init gain 0.1, Adam re-created every epoch)")
    p.add_argument("--pdf", action="store_true", help="also write the figures as PDF")
    p.set_defaults(func=_cmd_mlp)


def _cmd_mlp(args: argparse.Namespace) -> int:
    from agop.experiments.mlp import run_mlp, summary_text

    rd = run_mlp(out=args.out, resume=args.resume, progress=args.progress,
                 **_settings(args, run_mlp))
    print(f"run folder: {rd.path}")
    print(summary_text(rd.read_summary()))
    return 0


# ----------------------------------------------------------------------------- theory
def _add_theory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("theory", help="Proposition 5.1, Theorems 5.4 and 5.5 checked numerically")
    p.add_argument("--out", default=None, help="run folder to create (default: runs/theory-<time>)")
    p.add_argument("--data-dir", default=None,
                   help="data root holding mnist/ for the Theorem 5.5 data check (default: "
                        "$AGOP_DATA, else ~/.cache/agop); without MNIST the bundled digits "
                        "are used")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--pdf", action="store_true", help="also save every figure as PDF")
    p.set_defaults(func=_cmd_theory)


def _cmd_theory(args: argparse.Namespace) -> int:
    from agop.experiments.theory import run_theory, summary_text

    run = run_theory(args.out, data_dir=args.data_dir, seed=args.seed, pdf=args.pdf)
    summary = run.read_summary()
    print(summary_text(summary, run.path))
    return 1 if summary["failed"] else 0


# ----------------------------------------------------------------------------- reproduce / report
def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from agop.report.scales import SCALES  # a constant: no torch

    p = sub.add_parser(
        "reproduce", help="every figure of the paper into one HTML report",
        description="Run Deep RFM and the MLP study on every dataset found (plus digits) and the "
                    "theory checks, then write DIR/report.html (self-contained: open it from "
                    "disk) and DIR/summary.json. Run folders are kept in DIR/runs/: run the same "
                    "command again after an interruption to continue where it stopped.")
    p.add_argument("--scale", choices=tuple(SCALES), default="quick",
                   help="quick (default): 3-7 minutes on 2 CPU cores; paper: the paper's "
                        "sizes (50,000 points, 20 layers, 250 epochs; hours on a CPU: see "
                        "--dry-run); tiny: seconds, a smoke test (see docs/report.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan with each run's size, solver and estimated time on this "
                        "machine (a short calibration, ~20 s), and run nothing")
    p.add_argument("--datasets", default=None, metavar="LIST",
                   help="comma-separated datasets, e.g. digits,mnist (default: digits and each of "
                        "mnist, cifar10, svhn found under the data root)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", default="reproduce", metavar="DIR",
                   help="output folder (default: ./reproduce)")
    p.add_argument("--data-dir", dest="data_dir", default=None, metavar="DIR",
                   help="data root (default: $AGOP_DATA, else ~/.cache/agop)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress display")
    p.add_argument("--pdf", action="store_true", help="also write the figures as PDF")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from agop.report import reproduce

    names = None if args.datasets is None else [d for d in args.datasets.split(",") if d.strip()]
    if args.dry_run:
        from agop.report.plan import dry_run, format_dry_run

        device = "cuda" if args.device == "cuda" else "cpu"
        rows, cal = dry_run(args.scale, names, args.data_dir, device=device)
        print(format_dry_run(rows, cal, args.scale))
        return 0
    try:
        report = reproduce(args.out, scale=args.scale, datasets=names, device=args.device,
                           data_dir=args.data_dir, progress=args.progress, pdf=args.pdf)
    except KeyboardInterrupt:
        print(f"\nagop: interrupted; finished runs are kept in {args.out}/runs (run the same "
              f"command again to continue)", file=sys.stderr)
        return 130
    print(f"report: {report}\nnumbers: {report.with_name('summary.json')}")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="build the HTML report from existing run folders",
        description="Build one self-contained HTML report (and FILE with suffix .json holding "
                    "its numbers) from run folders of agop rfm, agop mlp and agop theory, in any "
                    "mix.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", default="report.html", metavar="FILE",
                   help="HTML file to write (default: report.html)")
    p.add_argument("--pdf", action="store_true", help="also write the cross-run figures as PDF")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from agop.report import build_report

    report = build_report(args.run_dirs, args.out, pdf=args.pdf)
    print(f"report: {report}\nnumbers: {report.with_suffix('.json')}")
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agop",
        description="Average gradient outer product as a mechanism for deep neural collapse: "
                    "Deep RFM, AGOP, collapse metrics and the paper's experiments.",
    )
    parser.add_argument("--version", action="version", version=f"agop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_datasets, _add_rfm, _add_mlp, _add_theory, _add_reproduce, _add_report):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    shown = warnings.formatwarning  # only the text changes: recorders (pytest) still record
    warnings.formatwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except (ValueError, MemoryError) as exc:
        return _die(str(exc))
    except BrokenPipeError:  # the reader of the output went away (agop ... | head): quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more is written to it
        return 141
    except OSError as exc:  # FileNotFoundError of agop's own has a message and no file name
        return _die(_os_error(exc))
    except KeyboardInterrupt:
        print("\nagop: interrupted; finished steps are saved (continue with --resume DIR)",
              file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
