"""Loopback deployment of a fedflat scenario on Flower: TLS, SuperNode authentication, 2 nodes.

What it does, all on 127.0.0.1 and inside one work folder:

1. generates a CA, a server certificate for 127.0.0.1/localhost and three SuperNode EC
   (P-384) key pairs in OpenSSH format, with the ``cryptography`` package;
2. starts ``flower-superlink`` with TLS and ``--enable-supernode-auth``;
3. registers two SuperNode public keys (``flwr supernode register``) and starts the two
   SuperNodes with ``--node-config "partition-id=K num-partitions=2"``;
4. writes a Flower app for a tiny 2-client scenario (``fedflat flower app``) and runs it with
   ``flwr run``; success means the run's status is ``finished:completed`` (``flwr ls``) AND the
   run folder holds every round in metrics.jsonl, a completed summary.json and the model;
5. starts a SuperNode with the third, unregistered key and checks the SuperLink refuses it;
6. stops every process it started, by process id (each runs in its own process group).

Prints one PASS/FAIL line per check and a summary; exits 0 only if all pass.

    python scripts/flower_deploy.py [--workdir DIR] [--rounds 3] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------- certificates
def _valid(builder: x509.CertificateBuilder, now: dt.datetime) -> x509.CertificateBuilder:
    """Valid from 5 minutes ago (clock skew) for one day: long enough for a loopback test."""
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=1))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it (EC P-256)."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (_valid(x509.CertificateBuilder(), now).subject_name(_name("fedflat loopback CA"))
          .issuer_name(_name("fedflat loopback CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_valid(x509.CertificateBuilder(), now).subject_name(_name("localhost"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 SuperNode key pair in OpenSSH format (what ssh-keygen -t ecdsa -b 384 writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    os.chmod(priv, 0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


# ---------------------------------------------------------------------- processes
class Procs:
    """Processes this script started; each leads its own process group (stopped by id)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}
        self.all: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.logs, start_new_session=True)
        self.started[name] = self.all[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, name: str) -> None:
        p = self.started.pop(name, None)
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(p.pid, sig)  # the group this script created for p (pgid == p.pid)
            except ProcessLookupError:
                return
            try:
                p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def flwr(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _json_out(text: str) -> dict:
    """The JSON object a `flwr ... --format json` call printed (skipping any log lines)."""
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else {}


# ---------------------------------------------------------------------- main
def tiny_scenario(rounds: int) -> dict:
    return {
        "name": "loopback", "seed": 5,
        "data": {"dataset": "synthetic", "num_clients": 2,
                 "synthetic": {"alpha": 1.0, "beta": 1.0, "max_size": 100}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 10, "local_epochs": 1},
        "server": {"rounds": rounds, "clients_per_round": 2},
        "runtime": {"threads": 1}, "eval": {"every": 1},
        "output": {"checkpoint_every": 0, "progress": False},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds for the run to finish")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedflat-deploy-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("tls", "keys", "logs", "flwr-home"):
        (work / sub).mkdir(exist_ok=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(work / "flwr-home")
    # The SuperLink starts flower-superexec through PATH.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    procs = Procs(work / "logs", env)
    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        checks.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""),
              flush=True)
        return ok

    t0 = time.perf_counter()
    try:
        deploy(args, work, env, procs, check)
    except Exception as exc:
        check("deployment script", False, f"{type(exc).__name__}: {exc}")
    finally:
        procs.stop_all()
        leftovers = [n for n, p in procs.all.items() if p.poll() is None]
        check(f"all {len(procs.all)} started processes stopped", not leftovers,
              ", ".join(leftovers))
    if not args.keep and args.workdir is None and all(ok for _, ok, _ in checks):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder (logs, certificates, run): {work}")
    return report(checks, t0)


def deploy(args: argparse.Namespace, work: Path, env: dict[str, str], procs: Procs,
           check: Callable[..., bool]) -> None:
    """The checks, in order; returns early when a step the rest needs fails."""
    tls = make_tls(work / "tls")
    keys = [make_node_key(work / "keys", f"supernode_{i}") for i in range(3)]
    port = free_port()
    (work / "flwr-home" / "config.toml").write_text(
        '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{tls["ca"]}"\n')

    sl = procs.start("superlink", [
        str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(tls["ca"]),
        "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]),
        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation", "--database", str(work / "state.db")])
    if not check("SuperLink up (TLS, SuperNode auth)", wait_port(port, 60, sl),
                 f"127.0.0.1:{port}"):
        print(procs.log("superlink")[-3000:])
        return

    for i in range(2):
        r = flwr(["supernode", "register", str(keys[i][1]), "loopback", "--format", "json"], env)
        check(f"register SuperNode {i} public key", r.returncode == 0 and
              _json_out(r.stdout).get("success", False), (r.stdout + r.stderr).strip()[-300:])

    node_ports = [free_port() for _ in range(3)]
    for i in range(2):
        procs.start(f"supernode_{i}", [
            str(BIN / "flower-supernode"), "--root-certificates", str(tls["ca"]),
            "--superlink", f"127.0.0.1:{port}", "--port", str(node_ports[i]),
            "--node-config", f"partition-id={i} num-partitions=2",
            "--auth-supernode-private-key", str(keys[i][0])])

    scen = work / "loopback.yaml"
    scen.write_text(yaml.safe_dump(tiny_scenario(args.rounds)))
    run_dir = work / "run"
    app = work / "loopback-app"
    if app.exists():
        shutil.rmtree(app)
    from fedflat.flower.app import write_app

    write_app(scen, app, out_dir=str(run_dir), node_timeout_s=60.0, reply_timeout_s=60.0)

    r = flwr(["run", str(app), "loopback", "--format", "json"], env, timeout=120)
    out = _json_out(r.stdout)
    run_id = out.get("run-id")
    if not check("flwr run submitted", r.returncode == 0 and bool(run_id),
                 f"run {run_id}" if run_id else (r.stdout + r.stderr).strip()[-500:]):
        return

    status, deadline = "", time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        ls = flwr(["ls", "loopback", "--run-id", str(run_id), "--format", "json"], env)
        runs = _json_out(ls.stdout).get("runs", [])
        status = runs[0].get("status", "") if runs else ""
        if status.startswith("finished"):
            break
        time.sleep(1.0)
    check("run status finished:completed (flwr ls)", status == "finished:completed", status)

    spath, mpath = run_dir / "summary.json", run_dir / "metrics.jsonl"
    summary = json.loads(spath.read_text()) if spath.exists() else {}
    lines = [json.loads(x) for x in mpath.read_text().splitlines()] if mpath.exists() else []
    lines = [m for m in lines if m["round"] >= 0]  # the first line evaluates the initial model
    check("summary.json: completed on the flower backend",
          summary.get("status") == "completed" and summary.get("backend") == "flower",
          f"status={summary.get('status')}, error={summary.get('error')}")
    ok_metrics = ([m["round"] for m in lines] == list(range(args.rounds))
                  and all(sorted(m["clients"]) == [0, 1] for m in lines)
                  and all(m.get("test_accuracy") is not None for m in lines))
    check(f"metrics.jsonl: {args.rounds} rounds, both clients each round, test accuracy",
          ok_metrics, f"{len(lines)} lines; final test accuracy "
          f"{lines[-1].get('test_accuracy') if lines else None}")
    check("final_model.pt written", (run_dir / "final_model.pt").is_file())

    # An unregistered key: the SuperLink must refuse the node.
    rogue = procs.start("supernode_unregistered", [
        str(BIN / "flower-supernode"), "--root-certificates", str(tls["ca"]),
        "--superlink", f"127.0.0.1:{port}", "--port", str(node_ports[2]),
        "--node-config", "partition-id=0 num-partitions=2", "--max-retries", "2",
        "--auth-supernode-private-key", str(keys[2][0])])
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and rogue.poll() is None:
        time.sleep(0.5)
    rogue_exit = rogue.poll()
    # The SuperLink's own account of the refusal (HTTP 412 on activate-node, ApiError 2004).
    link_says = "No SuperNode found with the given public key" in procs.log("superlink")
    nodes = flwr(["supernode", "list", "loopback", "--format", "json"], env)
    listed = _json_out(nodes.stdout).get("nodes", [])
    registered_ids = {str(n.get("node-id")) for n in listed}
    check("unregistered SuperNode refused",
          rogue_exit not in (None, 0) and link_says and len(registered_ids) == 2,
          f"node exit code {rogue_exit}, SuperLink logged the unknown key: {link_says}, "
          f"{len(registered_ids)} SuperNodes known to the SuperLink")


def report(checks: list[tuple[str, bool, str]], t0: float) -> int:
    failed = [n for n, ok, _ in checks if not ok]
    verdict = "PASS" if not failed and checks else "FAIL"
    tail = f"; failed: {', '.join(failed)}" if failed else ""
    print(f"\n{verdict}: {len(checks) - len(failed)}/{len(checks)} checks passed in "
          f"{time.perf_counter() - t0:.1f} s{tail}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
