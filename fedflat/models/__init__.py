"""Models: the zoo and the flat-parameter wrapper."""

from fedflat.models.flat import FlatModel, Segment
from fedflat.models.zoo import build_model

__all__ = ["FlatModel", "Segment", "build_model"]
