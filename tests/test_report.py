"""fedflat.report: run folders written by hand with known numbers, and one real run."""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedflat.errors import FedflatError
from fedflat.report.cli import register
from fedflat.report.plots import PLOTS, plot_run, plot_runs
from fedflat.report.tables import (
    aggregate_seeds,
    comparison_table,
    load_run,
    run_labels,
    run_row,
    seed_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_STEMS = {p.stem for p in PLOTS}


def base_scenario(name: str = "fedavg", seed: int = 0, lr: float = 0.1,
                  out_dir: str = "runs") -> dict:
    return {
        "name": name,
        "seed": seed,
        "data": {"dataset": "synthetic", "num_clients": 10},
        "client": {"lr": lr, "batch_size": 10},
        "server": {"rounds": 6, "clients_per_round": 4},
        "output": {"dir": out_dir, "checkpoint_every": 10, "progress": None},
    }


def write_run(
    folder: Path,
    *,
    scenario: dict,
    metrics: list[dict],
    summary: dict,
    trailing: str = "",
) -> Path:
    folder.mkdir(parents=True)
    (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + trailing)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "clients.json").write_text(json.dumps({"num_clients": 10, "clients": []}))
    return folder


def full_metrics(accs: dict[int, float], rounds: int = 6) -> list[dict]:
    """Every optional metric: evaluated at the rounds in ``accs``; 1000 B up and 4000 B down
    per round, 2.5 simulated seconds per round, ε growing by 0.5 per round."""
    out = []
    for t in range(rounds):
        rec = {
            "round": t,
            "clients": [0, 1, 2, 3],
            "client_train_loss": 2.0 / (t + 1),
            "round_seconds": 0.1,
            "wall_seconds": 0.1 * (t + 1),
            "sim_seconds": 2.5 * (t + 1),
            "bytes_up": 1000,
            "bytes_down": 4000,
            "bytes_up_total": 1000 * (t + 1),
            "bytes_down_total": 4000 * (t + 1),
            "epsilon_user": 0.5 * (t + 1),
            "lambda_max": 10.0 + t,
        }
        if t in accs:
            rec["test_accuracy"] = accs[t]
            rec["test_loss"] = 1.0 - accs[t]
            rec["global_train_loss"] = 0.9 - accs[t]
        out.append(rec)
    return out


def minimal_metrics(accs: dict[int, float | None], rounds: int = 6) -> list[dict]:
    """Only the keys the runtime always writes; test accuracy where given."""
    out = []
    for t in range(rounds):
        rec = {"round": t, "clients": [0, 1], "client_train_loss": 1.0 / (t + 1),
               "round_seconds": 0.01, "wall_seconds": 0.01 * (t + 1)}
        if t in accs:
            rec["test_accuracy"] = accs[t]
            rec["test_loss"] = None if accs[t] is None else 2.0
        out.append(rec)
    return out


def summary_for(name: str, status: str = "completed", wall: float = 12.5, **extra) -> dict:
    return {"status": status, "name": name, "rounds_planned": 6, "rounds_completed": 6,
            "wall_seconds": wall, **extra}


def table_line(table: str, label: str) -> str:
    lines = [ln for ln in table.splitlines() if ln.lstrip("| ").startswith(label)]
    assert len(lines) == 1, table
    return lines[0]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk (PNG spec: bytes 16..24, big-endian)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------- tables
def test_table_numbers_from_hand_written_run(tmp_path):
    accs = {1: 0.5, 3: 0.8, 5: 0.7}  # best at round 3, final at round 5
    rec = load_run(write_run(tmp_path / "a", scenario=base_scenario("fedsam"),
                             metrics=full_metrics(accs), summary=summary_for("fedsam")))
    row = run_row(rec)
    assert row["name"] == "fedsam"
    assert row["status"] == "completed"
    assert row["rounds"] == 6
    assert row["final_accuracy"] == pytest.approx(0.7)
    assert row["best_accuracy"] == pytest.approx(0.8)
    assert row["final_test_loss"] == pytest.approx(0.3)
    assert row["wall_seconds"] == pytest.approx(12.5)  # from summary.json
    assert row["sim_seconds"] == pytest.approx(15.0)  # 6 rounds x 2.5 s
    assert row["total_bytes"] == pytest.approx(6 * 5000)
    assert row["epsilon"] == pytest.approx(3.0)

    table = comparison_table([rec])
    header = table.splitlines()[0]
    for col in ("run", "status", "rounds", "final acc", "best acc", "test loss", "wall s",
                "sim s", "bytes", "ε"):
        assert col in header
    line = table_line(table, "fedsam")
    for text in ("completed", "0.7000", "0.8000", "0.3000", "12.5", "15.0", "30 kB", "3"):
        assert text in line


