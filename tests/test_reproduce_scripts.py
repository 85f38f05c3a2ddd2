"""Smoke runs of the reproduction scripts' ``--quick`` modes (in a subprocess).

The FedSAM (issue 3) and Byzantine (issue 5) parts also test the scripts' helpers and
check each --quick table against the run folders' own ``metrics.jsonl`` files, read
here independently.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # The cells' sweep folders go beside the table, not into the repository's runs/.
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--quick", "--out", str(out),
         "--out-dir", str(out.parent / "runs")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=590, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reproduce_compression_quick(tmp_path):
    out = tmp_path / "compression.md"
    proc = _run("reproduce_compression.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    d = 61 * 10  # logistic regression 60 -> 10
    # Bytes per message from the documented wire format (4 B header each).
    expected = {
        "fp32": 4 + 4 * d,
        "fp16": 4 + 2 * d,
        # one 4 B norm per bucket of 512 coordinates (the default bucket_size): 2 for d = 610
        "qsgd s=4": 4 + 4 * math.ceil(d / 512) + math.ceil(d * math.ceil(math.log2(2 * 4 + 1)) / 8),
        "top_k 1% + EF": 4 + 8 * math.ceil(0.01 * d),  # k float32 values + k int32 indices
        "random_k 10%": 4 + 4 * math.ceil(0.1 * d) + 8,  # values + an 8 B seed
        "sign": 4 + 4 + math.ceil(d / 8),
    }
    for codec, nbytes in expected.items():
        assert f"| {codec} | {nbytes} |" in text
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert len(runs) == 8
    fp32 = next(r for r in runs if r["name"] == "fp32")
    # 3 rounds × 10 clients, no stragglers in part A: every message is 4 + 4d bytes.
    assert fp32["curve"][-1]["bytes_up"] == 3 * 10 * expected["fp32"]
    drop = next(r for r in runs if r["name"] == "FedAvg (drop)")
    # round(0.9 × 10) = 9 of 10 participants are stragglers and are discarded.
    assert all(pt["clients"] <= 1 for pt in drop["curve"])
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reproduce_dpsat_quick(tmp_path):
    data = os.environ.get("FEDFLAT_DATA")
    if not data or not all(Path(data, p).exists() for p in ("mnist", "femnist")):
        pytest.skip("FEDFLAT_DATA with mnist/ and femnist/ is needed")
    out = tmp_path / "dpsat.md"
    proc = _run("reproduce_dpsat.py", out, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert {(r["setting"], r["mechanism"]) for r in runs} == {
        (s, m) for s in ("central", "femnist", "mnist_dir") for m in ("dp_sgd", "dp_sat")}
    for r in runs:
        assert 0.0 < r["epsilon_spent"] <= 3.0  # the calibrated budget is never exceeded
        assert 0.0 <= r["final_acc"] <= 1.0
    for s in ("central", "femnist", "mnist_dir"):
        # DP-SAT is accounted exactly as DP-SGD (ALGORITHMS.md §4.2): the same σ.
        sig = {r["sigma"] for r in runs if r["setting"] == s}
        assert len(sig) == 1
    text = out.read_text()
    assert all(f"| {s} | 3 |" in text for s in ("central", "femnist", "mnist_dir"))


# ======================================================================
# reproduce_fedsam.py (issue 3) and reproduce_byzantine.py (issue 5)
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import reproduce_byzantine as rb  # noqa: E402
import reproduce_fedsam as rf  # noqa: E402

from fedflat.sweep import cells  # noqa: E402
from fedflat.sweep.reuse import reusable  # noqa: E402

DATA = os.environ.get("FEDFLAT_DATA")


def _needs_data(*folders: str) -> None:
    if not DATA:
        pytest.skip("FEDFLAT_DATA is not set")
    missing = [f for f in folders if not Path(DATA, f).is_dir()]
    if missing:
        pytest.skip(f"FEDFLAT_DATA lacks {', '.join(missing)}")


# ---------------------------------------------------------------- table parsing
def parse_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in ``text`` as (header, rows)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, rule, *rows = block
            assert all(set(c) <= set("-:") for c in rule)
            tables.append((header, rows))
            block = []
    return tables


def first_number(cell: str) -> float:
    m = re.match(r"^-?\d+(\.\d+)?", cell)
    assert m, f"no number in cell {cell!r}"
    return float(m.group(0))


def seed_run(cell_dir: Path, seed: int) -> Path:
    """The run folder of ``seed`` in a cell's sweep folder, read from its sweep.json."""
    index = json.loads((cell_dir / "sweep.json").read_text())
    (point,) = index["points"]
    (run,) = [r for r in point["runs"] if r["seed"] == seed]
    return cell_dir / run["dir"]


