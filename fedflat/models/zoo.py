"""The model zoo: small models for simulation, built from the scenario's ``model`` block."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedflat.errors import ScenarioError


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ScenarioError(f"unknown norm {kind!r}", key="model.norm")


class CNN(nn.Module):
    """LeNet-style CNN: two conv5x5 + max-pool blocks, then two dense layers."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
        norm: str = "none",
        groups: int = 8,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 5, padding=2), _norm(norm, out, groups), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (200,),
    channels: Sequence[int] = (32, 64),
    norm: str = "none",
    groups: int = 8,
) -> nn.Module:
    """Build a zoo model for inputs of shape ``in_shape`` (without the batch dimension).

    Args:
        name: ``logistic`` (multinomial logistic regression), ``mlp`` or ``cnn``.
        in_shape: e.g. ``(60,)`` for vectors or ``(1, 28, 28)`` for images.
        num_classes: number of output classes.
        hidden: hidden layer widths of the MLP; the CNN uses ``hidden[0]`` for its dense layer.
        channels: convolution widths of the CNN.
        norm: normalisation after each conv layer of the CNN (none, group, batch, layer).
        groups: number of groups for GroupNorm.
    """
    flat_in = int(torch.Size(in_shape).numel())
    if name == "logistic":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat_in, num_classes))
    if name == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        prev = flat_in
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        return nn.Sequential(*layers)
    if name == "cnn":
        if len(in_shape) != 3:
            raise ScenarioError(
                "model cnn needs image inputs [C, H, W]; "
                f"this dataset gives shape {list(in_shape)}",
                key="model.name",
            )
        return CNN(in_shape, num_classes, channels, hidden[0] if hidden else 512, norm, groups)
    raise ScenarioError(f"unknown model {name!r}", key="model.name")
