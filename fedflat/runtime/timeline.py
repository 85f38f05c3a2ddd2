"""The simulated system of a run: who is available, who finishes in time, the clock.

Pure bookkeeping over ``fedflat.comm.system``: device profiles are drawn once per run
from (seed, "system"); each round draws from (seed, "system", round). The driver uses it
to choose eligible clients, to drop or shorten stragglers, and to advance ``sim_seconds``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedflat.comm.codecs import codec_from_config
from fedflat.comm.system import (
    RoundTiming,
    available,
    client_profiles,
    job_times,
    simulate_round,
)
from fedflat.rng import numpy_rng
from fedflat.runtime.build import FederatedData, build_schedule
from fedflat.runtime.worker import ClientJob
from fedflat.scenario.schema import Scenario


class Timeline:
    """Availability, straggler outcomes and the simulated clock of one run."""

    def __init__(self, sc: Scenario, fed: FederatedData, num_params: int,
                 base_dir: str | Path | None) -> None:
        self.sc = sc
        self.cfg = sc.system
        self.profiles = client_profiles(fed.num_clients, self.cfg, numpy_rng(sc.seed, "system"),
                                        base_dir=base_dir)
        self.sizes = fed.client_sizes()
        self.schedule = build_schedule(sc)
        # Timing uses the codecs' planned message sizes (the logged bytes are the real ones).
        self.bytes_up = codec_from_config(sc.comm.uplink).wire_nbytes(num_params)
        self.bytes_down = codec_from_config(sc.comm.downlink).wire_nbytes(num_params)

    def eligible(self, round_: int) -> np.ndarray:
        return available(self.profiles, self.cfg, round_, self._rng(round_))

    def simulate(self, round_: int, cohort: list[int]) -> RoundTiming:
        ids = np.asarray(cohort, dtype=np.int64)
        steps = np.array([self.schedule.num_steps(int(self.sizes[c])) for c in ids], dtype=np.int64)
        samples = steps * self.schedule.batch_size  # samples processed ≈ steps × batch
        if self.schedule.steps is None and self.schedule.batching == "shuffle":
            samples = np.array([(self.schedule.epochs or 1) * int(self.sizes[c]) for c in ids])
        rng = self._rng(round_)
        rng.random(len(self.sizes))  # the draws of eligible(): keep streams aligned
        return simulate_round(ids, samples, self.bytes_down, self.bytes_up, self.profiles, self.cfg,
                              rng, work_steps=steps, local_epochs=self.schedule.epochs)

    def dp_step(self, job: ClientJob) -> tuple[float, int]:
        """(sampling rate q, local steps) of a job, for the client's privacy accountant."""
        n = int(self.sizes[job.client_id])
        steps = job.max_steps if job.max_steps is not None else self.schedule.num_steps(n)
        return self.schedule.rate(n), steps

    def job_times(self) -> np.ndarray:
        """[N] seconds of one job of each client (asynchronous mode: no deadline)."""
        steps = np.array([self.schedule.num_steps(int(n)) for n in self.sizes], dtype=np.int64)
        samples = steps * self.schedule.batch_size
        if self.schedule.steps is None and self.schedule.batching == "shuffle":
            samples = (self.schedule.epochs or 1) * self.sizes
        return job_times(self.profiles, np.arange(len(self.sizes)), samples, self.bytes_down,
                         self.bytes_up)

    def _rng(self, round_: int) -> np.random.Generator:
        return numpy_rng(self.sc.seed, "system", round_)
