"""What a sweep is: a base scenario, fixed overrides, a grid of key values (some keys varying
together, ``zip``) and seeds; its expansion into points, and their validation before any runs.

A sweep file (YAML) holds the same as the command line::

    scenario: quickstart.yaml        # relative to the sweep file
    set: {server.rounds: 20, method: fedsam}   # fixed overrides (optional)
    grid:
      client.oracle.rho: [0.02, 0.05, 0.1]
      client.lr: [0.05, 0.1]
    zip: [[client.oracle.rho, client.lr]]   # these vary together (optional)
    seeds: 3                         # 0, 1, 2; or a list [0, 4, 7]
    jobs: 2
    ray: false                       # true: runs as Ray tasks (optional)
    target: 0.8
    out: runs/sweeps/fedsam-rho
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedflat.errors import ScenarioError
from fedflat.scenario.loader import LoadedScenario, load_scenario, parse_override, read_yaml

#: Keys a sweep file may hold.
SWEEP_FILE_KEYS: tuple[str, ...] = ("scenario", "set", "grid", "zip", "seeds", "jobs", "ray",
                                    "target", "out")


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: the overrides it applies (in grid order) and its index."""

    index: int
    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        """``method=fedsam, client.oracle.rho=0.05`` (``base`` for an empty grid)."""
        return ", ".join(f"{k}={_text(v)}" for k, v in self.overrides.items()) or "base"

    def folder(self, seed: int) -> str:
        """The run folder name of this point and seed: ``p003-fedsam-0.05-s1``."""
        slug = "-".join(_text(v) for v in self.overrides.values())
        slug = re.sub(r"[^A-Za-z0-9._=]+", "_", slug).strip("_")[:60]
        return f"p{self.index:03d}" + (f"-{slug}" if slug else "") + f"-s{seed}"


