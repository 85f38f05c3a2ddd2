"""How a sweep starts its runs: local subprocesses (default) or Ray tasks (``--ray``).

Either way each run is the same ``fedflat run`` / ``fedflat resume`` command in its own
process, writing into its run folder, so resuming, the tables and kill -9 behave the same.
A Ray task only starts that command on whichever node Ray picks (the local machine, or the
cluster of ``runtime.address``; the sweep folder must then be on a file system every node
sees, and fedflat importable there) and waits for it. ``--jobs`` bounds the tasks in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

_POLL_S = 0.05


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: deliver SIGKILL to this child when the sweep process dies."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the sweep died before prctl took effect
        os._exit(1)


def _preexec() -> Any:
    return _die_with_parent if sys.platform.startswith("linux") else None


class Launcher(Protocol):
    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> Any: ...
    def poll(self, handle: Any) -> int | None: ...
    def interrupt(self, handles: list[Any]) -> None: ...
    def close(self) -> None: ...


class SubprocessLauncher:
    """One child process per run, bound to the sweep (it dies with it on Linux)."""

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=_preexec())

    def poll(self, handle: subprocess.Popen[bytes]) -> int | None:
        return handle.poll()

    def interrupt(self, handles: list[subprocess.Popen[bytes]]) -> None:
        # The terminal's Ctrl-C reached the runs too; a signal to the sweep alone is passed
        # on, so that each run checkpoints at its round boundary.
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline and any(p.poll() is None for p in handles):
            time.sleep(_POLL_S)
        for proc in handles:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in handles:
            proc.wait()

    def close(self) -> None:
        pass


def run_command(cmd: list[str], log: str, env: dict[str, str]) -> int:
    """The body of a Ray task: run one command to its end; a cancelled task passes SIGINT
    on, so the run checkpoints at its round boundary (exit status 130)."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=_preexec())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


class RayLauncher:
    """Each run as a Ray task of one CPU; joins ``address`` or starts a local Ray."""

    def __init__(self, address: str | None, jobs: int) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            from fedflat.errors import FedflatError

            raise FedflatError("--ray needs the ray package") from None
        self.ray = ray
        self._started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as the Ray backend
            if address is not None:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            self._started = True
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_command)

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> Any:
        return self._task.remote(cmd, str(log), env)

    def poll(self, handle: Any) -> int | None:
        ready, _ = self.ray.wait([handle], timeout=0)
        return int(self.ray.get(ready[0])) if ready else None

    def interrupt(self, handles: list[Any]) -> None:
        for ref in handles:
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: SIGINT to its run
        for ref in handles:
            try:
                self.ray.get(ref, timeout=60)
            except Exception:  # cancelled tasks report TaskCancelledError
                continue

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
