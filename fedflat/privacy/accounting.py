"""Privacy accounting for the Poisson-subsampled Gaussian mechanism.

Pure functions over maintained libraries; no RDP or PLD mathematics is written here.

* ``"rdp"``: Opacus' ``compute_rdp`` (Mironov, Talwar, Zhang 2019, "Rényi Differential
  Privacy of the Sampled Gaussian Mechanism", https://arxiv.org/abs/1908.10530) composed
  over the history, converted to (ε, δ) either as Opacus does (Balle et al. 2020,
  Theorem 21 of https://arxiv.org/abs/1905.09982, ``conversion="balle"``) or with the
  classic conversion ``ε = min_α [RDP(α) + log(1/δ)/(α−1)]`` of TF-Privacy (Mironov 2017,
  Proposition 3, https://arxiv.org/abs/1702.07476; ``conversion="classic"``).
* ``"prv"``: Opacus' ``PRVAccountant`` (Gopi, Lee, Wutschitz 2021, "Numerical Composition
  of Differential Privacy", https://arxiv.org/abs/2106.02848). It is an upper bound with
  ε error 0.01. When its discretisation would be too large for memory, or it fails
  numerically (opacus#601/#604), the RDP value is used instead and the returned note
  says so.
* ``"pld"``: dp-accounting's ``PLDAccountant`` (Koskela, Jälkö, Honkela 2020; Doroshenko et
  al. 2022, https://arxiv.org/abs/2207.04380), pessimistic discretisation.

All three assume Poisson sampling with rate q and add/remove-one neighbours. Fixed-size or
shuffled batches are a different mechanism and are under-reported by these numbers
(PRIVACY.md). The same functions serve sample-level DP-SGD (q = expected batch / n,
T = local steps) and user-level DP-FedAvg (q = expected clients per round / population,
T = rounds); report the two separately, never add them.

Calibration (σ from ε) searches σ with a safeguarded secant/bisection in log space and
returns a σ whose *evaluated* ε is ≤ the target, within a relative tolerance ``rtol`` of the
smallest such σ. Results are cached in-process and in a small JSON file
(``$FEDFLAT_CACHE_DIR/privacy.json``, default ``~/.cache/fedflat/privacy.json``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

AccountantName = Literal["rdp", "prv", "pld"]
Conversion = Literal["balle", "classic"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "pld")
CONVERSIONS: tuple[str, ...] = ("balle", "classic")

# Opacus' / TF-Privacy's default order grid {1 + k/10 : k = 1..99} ∪ {12..63}.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + k / 10.0 for k in range(1, 100)] + [float(a) for a in range(12, 64)]
)
# σ search range of the calibration; Opacus' get_noise_multiplier stops at 1e6 too.
MAX_NOISE_MULTIPLIER = 1e6
MIN_NOISE_MULTIPLIER = 1e-3
# PRV discretises the privacy-loss domain on a grid; beyond this many points (≈ 80 MB per
# float64 array, several arrays alive at once) it falls back to RDP. Such grids only
# arise when ε is in the hundreds, where the PRV/RDP difference is immaterial.
MAX_PRV_GRID_POINTS = 10_000_000
PRV_EPS_ERROR = 0.01  # Opacus' default; PRV returns the upper end of ε ± eps_error
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default value_discretization_interval
CACHE_FORMAT = 1
MAX_CACHE_ENTRIES = 4096

_FALLBACK_WARNED: list[bool] = []  # non-empty once a PRV fallback has been logged

# One run-length entry of a history: (noise multiplier σ, sampling rate q, steps T).
HistoryEntry = tuple[float, float, int]


class EpsilonResult(NamedTuple):
    """ε of a history, with the accountant actually used and any caveat.

    Attributes:
        epsilon: the (ε, δ)-DP upper bound; ``inf`` when some step had no noise.
        accountant: the accountant that produced ``epsilon`` ("rdp" after a PRV fallback).
        note: why the result differs from what was asked (fallback, α at the edge of
            the order grid), or ``None``.
    """

    epsilon: float
    accountant: str
    note: str | None


class Calibration(NamedTuple):
    """Result of a noise calibration.

    Attributes:
        noise_multiplier: σ with evaluated ε ≤ the target; within ``rtol`` (relative) of
            the smallest such σ.
        epsilon: ε evaluated at ``noise_multiplier``.
        accountant: accountant that produced ``epsilon`` ("rdp" after a PRV fallback).
        note: caveats collected during the search, or ``None``.
        evaluations: number of ε evaluations (0 when served from a cache).
    """

    noise_multiplier: float
    epsilon: float
    accountant: str
    note: str | None
    evaluations: int


# --------------------------------------------------------------------------- validation


def check_accountant(
    accountant: str, conversion: str, orders: Sequence[float] | None
) -> tuple[float, ...] | None:
    """Validate an accountant's settings; returns the RDP orders (None: the default grid).

    Raises:
        ValueError: an unknown accountant or conversion, a conversion or orders given to
            an accountant they do not apply to, or orders that are not finite α > 1.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    if accountant != "rdp" and conversion != "balle":
        raise ValueError(
            f"conversion={conversion!r} applies to accountant='rdp' only, "
            f"got accountant={accountant!r}"
        )
    if orders is None:
        return None
    if accountant != "rdp":
        raise ValueError(f"orders apply to accountant='rdp' only, got {accountant!r}")
    out = tuple(float(a) for a in orders)
    if not out or not all(math.isfinite(a) and a > 1.0 for a in out):
        raise ValueError(
            f"orders must be a non-empty list of finite α > 1, got {orders}"
        )
    return out


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def check_history_entry(
    noise_multiplier: float, sampling_rate: float, steps: int
) -> HistoryEntry:
    """``(σ, q, T)`` as floats and an int, after checking σ ≥ 0 finite, q ∈ [0, 1], T ≥ 0.

    Raises:
        ValueError: naming the argument out of range.
    """
    sigma, q = float(noise_multiplier), float(sampling_rate)
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(
            f"noise_multiplier must be finite and >= 0, got {noise_multiplier}"
        )
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    return sigma, q, int(steps)