def test_per_round_bytes_are_summed_without_totals(tmp_path):
    metrics = minimal_metrics({5: 0.6})
    for t, m in enumerate(metrics):
        m["bytes_up"] = 100 * (t + 1)  # 100 + 200 + ... + 600 = 2100
    rec = load_run(write_run(tmp_path / "r", scenario=base_scenario(), metrics=metrics,
                             summary=summary_for("fedavg")))
    assert run_row(rec)["total_bytes"] == pytest.approx(2100)


def test_optional_columns_only_when_some_run_has_them(tmp_path):
    plain = load_run(write_run(tmp_path / "p", scenario=base_scenario("plain"),
                               metrics=minimal_metrics({5: 0.6}), summary=summary_for("plain")))
    header = comparison_table([plain]).splitlines()[0]
    assert "sim s" not in header
    assert "bytes" not in header
    assert "ε" not in header
    rich = load_run(write_run(tmp_path / "r", scenario=base_scenario("rich"),
                              metrics=full_metrics({5: 0.9}), summary=summary_for("rich")))
    table = comparison_table([plain, rich])
    assert "ε" in table.splitlines()[0]
    # The run without them shows a dash in those columns, not a zero.
    assert table_line(table, "plain").rstrip().endswith("–")


def test_markdown_table_shape(tmp_path):
    recs = [load_run(write_run(tmp_path / n, scenario=base_scenario(n),
                               metrics=minimal_metrics({5: 0.6}), summary=summary_for(n)))
            for n in ("one", "two", "three")]
    lines = comparison_table(recs, markdown=True).splitlines()
    assert len(lines) == 2 + 3
    assert all(ln.startswith("|") and ln.endswith("|") for ln in lines)
    n_cols = lines[0].count("|") - 1
    assert all(ln.count("|") - 1 == n_cols for ln in lines)
    assert set(lines[1]) <= set("|-:")


def test_summary_used_when_metrics_have_no_accuracy(tmp_path):
    rec = load_run(write_run(tmp_path / "s", scenario=base_scenario(), metrics=minimal_metrics({}),
                             summary=summary_for("fedavg", final_test_accuracy=0.42,
                                                 best_test_accuracy=0.5)))
    row = run_row(rec)
    assert (row["final_accuracy"], row["best_accuracy"]) == (0.42, 0.5)


def test_null_and_unevaluated_rounds_are_skipped(tmp_path):
    # The runtime writes NaN as null; a null accuracy is no measurement.
    rec = load_run(write_run(tmp_path / "n", scenario=base_scenario(),
                             metrics=minimal_metrics({1: 0.3, 4: 0.6, 5: None}),
                             summary=summary_for("fedavg")))
    row = run_row(rec)
    assert row["final_accuracy"] == pytest.approx(0.6)
    assert row["best_accuracy"] == pytest.approx(0.6)


def test_running_run_takes_wall_time_from_metrics(tmp_path):
    rec = load_run(write_run(tmp_path / "r", scenario=base_scenario(), metrics=minimal_metrics({}),
                             summary=summary_for("fedavg", status="running", wall=0.0)))
    assert run_row(rec)["wall_seconds"] == pytest.approx(0.06)


def test_labels_disambiguate_colliding_names(tmp_path):
    a = load_run(write_run(tmp_path / "fedavg" / "stamp1", scenario=base_scenario(),
                           metrics=minimal_metrics({5: 0.5}), summary=summary_for("fedavg")))
    b = load_run(write_run(tmp_path / "fedavg" / "stamp2", scenario=base_scenario(seed=1),
                           metrics=minimal_metrics({5: 0.6}), summary=summary_for("fedavg")))
    c = load_run(write_run(tmp_path / "fedsam" / "stamp1", scenario=base_scenario("fedsam"),
                           metrics=minimal_metrics({5: 0.7}), summary=summary_for("fedsam")))
    assert run_labels([a, b, c]) == ["fedavg (stamp1)", "fedavg (stamp2)", "fedsam"]
    # Same folder name under different parents: the parent tells them apart.
    d = load_run(write_run(tmp_path / "other" / "stamp1", scenario=base_scenario(),
                           metrics=minimal_metrics({5: 0.5}), summary=summary_for("fedavg")))
    assert run_labels([a, d]) == ["fedavg (fedavg/stamp1)", "fedavg (other/stamp1)"]


