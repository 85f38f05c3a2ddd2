"""Communication: codecs with exact byte counts, the system model and asynchronous mode.

* :mod:`fedflat.comm.codecs`: fp32/fp16/bf16, QSGD, top-k, random-k, scaled sign,
  error feedback, bit packing.
* :mod:`fedflat.comm.system`: per-client device/network profiles, availability, and the
  simulated timeline of a synchronous round (deadline, stragglers, dropout).
* :mod:`fedflat.comm.asynchronous`: FedBuff buffered asynchronous aggregation as a
  deterministic event queue.
"""

from fedflat.comm.asynchronous import (
    AsyncScheduler,
    AsyncState,
    Job,
    async_scheduler,
    next_buffer,
    scheduler_from_config,
    staleness_weights,
    start,
    versions_in_use,
)
from fedflat.comm.codecs import (
    CODEC_NAMES,
    HEADER_NBYTES,
    Codec,
    Encoded,
    ErrorFeedbackCodec,
    Transmission,
    bf16,
    codec_from_config,
    fp16,
    fp32,
    make_codec,
    qsgd,
    random_k,
    sign,
    top_k,
    transmit,
    with_error_feedback,
)
from fedflat.comm.system import (
    Profiles,
    RoundTiming,
    available,
    client_profiles,
    job_times,
    simulate_round,
    transfer_times,
)

__all__ = [
    "CODEC_NAMES",
    "HEADER_NBYTES",
    "AsyncScheduler",
    "AsyncState",
    "Codec",
    "Encoded",
    "ErrorFeedbackCodec",
    "Job",
    "Profiles",
    "RoundTiming",
    "Transmission",
    "async_scheduler",
    "available",
    "bf16",
    "client_profiles",
    "codec_from_config",
    "fp16",
    "fp32",
    "job_times",
    "make_codec",
    "next_buffer",
    "qsgd",
    "random_k",
    "scheduler_from_config",
    "sign",
    "simulate_round",
    "staleness_weights",
    "start",
    "top_k",
    "transfer_times",
    "transmit",
    "versions_in_use",
    "with_error_feedback",
]