def _normalize_history(history: Sequence[Sequence[float]]) -> tuple[HistoryEntry, ...]:
    """Validate entries, drop the ones that cost nothing (q = 0 or T = 0), merge runs."""
    out: list[HistoryEntry] = []
    for i, seg in enumerate(history):
        if len(seg) != 3:
            raise ValueError(
                f"history[{i}] must be (noise_multiplier, q, steps), got {seg}"
            )
        sigma, q, steps = check_history_entry(seg[0], seg[1], seg[2])  # type: ignore[arg-type]
        if q == 0.0 or steps == 0:
            continue  # an example that is never sampled leaks nothing
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return tuple(out)


# ---------------------------------------------------------------------- ε of a history


def _rdp_epsilon(
    history: tuple[HistoryEntry, ...],
    delta: float,
    conversion: str,
    orders: tuple[float, ...],
) -> EpsilonResult:
    from opacus.accountants.analysis import rdp as opacus_rdp

    rdp = np.zeros(len(orders))
    for sigma, q, steps in history:
        rdp = rdp + np.asarray(
            opacus_rdp.compute_rdp(
                q=q, noise_multiplier=sigma, steps=steps, orders=list(orders)
            ),
            dtype=float,
        )
    return _rdp_to_dp(rdp, orders, delta, conversion)


def _rdp_to_dp(
    rdp: np.ndarray, orders: tuple[float, ...], delta: float, conversion: str
) -> EpsilonResult:
    from opacus.accountants.analysis import rdp as opacus_rdp

    alphas = np.asarray(orders, dtype=float)
    if conversion == "balle":
        # Opacus warns when the best α is at the grid edge; we report that in the note.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, best = opacus_rdp.get_privacy_spent(
                orders=list(orders), rdp=rdp, delta=delta
            )
        eps, best = float(eps), float(best)
    else:
        # Classic conversion (Mironov 2017, Prop. 3), as TF-Privacy's tutorials report ε.
        with np.errstate(invalid="ignore"):
            all_eps = rdp + math.log(1.0 / delta) / (alphas - 1.0)
        if np.isnan(all_eps).all() or np.isinf(all_eps).all():
            return EpsilonResult(math.inf, "rdp", None)
        idx = int(np.nanargmin(all_eps))
        eps, best = float(all_eps[idx]), float(alphas[idx])
    if not math.isfinite(eps):
        return EpsilonResult(math.inf, "rdp", None)
    note = None
    if len(alphas) > 1 and best in (float(alphas.min()), float(alphas.max())):
        edge = "largest" if best == float(alphas.max()) else "smallest"
        note = (
            f"optimal RDP order is the {edge} of the grid (α={best:g}); "
            "a wider order grid (or accountant='pld') gives a tighter ε"
        )
    return EpsilonResult(max(eps, 0.0), "rdp", note)