# ---------------------------------------------------------------------------- seeds
def test_aggregate_seeds_matches_numpy(tmp_path):
    finals = {0: 0.61, 1: 0.67, 2: 0.58}
    bests = {0: 0.70, 1: 0.69, 2: 0.66}
    recs = []
    for seed in (2, 0, 1):  # out of order on purpose
        # Different output folders and output settings must not split the group.
        sc = base_scenario("fedsam", seed=seed, out_dir=f"runs/seed{seed}")
        sc["output"]["checkpoint_every"] = seed + 1
        accs = {2: bests[seed], 5: finals[seed]}
        recs.append(load_run(write_run(tmp_path / f"s{seed}", scenario=sc,
                                       metrics=minimal_metrics(accs),
                                       summary=summary_for("fedsam"))))
    other = load_run(write_run(tmp_path / "lr", scenario=base_scenario("fedsam", lr=0.05),
                               metrics=minimal_metrics({5: 0.9}), summary=summary_for("fedsam")))
    groups = aggregate_seeds([*recs, other])
    assert len(groups) == 2
    g, h = groups
    assert g.seeds == (0, 1, 2)
    f = np.array([finals[s] for s in (0, 1, 2)])
    b = np.array([bests[s] for s in (0, 1, 2)])
    assert g.final_mean == pytest.approx(np.mean(f))
    assert g.final_std == pytest.approx(np.std(f, ddof=1))
    assert g.best_mean == pytest.approx(np.mean(b))
    assert g.best_std == pytest.approx(np.std(b, ddof=1))
    assert len(h.records) == 1
    assert h.final_mean == pytest.approx(0.9)
    assert math.isnan(h.final_std)
    # Same name, different configuration: the labels tell the groups apart.
    assert g.label != h.label

    pop = aggregate_seeds(recs, ddof=0)[0]
    assert pop.final_std == pytest.approx(np.std(f, ddof=0))

    table = seed_table(groups)
    assert f"{np.mean(f):.4f} ± {np.std(f, ddof=1):.4f}" in table
    assert "0,1,2" in table


def test_aggregate_seeds_skips_runs_without_accuracy(tmp_path):
    recs = [load_run(write_run(tmp_path / f"s{s}", scenario=base_scenario(seed=s),
                               metrics=minimal_metrics(acc), summary=summary_for("fedavg")))
            for s, acc in ((0, {5: 0.4}), (1, {5: 0.6}), (2, {}))]
    (g,) = aggregate_seeds(recs)
    assert len(g.records) == 3
    assert g.n_measured == 2
    assert g.final_mean == pytest.approx(0.5)
    assert g.final_std == pytest.approx(np.std([0.4, 0.6], ddof=1))


def test_aggregate_seeds_rejects_negative_ddof():
    with pytest.raises(ValueError, match="ddof"):
        aggregate_seeds([], ddof=-1)


# ---------------------------------------------------------------------------- errors
def test_non_run_folder_names_missing_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FedflatError, match=r"scenario\.yaml"):
        load_run(empty)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "scenario.yaml").write_text("name: x\n")
    (partial / "summary.json").write_text("{}")
    with pytest.raises(FedflatError, match=r"metrics\.jsonl") as info:
        load_run(partial)
    assert "scenario.yaml" not in str(info.value)
    assert "summary.json" not in str(info.value)
    with pytest.raises(FedflatError, match="does not exist"):
        load_run(tmp_path / "nowhere")


def test_bad_metrics_line_is_located_but_a_torn_last_line_is_dropped(tmp_path):
    good = minimal_metrics({5: 0.5})
    torn = write_run(tmp_path / "torn", scenario=base_scenario(), metrics=good,
                     summary=summary_for("fedavg"), trailing='{"round": 6, "train_l')
    assert len(load_run(torn).metrics) == 6
    bad = tmp_path / "bad"
    write_run(bad, scenario=base_scenario(), metrics=good, summary=summary_for("fedavg"))
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{not json"
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FedflatError, match=r"metrics\.jsonl:3"):
        load_run(bad)


# ---------------------------------------------------------------------------- plots
def test_plot_runs_writes_valid_pngs(tmp_path):
    a = write_run(tmp_path / "runs" / "a", scenario=base_scenario("fedavg"),
                  metrics=full_metrics({1: 0.5, 3: 0.6, 5: 0.65}), summary=summary_for("fedavg"))
    b = write_run(tmp_path / "runs" / "b", scenario=base_scenario("fedsam"),
                  metrics=full_metrics({1: 0.55, 3: 0.7, 5: 0.75}), summary=summary_for("fedsam"))
    out = tmp_path / "plots"
    written = plot_runs([a, b], out)
    assert {p.stem for p in written} == ALL_STEMS
    for p in written:
        assert p.parent == out
        assert p.suffix == ".png"
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert p.stat().st_size > 5000  # axes, two lines and a legend: not an empty canvas
        assert png_size(p) == (640, 400)  # 6.4 x 4.0 inches at 100 dpi


