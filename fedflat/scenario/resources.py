"""What the runtime's resource keys refuse before anything starts.

A run asking for GPUs on a machine that has none would start Ray with GPUs it cannot use,
then fail inside an actor (or wait for one that never places); it is refused here instead,
at validation, naming the key. A run that joins a cluster (``runtime.address`` or
``RAY_ADDRESS``) is checked against that cluster's resources when it starts
(``fedflat.runtime.backends.check_resources``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario


def resource_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each resource request this machine cannot serve."""
    rt = sc.runtime
    errors: list[tuple[str, str]] = []
    if rt.backend != "ray" or rt.num_gpus <= 0:
        return errors
    if rt.address or os.environ.get("RAY_ADDRESS"):
        return errors  # the cluster's GPUs count, not this machine's
    import torch

    if not torch.cuda.is_available():
        errors.append(("runtime.num_gpus", f"{rt.num_gpus:g} GPU per client actor asked for, "
                       "but this machine has no CUDA device (torch.cuda.is_available() is "
                       "False); set runtime.num_gpus: 0, or runtime.address to a Ray cluster "
                       "with GPUs"))
    return errors
