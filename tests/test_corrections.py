"""Client-drift corrections and their server steps.

The drift test uses two least-squares clients ``L_i(w) = ½ mean((X_i w − y_i)²)``, i.e.
``½(w − a_i)ᵀA_i(w − a_i)`` + const, trained with K full-batch GD steps of size η.
Local GD gives ``y_i = a_i + Q_i (x − a_i)`` with ``Q_i = (I − ηA_i)^K``, so FedAvg's
fixed point is ``x_fa = (Σ(I − Q_i))⁻¹ Σ(I − Q_i) a_i`` while the global optimum is
``x* = (ΣA_i)⁻¹ ΣA_i a_i``: the two differ (client drift) and SCAFFOLD must reach x*.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from fedflat.client.local_chain import LocalStep, StepEnd, StepInput
from fedflat.client.local_corrections import (
    FEDDYN_GRAD,
    MOFEDSAM_STEPS_LR,
    PREV_STEPS_LR,
    SCAFFOLD_C,
    SCAFFOLD_CI,
    SCAFFOLD_DC,
    feddyn,
    mofedsam,
    scaffold,
)
from fedflat.client.oracle_base import UpdateContext, plain
from fedflat.client.oracles import FEDSMOO_MU, FEDSMOO_S
from fedflat.models import FlatModel
from fedflat.rng import stream
from fedflat.runtime.build import build_server_corrections
from fedflat.runtime.build import local_rule_parts as build_local_rule
from fedflat.scenario.local_rule import (
    PRESETS,
    CorrectionConfig,
    FedOptConfig,
    OracleConfig,
    SwaConfig,
)
from fedflat.server.correction_state import (
    feddyn_server,
    fedsmoo_server,
    prev_update_broadcast,
    scaffold_server,
)
from fedflat.server.pipeline import Pipeline, ServerRound, ServerStep

torch.set_num_threads(1)
D = 3


def adjust(step: LocalStep, g, w, state, ctx):
    """The corrected gradient of one local step at ``w`` (the batch is not read)."""
    return step.update(g, state, StepInput(w, None, None, ctx))[0]


def finish(step: LocalStep, y, steps, lr, state, ctx):
    return step.finish(state, StepEnd(y, steps, lr, ctx))


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y).square().mean()


def make_clients(seed: int = 0):
    rng = np.random.default_rng(seed)
    clients = []
    setups = ((np.array([1.0, 0.3, 0.6]), 2.0), (np.array([0.4, 1.2, 0.5]), -1.0))
    for scale, shift in setups:
        x = rng.normal(size=(40, D)) * scale
        y = x @ rng.normal(size=D) + shift + 0.1 * rng.normal(size=40)
        as_t = torch.tensor
        clients.append((as_t(x, dtype=torch.float32), as_t(y, dtype=torch.float32)))
    return clients


def closed_forms(clients, lr: float, steps: int):
    mats, opts = [], []
    for x, y in clients:
        xd, yd = x.double().numpy(), y.double().numpy()
        a = xd.T @ xd / len(yd)
        mats.append(a)
        opts.append(np.linalg.solve(a, xd.T @ yd / len(yd)))
    eye = np.eye(D)
    q = [np.linalg.matrix_power(eye - lr * a, steps) for a in mats]
    lhs = sum(eye - qi for qi in q)
    rhs_fa = sum((eye - qi) @ ai for qi, ai in zip(q, opts, strict=True))
    x_fa = np.linalg.solve(lhs, rhs_fa)
    rhs_star = sum(a @ ai for a, ai in zip(mats, opts, strict=True))
    x_star = np.linalg.solve(sum(mats), rhs_star)
    return x_fa, x_star


def mean_and_fedavg() -> ServerStep:
    """Test stand-in for the lead's rule + FedAvg (server lr 1): x ← x + mean Δ_i."""

    def apply(rnd: ServerRound, state, gen):
        agg = rnd.deltas.mean(0)
        return rnd.with_(aggregate=agg, new_params=rnd.params + agg), state, {}

    return ServerStep(name="fedavg", init=lambda p: (), apply=apply)


