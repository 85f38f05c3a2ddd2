"""Scenario blocks for the local rule, drift corrections, server optimizers and SWA.

Typed (pydantic v2, unknown keys rejected) descriptions of what a scenario may say about
the client's gradient oracle, its drift corrections, the adaptive server optimizers and
server SWA; ``PRESETS`` maps method names to the blocks they imply; the ``build_*``
functions turn validated blocks into the library objects (``Oracle``, ``Correction``,
``ServerStep``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedflat.scenario.variants import VariantConfig, family, family_of

# ------------------------------------------------------------------------------ oracles
# One config class per oracle (fedflat.scenario.variants); its fields are exactly the
# scenario-settable arguments of the oracle's factory (fedflat.client.oracles), so a key
# of another oracle is an error instead of being ignored. The factory registry (name ->
# (config, factory)) is fedflat.client.oracles.ORACLE_REGISTRY, because fedflat.scenario
# imports no client code; tests/test_registry.py checks that its names are these.

_RHO = ("Perturbation radius ρ. Default 0.05 (SAM's CIFAR default).")


class OracleConfig(VariantConfig):
    """Base of the per-oracle configs (ALGORITHMS.md §2, §3.6–3.8).

    ``OracleConfig(**block)`` and ``OracleConfig.model_validate(block)`` return the
    variant named by ``block["name"]`` (default ``sgd``).
    """

    name: str


class SgdOracle(OracleConfig):
    """The plain mini-batch gradient (1 pass)."""

    name: Literal["sgd"] = Field("sgd", description="Plain gradient, 1 pass.")


class SamOracle(OracleConfig):
    """SAM (Foret et al. 2021), 2 passes."""

    name: Literal["sam"] = Field("sam", description="SAM, 2 passes.")
    rho: float = Field(0.05, ge=0, description=_RHO)
    wd_in_perturbation: bool = Field(
        False,
        description="Build ε from g + λw (λ = the client optimizer's weight decay), as "
        "the JAX reference does. Default false (PyTorch repos).",
    )


class AsamOracle(OracleConfig):
    """ASAM (Kwon et al. 2021), 2 passes."""

    name: Literal["asam"] = Field("asam", description="ASAM, 2 passes.")
    rho: float = Field(
        0.05, ge=0,
        description="Perturbation radius ρ. Default 0.05; ASAM's is typically ~10× SAM's.",
    )
    eta: float = Field(
        0.0,
        ge=0,
        description="Element-wise offset η_a in T = |w| + η_a. Default 0 (official "
        "example); FedASAM uses 0.2. Must be 0 with variant davda54.",
    )
    variant: Literal["official", "davda54"] = Field(
        "official",
        description="official (T only on tensors named *weight*, with η_a) or davda54 "
        "(T = |w| on all tensors, no η_a). Default official.",
    )


class GamOracle(OracleConfig):
    """GAM (Zhang et al. 2023), 4 passes."""

    name: Literal["gam"] = Field("gam", description="GAM, 4 passes.")
    grad_rho: float = Field(0.03, ge=0, description="ρ_t (SAM radius). Default 0.03.")
    grad_norm_rho: float = Field(
        0.2, ge=0, description="ρ'_t (gradient-norm ascent radius). Default 0.2."
    )
    beta0: float = Field(0.1, ge=0, le=1, description="β0 (β2 = 1 − β0). Default 0.1.")
    beta1: float = Field(0.1, ge=0, le=1, description="β1 (β3 = 1 − β1). Default 0.1.")
    gamma: float = Field(
        0.05, ge=0, description="γ, weight of the orthogonal correction. Default 0.05."
    )


class SamOnOracle(OracleConfig):
    """SAM-ON (Mueller et al. 2023): SAM on the normalisation layers only, 2 passes."""

    name: Literal["sam_on"] = Field("sam_on", description="SAM-ON, 2 passes.")
    rho: float = Field(0.05, ge=0, description=_RHO)
    adaptive: bool = Field(
        False, description="Use the ASAM-ON operator T = |w| + η_a. Default false."
    )
    eta: float = Field(
        0.0, ge=0,
        description="ASAM-ON element-wise offset η_a in T = |w| + η_a. Default 0.",
    )
    normalize_bias: bool = Field(
        False, description="Adaptive: apply T to bias tensors too. Default false."
    )
    p: Literal[2, "infinity"] = Field(
        2,
        description="Perturbation ball (the reference's --p): 2 (ε = ρ T²g/‖Tg‖) or "
        "infinity (ε = ρ T sign(g), no normalisation; T = 1 unless adaptive). Default 2.",
    )
    layerwise: bool = Field(
        False,
        description="Adaptive: T = ‖w_l‖ (1 + η_a), one value per parameter tensor, "
        "instead of the element-wise |w| + η_a (the reference's --layerwise). "
        "Default false.",
    )

    @model_validator(mode="after")
    def _layerwise_needs_adaptive(self) -> SamOnOracle:
        if self.layerwise and not self.adaptive:
            raise ValueError("layerwise applies to the ASAM-ON operator: set adaptive: true")
        return self


class FisherSamOracle(OracleConfig):
    """Fisher SAM (Kim et al. 2022), 2 passes."""

    name: Literal["fisher_sam"] = Field("fisher_sam", description="Fisher SAM, 2 passes.")
    rho: float = Field(0.05, ge=0, description="Radius γ. Default 0.05.")
    eta_f: float = Field(1.0, ge=0, description="η_f in f = 1 + η_f g². Default 1.0.")


class LesamOracle(OracleConfig):
    """FedLESAM (Fan et al. 2024): the perturbation from the last global update, 1 pass."""

    name: Literal["lesam"] = Field("lesam", description="FedLESAM, 1 pass.")
    rho: float = Field(0.05, ge=0, description=_RHO)


class FedSmooOracle(OracleConfig):
    """FedSMOO (Sun et al. 2023): SAM with a global perturbation, 2 passes."""

    name: Literal["fedsmoo"] = Field("fedsmoo", description="FedSMOO, 2 passes.")
    rho: float = Field(0.05, ge=0, description=_RHO)


OracleSpec = family(
    OracleConfig, label="oracle", tag="name", default="sgd",
    variants=(SgdOracle, SamOracle, AsamOracle, GamOracle, SamOnOracle, FisherSamOracle,
              LesamOracle, FedSmooOracle),
)
ORACLE_CONFIGS: dict[str, type[OracleConfig]] = family_of(OracleConfig).variants  # type: ignore[assignment]


class CorrectionConfig(BaseModel):
    """Client-drift corrections added to the oracle's gradient (§3.2–3.4, §3.7)."""

    model_config = ConfigDict(extra="forbid")

    prox_mu: float | None = Field(
        None,
        ge=0,
        description="FedProx μ (adds μ(y − x)); null = off. Typical 0.001–1.",
    )
    scaffold: bool = Field(
        False,
        description="SCAFFOLD option II control variates (g + c − c_i). Default off.",
    )
    feddyn_alpha: float | None = Field(
        None,
        gt=0,
        description="FedDyn α (g − g_i + α(y − x), server x = mean(y) − h/α); "
        "null = off. FL-Simulator uses 0.1.",
    )
    mofedsam_alpha: float | None = Field(
        None,
        gt=0,
        le=1,
        description="MoFedSAM α: step direction α g + (1 − α)(−Δ_prev/(Kη)); "
        "null = off. FL-Simulator uses 0.05 or 0.1.",
    )


