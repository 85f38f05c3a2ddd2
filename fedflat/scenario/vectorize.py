"""What the vectorised engine (``runtime.backend: vmap``, ``runtime.vectorize``) refuses.

Everything it cannot run exactly is refused here, at validation, naming the key; it never
falls back to a loop. The engine itself is ``fedflat.client.vectorized``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedflat.scenario.local_rule import SamOnOracle

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario


def vectorize_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting the vectorised engine cannot run."""
    rt = sc.runtime
    errors: list[tuple[str, str]] = []
    if rt.vectorize and rt.backend != "ray":
        errors.append(("runtime.vectorize", f"vectorize is a setting of runtime.backend: ray "
                       f"(its client actors); with backend {rt.backend!r} use backend: vmap"))
    if rt.backend != "vmap" and not rt.vectorize:
        return errors
    engine = "runtime.backend: vmap" if rt.backend == "vmap" else "runtime.vectorize: true"
    if sc.model.norm == "batch" and sc.model.name == "cnn":
        # BatchNorm writes running statistics in place, once per client: not vmappable.
        errors.append(("model.norm", f"batch is not supported by {engine} (BatchNorm "
                       "statistics are per-client buffers); use norm: group or layer"))
    o = sc.client.oracle
    if isinstance(o, SamOnOracle) and (o.p != 2 or o.layerwise):
        # The engine has SAM-ON's l2 ball with the element-wise operator only.
        key = "client.oracle.p" if o.p != 2 else "client.oracle.layerwise"
        errors.append((key, f"sam_on's l-infinity ball and layer-wise operator are not "
                       f"supported by {engine}; use backend serial or ray"))
    return errors