def simulate(
    corrections: list[LocalStep],
    server_steps: list[ServerStep],
    rounds: int,
    lr: float = 0.1,
    steps: int = 10,
) -> np.ndarray:
    """Hand-written client loop (oracle → corrections → SGD) and server pipeline."""
    clients = make_clients()
    model = FlatModel(nn.Linear(D, 1, bias=False))
    model.loss_fn = half_mse
    oracle = plain()
    pipeline = Pipeline([mean_and_fedavg(), *server_steps])
    x = torch.zeros(D)
    pstate = pipeline.init(x)
    states: list[dict[str, torch.Tensor]] = [{}, {}]
    broadcast: dict[str, torch.Tensor] = {}
    gen = stream(0, "client")
    for t in range(rounds):
        deltas, extras = [], []
        for i, batch in enumerate(clients):
            ctx = UpdateContext(
                model=model,
                x_global=x,
                round=t,
                client_id=i,
                num_samples=40,
                broadcast=broadcast,
                client_state=states[i],
            )
            ostate = oracle.init(ctx)
            cstates = [c.init(ctx) for c in corrections]
            w = x.clone()
            for _ in range(steps):
                _, g, ostate, _ = oracle.grad(w, batch, ostate, gen, ctx)
                for c, cs in zip(corrections, cstates, strict=True):
                    g = adjust(c, g, w, cs, ctx)
                w = w - lr * g
            new_state, extra = dict(states[i]), {}
            for c, cs in zip(corrections, cstates, strict=True):
                s_i, e_i = finish(c, w, steps, lr, cs, ctx)
                new_state.update(s_i)
                extra.update(e_i)
            states[i] = new_state
            deltas.append(w - x)
            extras.append(extra)
        stacked = {k: torch.stack([e[k] for e in extras]) for k in extras[0]}
        rnd = ServerRound(
            round=t,
            params=x,
            deltas=torch.stack(deltas),
            weights=torch.ones(2),
            client_ids=[0, 1],
            num_clients=2,
            extras=stacked,
        )
        rnd, pstate, _ = pipeline.apply(rnd, pstate, stream(0, "server", t))
        x, broadcast = rnd.new_params, rnd.broadcast
    return x.double().numpy()


def test_scaffold_removes_the_client_drift_of_fedavg():
    lr, steps = 0.1, 10
    x_fa, x_star = closed_forms(make_clients(), lr, steps)
    assert np.linalg.norm(x_fa - x_star) > 0.1  # FedAvg's drift is real here
    x_avg = simulate([], [], rounds=150, lr=lr, steps=steps)
    np.testing.assert_allclose(x_avg, x_fa, atol=1e-4)
    x_scaffold = simulate(
        [scaffold()], [scaffold_server()], rounds=150, lr=lr, steps=steps
    )
    np.testing.assert_allclose(x_scaffold, x_star, atol=1e-4)


def test_feddyn_reaches_the_global_optimum():
    lr, steps, alpha = 0.1, 10, 0.5
    _x_fa, x_star = closed_forms(make_clients(), lr, steps)
    x_dyn = simulate(
        [feddyn(alpha=alpha)],
        [feddyn_server(alpha=alpha)],
        rounds=300,
        lr=lr,
        steps=steps,
    )
    np.testing.assert_allclose(x_dyn, x_star, atol=1e-4)


# --------------------------------------------------------------------------- unit facts
def ctx_for(x, broadcast=None, client_state=None) -> UpdateContext:
    model = FlatModel(nn.Linear(2, 1, bias=False))
    return UpdateContext(
        model=model,
        x_global=x,
        round=3,
        client_id=1,
        num_samples=5,
        broadcast=broadcast or {},
        client_state=client_state or {},
    )


def test_scaffold_adjust_and_option_two_update():
    x = torch.tensor([1.0, 2.0])
    c, ci = torch.tensor([0.5, -0.5]), torch.tensor([0.25, 1.0])
    ctx = ctx_for(x, {SCAFFOLD_C: c}, {SCAFFOLD_CI: ci})
    corr = scaffold()
    st = corr.init(ctx)
    g = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(adjust(corr, g, x, st, ctx), g + c - ci)
    y = torch.tensor([0.0, 1.5])
    new_state, extras = finish(corr, y, 4, 0.25, st, ctx)
    expected = ci - c + (x - y) / (4 * 0.25)
    torch.testing.assert_close(new_state[SCAFFOLD_CI], expected)
    torch.testing.assert_close(extras[SCAFFOLD_DC], expected - ci)
    # no step taken: c_i unchanged, Δc_i = 0
    same, dc = finish(corr, x, 0, 0.25, st, ctx)
    assert torch.equal(same[SCAFFOLD_CI], ci)
    assert torch.equal(dc[SCAFFOLD_DC], torch.zeros(2))


