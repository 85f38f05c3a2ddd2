"""Scenario errors: each class gives one located message, exit code 2, no traceback,
no run folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedflat.cli import main
from fedflat.errors import ScenarioError
from fedflat.scenario import load_scenario
from fedflat.scenario.reference import iter_keys

GOOD = """\
name: t
seed: 1
data:
  dataset: synthetic
  num_clients: 10
server:
  rounds: 2
  clients_per_round: 3
output:
  dir: {out}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text.format(out=tmp_path / "runs"))
    return p


def cli_error(tmp_path: Path, text: str, capsys, *extra: str) -> str:
    path = write(tmp_path, text)
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    assert not (tmp_path / "runs").exists(), "no run folder for an invalid scenario"
    return err


def test_good_scenario_validates(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD)).scenario
    assert sc.server.rounds == 2
    assert sc.data.num_clients == 10


def test_unknown_key_names_file_key_and_line(tmp_path, capsys):
    err = cli_error(tmp_path, GOOD.replace("  rounds: 2", "  rounds: 2\n  roundz: 3"), capsys)
    assert "s.yaml:8:" in err
    assert "server.roundz" in err
    assert "did you mean 'rounds'" in err


def test_wrong_type(tmp_path, capsys):
    err = cli_error(tmp_path, GOOD.replace("rounds: 2", "rounds: many"), capsys)
    assert "s.yaml:7:" in err
    assert "server.rounds" in err
    assert "integer" in err


def test_out_of_range_clients_per_round(tmp_path, capsys):
    err = cli_error(tmp_path, GOOD.replace("clients_per_round: 3", "clients_per_round: 11"), capsys)
    assert "s.yaml:8:" in err
    assert "server.clients_per_round" in err
    assert "exceeds" in err


def test_alpha_must_be_positive(tmp_path, capsys):
    text = GOOD.replace("  num_clients: 10", "  num_clients: 10\n  partition:\n"
                        "    method: dirichlet_per_class\n    alpha: 0")
    err = cli_error(tmp_path, text, capsys)
    assert "s.yaml:8:" in err
    assert "data.partition.alpha" in err
    assert "greater than 0" in err


def test_alpha_under_natural_is_refused_naming_the_key(tmp_path, capsys):
    # natural (the default) takes no keys: alpha belongs to the Dirichlet partitioners.
    text = GOOD.replace("  num_clients: 10", "  num_clients: 10\n  partition:\n    alpha: 0.5")
    err = cli_error(tmp_path, text, capsys)
    assert "s.yaml:7:" in err
    assert "data.partition.alpha" in err
    assert "not a key of partitioner 'natural'" in err
    assert "dirichlet_per_class, dirichlet_per_client" in err


def test_yaml_syntax_error(tmp_path, capsys):
    err = cli_error(tmp_path, GOOD.replace("seed: 1", "seed: [1"), capsys)
    assert "s.yaml:" in err
    assert "YAML syntax error" in err


def test_missing_data_file(tmp_path, capsys):
    text = GOOD.replace("dataset: synthetic", f"dataset: femnist\n  data_dir: {tmp_path}/nodata")
    err = cli_error(tmp_path, text, capsys)
    assert "s.yaml:5:" in err
    assert "data.data_dir" in err
    assert "femnist" in err


def test_bad_override_is_located(tmp_path, capsys):
    err = cli_error(tmp_path, GOOD, capsys, "--set", "server.rounds=-1")
    assert "--set server.rounds" in err
    assert "greater than or equal to 1" in err


def test_unknown_override_key(tmp_path):
    with pytest.raises(ScenarioError, match=r"server\.roundz"):
        load_scenario(write(tmp_path, GOOD), ["server.roundz=3"])


def test_missing_scenario_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_duplicate_key(tmp_path):
    with pytest.raises(ScenarioError, match="duplicate key 'seed'"):
        load_scenario(write(tmp_path, GOOD + "seed: 2\n"))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFLAT_DATA", "/some/where")
    assert load_scenario(write(tmp_path, GOOD)).scenario.data.data_dir == "/some/where"


def test_cli_subprocess_has_no_traceback(tmp_path):
    path = write(tmp_path, GOOD.replace("rounds: 2", "rounds: x"))
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "run", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "server.rounds" in proc.stderr


def test_shipped_scenarios_validate():
    root = Path(__file__).resolve().parents[1] / "scenarios"
    for path in sorted(root.glob("*.yaml")):
        load_scenario(path)


def test_readme_lists_every_key():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [k for k, *_ in iter_keys() if f"`{k}`" not in readme]
    assert not missing, f"README scenario reference lacks {missing}; regenerate it"
    # Types read as a user writes them: no typing internals, no object addresses.
    types = {k: t for k, t, *_ in iter_keys()}
    assert not [k for k, t in types.items() if any(s in t for s in ("Annotated", "FieldInfo",
                                                                     "0x", "fedflat."))]
    assert types["system.compute_speed"] == ("{kind: 'constant', value} or {kind: 'lognormal', "
                                             "mean, sigma} or {kind: 'trace', path} or None")


def test_readme_method_presets_table_says_what_each_preset_sets():
    from fedflat.scenario.local_rule import PRESETS
    from fedflat.scenario.reference import presets_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert presets_markdown() in readme, "README method presets table is stale; regenerate it"
    rows = {line.split("|")[1].strip(" `"): line for line in presets_markdown().splitlines()[2:]}
    assert set(rows) == set(PRESETS)
    for name, row in rows.items():  # the row against what loading the preset gives
        sc = load_scenario({"method": name}).scenario
        _, _, oracle, _, server, swa, _ = row.split("|")
        assert f"name: {sc.client.oracle.name}" in oracle
        assert f"optimizer: {sc.server.optimizer}, lr: {sc.server.lr}" in server
        assert ("off" in swa) == (not sc.server.swa.enabled)


def test_resolved_scenario_round_trips(tmp_path):
    from fedflat.scenario import dump_scenario

    sc = load_scenario(write(tmp_path, GOOD)).scenario
    again = load_scenario(yaml.safe_load(dump_scenario(sc))).scenario
    assert again == sc
