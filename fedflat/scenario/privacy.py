"""The scenario's ``privacy:`` block (pydantic v2).

Two independent guarantees with different neighbouring relations; they are reported
separately and never added (PRIVACY.md):

* ``sample_level``: DP-SGD inside each client (Abadi et al., CCS 2016; ALGORITHMS.md §4.1);
  one example added/removed. Accounted per client.
* ``user_level``: DP-FedAvg at the server (McMahan et al., ICLR 2018; ALGORITHMS.md §4.3),
  optionally with quantile-based adaptive clipping (Andrew et al., NeurIPS 2021; §4.4); one
  client added/removed. Accounted per round with q = expected clients / population.

Example::

    privacy:
      accountant: pld
      sample_level: {enabled: true, epsilon: 3.0, delta: 1.0e-5, clip_norm: 1.0,
                     expected_batch_size: 32}
      user_level:
        enabled: true
        noise_multiplier: 1.0
        delta: 1.0e-6
        adaptive_clipping: {enabled: true}

Validation errors carry pydantic's ``loc`` (e.g. ``privacy.user_level.delta``); checks that
involve several keys name them in the message. Passing
``context={"expected_clients_per_round": m}`` to ``model_validate`` also checks the default
count noise σ_b = m/20 against the noise multiplier.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from fedflat.scenario.diff2 import Diff2Block
from fedflat.scenario.variants import VariantConfig, family, family_of

# δ is the probability that the ε guarantee fails outright: a mechanism that publishes each of
# n protected records with probability δ is (0, δ)-DP and leaks n·δ of them on average. So δ
# must be below 1/n for the n units the guarantee protects (the convention δ < 1/N of
# Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, §2.3), and
# at most DELTA_CEILING whatever n. Sample level: n = the training examples of all clients
# together (the global model depends on every one of them); user level: n = the clients.
DELTA_CEILING = 0.1


def delta_problem(delta: float, units: int | None, unit_name: str) -> str | None:
    """Why ``delta`` is too large for a guarantee protecting ``units`` records, or None.

    Args:
        delta: the δ of the guarantee.
        units: n, the number of protected units (None: unknown, only the ceiling applies).
        unit_name: what they are, for the message ("clients", "training examples").
    """
    if units is not None and units >= 1 and 1.0 / units < DELTA_CEILING:
        if delta < 1.0 / units:
            return None
        return (f"delta = {delta:g} must be below 1/n = 1/{units} = {1.0 / units:.3g} for the "
                f"n = {units} {unit_name} the guarantee protects (with a larger δ a mechanism may "
                f"publish each of them outright with probability δ); 1/(10·n) or smaller is "
                "usual")
    if delta < DELTA_CEILING:
        return None
    return (f"delta = {delta:g} must be below {DELTA_CEILING:g} (and below 1/n for the n "
            f"{unit_name} the guarantee protects): with a larger δ a mechanism may publish each "
            "of them outright with probability δ")


class _Strict(BaseModel):
    # Floats reject inf/NaN; checks across keys are field validators on the later key
    # (fields validate in order), so the error's loc names that key.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _exactly_one_noise_spec(
    epsilon: float | None, info: ValidationInfo
) -> float | None:
    """Field validator body for ``epsilon``: at least one of noise_multiplier / epsilon.

    epsilon alone: σ is calibrated to spend it over the planned run. noise_multiplier
    alone: ε is only reported. Both: σ is used and ε is enforced as a cap (the run stops
    before the step that would exceed it).
    """
    noise_multiplier = info.data.get("noise_multiplier")
    if "noise_multiplier" not in info.data:
        return epsilon  # noise_multiplier itself failed; that error is reported
    if info.data.get("enabled") and noise_multiplier is None and epsilon is None:
        raise ValueError(
            "enabled: true needs noise_multiplier, epsilon, or both (a fixed σ whose ε "
            "is enforced as a cap); exactly one is the usual choice"
        )
    return epsilon


class SampleLevelPrivacy(VariantConfig):
    """DP-SGD in every client: per-example clipping and Gaussian noise on the sum.

    One class per mechanism (fedflat.scenario.variants), chosen by ``mechanism``; the keys
    below are every mechanism's, a variant adds its own (``rho``), which are the
    mechanism-specific arguments of its factory (``fedflat.privacy.mechanisms.DP_ORACLES``).
    ``SampleLevelPrivacy(**block)`` returns the variant.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    mechanism: str
    participation_quantile: float = Field(
        0.99, gt=0, le=1,
        description=(
            "With epsilon: σ is calibrated so that a client taking part in this quantile of "
            "the binomial number of participations stays within ε; a client whose next "
            "participation would exceed ε is left out (logged as budget_exhausted)."
        ),
    )

    enabled: bool = Field(False, description="Train clients with DP-SGD.")
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "σ (unitless): std of the Gaussian noise added to the sum of clipped "
            "per-example gradients, divided by clip_norm. Give this or epsilon."
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        validate_default=True,
        description=(
            "Target ε (unitless) per client over the whole run; σ is calibrated from it "
            "with the run's planned local steps. Give this or noise_multiplier."
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="δ of the (ε, δ) guarantee: must be below 1/N for the N training "
        "examples of all clients together (checked when the data is built) and below 0.1.",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="C: L2 bound of each per-example gradient (over all parameters).",
    )
    per_layer_clipping: bool = Field(
        False,
        description=(
            "Clip each parameter tensor separately with C_l, Σ C_l² = C² (the total "
            "sensitivity stays C)."
        ),
    )
    expected_batch_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Expected Poisson batch size L (examples); a client with n samples uses "
            "q = L/n and divides the noisy sum by L. Give this or sampling_rate; with "
            "neither, the client's batch_size is used as L."
        ),
    )
    sampling_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Poisson sampling rate q (probability per example per step), the same for "
            "every client. Give this or expected_batch_size."
        ),
    )

    _epsilon_xor_noise = field_validator("epsilon")(_exactly_one_noise_spec)

    @field_validator("sampling_rate")
    @classmethod
    def _batch_xor_rate(cls, value: float | None, info: ValidationInfo) -> float | None:
        batch = info.data.get("expected_batch_size")
        if batch is not None and value is not None:
            raise ValueError(
                "give at most one of expected_batch_size or sampling_rate "
                f"(got expected_batch_size={batch}, sampling_rate={value})"
            )
        return value

    def factory_kwargs(self) -> dict[str, Any]:
        """The mechanism's own factory arguments (``rho``); the shared keys are not."""
        return {k: getattr(self, k) for k in type(self).model_fields
                if k not in SampleLevelPrivacy.model_fields}


