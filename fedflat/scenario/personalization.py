"""The ``personalization:`` block: personal models evaluated on each client's own test split.

Example::

    personalization:
      method: ditto        # none | finetune | ditto | apfl
      ditto_lambda: 0.1

Each client's test split is ``eval.client_test`` (``fedflat.data.client_test``), the same one
``eval.per_client`` evaluates on. Definitions, citations and pitfalls:
``fedflat.personalization.methods``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario

#: Keys that left this block, and where they went.
MOVED = {"test_split": "eval.client_test (auto, dataset_share or local_holdout; 'holdout' is "
                       "local_holdout)",
         "test_fraction": "eval.holdout_fraction"}


class PersonalizationConfig(BaseModel):
    """Personalized FL on top of the federated run (``method: none`` = off)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    method: Literal["none", "finetune", "ditto", "apfl"] = Field(
        "none", description="Personal models: 'finetune' = k SGD steps from the global model "
        "before evaluation; 'ditto' = proximal personal models (Li et al. 2021); 'apfl' = "
        "adaptive mixture α v + (1−α) w with α learned per client (Deng et al. 2020).")
    finetune_steps: int = Field(5, ge=1, description="finetune: SGD steps k before evaluation.")
    personal_steps: int | None = Field(
        None, ge=1, description="ditto / apfl: personal SGD steps per participation (None = "
        "the client's local steps of the round).")
    ditto_lambda: float = Field(0.1, ge=0, description="ditto: proximal weight λ.")
    apfl_alpha: float = Field(0.5, ge=0, le=1, description="apfl: initial mixing weight α.")
    apfl_alpha_lr: float | None = Field(
        None, ge=0, description="apfl: step size of α (None = client.lr; 0 = fixed α).")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        # The test split is one definition shared with eval.per_client (fedflat.data.client_test).
        if isinstance(data, dict):
            for key, to in MOVED.items():
                if key in data:
                    raise ValueError(f"personalization.{key} moved to {to}")
        return data


def personalization_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting personalization cannot run with."""
    p = sc.personalization
    if p.method == "none":
        return []
    why = f"personalization.method is {p.method!r}"
    errors: list[tuple[str, str]] = []
    if sc.runtime.backend != "serial":
        errors.append(("runtime.backend", f"{why}: runs on the serial backend only"))
    if sc.privacy.sample_level.enabled or sc.privacy.user_level.enabled:
        errors.append(("privacy", f"{why}: personal models are trained outside the DP "
                       "accounting; remove privacy or personalization"))
    if sc.topology.kind != "none":
        errors.append(("topology.kind", f"{why}: personalization of decentralized training "
                       "is not implemented"))
    if sc.model.norm == "batch":
        errors.append(("model.norm", f"{why}: BatchNorm statistics of personal models are "
                       "not kept; use norm: group or layer"))
    if sc.system.asynchronous is not None:
        errors.append(("system.asynchronous", f"{why}: synchronous rounds only"))
    return errors
