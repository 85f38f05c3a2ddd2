"""What happens during and after a run: divergence, progress off a terminal, the two training
losses and the initial model's line, resume and report on damaged run folders (real
subprocesses where it is a CLI behaviour)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, tiny_scenario

import fedflat
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.runtime.checkpoint import list_checkpoints
from fedflat.runtime.driver import EXIT_DIVERGED, divergence
from fedflat.scenario import load_scenario


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def cli(*args: str, cwd: Path, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedflat.cli", *args], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=_env(), cwd=cwd, timeout=300)


def write_scenario(path: Path, sc: dict) -> Path:
    path.write_text(yaml.safe_dump(sc))
    return path


def lines_of(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------- divergence
def test_divergence_rule():
    initial = {"round": -1, "test_loss": 2.0}
    assert divergence({"round": 3, "client_train_loss": 150.0}, initial, 100.0) is None
    msg = divergence({"round": 3, "client_train_loss": 201.0}, initial, 100.0)
    assert msg is not None
    assert msg.startswith("round 3: client_train_loss")
    assert "divergence_factor" in msg
    assert "round 4" in divergence({"round": 4, "test_loss": math.nan}, initial, 100.0)
    assert divergence({"round": 4, "client_train_loss": math.inf}, initial, 100.0) is not None
    assert divergence({"round": 4, "update_norm": math.nan}, initial, 100.0) is not None
    # an empty Poisson cohort has no client loss (NaN): not a divergence
    assert divergence({"round": 5, "client_train_loss": math.nan, "update_norm": 0.0},
                      initial, 100.0) is None
    # without an initial evaluation only non-finite values count
    assert divergence({"round": 1, "client_train_loss": 1e9}, {}, 100.0) is None
    assert divergence({"round": 1, "test_loss": math.inf}, initial, None) is None


def test_exploding_run_ends_diverged_and_keeps_its_checkpoints(tmp_path):
    # Round 0 trains normally; the server step of 1e5 times its update throws the model far
    # away, so round 1's clients start from an exploded model.
    sc = tiny_scenario(**{"server.lr": 1e5, "server.rounds": 6, "output.keep_checkpoints": 5,
                          "output.plots": False})
    out = tmp_path / "run"
    proc = cli("run", str(write_scenario(tmp_path / "s.yaml", sc)), "--out", str(out),
               cwd=tmp_path)
    assert proc.returncode == EXIT_DIVERGED == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    said = [x for x in proc.stderr.splitlines() if x.startswith("diverged:")]
    assert len(said) == 1
    assert "round 1:" in said[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["diverged"].startswith("round 1:")
    assert summary["rounds_completed"] == 2
    initial, *rounds = lines_of(out)
    assert [m["round"] for m in rounds] == [0, 1]  # the diverged round's line is written
    assert rounds[1]["client_train_loss"] > 100 * initial["test_loss"]
    assert rounds[0]["client_train_loss"] < 100 * initial["test_loss"]
    # the checkpoint before it (after round 0) is kept, none of the diverged model
    assert [p.name for p in list_checkpoints(out)] == ["round_000001.pt"]
    assert not (out / "final_model.pt").exists()
    assert f"{out}/checkpoints/round_000001.pt" in said[0]


# ---------------------------------------------------------------------------- progress
def test_progress_off_a_terminal_is_plain_lines(tmp_path):
    sc = tiny_scenario(**{"server.rounds": 4, "output.progress_every": 2, "output.plots": False,
                          "output.progress": True})
    out = tmp_path / "run"
    proc = cli("run", str(write_scenario(tmp_path / "s.yaml", sc)), "--out", str(out),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr  # no tqdm frames in a log
    progress = [x for x in proc.stderr.splitlines() if x.startswith("tiny: ")]
    assert [x.split(",")[0] for x in progress] == ["tiny: 2/4 rounds", "tiny: 4/4 rounds"]
    rounds = lines_of(out)[1:]
    # round index 1 (the second round) is evaluated with eval.every 2
    assert f"test accuracy {rounds[1]['test_accuracy']:.4f} (round 1)" in progress[0]
    assert f"client_train_loss {rounds[3]['client_train_loss']:.4f}" in progress[1]
    # the reported time counts what happens before round 0 (model, backend, round -1 line)
    summary = json.loads((out / "summary.json").read_text())
    initial = lines_of(out)[0]
    assert initial["wall_seconds"] > 0
    assert summary["wall_seconds"] >= initial["wall_seconds"] + sum(
        m["round_seconds"] for m in rounds)


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    sc = tiny_scenario(**{"server.rounds": 4, "output.progress_every": 1, "output.plots": False})
    path = write_scenario(tmp_path / "s.yaml", sc)
    master, slave = pty.openpty()
    # 24 x 100 characters: a terminal of width 0 would give tqdm no room to draw
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fedflat.cli", "run", str(path), "--out",
                             str(tmp_path / "run")], stdout=subprocess.DEVNULL, stderr=slave,
                            env=_env(), cwd=tmp_path)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "4/4" in text  # the bar, full
    assert "\r" in text.replace("\r\n", "")  # redrawn in place
    assert "tiny: 1/4 rounds," not in text  # no plain lines on a terminal


# ---------------------------------------------------------------------------- the two losses
def test_client_and_global_train_loss_are_named_apart_and_round_minus_one_is_the_initial_model(
        tmp_path):
    sc = tiny_scenario(**{"eval.split": "both", "eval.every": 1, "server.rounds": 2,
                          "output.plots": False})
    res = fedflat.run(sc, out=tmp_path / "run")
    initial, *rounds = lines_of(res.run_dir)
    assert initial == res.initial
    assert initial["round"] == -1
    # By hand: the initial logistic model's cross-entropy on the pooled train split and on
    # the test split, from the flat vector's own segments.
    loaded = load_scenario(sc)
    fed = build_data(loaded.scenario)
    model = build_flat_model(loaded.scenario, fed.dataset)
    w0 = initial_params(loaded.scenario, model)
    parts = {s.name.rsplit(".", 1)[-1]: w0[s.slice].view(s.shape) for s in model.segments}
    ds = fed.dataset
    pool = torch.cat([torch.as_tensor(ix) for ix in fed.client_indices])
    for x, y, key in ((ds.x_train[pool], ds.y_train[pool], "global_train"),
                      (ds.x_test, ds.y_test, "test")):
        logits = x.double() @ parts["weight"].double().T + parts["bias"].double()
        assert initial[f"{key}_loss"] == pytest.approx(float(F.cross_entropy(logits, y)),
                                                       rel=1e-5)
        acc = float((logits.argmax(1) == y).double().mean())
        assert initial[f"{key}_accuracy"] == pytest.approx(acc, abs=1.0 / len(y))
    for m in rounds:
        assert "train_loss" not in m
        assert math.isfinite(m["client_train_loss"])
        # two quantities: the cohort's loss while training from the round's start model,
        # the global model after the round on every client's data
        assert m["client_train_loss"] != m["global_train_loss"]
    assert res.metrics == rounds


# ---------------------------------------------------------------------------- resume and report
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A finished 4-round run with a checkpoint after every round (4 kept)."""
    base = tmp_path_factory.mktemp("finished")
    sc = tiny_scenario(**{"output.keep_checkpoints": 4, "output.plots": False})
    res = fedflat.run(sc, out=base / "run")
    return res.run_dir, res.params