class DpSgd(SampleLevelPrivacy):
    mechanism: Literal["dp_sgd"] = Field("dp_sgd", description="dp_sgd (Abadi et al.)")


class _Perturbed(SampleLevelPrivacy):
    """The sharpness-aware mechanisms: the private gradient at a perturbed point."""

    rho: float = Field(0.03, gt=0, description="Perturbation radius ρ (L2, parameter units).")


class DpSat(_Perturbed):
    mechanism: Literal["dp_sat"] = Field(
        "dp_sat", description="dp_sat (perturb along the previous privatised gradient, one "
        "private pass, no extra cost)")


class DpSatMomentum(_Perturbed):
    mechanism: Literal["dp_sat_momentum"] = Field(
        "dp_sat_momentum", description="dp_sat_momentum (along the previous displacement)")


class DpSam(_Perturbed):
    mechanism: Literal["dp_sam"] = Field(
        "dp_sam", description="dp_sam (two private passes per step, accounted as such)")


class Diff2(SampleLevelPrivacy):
    """DIFF2 is a round-level estimator, not a per-step DP oracle: fedflat.runtime.build
    builds its client release and server step from ``diff2`` (not from DP_ORACLES)."""

    mechanism: Literal["diff2"] = Field(
        "diff2", description="diff2 (Murata & Suzuki 2023: full-batch clipped gradient "
        "differences with a full gradient every diff2.period rounds, see the diff2 keys)")
    diff2: Diff2Block = Field(
        default_factory=Diff2Block,
        description="Its period, difference clip and σ split.")


SampleLevelSpec = family(
    SampleLevelPrivacy, label="mechanism", tag="mechanism", default="dp_sgd",
    variants=(DpSgd, DpSat, DpSatMomentum, DpSam, Diff2),
)
DP_MECHANISM_CONFIGS: dict[str, type[SampleLevelPrivacy]] = family_of(SampleLevelPrivacy).variants  # type: ignore[assignment]


class AdaptiveClipping(_Strict):
    """Quantile-based adaptive clip norm (Andrew et al. 2021; ALGORITHMS.md §4.4)."""

    enabled: bool = Field(
        False,
        description="Track the target quantile of update norms instead of a fixed clip.",
    )
    target_quantile: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="γ: fraction of client updates that should be unclipped (0.5 = median).",
    )
    clip_lr: float = Field(
        0.2,
        gt=0,
        description="η_C: learning rate of the clip update C ← C·exp(−η_C(b̄ − γ)).",
    )
    count_noise: float | None = Field(
        None,
        gt=0,
        description=(
            "σ_b (in counts): std of the Gaussian noise on the number of unclipped "
            "updates; default expected clients per round / 20. Needs σ_b > z/2."
        ),
    )
    initial_clip: float = Field(
        0.1,
        gt=0,
        description="C_0: clip norm of the first round (L2, model-update units).",
    )
    update: Literal["geometric", "arithmetic"] = Field(
        "geometric",
        description="geometric: C·exp(−η_C(b̄−γ)); arithmetic: C − η_C(b̄−γ).",
    )

    def resolved_count_noise(self, expected_clients_per_round: float) -> float:
        """σ_b: the configured value, or expected clients per round / 20."""
        if self.count_noise is not None:
            return self.count_noise
        if not expected_clients_per_round > 0:
            raise ValueError(
                "expected_clients_per_round must be > 0, got "
                f"{expected_clients_per_round}"
            )
        return expected_clients_per_round / 20.0