def last_accuracy(run_dir: Path) -> float:
    """The run's final test accuracy, read straight from metrics.jsonl."""
    accs = [json.loads(line).get("test_accuracy")
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    accs = [a for a in accs if a is not None]
    assert accs, f"{run_dir} has no test accuracy"
    return accs[-1]


# ---------------------------------------------------------------- helpers (fast)
def test_presets_keep_the_reference_radii_and_sets_win() -> None:
    """The resolved scenarios carry ALGORITHMS.md §3.6 values; --set keys override."""
    base, over = rf.build_overrides("cifar10_a0.05", "fedasam_swa", 1, "default",
                                    data_dir="/nonexistent")
    sc = rf.resolved(base, over)
    assert sc["client"]["oracle"]["name"] == "asam"
    assert sc["client"]["oracle"]["rho"] == pytest.approx(0.7)
    assert sc["client"]["oracle"]["eta"] == pytest.approx(0.2)
    assert sc["server"]["swa"]["enabled"] is True
    assert sc["server"]["swa"]["start"] == pytest.approx(0.75)
    assert sc["server"]["swa"]["cycle"] == 10
    assert sc["data"]["partition"]["alpha"] == pytest.approx(0.05)
    assert sc["data"]["partition"]["alpha_scale"] == "total_mass"
    assert sc["seed"] == 1
    # λ_max only after the last round.
    assert sc["eval"]["sharpness"]["every"] == sc["server"]["rounds"]
    base, over = rf.build_overrides("femnist", "fedsam", 0, "default",
                                    {"client.oracle.rho": 0.02})
    assert rf.resolved(base, over)["client"]["oracle"]["rho"] == pytest.approx(0.02)
    base, over = rf.build_overrides("femnist", "fedavg", 0, "default")
    sc = rf.resolved(base, over)
    assert sc["client"]["oracle"]["name"] == "sgd"
    assert not sc["server"]["swa"]["enabled"]


def test_full_budget_is_the_paper_setting() -> None:
    """--full: the CIFAR-10 hyperparameters of ALGORITHMS.md §3.6."""
    base, over = rf.build_overrides("cifar10_a1", "fedsam", 0, "full")
    sc = rf.resolved(base, over)
    assert sc["client"]["lr"] == pytest.approx(0.01)
    assert sc["client"]["weight_decay"] == pytest.approx(4e-4)
    assert sc["client"]["batch_size"] == 64
    assert sc["server"]["clients_per_round"] == 5
    assert sc["data"]["num_clients"] == 100
    assert sc["server"]["rounds"] >= 1000
    assert sc["client"]["oracle"]["rho"] == pytest.approx(0.1)


def test_byzantine_overrides() -> None:
    """f = floor(0.2 * 25) = 5 Byzantine clients; bucketing s = 2; none = no attack."""
    base, over = rb.build_overrides("noniid", "krum", "on", "alie", 0, "default")
    sc = rf.resolved(base, over)
    assert sc["server"]["aggregation"]["rule"] == "krum"
    assert sc["server"]["aggregation"]["bucket_size"] == 2
    assert sc["server"]["aggregation"]["num_byzantine"] == 5
    assert math.floor(sc["attack"]["fraction"] * sc["data"]["num_clients"]) == 5
    assert sc["server"]["clients_per_round"] == sc["data"]["num_clients"] == 25
    assert sc["data"]["partition"]["method"] == "shards"
    base, over = rb.build_overrides("iid", "mean", "off", "none", 0, "default")
    sc = rf.resolved(base, over)
    assert sc["attack"]["kind"] == "none"
    assert sc["attack"]["fraction"] == 0.0
    assert sc["server"]["aggregation"]["bucket_size"] is None


def test_reuse_survives_schema_additions_but_not_changes(tmp_path: Path) -> None:
    """A completed run folder is reused when its stored scenario, loaded by the current
    schema, equals the wanted one (a block added later is filled with its defaults);
    a different value, or an unfinished run, is not reused."""
    base, over = rf.build_overrides("femnist", "fedsam", 0, "default",
                                    data_dir="/nonexistent")
    full = rf.resolved(base, over)
    stored = {k: v for k, v in full.items() if k not in ("attack", "comm")}
    assert stored != full  # the blocks really were dropped
    run = tmp_path / "run"
    run.mkdir()
    (run / "scenario.yaml").write_text(yaml.safe_dump(stored))
    from fedflat._version import code_revision

    done = {"status": "completed", "code_revision": code_revision()}
    (run / "summary.json").write_text(json.dumps(done))
    assert reusable(run, base, over)
    # output.* never changes a number: another plots setting still reuses.
    assert reusable(run, base, {**over, "output.plots": False})
    assert not reusable(run, base, {**over, "client.lr": 0.07})
    # A run made by other code is not reused: a table never mixes code revisions.
    (run / "summary.json").write_text(json.dumps({**done, "code_revision": "0" * 40}))
    assert not reusable(run, base, over)
    (run / "summary.json").write_text(json.dumps({**done, "status": "interrupted"}))
    assert not reusable(run, base, over)


def _fake_run(path: Path, seed: int, accs: list[float], lam: float) -> None:
    path.mkdir(parents=True)
    (path / "scenario.yaml").write_text(yaml.safe_dump({"name": "x", "seed": seed,
                                                        "model": {"name": "mlp"}}))
    lines = [{"round": i, "test_accuracy": a} for i, a in enumerate(accs)]
    lines[-1]["lambda_max"] = lam
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (path / "summary.json").write_text(json.dumps({"status": "completed", "name": "x"}))


def test_seed_cell_matches_numpy(tmp_path: Path) -> None:
    finals = [0.61, 0.65, 0.58]
    lams = [12.0, 9.5, 14.25]
    dirs = []
    for s, (f, lam) in enumerate(zip(finals, lams, strict=True)):
        d = tmp_path / f"seed{s}"
        _fake_run(d, s, [0.1, 0.9, f], lam)  # the best is not the final
        dirs.append(d)
    cell = cells.seed_cell(dirs)
    assert cell.n == 3
    assert cell.acc_mean == pytest.approx(np.mean(finals))
    assert cell.acc_std == pytest.approx(np.std(finals, ddof=1))
    assert cell.lambda_mean == pytest.approx(np.mean(lams))
    text = cells.fmt_acc(cell, 3)
    assert text == f"{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}"
    assert cells.fmt_acc(cells.seed_cell(dirs[:1]), 3).endswith("(n=1)")


def test_seed_cell_refuses_runs_that_differ_beyond_the_seed(tmp_path: Path) -> None:
    _fake_run(tmp_path / "a", 0, [0.5], 1.0)
    _fake_run(tmp_path / "b", 1, [0.5], 1.0)
    sc = yaml.safe_load((tmp_path / "b" / "scenario.yaml").read_text())
    sc["model"]["name"] = "cnn"
    (tmp_path / "b" / "scenario.yaml").write_text(yaml.safe_dump(sc))
    with pytest.raises(RuntimeError, match="more than their seed"):
        cells.seed_cell([tmp_path / "a", tmp_path / "b"])


def test_markdown_table_and_selection_parsing() -> None:
    rows_in = [["FedAvg", "0.5"], ["FedSAM (ρ=0.1)", "0.25"]]
    text = cells.markdown_table(["method", "acc"], rows_in)
    ((header, rows),) = parse_tables(text)
    assert header == ["method", "acc"]
    assert rows == rows_in
    picked = cells.parse_list("fedsam,scaffold", rf.METHODS, "method")
    assert picked == ["fedsam", "scaffold"]
    assert cells.parse_list("all", rf.METHODS, "method") == list(rf.METHODS)
    with pytest.raises(Exception, match="unknown method"):
        cells.parse_list("fedsma", rf.METHODS, "method")
    assert cells.parse_seeds("0,2") == [0, 2]
    assert cells.parse_sets(["client.lr=0.02", "model.hidden=[32]"]) == {
        "client.lr": 0.02, "model.hidden": [32]}


# ---------------------------------------------------------------- --quick end to end
def _run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=570, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fedsam_quick(tmp_path: Path) -> None:
    _needs_data("femnist", "cifar10")
    table = tmp_path / "fedsam.md"
    runs = tmp_path / "runs"
    proc = _run_script(
        "reproduce_fedsam.py", "--out-dir", str(runs), "--table", str(table))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = table.read_text()
    assert "Command: `python scripts/reproduce_fedsam.py --quick" in text
    assert text.strip() in proc.stdout  # printed as well
    ((header, rows),) = parse_tables(text)
    expected_cols = ["method"]
    for ds in rf.DATASETS:
        label = rf.DATASETS[ds]["label"]
        expected_cols += [f"{label} acc", f"{label} λ_max"]
    assert header == expected_cols
    assert [r[0] for r in rows] == [rf.METHOD_LABELS[m] for m in rf.METHODS]
    for method, row in zip(rf.METHODS, rows, strict=True):
        for j, ds in enumerate(rf.DATASETS):
            acc_cell, lam_cell = row[1 + 2 * j], row[2 + 2 * j]
            acc = first_number(acc_cell)
            assert 0.0 <= acc <= 1.0
            # One seed in --quick: the cell is that run's final accuracy.
            run_dir = seed_run(runs / "quick" / ds / method, 0)
            assert acc == pytest.approx(last_accuracy(run_dir), abs=5e-5)
            assert math.isfinite(first_number(lam_cell))

    # A second invocation reuses the completed run instead of training again.
    again = _run_script("reproduce_fedsam.py", "--out-dir", str(runs), "--table",
                        str(tmp_path / "again.md"), "--datasets", "femnist",
                        "--methods", "fedavg")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_byzantine_quick(tmp_path: Path) -> None:
    _needs_data("mnist")
    table = tmp_path / "byz.md"
    runs = tmp_path / "runs"
    proc = _run_script(
        "reproduce_byzantine.py", "--out-dir", str(runs), "--table", str(table))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = table.read_text()
    assert "Command: `python scripts/reproduce_byzantine.py --quick" in text
    assert "### non-IID" in text
    ((header, rows),) = parse_tables(text)  # --quick: the non-IID split only
    assert header == ["rule", *(rb.ATTACK_LABELS[a] for a in rb.ATTACKS)]
    expected_rows = []
    for rule in rb.RULES:
        label = rb.RULE_LABELS[rule]
        expected_rows += [label, label + " + bucketing s=2"]
    assert [r[0] for r in rows] == expected_rows
    for i, row in enumerate(rows):
        rule = rb.RULES[i // 2]
        folder = f"{rule}_b2" if i % 2 else rule
        for attack, cell in zip(rb.ATTACKS, row[1:], strict=True):
            acc = first_number(cell)
            assert 0.0 <= acc <= 1.0
            run_dir = seed_run(runs / "quick" / "noniid" / folder / attack, 0)
            assert acc == pytest.approx(last_accuracy(run_dir), abs=5e-5)