class SwaConfig(BaseModel):
    """Server-side SWA of the global models (§3.6)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Turn server SWA on. Default off.")
    start: float | int = Field(
        0.75,
        description="Start of the SWA phase: a float in [0, 1] is a fraction of the "
        "rounds, an int a 0-based round index. Default 0.75.",
    )
    cycle: int = Field(10, ge=1, description="Cycle length c in rounds. Default 10.")
    swa_lr: float = Field(
        1e-4, ge=0, description="Client lr at the low end of each cycle. Default 1e-4."
    )
    collect: Literal["lowest_lr", "official"] = Field(
        "lowest_lr",
        description="Which round of a cycle is averaged: lowest_lr ((r+1) mod c == 0) "
        "or official (r > start and (r − start) mod c == 0, the reference code). "
        "Default lowest_lr.",
    )

    @field_validator("start")
    @classmethod
    def _start_range(cls, v: float | int) -> float | int:
        if v < 0 or (isinstance(v, float) and v > 1):
            raise ValueError(
                f"start must be a fraction in [0, 1] or a round index >= 0, got {v}"
            )
        return v


class FedOptConfig(BaseModel):
    """Hyperparameters of FedAdam / FedYogi / FedAdagrad (§3.5); server lr apart."""

    model_config = ConfigDict(extra="forbid")

    beta1: float | None = Field(
        None, ge=0, lt=1,
        description="First-moment decay β1. None: 0.9 for FedAdam / FedYogi, 0 for FedAdagrad "
        "(Reddi et al. and Flower: Adagrad's accumulator never forgets, so a β1 > 0 slow start "
        "persists).",
    )
    beta2: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="Second-moment decay β2 (Adam, Yogi). Default 0.99 (paper text; "
        "the released code used 0.999).",
    )
    tau: float = Field(1e-3, gt=0, description="Adaptivity τ. Default 1e-3.")
    bias_correction: bool = Field(
        False,
        description="Keras-style bias correction (released code); false = paper "
        "Algorithm 2. Default false.",
    )
    initial_accumulator: float = Field(
        0.0, ge=0, description="Initial second moment v_0. Default 0."
    )


_SWA_REFERENCE: dict[str, Any] = {
    "enabled": True,
    "start": 0.75,
    "cycle": 10,
    "swa_lr": 1e-4,
    "collect": "lowest_lr",
}
_FEDAVG: dict[str, Any] = {"optimizer": "fedavg", "lr": 1.0}

# Method name -> the scenario blocks it implies. Keys: "oracle" (an oracle block),
# "correction" (CorrectionConfig), "server" ({"optimizer": fedavg|fedadam|fedyogi|
# fedadagrad, "lr": η_g, optional "fedopt": FedOptConfig}), optional "swa" (SwaConfig).
# Values are the reference hyperparameters of ALGORITHMS.md §3.2–3.8; data-set-specific
# settings (client lr, batch size, rounds) are not part of a method preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Caldarola et al. ECCV 2022, CIFAR-10 scripts: FedSAM ρ = 0.1, FedAvg server.
    "fedsam": {
        "oracle": {"name": "sam", "rho": 0.1},
        "correction": {},
        "server": dict(_FEDAVG),
    },
    # FedASAM ρ = 0.7, η_a = 0.2 (official ASAM variant).
    "fedasam": {
        "oracle": {"name": "asam", "rho": 0.7, "eta": 0.2, "variant": "official"},
        "correction": {},
        "server": dict(_FEDAVG),
    },
    # The same with server SWA (start 0.75 T, c = 10, swa_lr 1e-4).
    "fedsam_swa": {
        "oracle": {"name": "sam", "rho": 0.1},
        "correction": {},
        "server": dict(_FEDAVG),
        "swa": dict(_SWA_REFERENCE),
    },
    "fedasam_swa": {
        "oracle": {"name": "asam", "rho": 0.7, "eta": 0.2, "variant": "official"},
        "correction": {},
        "server": dict(_FEDAVG),
        "swa": dict(_SWA_REFERENCE),
    },
    # Qu et al. ICML 2022 via FL-Simulator: SAM ρ = 0.1, momentum α = 0.1.
    "mofedsam": {
        "oracle": {"name": "sam", "rho": 0.1},
        "correction": {"mofedsam_alpha": 0.1},
        "server": dict(_FEDAVG),
    },
    # FedGAMMA (FL-Simulator): SAM ρ = 0.01 + SCAFFOLD.
    "fedgamma": {
        "oracle": {"name": "sam", "rho": 0.01},
        "correction": {"scaffold": True},
        "server": dict(_FEDAVG),
    },
    # FedSMOO (FL-Simulator): ρ = 0.1, FedDyn λ = 0.1.
    "fedsmoo": {
        "oracle": {"name": "fedsmoo", "rho": 0.1},
        "correction": {"feddyn_alpha": 0.1},
        "server": dict(_FEDAVG),
    },
    # FedLESAM example command: ρ = 0.5.
    "fedlesam": {
        "oracle": {"name": "lesam", "rho": 0.5},
        "correction": {},
        "server": dict(_FEDAVG),
    },
    "scaffold": {
        "oracle": {"name": "sgd"},
        "correction": {"scaffold": True},
        "server": dict(_FEDAVG),
    },
    # FedProx μ = 0.01 (FL-Simulator CIFAR; the FedProx synthetic runs use μ = 1).
    "fedprox": {
        "oracle": {"name": "sgd"},
        "correction": {"prox_mu": 0.01},
        "server": dict(_FEDAVG),
    },
    # FedDyn α = 0.1 (FL-Simulator).
    "feddyn": {
        "oracle": {"name": "sgd"},
        "correction": {"feddyn_alpha": 0.1},
        "server": dict(_FEDAVG),
    },
    # FL-Simulator FedAdam: global lr 0.1, β = (0.9, 0.99), ε = 0.01.
    "fedadam": {
        "oracle": {"name": "sgd"},
        "correction": {},
        "server": {
            "optimizer": "fedadam",
            "lr": 0.1,
            "fedopt": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-2},
        },
    },
    # Flower FedYogi defaults: η = 0.01, β = (0.9, 0.99), τ = 1e-3.
    "fedyogi": {
        "oracle": {"name": "sgd"},
        "correction": {},
        "server": {
            "optimizer": "fedyogi",
            "lr": 0.01,
            "fedopt": {"beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
        },
    },
    # Reddi et al. CIFAR-100 best FedAdagrad: server lr 10^-1, ε = 10^-2.
    "fedadagrad": {
        "oracle": {"name": "sgd"},
        "correction": {},
        "server": {
            "optimizer": "fedadagrad",
            "lr": 0.1,
            "fedopt": {"tau": 1e-2},
        },
    },
}
