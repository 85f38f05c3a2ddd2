"""The local chain: one step shape, steps in the maths' order, state keyed by step name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedflat.client.local_chain import (
    LOSS,
    LocalStep,
    StepEnd,
    StepInput,
    chain,
    clip_grad,
    oracle_step,
)
from fedflat.client.local_corrections import fedprox, scaffold
from fedflat.client.optim import sgd
from fedflat.client.oracle_base import UpdateContext, plain
from fedflat.client.update import LocalRule, LocalSchedule, client_update
from fedflat.models import FlatModel
from fedflat.rng import stream

D = 4


def _problem(scale: float = 1.0):
    gen = stream(0, "data")
    x = torch.randn(20, D, generator=gen) * scale
    y = x @ torch.randn(D, generator=gen) + 3.0
    model = FlatModel(nn.Linear(D, 1, bias=False))
    model.loss_fn = lambda out, t: 0.5 * (out.squeeze(-1) - t).square().mean()
    ctx = UpdateContext(model=model, x_global=torch.zeros(D), round=0, client_id=0,
                        num_samples=len(y))
    return x, y, ctx


def _at(g_ctx, w=None):
    x, y, ctx = g_ctx
    return StepInput(ctx.x_global if w is None else w, (x, y), stream(0, "client"), ctx)


def test_clip_grad_bounds_the_norm_and_reclipping_is_idempotent():
    step = clip_grad(2.0)
    at = _at(_problem())
    big = torch.tensor([3.0, 4.0, 0.0, 0.0])  # norm 5
    out, _, _ = step.update(big, (), at)
    assert float(out.norm()) == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(step.update(out, (), at)[0], out)  # clipping twice = clipping once
    small = torch.tensor([0.3, 0.4, 0.0, 0.0])
    assert torch.equal(step.update(small, (), at)[0], small)
    assert torch.equal(step.update(torch.zeros(D), (), at)[0], torch.zeros(D))
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad(0.0)


def test_clip_comes_after_the_corrections():
    # Away from x_global FedProx adds μ(w − x): the clip, last, bounds the *corrected*
    # gradient, so the chain returns (∇L(w) + μ(w − x)) · C / ‖∇L(w) + μ(w − x)‖.
    prob = _problem(scale=10.0)
    x, y, ctx = prob
    rule = LocalRule(oracle=plain(), corrections=(fedprox(mu=1.0),), optimizer=sgd(),
                     schedule=LocalSchedule(batch_size=20, steps=1), grad_clip=0.5)
    local = rule.chain
    assert local.names == ("oracle", "fedprox", "grad_clip")
    w = torch.full((D,), 2.0)
    g, _, _ = local.update(local.init(ctx), _at(prob, w))
    _, grad = ctx.model.loss_grad(w, x, y)
    corrected = grad + 1.0 * (w - ctx.x_global)
    torch.testing.assert_close(g, corrected * (0.5 / corrected.norm()))
    # and one client update moves the parameters by lr · C exactly
    res = client_update(rule, ctx, x, y, lr=0.1, gen=stream(0, "client", 0, 0))
    assert float(res.delta.norm()) == pytest.approx(0.1 * 0.5, rel=1e-6)


def test_oracle_step_reports_the_batch_loss_and_ignores_the_incoming_gradient():
    prob = _problem()
    x, y, ctx = prob
    step = oracle_step(plain())
    g, _, m = step.update(torch.full((D,), 7.0), step.init(ctx), _at(prob))
    loss, expected = ctx.model.loss_grad(ctx.x_global, x, y)
    assert torch.equal(g, expected)
    assert torch.equal(m[LOSS], loss)
    assert step.passes == 1


def test_step_names_are_unique_and_own_their_keys():
    with pytest.raises(ValueError, match="unique"):
        chain(fedprox(mu=0.1), fedprox(mu=0.2))
    _, _, ctx = _problem()
    twin = scaffold()._replace(name="scaffold_twin")
    local = chain(oracle_step(plain()), scaffold(), twin)
    with pytest.raises(ValueError, match="both return the client state 'scaffold_ci'"):
        local.finish(local.init(ctx), StepEnd(ctx.x_global, 1, 0.1, ctx))


def test_an_inserted_step_changes_nothing_else():
    # States are keyed by step name: an identity step inserted between two corrections
    # leaves every other step's state, the delta and the client state bit for bit unchanged.
    x, y, ctx = _problem()
    ctx.client_state = {"scaffold_ci": torch.full((D,), 0.1)}
    seen: list[str] = []

    def update(g, state, at):
        return g, state, {}

    identity = LocalStep("identity", init=lambda c: seen.append("init"), update=update)
    base = {"optimizer": sgd(momentum=0.9), "schedule": LocalSchedule(batch_size=5, epochs=1)}
    plain_rule = LocalRule(oracle=plain(), corrections=(fedprox(mu=0.1), scaffold()), **base)
    with_step = LocalRule(oracle=plain(), corrections=(fedprox(mu=0.1), identity, scaffold()),
                          **base)
    a = client_update(plain_rule, ctx, x, y, 0.05, stream(0, "client", 0, 0))
    b = client_update(with_step, ctx, x, y, 0.05, stream(0, "client", 0, 0))
    assert seen == ["init"]
    assert torch.equal(a.delta, b.delta)
    assert a.client_state.keys() == b.client_state.keys()
    for k in a.client_state:
        assert torch.equal(a.client_state[k], b.client_state[k])
    assert torch.equal(a.extras["scaffold_dc"], b.extras["scaffold_dc"])