def _prv_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> EpsilonResult:
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    acc = PRVAccountant()
    acc.history = list(history)
    delta_error = delta / 1000  # Opacus' default in get_epsilon
    reason: str | None = None
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            # Opacus allocates arrays of the domain's size without a check (an extreme
            # history asked for 11 GiB here); ask for the size first. ``_get_domain`` is
            # private but is exactly what get_epsilon calls next.
            domain = acc._get_domain(
                prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
                num_self_compositions=[t for _, _, t in history],
                eps_error=PRV_EPS_ERROR,
                delta_error=delta_error,
            )
            if domain.size > MAX_PRV_GRID_POINTS:
                reason = (
                    f"PRV would need a grid of {domain.size:,} points "
                    f"(> {MAX_PRV_GRID_POINTS:,})"
                )
            else:
                eps = float(
                    acc.get_epsilon(
                        delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error
                    )
                )
                if math.isfinite(eps) and eps >= 0.0:
                    return EpsilonResult(eps, "prv", None)
                reason = f"PRV returned ε={eps}"
    except (ValueError, ArithmeticError, RuntimeError, MemoryError, IndexError) as err:
        reason = f"PRV failed ({type(err).__name__}: {err})"
    rdp = _rdp_epsilon(history, delta, "balle", DEFAULT_RDP_ORDERS)
    note = f"{reason}; fell back to the RDP accountant (an upper bound, looser)"
    if rdp.note:
        note += f"; {rdp.note}"
    # Warn once per process; a run re-accounts every round and would repeat it.
    level = logging.DEBUG if _FALLBACK_WARNED else logging.WARNING
    if not _FALLBACK_WARNED:
        _FALLBACK_WARNED.append(True)
    logger.log(level, "privacy accounting: %s", note)
    return EpsilonResult(rdp.epsilon, "rdp", note)


