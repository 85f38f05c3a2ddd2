"""Metrics: sharpness of the loss landscape (Hessian λ_max, trace, m-sharpness)."""

from fedflat.metrics.sharpness import (
    EigenResult,
    MSharpness,
    TraceResult,
    hessian_trace,
    hvp,
    lambda_max,
    m_sharpness,
)

__all__ = [
    "EigenResult",
    "MSharpness",
    "TraceResult",
    "hessian_trace",
    "hvp",
    "lambda_max",
    "m_sharpness",
]
