"""The client update of many clients at once: ``torch.func.vmap`` over stacked parameters.

The same maths as ``client_update`` with the serial oracles, corrections and optimizers, on a
chunk of C clients whose flat parameters are the rows of one [C, d] matrix. Each local step
evaluates every client's model on its own mini-batch in one vmapped ``functional_call``.

Ragged chunks are masked, never looped: a step's batches are padded to the widest one with
an example mask [C, B] (a padded example adds nothing to a loss, a gradient or a clipped
sum), and a client whose local steps are done (fewer examples, fewer steps, a straggler's
``max_steps``) is inactive [C]: its parameters, optimizer and oracle state are carried
unchanged through the remaining steps. Per-example gradients (DP) are a nested vmap
(clients, then examples). The batches and the DP noise are drawn by the caller from each
client's own generator, so they are those of the serial reference.

BatchNorm is not supported: its running statistics are buffers written in place, which a
vmapped call cannot do per client (the scenario check refuses ``model.norm: batch``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedflat.client.local_corrections import (
    FEDDYN_GRAD,
    MOFEDSAM_STEPS_LR,
    PREV_GLOBAL_UPDATE,
    PREV_STEPS_LR,
    SCAFFOLD_C,
    SCAFFOLD_CI,
    SCAFFOLD_DC,
)
from fedflat.client.oracles import FEDSMOO_MU, FEDSMOO_S, ORACLE_NAMES, is_norm_segment
from fedflat.client.update import ClientResult
from fedflat.models.flat import FlatModel

DP_MECHANISMS = ("dp_sgd", "dp_sat", "dp_sat_momentum", "dp_sam")
_TINY = 1e-12  # smallest per-example norm divided by (as fedflat.privacy.mechanisms)


@dataclass(frozen=True)
class VecDP:
    """Example-level DP of the chunk (fedflat.privacy.mechanisms, same definitions)."""

    mechanism: str
    clip_norm: float
    noise_multiplier: float
    rho: float = 0.0
    layer_clips: tuple[float, ...] | None = None  # per-tensor bounds C_l, or flat clipping

    @property
    def releases(self) -> int:
        """Gaussian releases (noise draws of d normals) per local step."""
        return 2 if self.mechanism == "dp_sam" else 1


@dataclass(frozen=True)
class VecRule:
    """The local rule as plain hyperparameters (what ``build_local_rule`` composes).

    The oracle's hyperparameters keep the names and defaults of ``fedflat.client.oracles``;
    ``eps`` None means the oracle's own default guard.
    """

    oracle: str = "sgd"
    oracle_params: dict[str, Any] = field(default_factory=dict)
    prox_mu: float | None = None
    scaffold: bool = False
    feddyn_alpha: float | None = None
    mofedsam_alpha: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    grad_clip: float | None = None
    dp: VecDP | None = None


class StepBatch(NamedTuple):
    """One local step of the chunk: padded batches and who takes the step.

    x [C, B, ...], y [C, B] (int64), mask [C, B] (1 real, 0 padding), active [C] (bool), and
    noise [C, releases, d] for DP (None without noise).
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    active: Tensor
    noise: Tensor | None = None


def _factor(scale: float, norm: Tensor, eps: float) -> Tensor:
    """``scale / (norm + eps)`` per client, exactly 0 where ``norm + eps`` is 0."""
    denom = norm + eps
    return torch.where(denom > 0, scale / denom.clamp_min(1e-30), torch.zeros_like(denom))


def _rownorm(v: Tensor) -> Tensor:
    return torch.linalg.vector_norm(v, dim=1)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1)


def _col(v: Tensor) -> Tensor:
    return v.unsqueeze(1)


