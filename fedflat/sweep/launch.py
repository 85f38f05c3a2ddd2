"""How a sweep starts its runs: local subprocesses (default) or Ray tasks (``--ray``).

Either way each run is the same ``fedflat run`` / ``fedflat resume`` command in its own
process, writing into its run folder, so resuming, the tables and kill -9 behave the same.
A Ray task only starts that command on whichever node Ray picks (the local machine, or the
cluster of ``runtime.address``; the sweep folder must then be on a file system every node
sees) and waits for it. ``--jobs`` bounds the tasks in flight.

A cluster fedflat did not start (a ``runtime.address`` naming another host) need not have
fedflat installed: the driver joins it with a Ray ``runtime_env`` whose ``py_modules`` is this
fedflat package (``sweep_runtime_env``), so each task imports the driver's code, and the task
starts its run with the node's own interpreter and that copy on ``PYTHONPATH``. The package
folder alone travels (never ``results/`` or run folders, which live beside it); byte-code
caches are excluded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

_POLL_S = 0.05
#: Addresses that reach a Ray on this machine, which sees this checkout already.
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0")
#: What a shipped package leaves out: caches only change load time, never a number.
SHIPPED_EXCLUDES: tuple[str, ...] = ("__pycache__", "*.pyc", "*.pyo")


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


class InlineLauncher:
    """Each run in this process, one after another (``start`` returns when the run ends):
    the same ``fedflat run`` / ``resume`` command through ``fedflat.commands.run_core``, without a
    fresh interpreter's imports (several seconds of CPU per run, which dominate small runs).
    One run at a time and from the main thread only (a run installs signal handlers); a
    crash of one run is a crash of the caller, which is why sweeps default to subprocesses."""

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> int:
        import contextlib

        from fedflat.commands import run_core

        args = cmd[cmd.index("fedflat.cli") + 1:]
        with open(log, "a") as fh, contextlib.redirect_stdout(fh), \
                contextlib.redirect_stderr(fh):
            try:
                return int(run_core(args) or 0)
            except SystemExit as exc:  # argparse
                return exc.code if isinstance(exc.code, int) else 1
            except Exception as exc:  # the log says why, as a child's traceback would
                print(f"error: {type(exc).__name__}: {exc}")
                return 1

    def poll(self, handle: int) -> int | None:
        return handle

    def interrupt(self, handles: list[int]) -> None:
        pass  # nothing runs between calls

    def close(self) -> None:
        pass


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


def is_remote_address(address: str | None) -> bool:
    """Whether ``address`` names a Ray cluster on another host: ``ray://...`` or ``HOST:PORT``
    with a host other than this machine's; ``None``, ``auto`` and ``local`` are local."""
    if address is None or address.strip() in ("", "auto", "local"):
        return False
    host = address.strip().split("://", 1)[-1].split("/", 1)[0]
    if host.startswith("[") and "]" in host:  # [::1]:6379
        host = host[1:host.index("]")]
    elif host.count(":") == 1:  # HOST:PORT (a bare IPv6 address has more colons)
        host = host.split(":", 1)[0]
    own = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        own.add(socket.gethostbyname(socket.gethostname()))
    return host not in (*_LOCAL_HOSTS, *own)


def sweep_runtime_env(package_dir: str | Path | None = None) -> dict[str, Any]:
    """The Ray ``runtime_env`` that ships fedflat to a cluster: ``py_modules`` = the package
    folder (default: the fedflat this process imports), caches excluded."""
    if package_dir is None:
        import fedflat

        package_dir = Path(fedflat.__file__).resolve().parent
    return {"py_modules": [str(Path(package_dir))], "excludes": list(SHIPPED_EXCLUDES)}


def run_shipped(args: list[str], log: str, env: dict[str, str]) -> int:
    """The body of a Ray task on a cluster that got fedflat through ``runtime_env``: the
    node's interpreter runs ``args``, with the node's environment plus ``env`` and the
    shipped package first on ``PYTHONPATH`` (the driver's paths mean nothing there)."""
    import fedflat

    root = str(Path(fedflat.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    full = {**os.environ, **env,
            "PYTHONPATH": root + (os.pathsep + path if path else "")}
    return run_command([sys.executable, *args], log, full)


def _shipped_env(env: dict[str, str]) -> dict[str, str]:
    """What of the driver's environment a remote run needs: fedflat's and Ray's settings
    (the rest, such as PATH or HOME, belongs to the node)."""
    keep = ("FEDFLAT_", "RAY_", "PYTHONUNBUFFERED", "CUBLAS_", "OMP_NUM_THREADS")
    return {k: v for k, v in env.items() if k.startswith(keep)}


class RayLauncher:
    """Each run as a Ray task of one CPU; joins ``address`` or starts a local Ray. A remote
    ``address`` (``is_remote_address``) is joined with ``sweep_runtime_env``."""

    def __init__(self, address: str | None, jobs: int) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover - ray is a dependency
            from fedflat.errors import FedflatError

            raise FedflatError("--ray needs the ray package") from None
        self.ray = ray
        self._started = False
        self.shipped = is_remote_address(address)
        if not ray.is_initialized():
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as the Ray backend
            if address is not None:
                ray.init(address=address, log_to_driver=False,
                         runtime_env=sweep_runtime_env() if self.shipped else None)
            else:
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            self._started = True
        body = run_shipped if self.shipped else run_command
        self._task = ray.remote(num_cpus=1, max_retries=0)(body)

    def start(self, cmd: list[str], log: Path, env: dict[str, str]) -> Any:
        if self.shipped:  # cmd[0] is this machine's interpreter: the node uses its own
            return self._task.remote(cmd[1:], str(log), _shipped_env(env))
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
