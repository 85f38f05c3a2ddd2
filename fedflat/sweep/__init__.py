"""Sweeps: a base scenario run over a grid of key values and seeds, resumably, with a table
of mean ± std and Student-t confidence intervals per grid point.

``fedflat sweep SCENARIO --grid method=fedavg,fedsam --seeds 3`` (see ``fedflat.sweep.cli``).
"""

from fedflat.sweep.spec import SweepPoint, SweepSpec, expand_points, load_sweep_file

__all__ = ["SweepPoint", "SweepSpec", "expand_points", "load_sweep_file"]
