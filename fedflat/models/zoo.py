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


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: embedding 8, two stacked LSTM layers, dense on the last step.

    LEAF (models/shakespeare/stacked_lstm.py) uses 80 characters, embedding 8 and two LSTM
    layers of 256 units; ``hidden`` sets the LSTM width (the scenario default is smaller
    for CPU runs). Inputs are ``[batch, seq]`` character indices stored as floats (see
    :mod:`fedflat.data.shakespeare`); the output is the logits of the next character.
    """

    def __init__(self, vocab: int, num_classes: int, hidden: int = 256, embed: int = 8,
                 layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with GroupNorm and a 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.GroupNorm(min(groups, c_out), c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool) with GroupNorm in place of BatchNorm.

    ``resnet18``: He et al. (2016)'s ImageNet ResNet-18 layout adapted to 32x32 inputs as
    in the common CIFAR code (kuangliu/pytorch-cifar): widths 64-128-256-512, two blocks
    per stage; 11,173,962 parameters for 10 classes (GroupNorm has BatchNorm's affine
    parameters). This is the ResNet-18-GN of the FedSAM line of work (Caldarola et al.
    2022's ResNet runs; Qu et al. 2022; Hsieh et al. 2020's BN->GN swap, who use 2 groups).
    FedSAM's own CIFAR-10 table uses the LeNet-style CNN (``model.name: cnn``).
    ``resnet8``: He et al.'s CIFAR ResNet of depth 6n+2 with n = 1 (widths 16-32-64, one
    block per stage, projection shortcuts), 78,042 parameters for 10 classes.
    GroupNorm keeps no running statistics, so there are no buffers to aggregate.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int],
                 blocks: Sequence[int], groups: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(min(groups, widths[0]), widths[0]), nn.ReLU())
        layers: list[nn.Module] = []
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, groups))
                c = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


_RESNETS = {"resnet8": ((16, 32, 64), (1, 1, 1)), "resnet18": ((64, 128, 256, 512), (2, 2, 2, 2))}


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (200,),
    channels: Sequence[int] = (32, 64),
    norm: str = "none",
    groups: int = 8,
    lstm_hidden: int = 64,
) -> nn.Module:
    """Build a zoo model for inputs of shape ``in_shape`` (without the batch dimension).

    Args:
        name: ``logistic`` (multinomial logistic regression), ``mlp`` or ``cnn``.
        in_shape: e.g. ``(60,)`` for vectors or ``(1, 28, 28)`` for images.
        num_classes: number of output classes.
        hidden: hidden layer widths of the MLP; the CNN uses ``hidden[0]`` for its dense layer.
        channels: convolution widths of the CNN.
        norm: normalisation after each conv layer of the CNN (none, group, batch, layer).
        groups: number of groups for GroupNorm (CNN with norm: group, ResNets).
        lstm_hidden: LSTM width of ``char_lstm``.

    ``char_lstm`` needs ``in_shape = (seq_len,)`` character-index inputs and
    ``num_classes`` = vocabulary size (shakespeare); ``resnet8`` / ``resnet18`` need
    images ``[C, H, W]``.
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
    if name == "char_lstm":
        if len(in_shape) != 1:
            raise ScenarioError("model char_lstm needs character sequences (dataset "
                                f"shakespeare); this dataset gives shape {list(in_shape)}",
                                key="model.name")
        return CharLSTM(num_classes, num_classes, hidden=lstm_hidden)
    if name in _RESNETS:
        if len(in_shape) != 3:
            raise ScenarioError(f"model {name} needs image inputs [C, H, W]; "
                                f"this dataset gives shape {list(in_shape)}", key="model.name")
        widths, blocks = _RESNETS[name]
        return ResNet(in_shape[0], num_classes, widths, blocks, groups)
    raise ScenarioError(f"unknown model {name!r}", key="model.name")