def _pld_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> EpsilonResult:
    import dp_accounting as dpa

    acc = dpa.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    event = dpa.ComposedDpEvent(
        [
            dpa.SelfComposedDpEvent(
                dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )
    acc.compose(event)
    return EpsilonResult(max(float(acc.get_epsilon(delta)), 0.0), "pld", None)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(
    history: tuple[HistoryEntry, ...],
    delta: float,
    accountant: str,
    conversion: str,
    orders: tuple[float, ...] | None,
) -> EpsilonResult:
    if not history:
        return EpsilonResult(0.0, accountant, None)
    if any(sigma == 0.0 for sigma, _, _ in history):
        return EpsilonResult(math.inf, accountant, None)  # a noiseless release
    if accountant == "rdp":
        return _rdp_epsilon(history, delta, conversion, orders or DEFAULT_RDP_ORDERS)
    if accountant == "prv":
        return _prv_epsilon(history, delta)
    return _pld_epsilon(history, delta)


def compute_epsilon(
    history: Sequence[Sequence[float]],
    *,
    delta: float,
    accountant: AccountantName = "rdp",
    conversion: Conversion = "balle",
    orders: Sequence[float] | None = None,
) -> EpsilonResult:
    """ε of a heterogeneous composition of Poisson-subsampled Gaussian mechanisms.

    Args:
        history: entries ``(noise_multiplier σ, sampling_rate q, steps T)``; entry i
            is T_i steps with noise std σ_i·sensitivity, each record sampled with
            probability q_i per step.
        delta: target δ in (0, 1).
        accountant: "rdp", "prv" or "pld" (see the module docstring).
        conversion: RDP → (ε, δ) conversion, "balle" (Opacus) or "classic"
            (TF-Privacy); only with ``accountant="rdp"``.
        orders: RDP orders α (> 1); default Opacus' grid. Only with
            ``accountant="rdp"``.

    Returns:
        ``EpsilonResult``; ε = 0 for an empty history (or all q = 0 / T = 0), ``inf`` if
        any sampled step had σ = 0.

    Raises:
        ValueError: on an invalid argument, naming it.
    """
    orders_t = check_accountant(accountant, conversion, orders)
    delta = _check_delta(delta)
    result = _epsilon_cached(
        _normalize_history(history), delta, accountant, conversion, orders_t
    )
    if result.note and result.accountant == accountant:
        logger.info("privacy accounting: %s", result.note)
    return result


def epsilon(
    *,
    sampling_rate: float,
    steps: int,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantName = "rdp",
    conversion: Conversion = "balle",
    orders: Sequence[float] | None = None,
) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps.

    Args:
        sampling_rate: Poisson sampling probability q ∈ [0, 1] per step (expected batch
            size / dataset size, or expected clients per round / population).
        steps: number of steps T (local steps, or rounds for user-level DP).
        noise_multiplier: σ, noise standard deviation divided by the L2 sensitivity
            (the clip norm).
        delta: δ ∈ (0, 1).
        accountant: "rdp", "prv" or "pld".
        conversion: "balle" or "classic" (RDP only).
        orders: RDP orders (RDP only).

    Returns:
        ε (0 when q = 0 or T = 0; ``inf`` when σ = 0 and q > 0). A PRV fallback to RDP is
        logged as a warning; use ``compute_epsilon`` to receive the note.

    Raises:
        ValueError: on an invalid argument, naming it.

    Example:
        >>> round(epsilon(sampling_rate=0.04, steps=750,
        ...               noise_multiplier=1.8408203125, delta=1e-5), 3)
        2.996
    """
    check_history_entry(noise_multiplier, sampling_rate, steps)
    return compute_epsilon(
        [(noise_multiplier, sampling_rate, steps)],
        delta=delta,
        accountant=accountant,
        conversion=conversion,
        orders=orders,
    ).epsilon


def rdp_epsilon_floor(
    *,
    delta: float,
    conversion: Conversion = "balle",
    orders: Sequence[float] | None = None,
) -> float:
    """The smallest ε the RDP accountant can certify at δ on an order grid (σ → ∞).

    With RDP = 0 at every order, the conversion still charges log(1/δ)/(α−1)-type terms,
    so targets at or below this value are impossible for ``accountant="rdp"``.
    """
    orders_t = check_accountant("rdp", conversion, orders) or DEFAULT_RDP_ORDERS
    delta = _check_delta(delta)
    return _rdp_to_dp(np.zeros(len(orders_t)), orders_t, delta, conversion).epsilon


# ------------------------------------------------------------------------- calibration


def _search_sigma(
    eps_of: Callable[[float], EpsilonResult],
    target: float,
    rtol: float,
) -> tuple[float, EpsilonResult, int, list[str]]:
    """Smallest σ with eps_of(σ) ≤ target, to relative precision rtol.

    Keeps a bracket lo < hi with ε(lo) > target ≥ ε(hi) and returns hi, so the answer's
    ε was evaluated and is within budget even if ε(σ) is not exactly monotone (PRV, PLD
    discretisation). Steps are secant steps of log ε against log σ (nearly linear for the
    subsampled Gaussian), kept inside the bracket; after two updates of the same end the
    next step bisects, which bounds the count by about twice plain bisection.
    """
    notes: list[str] = []
    count = 0

    def ev(sigma: float) -> EpsilonResult:
        nonlocal count
        count += 1
        res = eps_of(sigma)
        if res.note and res.note not in notes:
            notes.append(res.note)
        return res

    x = 1.0
    r = ev(x)
    if r.epsilon <= target:
        hi, r_hi = x, r
        lo, r_lo = x, r
        while r_lo.epsilon <= target:
            hi, r_hi = lo, r_lo
            if hi <= MIN_NOISE_MULTIPLIER:
                notes.append(
                    f"target reached already at σ={hi:g}, the search's lower limit"
                )
                return hi, r_hi, count, notes
            lo = max(hi / 4.0, MIN_NOISE_MULTIPLIER)
            r_lo = ev(lo)
    else:
        lo, r_lo = x, r
        hi, r_hi = x, r
        while r_hi.epsilon > target:
            lo, r_lo = hi, r_hi
            if lo >= MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"epsilon={target} is not reachable with noise_multiplier <= "
                    f"{MAX_NOISE_MULTIPLIER:g} (ε there is {r_hi.epsilon:.4g}); "
                    "raise epsilon, or lower sampling_rate or steps"
                )
            hi = min(lo * 4.0, MAX_NOISE_MULTIPLIER)
            r_hi = ev(hi)

    log_t = math.log(target)
    last_side = ""
    same_side = 0
    while hi / lo > 1.0 + rtol:
        a, b = math.log(lo), math.log(hi)
        fa = math.log(r_lo.epsilon) - log_t if math.isfinite(r_lo.epsilon) else math.inf
        fb = math.log(r_hi.epsilon) - log_t if r_hi.epsilon > 0 else -math.inf
        # Keep at least rtol/2 (in log σ) from each end so one evaluation can close a
        # bracket that is nearly narrow enough.
        margin = min(0.5, 0.5 * math.log1p(rtol) / (b - a))
        if same_side >= 2 or not (math.isfinite(fa) and math.isfinite(fb)) or fa <= fb:
            t = 0.5
        else:
            t = fa / (fa - fb)
        t = min(max(t, margin), 1.0 - margin)
        x = math.exp(a + t * (b - a))
        r = ev(x)
        side = "hi" if r.epsilon <= target else "lo"
        if side == "hi":
            hi, r_hi = x, r
        else:
            lo, r_lo = x, r
        same_side = same_side + 1 if side == last_side else 1
        last_side = side
        if same_side > 2:
            same_side = 0  # after one bisection, trust the secant again
    return hi, r_hi, count, notes


def _cache_path() -> Path:
    base = os.environ.get("FEDFLAT_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "fedflat"
    return root / "privacy.json"


def _lib_versions() -> dict[str, str]:
    out = {}
    for name in ("opacus", "dp-accounting"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "?"
    return out


def _cache_key(**kwargs: object) -> str:
    return json.dumps(
        {**kwargs, "libs": _lib_versions(), "format": CACHE_FORMAT}, sort_keys=True
    )


def _read_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache_entry(key: str, value: dict[str, object]) -> None:
    """Add one entry; atomic (tmp + os.replace) and never raising."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)
        entries.pop(key, None)
        entries[key] = value
        while len(entries) > MAX_CACHE_ENTRIES:  # oldest first (insertion order)
            entries.pop(next(iter(entries)))
        fd, tmp = tempfile.mkstemp(prefix=".privacy.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, fh)
            os.replace(tmp, path)  # readers see the old or the new file, never half
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, TypeError, ValueError) as err:
        logger.debug("privacy cache not written (%s): %s", path, err)


def _cached_calibration(key: str) -> Calibration | None:
    entry = _read_cache(_cache_path()).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        sigma = float(entry["noise_multiplier"])  # type: ignore[arg-type]
        eps = float(entry["epsilon"])  # type: ignore[arg-type]
        used = str(entry["accountant"])
        note = entry.get("note")
    except (KeyError, TypeError, ValueError):
        return None
    if not (sigma >= 0 and math.isfinite(sigma)):
        return None
    return Calibration(sigma, eps, used, None if note is None else str(note), 0)


@functools.lru_cache(maxsize=1024)
def _calibrate_cached(
    q: float,
    steps: int,
    target: float,
    delta: float,
    accountant: str,
    conversion: str,
    orders: tuple[float, ...] | None,
    rtol: float,
    use_disk: bool,
) -> Calibration:
    key = _cache_key(
        q=q,
        steps=steps,
        epsilon=target,
        delta=delta,
        accountant=accountant,
        conversion=conversion,
        orders=orders,
        rtol=rtol,
    )
    if use_disk:
        hit = _cached_calibration(key)
        if hit is not None:
            return hit

    def eps_of(sigma: float) -> EpsilonResult:
        return _epsilon_cached(
            ((sigma, q, steps),), delta, accountant, conversion, orders
        )

    sigma, res, count, notes = _search_sigma(eps_of, target, rtol)
    cal = Calibration(
        sigma, res.epsilon, res.accountant, "; ".join(notes) or None, count
    )
    if use_disk:
        _write_cache_entry(key, cal._asdict())
    return cal


def calibrate(
    *,
    sampling_rate: float,
    steps: int,
    epsilon: float,
    delta: float,
    accountant: AccountantName = "rdp",
    conversion: Conversion = "balle",
    orders: Sequence[float] | None = None,
    rtol: float = 1e-3,
    use_cache: bool = True,
) -> Calibration:
    """Smallest noise multiplier σ whose ε after T steps is ≤ a target, with details.

    Args:
        sampling_rate: Poisson sampling probability q ∈ [0, 1].
        steps: number of steps T.
        epsilon: target ε > 0.
        delta: δ ∈ (0, 1).
        accountant: "rdp", "prv" or "pld".
        conversion: "balle" or "classic" (RDP only).
        orders: RDP orders (RDP only).
        rtol: relative tolerance on σ: the result σ̂ has ε(σ̂) ≤ ε and
            σ̂ ≤ (1 + rtol)·σ* for the smallest admissible σ* (ε monotone in σ).
        use_cache: read/write the JSON cache file (the in-process cache is always on).

    Returns:
        ``Calibration``; σ = 0 when q = 0 or T = 0 (nothing is released about a record).

    Raises:
        ValueError: on an invalid argument, or when the target cannot be met: ε ≤ 0, ε at
            or below the RDP order grid's floor (``rdp_epsilon_floor``), or σ > 1e6
            needed.
    """
    orders_t = check_accountant(accountant, conversion, orders)
    delta = _check_delta(delta)
    _, q, steps = check_history_entry(0.0, sampling_rate, steps)
    target = float(epsilon)
    if not (target > 0.0 and math.isfinite(target)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0.0 < rtol < 1.0:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}")
    if q == 0.0 or steps == 0:
        return Calibration(0.0, 0.0, accountant, "no record is ever sampled: σ = 0", 0)
    if accountant == "rdp":
        floor = rdp_epsilon_floor(delta=delta, conversion=conversion, orders=orders_t)
        if target <= floor:
            raise ValueError(
                f"epsilon={target} is impossible for the RDP accountant at delta={delta}: "
                f"even infinite noise gives ε={floor:.4g} with orders up to "
                f"α={max(orders_t or DEFAULT_RDP_ORDERS):g}; use accountant='pld' or "
                "'prv', or larger orders"
            )
    cal = _calibrate_cached(
        q,
        steps,
        target,
        delta,
        accountant,
        conversion,
        orders_t,
        float(rtol),
        bool(use_cache),
    )
    if cal.note:
        logger.info("noise calibration: %s", cal.note)
    return cal


def noise_multiplier(
    *,
    sampling_rate: float,
    steps: int,
    epsilon: float,
    delta: float,
    accountant: AccountantName = "rdp",
    conversion: Conversion = "balle",
    orders: Sequence[float] | None = None,
    rtol: float = 1e-3,
    use_cache: bool = True,
) -> float:
    """Smallest σ (within relative tolerance ``rtol``) with ε(σ) ≤ ``epsilon``.

    See ``calibrate`` for the arguments and errors; this returns only σ.

    Example:
        >>> s = noise_multiplier(sampling_rate=0.04, steps=750, epsilon=3.0, delta=1e-5)
        >>> epsilon(sampling_rate=0.04, steps=750, noise_multiplier=s, delta=1e-5) <= 3.0
        True
    """
    return calibrate(
        sampling_rate=sampling_rate,
        steps=steps,
        epsilon=epsilon,
        delta=delta,
        accountant=accountant,
        conversion=conversion,
        orders=orders,
        rtol=rtol,
        use_cache=use_cache,
    ).noise_multiplier


def clear_memory_cache() -> None:
    """Forget the in-process ε and calibration caches (the JSON file is kept)."""
    _epsilon_cached.cache_clear()
    _calibrate_cached.cache_clear()


# ------------------------------------------------------------ adaptive clipping budget


def adaptive_clip_noise_split(*, noise_multiplier: float, count_noise: float) -> float:
    """Noise multiplier left for the clipped-update sum under adaptive clipping.

    The clipped-count query (sensitivity ½ after centring the bits, noise std σ_b) and the
    update sum (noise multiplier z_Δ) together are one Gaussian mechanism with multiplier
    z when ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)``; account the run with z. Andrew, Thakkar,
    McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS
    2021, https://arxiv.org/abs/1905.03871 (ALGORITHMS.md §4.4).

    Args:
        noise_multiplier: the total z > 0 used for accounting.
        count_noise: σ_b > z/2, std of the noise on the count of unclipped updates.

    Returns:
        z_Δ ≥ z. A warning is logged when z_Δ/z ≥ 2 (the count eats most of the budget).

    Raises:
        ValueError: when z ≤ 0 or z ≥ 2σ_b.
    """
    z, sb = float(noise_multiplier), float(count_noise)
    if not (z > 0.0 and math.isfinite(z)):
        raise ValueError(
            f"noise_multiplier must be finite and > 0, got {noise_multiplier}"
        )
    if not z < 2.0 * sb:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier < 2*count_noise; got "
            f"noise_multiplier={z}, count_noise={sb} (2*count_noise={2 * sb})"
        )
    z_delta = (z**-2 - (2.0 * sb) ** -2) ** -0.5
    if z_delta / z >= 2.0:
        logger.warning(
            "adaptive clipping: update noise multiplier %.4g is >= 2x the total %.4g; "
            "count_noise=%.4g is too small",
            z_delta,
            z,
            sb,
        )
    return z_delta
