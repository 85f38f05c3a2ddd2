"""The ``adversarial:`` block: PGD adversarial training of the clients, robust evaluation.

Example::

    adversarial:
      enabled: true
      epsilon: 0.3        # ℓ∞ radius in input units (MNIST pixels are in [0, 1])
      step_size: 0.1
      steps: 7
      norm: linf          # linf | l2
      eval_steps: 20      # robust_test_accuracy = accuracy under PGD-20

Definitions, citations and pitfalls: ``fedflat.client.adversarial``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedflat.client.adversarial import PGD
    from fedflat.scenario.schema import Scenario


class AdversarialConfig(BaseModel):
    """PGD adversarial training (``enabled``) and/or robust evaluation (``evaluate``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(
        False, description="Train every client on PGD adversarial mini-batches (Madry et al. "
        "2018; federated: Zizzo et al. 2020); the local oracle (SGD, SAM, DP) sees the "
        "adversarial batch.")
    evaluate: bool | None = Field(
        None, description="Log robust_test_accuracy (PGD with eval_steps) of the global model "
        "at evaluation rounds; None = when enabled.")
    epsilon: float = Field(0.3, gt=0, description="Radius ε of the attack ball (input units).")
    step_size: float = Field(0.1, gt=0, description="Training attack: ascent step α.")
    steps: int = Field(7, ge=1, description="Training attack: PGD steps k per mini-batch.")
    norm: Literal["linf", "l2"] = Field(
        "linf", description="Ball: 'linf' (sign steps) or 'l2' (normalised steps).")
    random_start: bool = Field(True, description="Start from a uniform point of the ball.")
    clip_min: float | None = Field(
        0.0, description="Lower end of the data range (input units); None = unbounded.")
    clip_max: float | None = Field(
        1.0, description="Upper end of the data range (input units); None = unbounded.")
    eval_steps: int = Field(20, ge=1, description="Robust evaluation: PGD steps (PGD-20).")
    eval_step_size: float | None = Field(
        None, gt=0, description="Robust evaluation: ascent step; None = ε/4.")
    eval_samples: int | None = Field(
        1000, ge=1, description="Robust evaluation on a fixed subset of this many test "
        "samples (samples); None = the whole evaluation set.")

    @property
    def evaluating(self) -> bool:
        return self.enabled if self.evaluate is None else self.evaluate

    def train_attack(self) -> PGD:
        from fedflat.client.adversarial import PGD

        return PGD(self.epsilon, self.step_size, self.steps, self.norm, self.random_start,
                   self.clip_min, self.clip_max)

    def eval_attack(self) -> PGD:
        from fedflat.client.adversarial import PGD

        step = self.eval_step_size if self.eval_step_size is not None else self.epsilon / 4
        return PGD(self.epsilon, step, self.eval_steps, self.norm, True,
                   self.clip_min, self.clip_max)


def adversarial_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting adversarial training cannot run with."""
    a = sc.adversarial
    if not (a.enabled or a.evaluating):
        return []
    errors: list[tuple[str, str]] = []
    if a.clip_min is not None and a.clip_max is not None and a.clip_min >= a.clip_max:
        errors.append(("adversarial.clip_max", "clip_max must exceed clip_min"))
    if sc.model.norm == "batch":
        errors.append(("model.norm", "adversarial: the attack runs the model in eval mode; "
                       "BatchNorm's train/eval difference makes it attack another function; "
                       "use norm: group or layer"))
    if a.enabled and (sc.runtime.backend == "vmap" or sc.runtime.vectorize):
        engine = ("runtime.backend: vmap" if sc.runtime.backend == "vmap"
                  else "runtime.vectorize: true")
        errors.append(("adversarial.enabled", f"adversarial training is not supported by "
                       f"{engine}; use runtime.backend serial or ray"))
    if sc.data.dataset == "synthetic" and a.clip_min is not None:
        errors.append(("adversarial.clip_min", "synthetic features are unbounded; set "
                       "adversarial.clip_min and clip_max to null"))
    return errors
