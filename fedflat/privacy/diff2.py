"""DIFF2: DP optimisation from clipped gradient differences with periodic full gradients.

Murata & Suzuki, "DIFF2: Differential Private Optimization via Gradient Differences for
Nonconvex Distributed Learning", ICML 2023 (https://arxiv.org/abs/2302.03884).

Setting: P clients, client p holds n_p records, N = Σ n_p; the objective is the mean
loss over all N records; a record is the unit of privacy (sample-level DP). Every round
each client computes its per-record gradients on its *full* local data (no
subsampling, q = 1) and sends a clipped sum; the server adds Gaussian noise.

Estimator (DIFF2 with the GD subroutine, Algorithm 1 of the paper), rounds r = 0..R-1:

- **full round** (r mod T == 0)::

      v_r = (1/N) [ Σ_z clip_C1(∇ℓ(x_r; z)) + N(0, σ1² C1² I) ]

- **difference round** (otherwise)::

      v_r = v_{r-1} + (1/N) [ Σ_z clip_C2(∇ℓ(x_r; z) − ∇ℓ(x_{r-1}; z)) + N(0, σ2² C2² I) ]

- update ``x_{r+1} = x_r − η v_r``.

``clip_C(u) = u · min(1, C/‖u‖)``, per record. **Sensitivity**: adding or removing one
record changes a clipped sum by at most C (C1 on full rounds, C2 on difference rounds;
the difference of *one record's* two gradients is clipped as one vector), so with
noise std σ1·C1 (σ2·C2) each release is a Gaussian mechanism of noise multiplier σ1
(σ2), and R rounds compose as full-batch (q = 1) Gaussian releases: the accountant
records one step ``(σ1, 1.0)`` per full round and ``(σ2, 1.0)`` per difference round.
The Gaussian mechanism's RDP is α/(2σ²) exactly, so the ledger has DP-GD's ε (R steps at
σ) whenever K/σ1² + (R−K)/σ2² = R/σ², K = ⌈R/T⌉ full rounds; :func:`split_sigma` gives
the split that spends half of that RDP on each kind (the paper's calibration also
spends a constant share on each). The gain comes from C2 ≪ C1 (for an L-smooth loss a
record's difference is at most L·η·‖v_{r-1}‖) and from the fewer, less noisy full
rounds.

Pitfalls (the paper's and ours): the division by N uses the fixed record count (the
add/remove convention of the accountants; under replace-one adjacency the sensitivity
is 2C); the noise of difference rounds accumulates in v over a period (variance grows
linearly with the rounds since the last full round), which is why full rounds restart
it every T rounds (the paper's T ≈ a few to tens); the first round of a period must be
a full round. With *equal* σ on both kinds (σ1 = σ2 = DP-GD's σ, also equal ε) a
full round's noise stays in v for T rounds instead of averaging out as DP-GD's fresh noise
does, and DIFF2 loses to DP-GD (measured in ``scripts/reproduce_diff2.py``).
A non-private DIFF2 (σ = 0, no clipping) reduces to GD exactly, since
v_r telescopes to the mean gradient at x_r.

Through a scenario (``privacy.sample_level.mechanism: diff2``, :mod:`fedflat.scenario.diff2`)
the same estimator runs as a federated round: client p (stateless) gets x_r and, in the
server broadcast, x_{r−1} (:data:`PREV_PARAMS`), computes its per-record gradients on all its
n_p records, and releases its clipped sum plus N(0, σ²C² I) (the noise is added by the
client on its own sum, as DP-SGD's sample-level noise is, so each client's guarantee is
about its own records and needs no trusted server), divided by n_p, as the gradient of one
local SGD step. The server's sample-weighted mean of the deltas −η·release_p/n_p is
−η·(1/N) Σ_p release_p; :func:`diff2_server` turns it into v_r (its state, v_{r−1}, is
checkpointed with the pipeline) and hands −η·v_r to the server optimizer. Every client
records one (σ1 or σ2, q = 1) step per round in its ledger. The total noise on v is the
sum of the P clients' draws (variance P·σ²C²), where :func:`diff2_gd` adds one central
draw: with one client the two coincide in distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedflat.client.oracle_base import Batch, Metrics, Oracle, UpdateContext
from fedflat.privacy.accountant import Accountant
from fedflat.privacy.mechanisms import check_model, per_example_grads
from fedflat.server.pipeline import ServerRound, ServerStep

#: Broadcast key of x_{r−1}, the global model of the previous round (set by diff2_server).
PREV_PARAMS = "diff2_prev_params"

# Per-record gradient rows [N, d] of the loss at flat parameters w: the model's job.
PerRecordGrads = Callable[[Tensor], Tensor]


def clip_rows(rows: Tensor, clip: float) -> Tensor:
    """Each row scaled to L2 norm at most ``clip`` (rows below it unchanged)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)