def copy_run(finished: tuple[Path, torch.Tensor], dest: Path, *, rewind_to: int | None = None
             ) -> Path:
    """A copy of the finished run; ``rewind_to``: as if killed after that many rounds."""
    run = shutil.copytree(finished[0], dest)
    if rewind_to is not None:
        for p in list_checkpoints(run):
            if int(p.stem.split("_")[1]) > rewind_to:
                p.unlink()
        (run / "final_model.pt").unlink()
        json_summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**json_summary, "status": "running"}))
    return run


def test_resume_skips_an_unreadable_checkpoint_with_a_warning(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run", rewind_to=3)
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:200])  # truncated by a full disk
    proc = cli("resume", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert len(warned) == 1
    assert str(newest) in warned[0]
    assert "round_000002.pt" in warned[0]  # the previous good one it goes on from
    assert torch.equal(torch.load(run / "final_model.pt"), finished[1])


def test_resume_refuses_when_no_checkpoint_is_readable(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run", rewind_to=2)
    for p in list_checkpoints(run):
        p.write_bytes(b"not a checkpoint")
    proc = cli("resume", str(run), cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1
    assert "no readable checkpoint" in errors[0]


def test_resume_refuses_a_hand_edited_scenario(tmp_path, finished):
    run = copy_run(finished, tmp_path / "edited", rewind_to=2)
    text = (run / "scenario.yaml").read_text()
    (run / "scenario.yaml").write_text(text.replace("lr: 0.05", "lr: 0.5", 1))
    line = one_error_line(cli("resume", str(run), cwd=tmp_path))
    assert "scenario.yaml" in line
    assert "client.lr: 0.05 -> 0.5" in line


def test_resume_refuses_a_truncated_scenario(tmp_path, finished):
    run = copy_run(finished, tmp_path / "truncated", rewind_to=2)
    raw = (run / "scenario.yaml").read_text()
    (run / "scenario.yaml").write_text(raw[: raw.index("model:")] + "model: [unclosed\n")
    line = one_error_line(cli("resume", str(run), cwd=tmp_path))
    assert "scenario.yaml:" in line
    assert "YAML syntax error" in line


def test_resume_repairs_a_torn_metrics_line(tmp_path, finished):
    run = copy_run(finished, tmp_path / "torn", rewind_to=2)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "clients": [1, ')  # killed mid-write
    proc = cli("resume", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [m["round"] for m in lines_of(run)] == [-1, 0, 1, 2, 3]
    assert torch.equal(torch.load(run / "final_model.pt"), finished[1])


def test_resume_rewrites_a_missing_final_model(tmp_path, finished):
    run = copy_run(finished, tmp_path / "nofinal")
    (run / "final_model.pt").unlink()
    proc = cli("resume", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final_model.pt is missing" in proc.stderr
    assert torch.equal(torch.load(run / "final_model.pt"), finished[1])
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(("command", "folder", "expected"), [
    ("resume", "junk", "not a run folder"),
    ("report", "junk", "not a run folder"),
    ("resume", "nowhere", "does not exist"),
])
def test_resume_and_report_on_a_folder_that_is_not_a_run(tmp_path, command, folder, expected):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    line = one_error_line(cli(command, str(tmp_path / folder), cwd=tmp_path))
    assert expected in line
    assert str(tmp_path / folder) in line


def test_report_warns_about_a_torn_last_line_and_ignores_it(tmp_path, finished):
    run = copy_run(finished, tmp_path / "run")
    n = len(lines_of(run))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 4, "clie')
    proc = cli("report", str(run), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warned = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    assert len(warned) == 1
    assert f"metrics.jsonl:{n + 1}: torn last line" in warned[0]
    assert "completed" in proc.stdout