def test_plot_run_skips_plots_whose_metrics_are_missing(tmp_path):
    run = write_run(tmp_path / "r", scenario=base_scenario(),
                    metrics=minimal_metrics({1: 0.5, 5: 0.6}), summary=summary_for("fedavg"))
    written = plot_run(run)
    assert {p.stem for p in written} == {
        "test_accuracy_vs_round", "client_train_loss_vs_round", "test_loss_vs_round"}
    assert all(p.parent == run / "plots" and p.read_bytes()[:8] == PNG_MAGIC for p in written)
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(p.name for p in written)


def test_plot_run_without_any_evaluation_or_summary(tmp_path):
    # A run still going: no summary, no scenario, never evaluated, a null (NaN) loss.
    run = tmp_path / "r"
    run.mkdir()
    metrics = minimal_metrics({})
    metrics[2]["client_train_loss"] = None
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    written = plot_run(run)
    assert [p.stem for p in written] == ["client_train_loss_vs_round"]
    empty = tmp_path / "e"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_run(empty) == []


def test_plot_run_on_non_run_folder_names_metrics_file(tmp_path):
    with pytest.raises(FedflatError, match=r"metrics\.jsonl"):
        plot_run(tmp_path)


def test_run_lacking_x_metric_is_left_out_of_that_plot(tmp_path):
    # One run has bytes, one does not: the bytes plot is drawn with the first only.
    a = write_run(tmp_path / "a", scenario=base_scenario("a"), metrics=full_metrics({5: 0.5}),
                  summary=summary_for("a"))
    b = write_run(tmp_path / "b", scenario=base_scenario("b"), metrics=minimal_metrics({5: 0.6}),
                  summary=summary_for("b"))
    written = {p.stem for p in plot_runs([a, b], tmp_path / "out")}
    assert written == ALL_STEMS


@pytest.mark.timeout(60)
def test_plot_run_handles_200_rounds(tmp_path):
    # Speed is a benchmark's business on this shared machine, not a timed assert; the timeout
    # only catches a plot that hangs or grows without bound with the number of rounds.
    accs = {t: 0.5 + t / 1000 for t in range(0, 200, 5)}
    run = write_run(tmp_path / "r", scenario=base_scenario(),
                    metrics=full_metrics(accs, rounds=200), summary=summary_for("fedavg"))
    written = plot_run(run)
    assert len(written) == len(ALL_STEMS)
    assert all(p.stat().st_size > 0 for p in written)


# ---------------------------------------------------------------------------- CLI
def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedflat")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict = {}
    register(sub, handlers)
    args = parser.parse_args(argv)
    return handlers[args.command](args)


def test_cli_report_prints_table_and_writes_plots(tmp_path, capsys):
    runs = tmp_path / "runs" / "fedsam"
    dirs = [write_run(runs / f"stamp{s}", scenario=base_scenario("fedsam", seed=s),
                      metrics=full_metrics({5: acc}), summary=summary_for("fedsam"))
            for s, acc in ((0, 0.6), (1, 0.8))]
    assert _cli(["report", *map(str, dirs), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| fedsam (stamp0)" in out
    assert "0.6000" in out
    assert "0.8000" in out
    assert "0.7000 ± 0.1414" in out  # mean, sample std of (0.6, 0.8)
    report = runs / "report"
    assert str(report) in out
    assert {p.stem for p in report.glob("*.png")} == ALL_STEMS

    # A folder holding run folders stands for them; the report/ folder is not a run.
    other = tmp_path / "figs"
    assert _cli(["report", str(runs), "--out", str(other)]) == 0
    assert "fedsam (stamp1)" in capsys.readouterr().out
    assert {p.stem for p in other.glob("*.png")} == ALL_STEMS


def test_cli_report_rejects_non_run_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FedflatError, match=r"scenario\.yaml"):
        _cli(["report", str(tmp_path / "x")])


# ---------------------------------------------------------------------------- real runs
def test_real_runs_round_trip(tmp_path):
    """Runs written by the runtime itself: the report reads what it writes."""
    from conftest import tiny_scenario

    import fedflat

    results = [fedflat.run(tiny_scenario(seed=s), out=tmp_path / f"seed{s}") for s in (1, 2)]
    recs = [load_run(r.run_dir) for r in results]
    for res, rec in zip(results, recs, strict=True):
        row = run_row(rec)
        accs = [m["test_accuracy"] for m in res.metrics if m.get("test_accuracy") is not None]
        assert row["final_accuracy"] == pytest.approx(accs[-1])
        assert row["best_accuracy"] == pytest.approx(max(accs))
        assert row["rounds"] == len(res.metrics)
    (g,) = aggregate_seeds(recs)
    finals = [run_row(r)["final_accuracy"] for r in recs]
    assert g.final_mean == pytest.approx(np.mean(finals))
    assert g.final_std == pytest.approx(np.std(finals, ddof=1))
    written = plot_run(results[0].run_dir)
    assert {"test_accuracy_vs_round", "client_train_loss_vs_round"} <= {p.stem for p in written}
