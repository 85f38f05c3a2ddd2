"""CIFAR ResNet-8 / ResNet-18 with GroupNorm: sizes, shapes, no running buffers, SAM."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedflat.client.oracle_base import UpdateContext
from fedflat.client.oracles import sam
from fedflat.errors import ScenarioError
from fedflat.models.flat import FlatModel
from fedflat.models.zoo import build_model
from fedflat.rng import stream


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k  # bias-free convolutions (a norm follows each)


def resnet8_hand_count(classes: int = 10) -> int:
    # stem 3->16, one block per stage (16, 32, 64), 1x1 projections where the width changes;
    # each GroupNorm has a weight and a bias per channel.
    n = conv(3, 16, 3) + 2 * 16
    n += 2 * (conv(16, 16, 3) + 2 * 16)
    n += conv(16, 32, 3) + conv(32, 32, 3) + 4 * 32 + conv(16, 32, 1) + 2 * 32
    n += conv(32, 64, 3) + conv(64, 64, 3) + 4 * 64 + conv(32, 64, 1) + 2 * 64
    return n + 64 * classes + classes


def test_parameter_counts():
    assert resnet8_hand_count() == 78_042
    r8 = build_model("resnet8", (3, 32, 32), 10)
    assert sum(p.numel() for p in r8.parameters()) == resnet8_hand_count()
    # The CIFAR ResNet-18 (kuangliu/pytorch-cifar; FedSAM-line papers report 11.2M):
    # 11,173,962 parameters for 10 classes, unchanged by BatchNorm -> GroupNorm.
    r18 = build_model("resnet18", (3, 32, 32), 10)
    assert sum(p.numel() for p in r18.parameters()) == 11_173_962


@pytest.mark.parametrize("name", ["resnet8", "resnet18"])
def test_output_shape_and_no_running_buffers(name):
    model = build_model(name, (3, 32, 32), 10, groups=2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert list(model.buffers()) == []  # nothing for BN aggregation to average
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert FlatModel(model).num_buffers == 0


def test_images_only():
    with pytest.raises(ScenarioError, match="image inputs"):
        build_model("resnet8", (60,), 10)


def test_one_sam_step_matches_autograd_and_lowers_the_batch_loss():
    module = build_model("resnet8", (3, 32, 32), 10)
    model = FlatModel(module)
    model.module.train()
    w = model.init_params(stream(0, "init"))
    gen = stream(0, "data")
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    ctx = UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=8)
    rho = 0.05
    oracle = sam(rho=rho)
    loss, g_sam, _, _ = oracle.grad(w, (x, y), oracle.init(ctx), stream(0, "client"), ctx)

    # independent route: plain autograd on named tensors, perturbation by hand
    names = [n for n, _ in module.named_parameters()]

    def grads(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = flat.detach().clone().requires_grad_(True)
        params, off = {}, 0
        for n, p in module.named_parameters():
            params[n] = leaf[off:off + p.numel()].view_as(p)
            off += p.numel()
        out = nn.functional.cross_entropy(functional_call(module, params, (x,)), y)
        (g,) = torch.autograd.grad(out, leaf)
        return out.detach(), g

    assert len(names) == len(model.segments)
    l0, g0 = grads(w)
    _, g_expected = grads(w + rho * g0 / g0.norm())
    assert float(loss) == pytest.approx(float(l0), rel=1e-5)
    torch.testing.assert_close(g_sam, g_expected, rtol=1e-4, atol=1e-6)
    l1, _ = grads(w - 0.05 * g_sam)
    assert float(l1) < float(l0)
