"""The ``agop theory`` experiment: Proposition 5.1, Theorems 5.4 and 5.5 checked numerically.

Section 5, Appendix A; Figure 4 and the figures of Theorems 5.4 and 5.5. The mathematics is
:mod:`agop.theory`; this module owns the settings of the checks, their rows (``theory.csv``:
check, value, expected, passed, note), the data behind each figure and the run folder.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from agop._validate import check_int
from agop.experiments.records import write_csv
from agop.theory import (collapsed_fixed_point, collapsed_gram_inverse, collapsed_kernel,
                         contraction_rate, krr_bound, krr_objective, krr_ratio,
                         linearized_deep_rfm, random_kernels, relu_feature_distance,
                         relu_feature_inner, relu_feature_ratio, rfm_kernels,
                         simulate_relu_features)

__all__ = ["CONTRACTION_SETTINGS", "EPSILONS", "MU_VALUES", "THEORY_DEFAULTS", "run_theory",
           "summary_text"]

#: The settings of a run: the seed of the random draws, the data root (MNIST for Theorem
#: 5.5's data check), and whether the figures are also written as PDF.
THEORY_DEFAULTS: dict[str, Any] = {"seed": 0, "data_dir": None, "pdf": False}
#: Settings of the Theorem 5.4 figure: (λ_k, λ_Φ, κ rule).
CONTRACTION_SETTINGS = (
    (0.02, 1.0, "exact"), (0.1, 1.0, "exact"), (0.3, 1.0, "exact"),
    (0.1, 0.3, "exact"), (0.1, 3.0, "exact"), (0.1, 0.0, "exact"), (0.02, 1.0, "paper"),
)
MU_VALUES = (1.0, 10.0, 100.0)
EPSILONS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _row(check: str, value: float, expected: str, passed: bool, note: str = "") -> dict:
    return {"check": check, "value": float(value), "expected": expected,
            "passed": bool(passed), "note": note}


def _z_scores(estimate, se, truth) -> np.ndarray:
    """|estimate − truth|/se; where se = 0 (a deterministic case, e.g. dist 0 or 2) it is 0
    if the estimate is exact and inf otherwise."""
    diff = np.abs(estimate - truth)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.inf))


def _proposition_rows(run, seed: int, pdf: bool) -> tuple[list[dict], dict]:
    from agop.experiments import figures  # matplotlib: loaded when drawing

    dist = np.linspace(0.0, 2.0, 41)
    sim = simulate_relu_features(dist, D=4096, trials=64, seed=seed)
    theory = relu_feature_distance(dist)
    ratio = relu_feature_ratio(dist)
    write_csv(run.path / "relu_features.csv", [
        {"dist": d, "theory": t, "ratio": q, "simulated": m, "simulated_se": s,
         "inner_theory": relu_feature_inner(1 - d * d / 2), "inner_simulated": i,
         "inner_simulated_se": ie}
        for d, t, q, m, s, i, ie in zip(dist, theory, ratio, sim.distance, sim.distance_se,
                                        sim.inner, sim.inner_se)])
    figures.theory_relu_distance(dist, theory, ratio, sim.distance, sim.distance_se,
                                 run.figures_dir / "figure4_relu_distance", D=sim.D, pdf=pdf)
    r = np.linspace(-1, 1, 2001)[1:-1]
    eq1 = ((1 - r**2) ** 1.5 / np.pi + r**2 * np.sqrt(1 - r**2) / np.pi + r / 2
           + r / np.pi * np.arctan(r / np.sqrt(1 - r**2)))
    inner_theory = relu_feature_inner(1 - dist**2 / 2)
    z_inner = _z_scores(sim.inner, sim.inner_se, inner_theory)
    z_dist = _z_scores(sim.distance, sim.distance_se, theory)
    z_norm = abs(sim.sq_norm - 1.0) / sim.sq_norm_se
    fine = np.linspace(0, 2, 2001)
    fine_ratio = relu_feature_ratio(fine)
    rows = [
        _row("prop5.1 inner at r=1", relu_feature_inner(1.0), "1", relu_feature_inner(1.0) == 1.0),
        _row("prop5.1 inner at r=0", relu_feature_inner(0.0), f"1/pi = {1 / np.pi!r}",
             abs(relu_feature_inner(0.0) - 1 / np.pi) < 1e-15),
        _row("prop5.1 inner at r=-1", relu_feature_inner(-1.0), "0",
             relu_feature_inner(-1.0) == 0.0),
        _row("prop5.1 max |eq.(1) - arc-cosine form|", np.abs(eq1 - relu_feature_inner(r)).max(),
             "< 1e-12", np.abs(eq1 - relu_feature_inner(r)).max() < 1e-12, "r on (-1, 1)"),
        _row("prop5.1 Monte-Carlo inner: max |z|", z_inner.max(), "< 4", z_inner.max() < 4,
             f"D={sim.D}; {sim.trials} trials; 41 distances"),
        _row("prop5.1 Monte-Carlo distance: max |z|", z_dist.max(), "< 4", z_dist.max() < 4,
             f"D={sim.D}; {sim.trials} trials"),
        _row("prop5.1 Monte-Carlo E|sigma(Wx)|^2: |z|", z_norm, "< 4 (mean 1)", z_norm < 4,
             f"mean {sim.sq_norm:.5f}"),
        _row("fig4 ratio at dist=2", fine_ratio[-1], f"1/sqrt2 = {1 / math.sqrt(2)!r}",
             abs(fine_ratio[-1] - 1 / math.sqrt(2)) < 1e-15),
        _row("fig4 ratio monotone decreasing on (0 2]", np.diff(fine_ratio[1:]).max(), "< 0",
             np.diff(fine_ratio[1:]).max() < 0, "largest step on a 2001-point grid"),
        _row("fig4 ratio within [1/sqrt2 1]", fine_ratio.min(), ">= 1/sqrt2 and max <= 1",
             fine_ratio.min() >= 1 / math.sqrt(2) - 1e-15 and fine_ratio.max() <= 1.0,
             f"max {fine_ratio.max():.6f}"),
    ]
    return rows, {"relu_ratio_at_2": float(fine_ratio[-1]),
                  "relu_mc_max_z_inner": float(z_inner.max()),
                  "relu_mc_max_z_distance": float(z_dist.max())}


def _contraction_rows(run, seed: int, pdf: bool) -> tuple[list[dict], dict]:
    from agop.experiments import figures  # matplotlib: loaded when drawing

    n, d, depth = 32, 64, 12
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, d))
    B /= np.linalg.norm(B, axis=1, keepdims=True)  # unit-norm samples, d ≥ n (Assumption 5.2)
    y = np.where(np.arange(n) < n // 2, 1.0, -1.0)
    curves, rates, results = [], {}, {}
    for lam_k, lam_phi, kap in CONTRACTION_SETTINGS:
        # the first feature map already adds λ_Φ I, so Assumption 5.3 holds for gram0
        res = linearized_deep_rfm(B @ B.T + lam_phi * np.eye(n), y, lam_k, lam_phi, depth,
                                  kappa=kap)
        curves.append({"lambda_k": lam_k, "lambda_phi": lam_phi, "kappa": kap,
                       "spectral": res.spectral})
        rates[(lam_k, lam_phi, kap)] = contraction_rate(res.spectral)
        results[(lam_k, lam_phi, kap)] = res
    write_csv(run.path / "contraction.csv", [
        {"lambda_k": c["lambda_k"], "lambda_phi": c["lambda_phi"], "kappa": c["kappa"],
         "layer": layer + 2, "distance": v}
        for c in curves for layer, v in enumerate(c["spectral"])])
    figures.theory_contraction(curves, run.figures_dir / "theorem54_contraction", pdf=pdf)

    small, mid, large = (rates[(lk, 1.0, "exact")] for lk in (0.02, 0.1, 0.3))
    lo_phi, hi_phi = rates[(0.1, 0.3, "exact")], rates[(0.1, 3.0, "exact")]
    linear = results[(0.1, 0.0, "exact")].spectral
    A_star = np.outer(y, y) + np.eye(n)
    fixed = linearized_deep_rfm(A_star, y, 0.1, 1.0, 5).spectral.max()
    one_step = linearized_deep_rfm(B @ B.T + np.eye(n), y, 0.0, 1.0, 1).spectral[0]
    lemma = np.abs(collapsed_gram_inverse(y, 0.7)
                   - np.linalg.inv(np.outer(y, y) + 0.7 * np.eye(n))).max()
    rows = [
        _row("thm5.4 rate lambda_k/lambda_phi=0.02", small, "< 1", small < 1,
             f"n={n}; operator norm; kappa exact"),
        _row("thm5.4 rate grows with lambda_k (0.02/0.1/0.3)", large, f"> {mid!r} > {small!r}",
             small < mid < large < 1, "lambda_phi=1"),
        _row("thm5.4 rate falls with lambda_phi (0.3/1/3)", hi_phi, f"< {mid!r} < {lo_phi!r}",
             hi_phi < mid < lo_phi, "lambda_k=0.1"),
        _row("thm5.4 lambda_phi=0: no collapse", linear[-1],
             "stalls > 0 (last two layers equal)",
             linear[-1] > 1e-3 * linear[0] and abs(linear[-1] / linear[-2] - 1) < 1e-9,
             "linear feature map; lambda_k=0.1"),
        _row("thm5.4 collapsed Gram is a fixed point", fixed, "< 1e-10", fixed < 1e-10,
             "start at yy^T + lambda_phi I"),
        _row("thm5.4 linear kernel collapses in one step", one_step, "< 1e-10", one_step < 1e-10,
             "lambda_k = 0"),
        _row("lemmaA.2 max |closed form - inv|", lemma, "< 1e-12", lemma < 1e-12,
             f"n={n}; lambda_phi=0.7"),
    ]
    paper = results[(0.02, 1.0, "paper")]
    plateau = n * abs(collapsed_fixed_point(0.02, 1.0, n, "paper") - 1)
    rows.append(_row(
        "thm5.4 paper kappa: limiting distance", paper.spectral[-1], f"n|t*-1| = {plateau!r}",
        abs(paper.spectral[-1] - plateau) < 1e-6 * plateau,
        f"lambda_k=0.02; kappa={paper.kappa:.4f}: an O(lambda_k n) offset instead of "
        "O(lambda_k^2/lambda_phi^2)"))
    return rows, {"contraction_rates": {f"lk={k[0]},lphi={k[1]},kappa={k[2]}": v
                                        for k, v in rates.items()}}


def _load_two_classes(data_dir, per_class: int = 200):
    """First ``per_class`` points of classes 0 and 1 of MNIST, else of the bundled digits."""
    from agop import datasets

    try:
        data = datasets.load("mnist", n=10 * per_class, balanced=True, root=data_dir)
    except FileNotFoundError:
        per_class = 140  # the digits train split has at least 146 of every class
        data = datasets.load("digits", n=10 * per_class, balanced=True)
    keep = data.y < 2
    return data.X[keep], np.where(data.y[keep] == 0, 1.0, -1.0), data.name, per_class


def _krr_rows(run, seed: int, data_dir, pdf: bool) -> tuple[list[dict], dict]:
    from agop.experiments import figures  # matplotlib: loaded when drawing

    X, y, dataset, per_class = _load_two_classes(data_dir)
    data_kernels = rfm_kernels(X, y)
    kernels = {"laplace (data)": data_kernels["laplace"], "rfm k_M (data)": data_kernels["rfm"]}
    N_rand = 40
    y_rand = np.where(np.arange(N_rand) < N_rand // 2, 1.0, -1.0)
    randoms = random_kernels(N_rand, seed)
    records, worst = [], 0.0
    for mu in MU_VALUES:
        for name, k in kernels.items():
            records.append({"kernel": name, "mu": mu, "ratio": krr_ratio(k, y, mu), "N": len(y)})
        records.append({"kernel": "k* (data)", "mu": mu,
                        "ratio": krr_ratio(collapsed_kernel(y), y, mu), "N": len(y)})
        for name, k in randoms.items():
            ratio = krr_ratio(k, y_rand, mu)
            worst = max(worst, ratio)
            records.append({"kernel": f"random {name}", "mu": mu, "ratio": ratio, "N": N_rand})
    eps_rows = []
    kstar = collapsed_kernel(y_rand)
    for eps in EPSILONS:
        normalized = (kstar + eps * np.eye(N_rand)) / (1 + eps)
        eps_rows.append({"epsilon": eps, "gap": 1 - krr_ratio(normalized, y_rand, 10.0)})
    write_csv(run.path / "krr.csv", records)
    write_csv(run.path / "krr_epsilon.csv", eps_rows)
    figures.theory_krr_bound(records, eps_rows, run.figures_dir / "theorem55_bound", pdf=pdf)

    def ratio(name, mu):
        return next(r["ratio"] for r in records if r["kernel"] == name and r["mu"] == mu)

    data_all = [r["ratio"] for r in records if r["kernel"] in kernels]
    gaps = np.array([r["gap"] for r in eps_rows])
    bound = krr_bound(N_rand, 10.0)
    unnormalized = krr_objective(kstar + 1e-3 * np.eye(N_rand), y_rand, 10.0) / bound
    signed = krr_objective((np.outer(y_rand, y_rand) + 1e-6 * np.eye(N_rand)) / (1 + 1e-6),
                           y_rand, 10.0) / bound
    source = f"{dataset} classes 0/1: first {per_class} each" + (
        "" if dataset == "mnist" else " (MNIST not found: fell back to digits)")
    rows = [
        _row("thm5.5 max ratio over random kernels", worst, "<= 1", worst <= 1 + 1e-12,
             f"{len(randoms)} kernels; N={N_rand}; mu in {list(MU_VALUES)}"),
        _row("thm5.5 max ratio on data kernels", max(data_all), "<= 1", max(data_all) <= 1 + 1e-12,
             source),
        _row("thm5.5 k* attains the bound", ratio("k* (data)", 10.0), "1",
             abs(ratio("k* (data)", 10.0) - 1) < 1e-12, "mu=10"),
        _row("thm5.5 (k*+eps I)/(1+eps) -> bound", gaps[-1],
             f"gap decreasing to 0 (eps={EPSILONS[-1]})",
             bool(np.all(np.diff(gaps) < 0) and gaps.min() >= -1e-12 and gaps[-1] < 1e-5),
             "mu=10; unit diagonal kept"),
        _row("thm5.5 k*+eps I without renormalization", unnormalized, "> 1 (diagonal 1+eps)",
             unnormalized > 1, "why the unit diagonal matters"),
        _row("thm5.5 negative entries: (yy^T+eps I)/(1+eps)", signed,
             f"> 1: (N+2mu)/(N+mu) = {(N_rand + 20) / (N_rand + 10)!r}", signed > 1,
             "why entrywise positivity (k_M = phi > 0) matters"),
    ]
    for mu in MU_VALUES:
        plain, rfm = ratio("laplace (data)", mu), ratio("rfm k_M (data)", mu)
        rows.append(_row(f"thm5.5 RFM k_M closer to bound than Laplace (mu={mu:g})", rfm,
                         f"> {plain!r} (Laplace)", plain < rfm <= 1 + 1e-12, source))
    summary = {"krr_dataset": dataset, "krr_per_class": per_class,
               "krr_ratio_laplace": {f"{mu:g}": ratio("laplace (data)", mu) for mu in MU_VALUES},
               "krr_ratio_rfm": {f"{mu:g}": ratio("rfm k_M (data)", mu) for mu in MU_VALUES},
               "krr_max_ratio_random": worst, "rfm_metric_scale": data_kernels["scale"],
               "rfm_solver_jitter": data_kernels["jitter"]}
    return rows, summary


def summary_text(summary: dict[str, Any], path: Any = None) -> str:
    """The lines ``agop theory`` prints, from the run's summary.json: checks passed, the failed
    ones by name, and a note when Theorem 5.5 fell back from MNIST to the bundled digits."""
    failed = summary["failed"]
    where = "" if path is None else f" -> {path}"
    lines = []
    if summary.get("krr_dataset") != "mnist":
        lines.append("theory: MNIST not found; Theorem 5.5 used scikit-learn's digits instead")
    lines.append(f"theory: {summary['passed']}/{summary['checks']} checks passed{where}")
    lines += [f"  FAILED: {name}" for name in failed]
    return "\n".join(lines)


def run_theory(out: str | os.PathLike | None = None, progress: bool = True, *,
               data_dir: str | os.PathLike | None = None, seed: int = 0, pdf: bool = False):
    """The ``agop theory`` experiment: Proposition 5.1, Theorems 5.4 and 5.5 checked numerically.

    Writes into the run folder ``out`` (default ``runs/theory-<time>``): config.json;
    theory.csv, one row per check (check, value, expected, passed, note), rewritten after each
    part; the data behind each figure (relu_features.csv, contraction.csv, krr.csv,
    krr_epsilon.csv); the figures (figures/figure4_relu_distance, theorem54_contraction,
    theorem55_bound); and summary.json (``checks``, ``passed``, ``failed`` and the headline
    numbers). Nothing is printed: the CLI prints :func:`summary_text`. A run takes seconds, so
    there is no resume.

    Parameters
    ----------
    out : path, optional
        The folder of the new run (created; must be empty or absent).
    progress : bool
        Show a progress bar over the three parts (on stderr).
    data_dir : path, optional
        The data root: Theorem 5.5's data check uses the first 200 points of MNIST classes 0
        and 1 found under it (else under ``$AGOP_DATA``), or scikit-learn's digits (140 per
        class) when MNIST is not found.
    seed : int
        The seed of the random draws (Monte-Carlo features, Gram matrices, random kernels).
    pdf : bool
        Also write the figures as PDF.

    Returns
    -------
    RunDir
        The run folder; its rows are theory.csv (``RunDir``'s ``path / "theory.csv"``).
    """
    from agop.experiments.common import checkpoint_loop, start_run, write_config

    seed = check_int(seed, "seed", minimum=0)
    start = start_run("theory", THEORY_DEFAULTS, {
        "seed": seed, "data_dir": None if data_dir is None else str(data_dir), "pdf": bool(pdf)},
        out=out)
    run = start.create()
    write_config(run, device="cpu", dtype="float64")  # numpy and torch on the CPU, in float64
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    parts = (("Proposition 5.1", lambda: _proposition_rows(run, seed, pdf)),
             ("Theorem 5.4", lambda: _contraction_rows(run, seed, pdf)),
             ("Theorem 5.5", lambda: _krr_rows(run, seed, data_dir, pdf)))

    def on_part(item) -> dict[str, str]:
        label, part = item
        part_rows, part_summary = part()
        rows.extend(part_rows)
        summary.update(part_summary)
        write_csv(run.path / "theory.csv", rows)
        return {"done": label}

    checkpoint_loop(parts, on_part, total=3, progress=progress, desc="agop theory", unit="part")
    failed = [r["check"] for r in rows if not r["passed"]]
    run.write_summary({"checks": len(rows), "passed": len(rows) - len(failed), "failed": failed,
                       **summary})
    return run