def is_full_round(r: int, period: int) -> bool:
    """Whether round ``r`` (0-based) releases a full gradient (every ``period`` rounds)."""
    return r % period == 0


def full_release(rows: Tensor, *, clip: float, sigma: float, n_records: int,
                 gen: torch.Generator) -> Tensor:
    """(1/N)(Σ clip_C1(g_z) + N(0, σ²C1² I)): a full round's estimate."""
    noise = torch.randn(rows.shape[1], generator=gen, dtype=rows.dtype, device=rows.device)
    return (clip_rows(rows, clip).sum(0) + sigma * clip * noise) / n_records


def difference_release(rows: Tensor, prev_rows: Tensor, v_prev: Tensor, *, clip: float,
                       sigma: float, n_records: int, gen: torch.Generator) -> Tensor:
    """v_{r-1} + (1/N)(Σ clip_C2(g_z(x_r) − g_z(x_{r-1})) + N(0, σ²C2² I))."""
    noise = torch.randn(rows.shape[1], generator=gen, dtype=rows.dtype, device=rows.device)
    diff = clip_rows(rows - prev_rows, clip).sum(0)
    return v_prev + (diff + sigma * clip * noise) / n_records


@dataclass(frozen=True)
class Diff2Config:
    """DIFF2-GD hyperparameters.

    Attributes:
        lr: step size η.
        rounds: R.
        period: T, rounds between full releases (1 = DP-GD).
        clip_full: C1, per-record clip of full gradients.
        clip_diff: C2, per-record clip of gradient differences.
        sigma: noise multiplier σ1 of full releases.
        sigma_diff: noise multiplier σ2 of difference releases (None = ``sigma``).
    """

    lr: float
    rounds: int
    period: int
    clip_full: float
    clip_diff: float
    sigma: float
    sigma_diff: float | None = None


