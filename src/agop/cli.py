"""The ``agop`` command: a thin shell over the library.

Every subcommand parses its flags and calls one library function; every number it writes can be
produced from Python with the same names (see the README).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from agop import __version__


def _die(msg: str) -> int:
    print(f"agop: error: {msg}", file=sys.stderr)
    return 2


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


# ----------------------------------------------------------------------------- rfm
def _add_rfm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rfm", help="Deep RFM (Algorithm 1), measured layer by layer")
    p.set_defaults(func=_cmd_rfm)


def _cmd_rfm(args: argparse.Namespace) -> int:
    return _die("'agop rfm' is not implemented yet")


# ----------------------------------------------------------------------------- mlp
def _add_mlp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mlp", help="train the paper's MLP and measure collapse and the NFA",
        description="Train the paper's MLP (Section 4, Appendix C) and record, every few epochs, "
                    "NC1/NC2 of each hidden layer's input, S Vᵀ stage and output (Figures 1, 7) "
                    "and the NFA correlations (Figure 8). Unset flags take the preset's / "
                    "paper's values, or the stored ones with --resume.")
    p.add_argument("--dataset", metavar="NAME", help="dataset (default: digits)")
    p.add_argument("--n", type=int, metavar="N", help="first N training points (default: all)")
    p.add_argument("--test-n", type=int, metavar="N",
                   help="first N test points for test accuracy (default: all; 0: none)")
    p.add_argument("--epochs", type=int, metavar="E", help="epochs (default: 250)")
    p.add_argument("--measure-every", type=int, metavar="K",
                   help="measure every K epochs, and at epoch 0 and the last (default: 10)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper 2e-5, authors 5e-5)")
    p.add_argument("--init-scale", type=float,
                   help="Xavier-uniform gain of the hidden layers (paper 0.01, authors 0.1)")
    p.add_argument("--width", type=int, help="hidden width (default: 512)")
    p.add_argument("--depth", type=int, help="number of hidden layers (default: 5)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default: 128)")
    p.add_argument("--preset", choices=["paper", "authors"],
                   help="paper: Appendix C (default); authors: their job scripts (lr 5e-5, "
                        "init gain 0.1, Adam re-created every epoch)")
    p.add_argument("--seed", type=int, help="seed of the weights and the batch order (default: 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--data-dir", metavar="DIR",
                   help="data root (default: $AGOP_DATA, else ~/.cache/agop)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/mlp-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_mlp)


def _cmd_mlp(args: argparse.Namespace) -> int:
    from agop.nets import run_mlp

    rd = run_mlp(out=args.out, resume=args.resume, progress=not args.no_progress,
                 dataset=args.dataset, n=args.n, test_n=args.test_n, epochs=args.epochs,
                 measure_every=args.measure_every, lr=args.lr, init_scale=args.init_scale,
                 width=args.width, depth=args.depth, batch_size=args.batch_size,
                 preset=args.preset, seed=args.seed, device=args.device, data_dir=args.data_dir)
    s = rd.read_summary()

    def g(v, spec: str = ".3g") -> str:  # summary.json stores NaN as null
        return "nan" if v is None else format(v, spec)

    test = "" if s["test_acc"] is None else f", test acc {g(s['test_acc'], '.4f')}"
    print(f"run folder: {rd.path}")
    print(f"epoch {s['epoch']}: train loss {g(s['loss'], '.4g')}, "
          f"train acc {g(s['train_acc'], '.4f')}{test}")
    for lay in s["layers"]:
        print(f"  layer {lay['layer']}: NC1 input {g(lay['nc1_input'])} -> right "
              f"{g(lay['nc1_right'])} -> output {g(lay['nc1_output'])}; NFA "
              f"rho(WtW, AGOP^1/2) {g(lay['nfa_sqrt'], '.3f')}, rho(WtW, AGOP) {g(lay['nfa'], '.3f')}")
    return 0


# ----------------------------------------------------------------------------- theory
def _add_theory(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("theory", help="Proposition 5.1, Theorems 5.4 and 5.5 checked numerically")
    p.add_argument("--out", default=None, help="run folder to create (default: runs/theory-<time>)")
    p.add_argument("--data-dir", default=None,
                   help="data root holding mnist/ for the Theorem 5.5 data check (default: "
                        "$AGOP_DATA, else ~/.cache/agop); without MNIST the bundled digits are used")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--pdf", action="store_true", help="also save every figure as PDF")
    p.set_defaults(func=_cmd_theory)


def _cmd_theory(args: argparse.Namespace) -> int:
    from agop.theory import run_theory

    run = run_theory(args.out, data_dir=args.data_dir, seed=args.seed, pdf=args.pdf)
    return 1 if run.read_summary()["failed"] else 0


# ----------------------------------------------------------------------------- reproduce / report
def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="every figure of the paper into one HTML report")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    return _die("'agop reproduce' is not implemented yet")


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="build the HTML report from existing run folders")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    return _die("'agop report' is not implemented yet")


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
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MemoryError) as exc:
        return _die(str(exc))
    except KeyboardInterrupt:
        print("\nagop: interrupted; finished steps are saved (continue with --resume DIR)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