@dataclass
class SweepSpec:
    """A sweep, as given on the command line or in a sweep file."""

    scenario: str
    sets: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    zip: list[list[str]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1
    ray: bool = False  # dispatch runs as Ray tasks (local Ray, or the base's runtime.address)
    target: float | None = None
    out: str | None = None
    source: str = "--grid"  # where grid keys came from, for error messages
    inline: bool = False  # runs in this process, one at a time (fedflat.sweep.launch)

    def identity(self) -> dict[str, Any]:
        """What must not change between a sweep and its rerun (seeds may grow)."""
        return {"scenario": str(Path(self.scenario).resolve()), "sets": list(self.sets),
                "points": [p.overrides for p in expand_points(self)]}


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def split_values(raw: str) -> list[Any]:
    """``"0,0.05,[1,2]"`` -> ``[0, 0.05, [1, 2]]``: split at top-level commas, each value
    parsed as YAML (as ``--set`` does)."""
    parts, depth, cur = [], 0, ""
    for ch in raw:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [parse_override(f"x={p.strip()}")[1] for p in parts]


def parse_grid_args(items: list[str]) -> dict[str, list[Any]]:
    """``["method=fedavg,fedsam", "client.lr=0.1,0.01"]`` -> an ordered grid."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ScenarioError(f"expected key.path=v1,v2,..., got {item!r}", file="--grid")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not raw.strip():
            raise ScenarioError("no values given", file=f"--grid {key}", key=key)
        grid[key] = split_values(raw)
    return grid


def parse_seeds(raw: Any, where: str = "--seeds") -> list[int]:
    """``3`` -> ``[0, 1, 2]``; ``"0,4,7"`` or ``[0, 4, 7]`` -> that list."""
    if isinstance(raw, str):
        raw = split_values(raw)
        if len(raw) == 1:
            raw = raw[0]
    if isinstance(raw, bool):
        raise ScenarioError("seeds must be a count or a list of seeds", file=where)
    if isinstance(raw, int):
        if raw < 1:
            raise ScenarioError(f"need at least one seed, got {raw}", file=where)
        return list(range(raw))
    if isinstance(raw, list) and raw and all(isinstance(s, int) and not isinstance(s, bool)
                                             and s >= 0 for s in raw):
        if len(set(raw)) != len(raw):
            raise ScenarioError(f"seeds repeat: {raw}", file=where)
        return list(raw)
    raise ScenarioError(f"seeds must be a count or a list of seeds >= 0, got {raw!r}", file=where)


def load_sweep_file(path: str | Path) -> SweepSpec:
    """Read a sweep file (see the module docstring).

    Raises:
        ScenarioError: naming the file, the key and its line.
    """
    data, lines = read_yaml(path)
    file = str(path)

    def err(key: str, msg: str) -> ScenarioError:
        return ScenarioError(msg, file=file, key=key, line=lines.get(tuple(key.split(".")[:1])))

    for key in data:
        if key not in SWEEP_FILE_KEYS:
            raise err(key, f"unknown key; allowed keys here: {', '.join(SWEEP_FILE_KEYS)}")
    if not isinstance(data.get("scenario"), str):
        raise err("scenario", "the base scenario path is required")
    base = Path(data["scenario"])
    if not base.is_absolute():
        base = Path(path).parent / base
    sets = data.get("set") or {}
    if not isinstance(sets, dict):
        raise err("set", "expected a mapping key.path: value")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise err("grid", "expected a mapping key.path: [values]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ScenarioError("expected a non-empty list of values", file=file,
                                key=f"grid.{key}", line=lines.get(("grid", key)))
    zips = data.get("zip") or []
    if not isinstance(zips, list) or not all(
            isinstance(g, list) and all(isinstance(k, str) for k in g) for g in zips):
        raise err("zip", "expected a list of lists of grid keys")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise err("jobs", f"expected a whole number >= 1, got {jobs!r}")
    use_ray = data.get("ray", False)
    if not isinstance(use_ray, bool):
        raise err("ray", f"expected true or false, got {use_ray!r}")
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)):
        raise err("target", f"expected a number, got {target!r}")
    seeds_line = lines.get(("seeds",))
    return SweepSpec(
        scenario=str(base),
        sets=[f"{k}={json.dumps(v)}" for k, v in sets.items()],
        grid={str(k): list(v) for k, v in grid.items()},
        zip=[list(g) for g in zips],
        seeds=parse_seeds(data.get("seeds", 1), f"{file}:{seeds_line}" if seeds_line else file),
        jobs=jobs, ray=use_ray, target=None if target is None else float(target),
        out=None if data.get("out") is None else str(data["out"]),
        source=file,
    )


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep file (it has a ``grid`` or ``scenario`` key, which no
    scenario has)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and ("grid" in data or "scenario" in data)


def expand_points(spec: SweepSpec) -> list[SweepPoint]:
    """The grid points, in order: the Cartesian product over the grid keys, where each zip
    group counts as one factor (its lists must have one length) placed at its first key.

    Raises:
        ScenarioError: a zip names a key not in the grid, a key twice, or lists of
            different lengths; the grid sets ``seed`` (use seeds).
    """
    if "seed" in spec.grid:
        raise ScenarioError("vary the seed with seeds, not in the grid", file=spec.source,
                            key="seed")
    group_of: dict[str, int] = {}
    for g, keys in enumerate(spec.zip):
        for key in keys:
            if key not in spec.grid:
                raise ScenarioError(f"zip names {key!r}, which is not a grid key",
                                    file=spec.source, key=key)
            if key in group_of:
                raise ScenarioError(f"{key!r} is in two zip groups", file=spec.source, key=key)
            group_of[key] = g
        lengths = {len(spec.grid[k]) for k in keys}
        if len(lengths) > 1:
            raise ScenarioError(
                "zipped keys need lists of one length: "
                + ", ".join(f"{k} has {len(spec.grid[k])}" for k in keys),
                file=spec.source, key=keys[0])
    factors: list[list[dict[str, Any]]] = []
    placed: set[int] = set()
    for key, values in spec.grid.items():
        g = group_of.get(key)
        if g is None:
            factors.append([{key: v} for v in values])
        elif g not in placed:
            placed.add(g)
            keys = spec.zip[g]
            factors.append([{k: spec.grid[k][i] for k in keys} for i in range(len(values))])
    points = []
    for i, combo in enumerate(itertools.product(*factors)):
        over: dict[str, Any] = {}
        for part in combo:
            over.update(part)
        points.append(SweepPoint(index=i, overrides=over))
    return points


def forced_overrides(spec: SweepSpec) -> dict[str, Any]:
    """What the sweep sets on every run unless the user set it: the serial backend (the
    sweep runs several runs at once; Ray inside each would oversubscribe the cores), no
    progress bar (there is no terminal) and no per-run plots (the sweep draws its own)."""
    user = {parse_override(s)[0] for s in spec.sets} | set(spec.grid)
    wanted = {"runtime.backend": "serial", "output.progress": False, "output.plots": False}
    return {k: v for k, v in wanted.items() if k not in user}


def run_overrides(spec: SweepSpec, point: SweepPoint, seed: int) -> list[str]:
    """The ``--set`` items of one run: forced, fixed, the point's, then the seed."""
    items = [f"{k}={json.dumps(v)}" for k, v in forced_overrides(spec).items()]
    items += list(spec.sets)
    items += [f"{k}={json.dumps(v)}" for k, v in point.overrides.items()]
    items.append(f"seed={seed}")
    return items


def validate(spec: SweepSpec, points: list[SweepPoint]) -> list[LoadedScenario]:
    """Load every (point, seed) scenario before any runs.

    Raises:
        ScenarioError: the first invalid one, naming the point, the seed and the key (a
            grid key is shown as ``--grid KEY``).
    """
    out = []
    for point in points:
        for seed in spec.seeds:
            try:
                out.append(load_scenario(spec.scenario, run_overrides(spec, point, seed)))
            except ScenarioError as exc:
                file = exc.file
                if file and file.startswith("--set ") and file[6:] in point.overrides:
                    file = f"--grid {file[6:]}"
                raise ScenarioError(
                    exc.message,
                    file=f"sweep point {point.index} ({point.label}), seed {seed}: "
                         f"{file or spec.scenario}",
                    key=exc.key, line=exc.line) from None
    return out
