"""DeepRFM fitted by several processes (gloo on 127.0.0.1, tests/_multiproc.py): ranks that
disagree are refused on every rank, and a checkpoint resumes only with its process count."""

from __future__ import annotations

import io

import numpy as np
import torch
from sklearn.datasets import load_digits

import _multiproc
from agop import distributed
from agop.models.deep_rfm import DeepRFM


def _shard(n: int = 200):
    X, y = load_digits(return_X_y=True)
    comm = distributed.current()
    a, b = distributed.row_range(n, comm.rank, comm.world)
    return X[a:b], y[a:b]


def _fit_with_rank_params(param: str, value_on_rank1):
    X, y = _shard()
    kw = dict(depth=1, width=16, solver="nystrom", centers=40, device="cpu")
    if distributed.current().rank == 1:
        kw[param] = value_on_rank1
    try:
        DeepRFM(**kw).fit(X, y)
    except ValueError as e:
        return str(e)
    return "fitted"


def test_ranks_with_different_parameters_are_refused_on_every_rank():
    """Different W on each rank would be a silently wrong model; a different ``standardize``
    would leave one rank alone in a collective. Both are refused, on every rank."""
    for param, value in (("features", "uniform"), ("standardize", False)):
        out = _multiproc.run(_fit_with_rank_params, 2, args=(param, value), timeout=60)
        assert all("ranks disagree on the DeepRFM parameters" in o for o in out), out
        assert all(param in o for o in out), out


def _checkpoint_then_resume_alone():
    X, y = _shard()
    model = DeepRFM(depth=2, width=16, solver="nystrom", centers=40, device="cpu")
    steps = model.fit_iter(X, y)
    next(steps)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_a_distributed_checkpoint_resumes_only_with_its_process_count():
    state = _multiproc.run(_checkpoint_then_resume_alone, 2, timeout=60)[0]
    restored = DeepRFM.from_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    X, y = load_digits(return_X_y=True)
    try:
        list(restored.resume_iter(X[:200]))
    except ValueError as e:
        assert "checkpointed with 2 process(es) and is resumed with 1" in str(e)
    else:
        raise AssertionError("a 2-process checkpoint resumed in 1 process")
    assert np.array_equal(restored.classes_, np.arange(10))


def _fit_failing_on_one_rank(what: str):
    """A failure that happens on one rank only must end every rank with the error, not strand
    the others in a collective: rank 0's M^{1/2} (computed there and broadcast), or one rank's
    memory plan."""
    import agop.models.deep_rfm as deep_rfm
    from agop import nystrom

    X, y = _shard()
    rank = distributed.current().rank
    if what == "sqrt" and rank == 0:
        def broken(*args, **kwargs):
            raise ValueError("the AGOP has a non-finite entry")
        deep_rfm.psd_power = broken
    if what == "plan" and rank == 1:
        def tight(*args, **kwargs):  # 'auto' then picks tsqr on every rank; rank 1 fails it
            raise MemoryError("the Nyström layer needs about 9 GB but the budget is 1 GB")
        nystrom.plan = tight
    try:
        DeepRFM(depth=1, width=16, solver="nystrom", centers=40, device="cpu").fit(X, y)
    except (ValueError, MemoryError) as e:
        return f"{type(e).__name__}: {e}"
    return "fitted"


def test_a_failure_on_one_rank_ends_every_rank_with_the_message():
    out = _multiproc.run(_fit_failing_on_one_rank, 2, args=("sqrt",), timeout=60)
    assert all(o.startswith("ValueError") and "rank 0" in o and "non-finite" in o
               for o in out), out
    out = _multiproc.run(_fit_failing_on_one_rank, 2, args=("plan",), timeout=60)
    assert all(o.startswith("MemoryError") and "9 GB" in o for o in out), out
    assert "another rank" in out[0] and "another rank" not in out[1]