class ChunkEngine:
    """Vectorised local training for one model and one local rule.

    Built once per worker; ``train`` runs one chunk of clients. Pure apart from running the
    module functionally (its own parameters are never read or written).
    """

    def __init__(self, rule: VecRule, model: FlatModel) -> None:
        if model.has_batchnorm:
            raise ValueError("the vectorised engine cannot run BatchNorm (model.norm: batch)")
        if rule.oracle not in ORACLE_NAMES:
            raise ValueError(f"unknown oracle {rule.oracle!r}; known: {list(ORACLE_NAMES)}")
        if rule.dp is not None and rule.dp.mechanism not in DP_MECHANISMS:
            raise ValueError(f"unknown DP mechanism {rule.dp.mechanism!r}")
        self.rule = rule
        self.model = model
        self.segments = model.segments
        p = dict(rule.oracle_params)
        self.p = p
        if rule.oracle == "asam" and p.get("variant", "official") == "official":
            self.t_one = ~model.mask(lambda s: "weight" in s.name)  # T = 1 off *weight*
        if rule.oracle == "sam_on":
            self.on = model.mask(is_norm_segment)
            if not bool(self.on.any()):
                raise ValueError(
                    "sam_on: the model has no parameters accepted by the selector "
                    "(no normalisation layers); use sam instead")
            self.on_scaled = model.mask(lambda s: is_norm_segment(s) and (
                p.get("normalize_bias", False) or "weight" in s.name)) & self.on
        module, loss_fn = model.module, model.loss_fn

        def batch_loss(params: dict[str, Tensor], x: Tensor, y: Tensor, m: Tensor) -> Tensor:
            out = functional_call(module, params, (x,))
            per = loss_fn(out, y, reduction="none")
            return (per * m).sum() / m.sum().clamp_min(1.0)  # mean over the real examples

        def example_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(module, params, (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))

        self._grad = vmap(grad_and_value(batch_loss))
        self._per_example = vmap(vmap(grad_and_value(example_loss), in_dims=(None, 0, 0)))

    # ----------------------------------------------------------------- model passes
    def _tree(self, w: Tensor) -> dict[str, Tensor]:
        c = w.shape[0]
        return {s.name: w[:, s.slice].view(c, *s.shape) for s in self.segments}

    def _flat(self, tree: dict[str, Tensor], c: int) -> Tensor:
        return torch.cat([tree[s.name].reshape(c, -1) for s in self.segments], 1)

    def loss_grad(self, w: Tensor, b: StepBatch) -> tuple[Tensor, Tensor]:
        """Per-client mean batch loss [C] and gradient [C, d] at the rows of ``w``."""
        grads, loss = self._grad(self._tree(w), b.x, b.y, b.mask)
        return loss.detach(), self._flat(grads, w.shape[0]).detach()

    def private_gradient(self, w: Tensor, b: StepBatch, noise: Tensor | None,
                         expected: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """One Gaussian release per client: (Σ clip(g_j) + σC·noise) / L (as serial)."""
        dp = self.rule.dp
        assert dp is not None  # noqa: S101 - only called with DP
        c, bw = b.mask.shape
        grads, losses = self._per_example(self._tree(w), b.x, b.y)
        g_list = [grads[s.name].reshape(c, bw, -1) for s in self.segments]
        layer_norms = torch.stack([torch.linalg.vector_norm(g, dim=2) for g in g_list], 2)
        norms = torch.linalg.vector_norm(layer_norms, dim=2)  # [C, B]
        real = b.mask > 0
        if dp.layer_clips is None:
            factor = (dp.clip_norm / norms.clamp_min(_TINY)).clamp(max=1.0)
            clipped = (factor < 1.0) & real
            factor = factor * b.mask  # padding contributes nothing
            parts = [torch.einsum("cb,cbk->ck", factor, g) for g in g_list]
        else:
            bounds = torch.tensor(dp.layer_clips, dtype=norms.dtype, device=norms.device)
            factor_k = (bounds / layer_norms.clamp_min(_TINY)).clamp(max=1.0)  # [C, B, K]
            clipped = (factor_k < 1.0).any(2) & real
            factor_k = factor_k * b.mask.unsqueeze(2)
            parts = [torch.einsum("cb,cbk->ck", factor_k[:, :, k], g)
                     for k, g in enumerate(g_list)]
        total = torch.cat(parts, 1).detach()
        count = b.mask.sum(1)
        denom = count.clamp_min(1.0)
        loss = torch.where(count > 0, (losses.detach() * b.mask).sum(1) / denom,
                           torch.full_like(count, float("nan")))
        metrics = {
            "dp_frac_clipped": clipped.float().sum(1) / denom,
            "dp_grad_norm": (norms.detach() * b.mask).sum(1) / denom,
            "dp_batch_size": count,
        }
        if noise is not None and dp.noise_multiplier > 0:
            total = total + noise * (dp.noise_multiplier * dp.clip_norm)
        return total / _col(expected), loss, metrics

    # ----------------------------------------------------------------- oracle
    def _oracle(self, w: Tensor, b: StepBatch, st: dict[str, Any], ctx: dict[str, Any]
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(loss [C], gradient [C, d], metrics) of one step; updates ``st`` where active."""
        if self.rule.dp is not None:
            return self._dp_oracle(w, b, st, ctx)
        name, p = self.rule.oracle, self.p
        if name == "sgd":
            loss, g = self.loss_grad(w, b)
            return loss, g, {}
        if name == "lesam":
            e = ctx.get("lesam_e")
            loss, g = self.loss_grad(w if e is None else w + e, b)
            return loss, g, {}
        loss, g = self.loss_grad(w, b)
        if name == "sam":
            wd = self.rule.weight_decay
            use_wd = p.get("wd_in_perturbation", False) and wd > 0
            d = g + wd * w if use_wd else g
            f = _col(_factor(p["rho"], _rownorm(d), p.get("eps", 1e-12)))
            loss_p, g_p = self.loss_grad(w + f * d, b)
            if use_wd:
                g_p = g_p + (f * wd) * d
        elif name == "asam":
            official = p.get("variant", "official") == "official"
            guard = p.get("eps")
            if guard is None:
                guard = 1e-16 if official else 1e-12
            t = w.abs()
            if official:
                t = (t + p.get("eta", 0.0)).masked_fill(self.t_one, 1.0)
            u = t * g
            f = _col(_factor(p["rho"], _rownorm(u), guard))
            loss_p, g_p = self.loss_grad(w + f * (t * u), b)
        elif name == "fisher_sam":
            g_over_f = g / (g.square() * p.get("eta_f", 1.0) + 1.0)
            f = _col(_factor(p["rho"], _rowdot(g, g_over_f).sqrt(), p.get("eps", 1e-12)))
            loss_p, g_p = self.loss_grad(w + f * g_over_f, b)
        elif name == "sam_on":
            eps = p.get("eps", 1e-16)
            g_s = g * self.on
            if p.get("adaptive", False):
                t = torch.where(self.on_scaled, w.abs() + p.get("eta", 0.0), 1.0) * self.on
                u = t * g_s
                e = t * u * _col(_factor(p["rho"], _rownorm(u), eps))
            else:
                e = g_s * _col(_factor(p["rho"], _rownorm(g_s), eps))
            loss_p, g_p = self.loss_grad(w + e, b)
        elif name == "fedsmoo":
            mu, s = st["mu"], ctx["fedsmoo_s"]
            g_hat = g - mu - s
            e = g_hat * _col(_factor(p["rho"], _rownorm(g_hat), p.get("eps", 1e-12)))
            st["mu"] = torch.where(_col(b.active), mu + e - s, mu)
            loss_p, g_p = self.loss_grad(w + e, b)
        else:  # gam, the official four-pass version (fedflat.client.oracles.gam)
            eps = p.get("eps", 1e-12)
            beta2, beta3 = 1.0 - p["beta0"], 1.0 - p["beta1"]
            g0 = g
            loss_p, g1 = self.loss_grad(
                w + _col(_factor(p["grad_rho"], _rownorm(g0), eps)) * g0, b)
            r = g1 - g0
            w12 = w + _col(_factor(p["grad_norm_rho"], _rownorm(r), eps)) * r
            _, g2 = self.loss_grad(w12, b)
            _, g3 = self.loss_grad(
                w12 + _col(_factor(p["grad_rho"], _rownorm(g2), eps)) * g2, b)
            pv = g0 + abs(beta2) * g2
            dv = p["beta1"] * g1 + beta3 * g3
            pn, dn = _rownorm(pv), _rownorm(dv)
            cosine = _rowdot(pv, dv) / (dn * pn + eps)
            k = _col(cosine * pn / (dn + eps))
            g_p = (1.0 + p["gamma"] * k) * dv - p["gamma"] * pv
        return loss, g_p, {"sam_loss_gap": loss_p - loss}

    def _dp_oracle(self, w: Tensor, b: StepBatch, st: dict[str, Any], ctx: dict[str, Any]
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        dp = self.rule.dp
        assert dp is not None  # noqa: S101
        noise = b.noise
        n1 = None if noise is None else noise[:, 0]
        expected = ctx["expected"]
        if dp.mechanism == "dp_sgd":
            g, loss, m = self.private_gradient(w, b, n1, expected)
            return loss, g, m
        if dp.mechanism == "dp_sam":
            g1, loss1, m1 = self.private_gradient(w, b, n1, expected)
            f = _col(_direction(g1, dp.rho))
            n2 = None if noise is None else noise[:, 1]
            g2, loss2, m2 = self.private_gradient(w + f * g1, b, n2, expected)
            gap = torch.where(b.mask.sum(1) > 0, loss2 - loss1, torch.zeros_like(loss1))
            return loss1, g2, {**m2, "dp_ascent_frac_clipped": m1["dp_frac_clipped"],
                               "dp_sam_loss_gap": gap}
        prev = st.get("prev")  # dp_sat: ĝ_{t−1}; dp_sat_momentum: w_{t−1}
        if prev is None:
            f = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            wp = w
        else:
            v = prev if dp.mechanism == "dp_sat" else prev - w
            f = _direction(v, dp.rho) * st["has_prev"]
            wp = w + _col(f) * v
        g, loss, m = self.private_gradient(wp, b, n1, expected)
        new_prev = g if dp.mechanism == "dp_sat" else w
        if prev is None:
            st["prev"] = new_prev.clone()
            st["has_prev"] = b.active.to(w.dtype)
        else:
            st["prev"] = torch.where(_col(b.active), new_prev, prev)
            st["has_prev"] = torch.maximum(st["has_prev"], b.active.to(w.dtype))
        m = {**m, "dp_sat_perturbation": (f != 0).to(w.dtype) * dp.rho}
        return loss, g, m

    # ----------------------------------------------------------------- chunk
    def train(self, start: Tensor, lr: Tensor, client_ids: Sequence[int],
              num_samples: Sequence[int], batches: Iterable[StepBatch],
              broadcast: dict[str, Tensor], states: Sequence[dict[str, Tensor]],
              expected_batch: Tensor | None = None) -> list[ClientResult]:
        """Train C clients from the rows of ``start`` [C, d] with learning rates ``lr`` [C].

        ``states`` are the clients' persistent states (SCAFFOLD's c_i, FedDyn's g_i, ...);
        ``expected_batch`` [C] is each client's DP divisor L. Results in chunk order, as
        ``client_update`` returns them (the uplink codec is the caller's).
        """
        rule = self.rule
        c, d = start.shape
        dev, dt = start.device, start.dtype
        w = start.clone()
        lr_col = _col(lr.to(device=dev, dtype=dt))

        def stacked(store: Sequence[dict[str, Tensor]], key: str) -> Tensor | None:
            if all(key not in s for s in store):
                return None
            return torch.stack([s[key].to(device=dev, dtype=dt) if key in s
                                else torch.zeros(d, device=dev, dtype=dt) for s in store])

        def shared(key: str) -> Tensor | None:
            v = broadcast.get(key)
            return None if v is None else v.to(device=dev, dtype=dt)

        ctx: dict[str, Any] = {"expected": expected_batch}
        st: dict[str, Any] = {}
        if rule.dp is None and rule.oracle == "lesam":
            u = shared(PREV_GLOBAL_UPDATE)
            rho = self.p["rho"]
            if u is not None and rho != 0:
                f = float(_factor(rho, u.norm(), self.p.get("eps", 1e-12)))
                ctx["lesam_e"] = None if f == 0.0 else u * -f
        if rule.dp is None and rule.oracle == "fedsmoo":
            mu0 = stacked(states, FEDSMOO_MU)
            st["mu"] = mu0 if mu0 is not None else torch.zeros_like(w)
            s = shared(FEDSMOO_S)
            ctx["fedsmoo_s"] = s if s is not None else torch.zeros(d, device=dev, dtype=dt)
        # Corrections, in local_rule_parts' order: mofedsam, fedprox, scaffold, feddyn.
        mofed = None
        if rule.mofedsam_alpha is not None:
            u = shared(PREV_GLOBAL_UPDATE)
            if u is not None:
                kl_t = broadcast.get(PREV_STEPS_LR)
                if kl_t is None:
                    raise ValueError("mofedsam: the broadcast has 'prev_global_update' but no "
                                     "'prev_steps_lr'")
                kl = float(kl_t.reshape(-1)[0])
                mofed = u * (-(1.0 - rule.mofedsam_alpha) / kl) if kl > 0 else None
        sc_c = shared(SCAFFOLD_C) if rule.scaffold else None
        sc_ci = stacked(states, SCAFFOLD_CI) if rule.scaffold else None
        sc_diff = None
        if rule.scaffold and (sc_c is not None or sc_ci is not None):
            sc_diff = (sc_c if sc_c is not None else 0.0) - (sc_ci if sc_ci is not None else 0.0)
        dyn_g = stacked(states, FEDDYN_GRAD) if rule.feddyn_alpha is not None else None

        buf: Tensor | None = None  # SGD momentum (created at each client's first step)
        adam_m = adam_v = None
        if rule.optimizer == "adam":
            adam_m, adam_v = torch.zeros_like(w), torch.zeros_like(w)
        steps = torch.zeros(c, dtype=torch.long, device=dev)
        loss_sum = torch.zeros(c, dtype=torch.float64, device=dev)
        counted = torch.zeros(c, dtype=torch.long, device=dev)
        msum: dict[str, Tensor] = {}
        for b in batches:
            act = b.active
            a = _col(act)
            loss, g, m = self._oracle(w, b, st, ctx)
            if mofed is not None:
                g = g * rule.mofedsam_alpha + mofed
            elif rule.mofedsam_alpha is not None:
                g = g * rule.mofedsam_alpha
            if rule.prox_mu is not None:
                g = g + rule.prox_mu * (w - start)
            if sc_diff is not None:
                g = g + sc_diff
            if rule.feddyn_alpha is not None:
                g = g + rule.feddyn_alpha * (w - start)
                if dyn_g is not None:
                    g = g - dyn_g
            if rule.grad_clip is not None:
                clip = rule.grad_clip
                g = g * _col(clip / _rownorm(g).clamp_min(clip))
            dv = g + rule.weight_decay * w if rule.weight_decay else g
            if rule.optimizer == "adam":
                assert adam_m is not None  # noqa: S101
                assert adam_v is not None  # noqa: S101
                t = (steps + 1).to(dt)
                adam_m = torch.where(a, 0.9 * adam_m + (1 - 0.9) * dv, adam_m)
                adam_v = torch.where(a, 0.999 * adam_v + (1 - 0.999) * dv * dv, adam_v)
                denom = (adam_v / _col(1 - 0.999**t)).sqrt() + 1e-8
                w_new = w - (lr_col / _col(1 - 0.9**t)) * adam_m / denom
            else:
                if rule.momentum:
                    first = _col(steps == 0)
                    new_buf = dv if buf is None else torch.where(
                        first, dv, buf * rule.momentum + dv)
                    buf = new_buf if buf is None else torch.where(a, new_buf, buf)
                    dv = dv + rule.momentum * buf if rule.nesterov else buf
                w_new = w - lr_col * dv
            w = torch.where(a, w_new, w)
            nonempty = act & (b.mask.sum(1) > 0)
            loss_sum += torch.where(nonempty, loss.to(torch.float64), 0.0)
            counted += nonempty.long()
            steps += act.long()
            for k, v in m.items():
                msum[k] = msum.get(k, 0.0) + torch.where(act, v.to(torch.float64), 0.0)
        return self._results(w, start, lr, steps, loss_sum, counted, msum, client_ids,
                             num_samples, states, st, sc_c, sc_ci, dyn_g)

    def _results(self, w: Tensor, start: Tensor, lr: Tensor, steps: Tensor, loss_sum: Tensor,
                 counted: Tensor, msum: dict[str, Tensor], client_ids: Sequence[int],
                 num_samples: Sequence[int], states: Sequence[dict[str, Tensor]],
                 st: dict[str, Any], sc_c: Tensor | None, sc_ci: Tensor | None,
                 dyn_g: Tensor | None) -> list[ClientResult]:
        rule = self.rule
        delta = w - start
        steps_l, counted_l = steps.tolist(), counted.tolist()
        loss_l = loss_sum.tolist()
        metrics_l = {k: v.tolist() for k, v in msum.items()}
        lr_l = lr.tolist()
        out = []
        for i, cid in enumerate(client_ids):
            k, lr_i = steps_l[i], float(lr_l[i])
            state = dict(states[i])
            extras: dict[str, Tensor] = {}
            if rule.mofedsam_alpha is not None:
                extras[MOFEDSAM_STEPS_LR] = torch.tensor(
                    [float(k) * lr_i], dtype=w.dtype, device=w.device)
            if rule.dp is None and rule.oracle == "fedsmoo":
                state[FEDSMOO_MU] = st["mu"][i]
                extras[FEDSMOO_MU] = st["mu"][i]
            if rule.scaffold:
                ci_old = sc_ci[i] if sc_ci is not None else torch.zeros_like(w[i])
                if k <= 0 or lr_i <= 0:
                    ci_new = ci_old
                else:
                    ci_new = -delta[i] / (k * lr_i) + ci_old
                    if sc_c is not None:
                        ci_new = ci_new - sc_c
                state[SCAFFOLD_CI] = ci_new
                extras[SCAFFOLD_DC] = ci_new - ci_old
            if rule.feddyn_alpha is not None:
                gi = dyn_g[i] if dyn_g is not None else torch.zeros_like(w[i])
                state[FEDDYN_GRAD] = gi - rule.feddyn_alpha * delta[i]
            out.append(ClientResult(
                client_id=int(cid), delta=delta[i], num_samples=int(num_samples[i]),
                train_loss=loss_l[i] / counted_l[i] if counted_l[i] else float("nan"),
                steps=k, client_state=state, extras=extras,
                metrics={name: v[i] / max(k, 1) for name, v in metrics_l.items()}))
        return out


def _direction(v: Tensor, rho: float) -> Tensor:
    """ρ/‖v‖ per row, 0 where v is zero (fedflat.privacy.mechanisms._direction)."""
    n = _rownorm(v)
    return torch.where(n > 0, rho / n.clamp_min(1e-30), torch.zeros_like(n))
