"""DIFF2: clipping / sensitivity of the difference term by hand, the accountant's ledger."""

from __future__ import annotations

import pytest
import torch

from fedflat.privacy.accountant import Accountant
from fedflat.privacy.accounting import compute_epsilon, epsilon
from fedflat.privacy.diff2 import (
    Diff2Config,
    clip_rows,
    diff2_gd,
    difference_release,
    split_sigma,
)
from fedflat.rng import stream


def test_difference_term_is_clipped_per_record_by_hand():
    prev = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    rows = torch.tensor([[3.0, 4.0], [1.0, 1.5]])  # differences (3, 4) norm 5 and (0, .5)
    v_prev = torch.tensor([10.0, 20.0])
    out = difference_release(rows, prev, v_prev, clip=1.0, sigma=0.0, n_records=2,
                             gen=stream(0, "data"))
    # (3,4) -> (0.6, 0.8); (0, 0.5) unchanged; mean over N = 2, added to v_prev
    torch.testing.assert_close(out, torch.tensor([10.0 + 0.3, 20.0 + 0.65]))


def test_sensitivity_of_the_difference_sum_is_c2():
    gen = stream(1, "data")
    prev = torch.randn(20, 5, generator=gen)
    rows = prev + 10 * torch.randn(20, 5, generator=gen)  # every difference gets clipped
    c2 = 0.3
    full = clip_rows(rows - prev, c2).sum(0)
    for k in range(20):  # remove record k: the clipped sum moves by exactly ‖clip(d_k)‖ = C2
        keep = [i for i in range(20) if i != k]
        moved = (full - clip_rows(rows[keep] - prev[keep], c2).sum(0)).norm()
        assert float(moved) == pytest.approx(c2, rel=1e-5)
    small = clip_rows(torch.tensor([[0.1, 0.0]]), c2)
    torch.testing.assert_close(small, torch.tensor([[0.1, 0.0]]))  # below C2: unchanged


def quadratic_rows(a: torch.Tensor, b: torch.Tensor):
    # ℓ_z(w) = ½ a_z ‖w − b_z‖²: per-record gradient a_z (w − b_z)
    return lambda w: a[:, None] * (w[None] - b)


def test_noiseless_unclipped_diff2_is_gradient_descent():
    gen = stream(2, "data")
    a, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, 3, generator=gen)
    grads = quadratic_rows(a.double(), b.double())
    cfg = Diff2Config(lr=0.3, rounds=12, period=5, clip_full=1e9, clip_diff=1e9, sigma=0.0)
    w = diff2_gd(grads, torch.zeros(3, dtype=torch.float64), cfg, stream(0, "noise"))
    ref = torch.zeros(3, dtype=torch.float64)
    for _ in range(12):
        ref = ref - 0.3 * grads(ref).mean(0)
    torch.testing.assert_close(w, ref)


def test_accountant_records_one_full_batch_release_per_round():
    gen = stream(3, "data")
    a, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, 3, generator=gen)
    acc = Accountant()
    cfg = Diff2Config(lr=0.1, rounds=30, period=10, clip_full=1.0, clip_diff=0.1, sigma=2.0)
    diff2_gd(quadratic_rows(a, b), torch.zeros(3), cfg, stream(0, "noise"), accountant=acc)
    assert acc.history == [(2.0, 1.0, 30)]
    assert acc.epsilon(1e-5) == pytest.approx(
        epsilon(sampling_rate=1.0, steps=30, noise_multiplier=2.0, delta=1e-5))


def test_full_rounds_follow_the_period():
    seen: list[int] = []
    cfg = Diff2Config(lr=0.1, rounds=7, period=3, clip_full=1.0, clip_diff=1.0, sigma=0.0)
    rows = torch.ones(2, 1)

    def grads(w: torch.Tensor) -> torch.Tensor:
        return rows * (1 + len(seen))

    def note(r: int, w: torch.Tensor) -> None:
        seen.append(r)

    w = diff2_gd(grads, torch.zeros(1), cfg, stream(0, "noise"), on_round=note)
    assert seen == list(range(7))
    # gradients 1..7 (norm = value): full rounds 0, 3, 6 clip to 1; differences are 1, ≤ C2
    # v: r0 1, r1 2, r2 3, r3 1, r4 2, r5 3, r6 1 -> Σ = 13
    torch.testing.assert_close(w, torch.tensor([-1.3]))


def test_split_ledger_has_dp_gds_epsilon():
    # full rounds 0, 10, 20 get σ1, the other 27 σ2: one release per round in round order
    s1, s2 = split_sigma(2.0, 30, 10)
    assert 3 / s1**2 == pytest.approx(27 / s2**2) == pytest.approx(30 / (2 * 2.0**2))
    gen = stream(3, "data")
    a, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, 3, generator=gen)
    acc = Accountant()
    cfg = Diff2Config(lr=0.1, rounds=30, period=10, clip_full=1.0, clip_diff=0.1, sigma=s1,
                      sigma_diff=s2)
    diff2_gd(quadratic_rows(a, b), torch.zeros(3), cfg, stream(0, "noise"), accountant=acc)
    assert acc.history == [(s1, 1.0, 1), (s2, 1.0, 9)] * 3
    # Gaussian RDP α/(2σ²) adds up: the same ε as 30 DP-GD steps at σ = 2
    dp_gd = epsilon(sampling_rate=1.0, steps=30, noise_multiplier=2.0, delta=1e-5)
    assert compute_epsilon(acc.history, delta=1e-5).epsilon == pytest.approx(dp_gd, rel=1e-6)
    assert split_sigma(2.0, 30, 1) == (2.0, 2.0)
