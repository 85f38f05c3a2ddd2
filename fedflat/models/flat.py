"""A torch module whose parameters live in one flat vector.

Between clients and server a model is one contiguous 1-D tensor. ``FlatModel`` makes the
module's parameters views of an internal flat buffer, so evaluating the model at a flat
point ``w`` is one ``copy_`` and the gradient comes back as one flat tensor. Oracles,
corrections and optimizers then work on flat vectors only (one kernel per update).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
)
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Segment:
    """Where one parameter tensor sits in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    module_type: type[nn.Module]

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class FlatModel:
    """A module plus the bookkeeping to run it at any flat parameter vector."""

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device)
        owners = {}
        for mod_name, mod in self.module.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                owners[f"{mod_name}.{p_name}" if mod_name else p_name] = type(mod)
        named = list(self.module.named_parameters())
        segs, off = [], 0
        for name, p in named:
            segs.append(Segment(name, tuple(p.shape), off, p.numel(), owners[name]))
            off += p.numel()
        self.segments: list[Segment] = segs
        self.num_params = off
        self._flat = torch.zeros(off, device=self.device)
        # Re-point every parameter at a view of the flat buffer.
        for seg in segs:
            view = self._flat[seg.slice].view(seg.shape)
            view.copy_(dict(named)[seg.name].detach())
            _set_param(self.module, seg.name, nn.Parameter(view))
        self._params = [p for _, p in self.module.named_parameters()]
        self.has_batchnorm = any(isinstance(m, BATCHNORM_TYPES) for m in module.modules())
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy

    # ----------------------------------------------------------------- parameters
    def get_params(self) -> Tensor:
        """A copy of the module's current flat parameters."""
        return self._flat.detach().clone()

    def init_params(self, gen: torch.Generator) -> Tensor:
        """PyTorch's default initialisation, drawn from ``gen`` (not the global RNG)."""
        w = torch.empty(self.num_params)
        for seg in self.segments:
            view = w[seg.slice].view(seg.shape)
            leaf = seg.name.rsplit(".", 1)[-1]
            if issubclass(seg.module_type, NORM_TYPES):
                view.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "weight" and len(seg.shape) >= 2:
                fan_in = math.prod(seg.shape[1:])
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5))
                view.uniform_(-bound, bound, generator=gen)
            elif leaf == "bias":
                owner = next(
                    s for s in self.segments if s.name == seg.name[: -len("bias")] + "weight"
                )
                fan_in = math.prod(owner.shape[1:])
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                view.uniform_(-bound, bound, generator=gen)
            else:
                view.normal_(0.0, 0.02, generator=gen)
        return w.to(self.device)

    def load(self, w: Tensor) -> None:
        """Make ``w`` the module's parameters (one copy)."""
        self._flat.copy_(w)

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """Views of ``w`` keyed by parameter name (differentiable w.r.t. ``w``)."""
        return {s.name: w[s.slice].view(s.shape) for s in self.segments}

    def mask(self, select: Callable[[Segment], bool]) -> Tensor:
        """A boolean [d] mask of the parameters whose segment ``select`` accepts."""
        m = torch.zeros(self.num_params, dtype=torch.bool, device=self.device)
        for s in self.segments:
            if select(s):
                m[s.slice] = True
        return m

    # ----------------------------------------------------------------- buffers (BN)
    # The floating-point buffers (BatchNorm running_mean / running_var, in module order) are
    # model state next to the parameters: they travel as their own flat vector. The integer
    # ``num_batches_tracked`` is left out: with BatchNorm's default momentum (0.1) it never
    # enters the forward pass, so carrying it would change no number.
    @property
    def num_buffers(self) -> int:
        """Length of the flat buffer vector (0 without BatchNorm)."""
        return sum(b.numel() for b in self.module.buffers() if b.is_floating_point())

    def get_buffers(self) -> Tensor:
        """Floating-point buffers (BatchNorm running statistics) as one flat vector."""
        bufs = [b.reshape(-1) for b in self.module.buffers() if b.is_floating_point()]
        if not bufs:
            return torch.zeros(0, device=self.device)
        return torch.cat(bufs).detach().clone()

    def set_buffers(self, flat: Tensor) -> None:
        """Make ``flat`` (as ``get_buffers`` returns it) the module's running statistics."""
        if flat.numel() != self.num_buffers:
            raise ValueError(f"{flat.numel()} buffer values for a model with {self.num_buffers}")
        off = 0
        for b in self.module.buffers():
            if b.is_floating_point():
                b.copy_(flat[off : off + b.numel()].view_as(b))
                off += b.numel()

    # ----------------------------------------------------------------- evaluation
    def loss_grad(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss on (x, y) at ``w`` and its flat gradient (one pass)."""
        self._flat.copy_(w)
        loss = self.loss_fn(self.module(x), y)
        grads = torch.autograd.grad(loss, self._params)
        return loss.detach(), torch.cat([g.reshape(-1) for g in grads])

    def functional_loss(self, w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Mean loss as a differentiable function of the flat vector ``w``.

        Used for Hessian-vector products and per-example gradients (torch.func).
        """
        out = functional_call(self.module, self.unflatten(w), (x,))
        return self.loss_fn(out, y)

    @torch.no_grad()
    def evaluate(
        self, w: Tensor, x: Tensor, y: Tensor, batch_size: int = 2048
    ) -> tuple[float, float, int]:
        """(summed loss, number correct, n) of the model at ``w`` in eval mode."""
        was_training = self.module.training
        self.module.eval()
        self._flat.copy_(w)
        loss_sum, correct = 0.0, 0.0
        for i in range(0, len(y), batch_size):
            out = self.module(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            loss_sum += float(self.loss_fn(out, yb, reduction="sum"))
            correct += float((out.argmax(1) == yb).sum())
        self.module.train(was_training)
        return loss_sum, correct, len(y)


def _set_param(module: nn.Module, dotted: str, value: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    for part in path:
        module = getattr(module, part)
    delattr(module, leaf)
    module.register_parameter(leaf, value)