def split_sigma(sigma: float, rounds: int, period: int) -> tuple[float, float]:
    """(σ1, σ2) with half of DP-GD's RDP (R releases at σ) on each kind of release.

    K = ⌈R/T⌉ full rounds: K/σ1² = (R−K)/σ2² = R/(2σ²), so the ledger's RDP, hence ε
    under the RDP accountant, equals DP-GD's. ``period = 1`` gives (σ, σ) (no
    difference rounds).
    """
    full = -(-rounds // period)
    if full == rounds:
        return sigma, sigma
    return sigma * (2 * full / rounds) ** 0.5, sigma * (2 * (rounds - full) / rounds) ** 0.5


def diff2_gd(grads: PerRecordGrads, w0: Tensor, cfg: Diff2Config, gen: torch.Generator,
             accountant: Accountant | None = None,
             on_round: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """Run DIFF2 with the GD subroutine from ``w0``; returns the final parameters.

    ``grads(w)`` gives the ``[N, d]`` per-record gradients (all clients' records stacked:
    the server only ever sees their clipped sums plus noise, so the client split does
    not change the releases). Each round records one ``(σ1 or σ2, q = 1)`` step in
    ``accountant``; ``on_round(r, w)`` is called with the parameters before round r's
    update. ``period = 1`` is DP-GD with clip C1.
    """
    if cfg.period < 1 or cfg.rounds < 0:
        raise ValueError(f"diff2: period must be >= 1 and rounds >= 0, got {cfg}")
    w = w0.clone()
    v = torch.zeros_like(w)
    prev: Tensor | None = None
    sigma_diff = cfg.sigma if cfg.sigma_diff is None else cfg.sigma_diff
    for r in range(cfg.rounds):
        if on_round is not None:
            on_round(r, w)
        rows = grads(w)
        n = rows.shape[0]
        full = is_full_round(r, cfg.period) or prev is None
        if full:
            v = full_release(rows, clip=cfg.clip_full, sigma=cfg.sigma, n_records=n, gen=gen)
        else:
            v = difference_release(rows, prev, v, clip=cfg.clip_diff, sigma=sigma_diff,
                                   n_records=n, gen=gen)
        if accountant is not None:
            accountant.step(cfg.sigma if full else sigma_diff, 1.0)
        prev = rows
        w = w - cfg.lr * v
    return w


def release_sigmas(sigma: float, rounds: int, period: int, split: str) -> tuple[float, float]:
    """(σ1, σ2) of full and difference releases from DP-GD's σ over ``rounds`` releases.

    ``split`` "equal": (σ, σ); "rdp_half": :func:`split_sigma`. Either way the ledger's
    Σ 1/σ_r² is R/σ², so ε equals DP-GD's (q = 1 Gaussian releases compose to one Gaussian
    of multiplier (Σ 1/σ_r²)^(−1/2), under any exact accountant).
    """
    if split == "equal":
        return sigma, sigma
    if split == "rdp_half":
        return split_sigma(sigma, rounds, period)
    raise ValueError(f"diff2 sigma_split must be 'equal' or 'rdp_half', got {split!r}")


def round_sigma(round_: int, sigmas: tuple[float, float], period: int) -> float:
    """σ of round ``round_``'s release (σ1 on full rounds, σ2 on difference rounds)."""
    return sigmas[0] if is_full_round(round_, period) else sigmas[1]


def _rows(ctx: UpdateContext, w: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """[n, d] per-record gradients at w (flat, segment order) and the [n] losses."""
    x, y = batch
    grads, losses = per_example_grads(ctx.model, w, x, y)
    b = int(y.shape[0])
    return torch.cat([grads[s.name].reshape(b, -1) for s in ctx.model.segments], 1), losses


def diff2_oracle(*, clip_full: float, clip_diff: float, sigmas: tuple[float, float],
                 period: int) -> Oracle:
    """The client's DIFF2 release as the gradient of one full-batch local step.

    Round r = ``ctx.round``: a full round releases Σ clip_C1(∇ℓ(x_r; z)) + N(0, σ1²C1² I),
    a difference round Σ clip_C2(∇ℓ(x_r; z) − ∇ℓ(x_{r−1}; z)) + N(0, σ2²C2² I) with x_{r−1}
    from ``ctx.broadcast[PREV_PARAMS]``; the sum runs over the batch, which must be all of
    the client's records, and the returned gradient is the release / n_p. The noise is one
    draw from the client's generator. Metrics: ``diff2_full_round`` (1 or 0),
    ``dp_frac_clipped``, ``dp_grad_norm`` (mean per-record norm of what was clipped).
    """
    if not (clip_full > 0 and clip_diff > 0 and period >= 1 and min(sigmas) >= 0):
        raise ValueError(f"diff2: need clips > 0, period >= 1, σ >= 0; got C1={clip_full}, "
                         f"C2={clip_diff}, T={period}, σ={sigmas}")

    def init(ctx: UpdateContext) -> None:
        check_model(ctx.model)

    def grad(w: Tensor, batch: Batch, state: Any, gen: torch.Generator,
             ctx: UpdateContext) -> tuple[Tensor, Tensor, Any, Metrics]:
        n = int(batch[1].shape[0])
        if n != ctx.num_samples:
            raise ValueError(f"diff2: client {ctx.client_id}'s batch has {n} of its "
                             f"{ctx.num_samples} records; DIFF2 needs the full local batch")
        rows, losses = _rows(ctx, w, batch)
        full = is_full_round(ctx.round, period)
        if not full:
            prev = ctx.broadcast.get(PREV_PARAMS)
            if prev is None:
                raise ValueError(f"diff2: round {ctx.round} is a difference round but the "
                                 "server sent no previous model")
            rows = rows - _rows(ctx, prev, batch)[0]
        clip, sigma = (clip_full, sigmas[0]) if full else (clip_diff, sigmas[1])
        norms = rows.norm(dim=1)
        total = clip_rows(rows, clip).sum(0)
        if sigma > 0:
            noise = torch.randn(total.shape, generator=gen, device=gen.device,
                                dtype=total.dtype).to(total.device)
            total = total.add_(noise, alpha=sigma * clip)
        metrics = {"diff2_full_round": float(full),
                   "dp_frac_clipped": float((norms > clip).float().mean()),
                   "dp_grad_norm": float(norms.mean())}
        return losses.detach().mean(), total / n, state, metrics

    return Oracle(init=init, grad=grad, passes=1)


def diff2_server(*, period: int, lr: Callable[[int], float]) -> ServerStep:
    """Server step after the sample-weighted mean: the aggregate becomes −η_r·v_r.

    The mean of the deltas −η_r·release_p/n_p (weights n_p) is −η_r·(v_r − v_{r−1}) on a
    difference round and −η_r·v_r on a full one; the state is v_{r−1} (in gradient units,
    so a decaying ``lr(r)`` is handled). Also broadcasts x_r as next round's x_{r−1}.
    """

    def apply(rnd: ServerRound, state: Tensor, gen: torch.Generator):
        assert rnd.aggregate is not None  # noqa: S101 - placed after the rule
        eta = lr(rnd.round)
        step = rnd.aggregate / -eta
        v = step if is_full_round(rnd.round, period) else state + step
        out = rnd.with_(aggregate=-eta * v, broadcast={**rnd.broadcast, PREV_PARAMS: rnd.params})
        return out, v, {"diff2/v_norm": float(v.norm())}

    return ServerStep("diff2", init=torch.zeros_like, apply=apply)