def test_scaffold_is_identity_without_control_variates():
    x = torch.tensor([1.0, 2.0])
    ctx = ctx_for(x)
    corr = scaffold()
    g = torch.tensor([3.0, 4.0])
    assert torch.equal(adjust(corr, g, x, corr.init(ctx), ctx), g)


def test_feddyn_adjust_and_dual_update():
    x = torch.tensor([1.0, 2.0])
    gi = torch.tensor([0.3, -0.2])
    ctx = ctx_for(x, client_state={FEDDYN_GRAD: gi})
    corr = feddyn(alpha=0.1)
    st = corr.init(ctx)
    w, g = torch.tensor([1.5, 1.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(adjust(corr, g, w, st, ctx), g - gi + 0.1 * (w - x))
    new_state, extras = finish(corr, w, 5, 0.1, st, ctx)
    torch.testing.assert_close(new_state[FEDDYN_GRAD], gi - 0.1 * (w - x))
    assert extras == {}
    with pytest.raises(ValueError, match="alpha must be > 0"):
        feddyn(alpha=0.0)


def test_mofedsam_mixes_in_the_normalised_previous_update():
    x = torch.zeros(2)
    u = torch.tensor([0.2, -0.4])
    ctx = ctx_for(x, {"prev_global_update": u, PREV_STEPS_LR: torch.tensor([2.0])})
    corr = mofedsam(alpha=0.1)
    g = torch.tensor([1.0, 1.0])
    expected = 0.1 * g - 0.9 * u / 2.0
    torch.testing.assert_close(adjust(corr, g, x, corr.init(ctx), ctx), expected)
    first = ctx_for(x)
    torch.testing.assert_close(adjust(corr, g, x, corr.init(first), first), 0.1 * g)
    _, extras = finish(corr, x, 8, 0.05, None, ctx)
    torch.testing.assert_close(extras[MOFEDSAM_STEPS_LR], torch.tensor([0.4]))
    broken = ctx_for(x, {"prev_global_update": u})
    with pytest.raises(ValueError, match="prev_steps_lr"):
        corr.init(broken)


def server_round(**kw) -> ServerRound:
    base = {
        "round": 0,
        "params": torch.tensor([1.0, 1.0]),
        "deltas": torch.tensor([[1.0, 0.0], [0.0, 2.0]]),
        "weights": torch.ones(2),
        "client_ids": [4, 7],
        "num_clients": 10,
    }
    base.update(kw)
    return ServerRound(**base)


def test_scaffold_server_averages_over_the_population():
    dc = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    step = scaffold_server()
    rnd = server_round(extras={SCAFFOLD_DC: dc})
    c0 = step.init(rnd.params)
    out, c, _ = step.apply(rnd, c0, stream(0, "server"))
    torch.testing.assert_close(c, torch.tensor([0.4, -0.2]))  # Σ Δc_i / N, N = 10
    assert torch.equal(out.broadcast[SCAFFOLD_C], c)
    assert out.new_params is None
    step_lr = scaffold_server(server_lr=0.5)
    with_agg = rnd.with_(aggregate=torch.tensor([2.0, 4.0]))
    out, _, _ = step_lr.apply(with_agg, c0, stream(0, "server"))
    torch.testing.assert_close(out.new_params, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="scaffold_dc"):
        step.apply(server_round(), c0, stream(0, "server"))


def test_feddyn_server_dual_and_model():
    step = feddyn_server(alpha=0.5)
    rnd = server_round(new_params=torch.tensor([1.5, 2.0]))
    h0 = step.init(rnd.params)
    out, h, _ = step.apply(rnd, h0, stream(0, "server"))
    expected_h = -(0.5 / 10) * torch.tensor([1.0, 2.0])
    torch.testing.assert_close(h, expected_h)
    expected_x = torch.tensor([1.5, 2.0]) - expected_h / 0.5
    torch.testing.assert_close(out.new_params, expected_x)


def test_fedsmoo_server_normalises_the_mean_dual():
    mu = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    step = fedsmoo_server(rho=0.2, eps=0.0)
    rnd = server_round(extras={FEDSMOO_MU: mu})
    out, s, _ = step.apply(rnd, step.init(torch.zeros(2)), stream(0, "server"))
    torch.testing.assert_close(s, torch.tensor([0.2, 0.0]))
    assert torch.equal(out.broadcast[FEDSMOO_S], s)


def test_prev_update_broadcast():
    step = prev_update_broadcast()
    kl = torch.tensor([[1.0], [3.0]])
    rnd = server_round(
        new_params=torch.tensor([0.5, 3.0]), extras={MOFEDSAM_STEPS_LR: kl}
    )
    out, _, _ = step.apply(rnd, (), stream(0, "server"))
    update = out.broadcast["prev_global_update"]
    torch.testing.assert_close(update, torch.tensor([-0.5, 2.0]))
    torch.testing.assert_close(out.broadcast[PREV_STEPS_LR], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="after the optimizer"):
        step.apply(server_round(), (), stream(0, "server"))


# --------------------------------------------------------------------------- configs
def test_every_preset_validates_and_builds():
    for name, preset in PRESETS.items():
        oracle = OracleConfig(**preset["oracle"])
        corr = CorrectionConfig(**preset["correction"])
        built, _corrections = build_local_rule(oracle, corr)
        build_server_corrections(oracle, corr, num_clients=100)
        if "fedopt" in preset["server"]:
            FedOptConfig(**preset["server"]["fedopt"])
        if "swa" in preset:
            assert SwaConfig(**preset["swa"]).enabled
        assert built.passes >= 1, name
    assert OracleConfig(**PRESETS["fedlesam"]["oracle"]).name == "lesam"
    smoo = build_local_rule(
        OracleConfig(name="fedsmoo"), CorrectionConfig(feddyn_alpha=0.1)
    )
    # FedSMOO's dual μ_i is the oracle's own state (its finish), no companion correction.
    assert [c.name for c in smoo[1]] == ["feddyn"]
    assert smoo[0].finish is not None


def test_configs_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError):
        OracleConfig(name="sam", radius=0.1)
    with pytest.raises(ValidationError):
        OracleConfig(name="sam", rho=-1.0)
    with pytest.raises(ValidationError):
        CorrectionConfig(feddyn_alpha=0.0)
    with pytest.raises(ValidationError):
        SwaConfig(start=1.5)
    assert isinstance(SwaConfig(start=7500).start, int)


def test_stateful_corrections_survive_the_client_loop_next_to_fedprox():
    # Through the real client loop: every stateful correction's new client state must
    # reach the result although fedprox returns a copy of the old state.
    from fedflat.client.optim import sgd
    from fedflat.client.update import LocalRule, LocalSchedule, client_update

    oracle, corrections = build_local_rule(
        OracleConfig(name="sam", rho=0.05),
        CorrectionConfig(prox_mu=0.1, scaffold=True, feddyn_alpha=0.1),
    )
    rule = LocalRule(
        oracle=oracle,
        corrections=corrections,
        optimizer=sgd(momentum=0.0, weight_decay=0.0),
        schedule=LocalSchedule(batch_size=10, epochs=1),
    )
    x, y = make_clients()[0]
    model = FlatModel(nn.Linear(D, 1, bias=False))
    model.loss_fn = half_mse
    old = {SCAFFOLD_CI: torch.ones(D), FEDDYN_GRAD: torch.ones(D), "other": torch.ones(1)}
    ctx = UpdateContext(
        model=model,
        x_global=torch.zeros(D),
        round=0,
        client_id=0,
        num_samples=len(y),
        client_state=old,
    )
    res = client_update(rule, ctx, x, y, lr=0.05, gen=stream(0, "client", 0, 0))
    assert res.steps == 4
    y_final = res.delta  # x_global = 0
    expected_ci = old[SCAFFOLD_CI] - y_final / (4 * 0.05)  # c = 0
    torch.testing.assert_close(res.client_state[SCAFFOLD_CI], expected_ci)
    torch.testing.assert_close(res.client_state[FEDDYN_GRAD], old[FEDDYN_GRAD] - 0.1 * y_final)
    assert torch.equal(res.client_state["other"], old["other"])
    torch.testing.assert_close(res.extras[SCAFFOLD_DC], expected_ci - old[SCAFFOLD_CI])
