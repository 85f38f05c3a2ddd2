"""Server-side stochastic weight averaging of the global models (ALGORITHMS.md §3.6).

From round ``start_round`` on, the client learning rate cycles linearly within each
``cycle``-round cycle from near the base lr down to ``swa_lr`` (``swa_client_lr``) and
the server averages one global model per cycle into ``x_SWA`` (``swa_step``), which is
then what gets evaluated (``round.eval_params``).

Collection conventions (``collect``):
    ``lowest_lr`` (default): after round r when ``r ≥ start`` and
        ``(r + 1) mod c == 0``, i.e. the round that trained at ``swa_lr``, the low end
        of the cycle (SWA's rule).
    ``official``: after round r when ``r > start`` and ``(r − start) mod c == 0``, the
        debcaldarola/fedsam test (models/main.py: ``i > swa_start and (i - swa_start)
        % swa_c == 0``), which fires after the round with the *largest* lr of a new cycle
        and never at ``r == start`` (kept for parity). One difference remains: the
        reference copies the global model into its SWA model at ``r == start`` and
        evaluates that copy until the first collection replaces it (weight 1/(0+1) = 1);
        here the current global model is evaluated until then. The average itself is the
        same.

Only the flat parameters are averaged. BatchNorm running statistics are not part of
them: re-estimate them for ``x_SWA`` before evaluating, or use GroupNorm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fedflat.server.pipeline import Metrics, ServerRound, ServerStep

COLLECT_MODES = ("lowest_lr", "official")


class SwaState(NamedTuple):
    """x_swa: running average (zeros until n > 0); n: models averaged so far."""

    x_swa: Tensor
    n: int


def _check(start_round: int, cycle: int) -> None:
    if start_round < 0:
        raise ValueError(f"swa start_round must be >= 0, got {start_round}")
    if cycle < 1:
        raise ValueError(f"swa cycle must be >= 1, got {cycle}")


def swa_start_round(start: float | int, num_rounds: int) -> int:
    """Resolve a configured start: a float in [0, 1] is a fraction of ``num_rounds``
    (``int(start · T)``; the reference default 0.75), an int is a round index.

    Raises:
        ValueError: negative start, or a float above 1.
    """
    if isinstance(start, bool) or start < 0:
        raise ValueError(
            f"swa start must be a fraction in [0, 1] or a round >= 0, got {start}"
        )
    if isinstance(start, float):
        if start > 1:
            raise ValueError(
                f"swa start given as a float must be a fraction <= 1, got {start}"
            )
        return int(start * num_rounds)
    return int(start)


def swa_collects(
    round_: int, *, start_round: int, cycle: int, collect: str = "lowest_lr"
) -> bool:
    """Whether the global model after round ``round_`` (0-based) enters the average."""
    _check(start_round, cycle)
    if collect not in COLLECT_MODES:
        raise ValueError(f"swa collect must be one of {COLLECT_MODES}, got {collect!r}")
    if collect == "lowest_lr":
        return round_ >= start_round and (round_ + 1) % cycle == 0
    # The reference's strict r > start: the cycle starting at `start` is not collected.
    return round_ > start_round and (round_ - start_round) % cycle == 0


def swa_client_lr(
    round_: int, *, base_lr: float, swa_lr: float, start_round: int, cycle: int
) -> float:
    """Client learning rate of round ``round_`` under the SWA cyclic schedule.

    Before ``start_round``: ``base_lr``. From it on, with ``t = ((r mod c) + 1)/c``:
    ``(1 − t)·base_lr + t·swa_lr`` (debcaldarola/fedsam ``schedule_cycling_lr``).
    """
    _check(start_round, cycle)
    if round_ < start_round:
        return base_lr
    t = ((round_ % cycle) + 1) / cycle
    return (1.0 - t) * base_lr + t * swa_lr


def swa_step(*, start_round: int, cycle: int, collect: str = "lowest_lr") -> ServerStep:
    """Server SWA: ``x_SWA ← (1 − 1/(n+1)) x_SWA + (1/(n+1)) x`` at collection rounds.

    Put it last in the pipeline (it reads ``round.new_params``). Once a model has been
    collected, every round sets ``round.eval_params = x_SWA``.

    Args:
        start_round: first round (0-based) of the SWA phase (``swa_start_round``).
        cycle: cycle length c ≥ 1 (reference scripts: 10).
        collect: ``"lowest_lr"`` or ``"official"`` (module docstring).

    Returns:
        ``ServerStep`` named ``swa``; state ``SwaState``.

    References:
        Caldarola, Caputo, Ciccone, Improving Generalization in Federated Learning by
        Seeking Flat Minima, ECCV 2022, https://arxiv.org/abs/2203.11834; Izmailov et
        al., Averaging Weights Leads to Wider Optima, UAI 2018,
        https://arxiv.org/abs/1803.05407.
    """
    _check(start_round, cycle)
    if collect not in COLLECT_MODES:
        raise ValueError(f"swa collect must be one of {COLLECT_MODES}, got {collect!r}")

    def apply(
        rnd: ServerRound, state: SwaState, gen: torch.Generator
    ) -> tuple[ServerRound, SwaState, Metrics]:
        if rnd.new_params is None:
            raise ValueError(
                "swa_step needs new_params: put it after the optimizer step"
            )
        x_swa, n = state
        if swa_collects(
            rnd.round, start_round=start_round, cycle=cycle, collect=collect
        ):
            x_swa = torch.lerp(x_swa, rnd.new_params.to(x_swa), 1.0 / (n + 1))
            n += 1
        if n == 0:
            return rnd, SwaState(x_swa, n), {}
        metrics = {"swa_models": float(n)}
        return rnd.with_(eval_params=x_swa), SwaState(x_swa, n), metrics

    def init(params: Tensor) -> SwaState:
        return SwaState(torch.zeros_like(params), 0)

    return ServerStep(name="swa", init=init, apply=apply)
