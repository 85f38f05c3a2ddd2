"""Sweep --ray on a cluster fedflat did not start: the code travels in a Ray runtime_env."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import fedflat
from fedflat.sweep.launch import (
    _shipped_env,
    is_remote_address,
    run_shipped,
    sweep_runtime_env,
)

PACKAGE = Path(fedflat.__file__).resolve().parent


@pytest.mark.parametrize("address", [None, "", "auto", "local", "localhost:6379",
                                     "127.0.0.1:6379", "ray://127.0.0.1:10001", "[::1]:6379",
                                     f"{socket.gethostname()}:6379"])
def test_addresses_of_this_machine_ship_nothing(address):
    assert not is_remote_address(address)


@pytest.mark.parametrize("address", ["head.cluster.example:6379", "10.255.0.7:6379",
                                     "ray://head.cluster.example:10001", "[2001:db8::1]:6379"])
def test_other_hosts_get_the_package(address):
    assert is_remote_address(address)


def test_runtime_env_ships_the_package_folder_only():
    env = sweep_runtime_env()
    (module,) = env["py_modules"]
    assert Path(module) == PACKAGE
    assert (Path(module) / "__init__.py").is_file()
    # results/ and run folders live beside the package, never inside what travels.
    assert not (Path(module) / "results").exists()
    assert not (Path(module) / "runs").exists()
    assert "__pycache__" in env["excludes"]


def test_remote_runs_keep_fedflat_settings_not_the_drivers_paths():
    env = {"PATH": "/driver/bin", "HOME": "/home/driver", "PYTHONPATH": "/driver/checkout",
           "FEDFLAT_DATA": "/data", "PYTHONUNBUFFERED": "1", "RAY_foo": "1"}
    assert _shipped_env(env) == {"FEDFLAT_DATA": "/data", "PYTHONUNBUFFERED": "1",
                                 "RAY_foo": "1"}


def test_shipped_task_imports_the_package_it_runs_in(tmp_path):
    """run_shipped runs the node's interpreter with the fedflat the task itself imported
    first on PYTHONPATH, whatever PYTHONPATH the node had."""
    log = tmp_path / "run.log"
    code = "import fedflat, pathlib; print(pathlib.Path(fedflat.__file__).resolve().parent)"
    rc = run_shipped(["-c", code], str(log), {"PYTHONUNBUFFERED": "1"})
    assert rc == 0
    assert Path(log.read_text().strip()) == PACKAGE


_SHIP = """
import os, sys
import ray
from fedflat.sweep.launch import run_shipped, sweep_runtime_env
copy, log = sys.argv[1], sys.argv[2]
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env=sweep_runtime_env(copy))
code = ("import fedflat, pathlib; p = pathlib.Path(fedflat.__file__).resolve().parent; "
        "print(p, (p / 'SHIPPED_MARKER').exists())")
task = ray.remote(num_cpus=1, max_retries=0)(run_shipped)
print("rc", ray.get(task.remote(["-c", code], log, {}), timeout=120))
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_ray_job_with_the_runtime_env_runs_the_shipped_copy(tmp_path):
    """A marked copy of the package, shipped through sweep_runtime_env (a Ray of its own in a
    subprocess, as a driver joining a cluster has), is what each task's run imports: Ray
    unpacks it on the node, and neither the copy's path nor the checkout's is used."""
    copy = tmp_path / "ship" / "fedflat"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "SHIPPED_MARKER").write_text("x")
    log = tmp_path / "task.log"
    proc = subprocess.run([sys.executable, "-c", _SHIP, str(copy), str(log)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
                          capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rc 0" in proc.stdout
    where, marked = log.read_text().split()
    assert marked == "True"
    assert Path(where) not in (copy, PACKAGE)