class UserLevelPrivacy(_Strict):
    """DP-FedAvg: clip each client's update, add Gaussian noise to the sum at the server."""

    enabled: bool = Field(False, description="Apply user-level DP at the server.")
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description=(
            "z (unitless): noise std on the sum of clipped updates divided by the clip "
            "norm; with adaptive clipping, the total z (update and count noise together). "
            "Give this or epsilon."
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        validate_default=True,
        description=(
            "Target user-level ε over the planned rounds; z is calibrated from it. "
            "Give this or noise_multiplier."
        ),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="δ of the user-level guarantee: must be below 1/N for the N clients "
        "(data.num_clients) and below 0.1.",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description=(
            "S: L2 bound of each client's model delta (flat, over all parameters); "
            "ignored when adaptive_clipping.enabled (initial_clip is used)."
        ),
    )
    adaptive_clipping: AdaptiveClipping = Field(
        default_factory=AdaptiveClipping,
        description="Quantile-based adaptive clipping.",
    )
    noise_placement: Literal["server", "client"] = Field(
        "server",
        description=(
            "server: DP-FedAvg, Gaussian noise on the clipped sum at the server; client: "
            "DP-FedSAM, each client clips and adds N(0, σ²C²/m) to its own delta before its "
            "uplink codec (needs server.aggregation.weighting: uniform); when fewer than m "
            "clients arrive the server tops the noise up to σC on the sum."
        ),
    )
    clip_scope: Literal["global", "per_tensor"] = Field(
        "global",
        description="noise_placement client: clip the whole delta (global) or each tensor to C "
        "(released DP-FedSAM code; K tensors give sensitivity C√K, accounted as σ/√K).",
    )

    _epsilon_xor_noise = field_validator("epsilon")(_exactly_one_noise_spec)

    @field_validator("adaptive_clipping")
    @classmethod
    def _noise_split_possible(
        cls, ac: AdaptiveClipping, info: ValidationInfo
    ) -> AdaptiveClipping:
        z = info.data.get("noise_multiplier")
        if not (info.data.get("enabled") and ac.enabled and z is not None):
            return ac  # with epsilon, the runtime checks z once it is calibrated
        sigma_b = ac.count_noise
        source = "count_noise"
        context = info.context if isinstance(info.context, dict) else {}
        m = context.get("expected_clients_per_round")
        if sigma_b is None and m is not None:
            sigma_b = ac.resolved_count_noise(float(m))
            source = f"default count_noise (expected clients per round {m} / 20)"
        if sigma_b is not None and z >= 2.0 * sigma_b:
            raise ValueError(
                "adaptive clipping needs noise_multiplier < 2 * count_noise "
                f"(ALGORITHMS.md §4.4); got noise_multiplier={z} and {source}={sigma_b}"
            )
        return ac


class PrivacyConfig(_Strict):
    """The ``privacy:`` block of a scenario."""

    sample_level: SampleLevelSpec = Field(
        default_factory=DpSgd,
        description="Example-level DP-SGD inside clients (accounted per client).",
    )
    user_level: UserLevelPrivacy = Field(
        default_factory=UserLevelPrivacy,
        description="Client-level DP-FedAvg at the server (accounted per round).",
    )
    accountant: Literal["rdp", "prv", "pld"] = Field(
        "rdp",
        description=(
            "rdp: Opacus RDP (fast, 5-30 % looser); prv: Opacus PRV (tight, falls back to "
            "RDP on numerical failure); pld: dp-accounting PLD (tight, slowest)."
        ),
    )
    conversion: Literal["balle", "classic"] = Field(
        "balle",
        description=(
            "RDP → (ε, δ) conversion: balle (Opacus, tighter) or classic (TF-Privacy "
            "tutorials). Only with accountant: rdp."
        ),
    )

    @field_validator("conversion")
    @classmethod
    def _conversion_needs_rdp(cls, value: str, info: ValidationInfo) -> str:
        accountant = info.data.get("accountant")
        if value != "balle" and accountant is not None and accountant != "rdp":
            raise ValueError(
                f"conversion {value!r} applies to accountant 'rdp' only, "
                f"got accountant {accountant!r}"
            )
        return value

    @property
    def enabled(self) -> bool:
        """Whether any DP mechanism is on."""
        return self.sample_level.enabled or self.user_level.enabled
