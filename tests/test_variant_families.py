"""One registry per family for partitioners, DP mechanisms and aggregation rules.

Checked against independent facts: each factory's own signature, the YAML file's lines,
closed forms (σ = 0 quantity skew is balanced to within one sample).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from fedflat.data.partition import PARTITIONERS
from fedflat.errors import ScenarioError
from fedflat.privacy.mechanisms import DP_ORACLES
from fedflat.runtime.build import build_data
from fedflat.scenario import load_scenario
from fedflat.scenario.aggregation import RULE_CONFIGS, AggregationConfig, check_aggregation
from fedflat.scenario.partition import PARTITION_CONFIGS, PartitionConfig
from fedflat.scenario.privacy import DP_MECHANISM_CONFIGS, SampleLevelPrivacy
from fedflat.scenario.schema import Scenario
from fedflat.server.rules import RULES, aggregate, min_inputs

# Partitioner arguments set in code, not in the block: a numerical guard and the dataset's C.
_PARTITION_NOT_IN_BLOCK = {"max_tries", "num_classes"}


def _own(cls: type, tag: str) -> set[str]:
    return set(cls.model_fields) - {tag}


def _load(tmp_path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return load_scenario(path).scenario


def _error(tmp_path, text: str) -> str:
    with pytest.raises(ScenarioError) as info:
        _load(tmp_path, text)
    return str(info.value)


# ------------------------------------------------------------------------ partitioners
def test_partition_configs_are_the_registry_plus_natural():
    assert list(PARTITION_CONFIGS) == ["natural", *PARTITIONERS]


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_partition_fields_are_the_partitioner_arguments(name):
    params = {p.name: p for p in inspect.signature(PARTITIONERS[name]).parameters.values()
              if p.kind is p.KEYWORD_ONLY}
    assert _own(PARTITION_CONFIGS[name], "method") == set(params) - _PARTITION_NOT_IN_BLOCK


def test_partition_base_builds_the_named_variant():
    cfg = PartitionConfig(method="shards", shards_per_client=3)
    assert type(cfg).__name__ == "ShardsPartition"
    assert cfg.factory_kwargs() == {"shards_per_client": 3}
    assert Scenario().data.partition.method == "natural"


def test_quantity_sigma_is_now_sigma(tmp_path):
    text = ("name: t\ndata:\n  dataset: digits\n  partition:\n    method: quantity_skew\n"
            "    quantity_sigma: 0.5\n")
    err = _error(tmp_path, text)
    assert "s.yaml:6:" in err
    assert "data.partition.quantity_sigma" in err
    assert "its keys: sigma, min_size" in err


def _quantity_skew(sigma: float) -> str:
    return ("name: t\nserver: {clients_per_round: 3}\ndata:\n  dataset: digits\n"
            f"  num_clients: 7\n  partition: {{method: quantity_skew, sigma: {sigma}}}\n")


def test_sigma_zero_reaches_quantity_skew_balanced(tmp_path):
    # σ = 0: every log-size equal, so the sizes are n/N up to the one-sample remainder.
    sizes = build_data(_load(tmp_path, _quantity_skew(0))).client_sizes()
    assert sizes.max() - sizes.min() <= 1
    assert np.ptp(build_data(_load(tmp_path, _quantity_skew(2))).client_sizes()) > 1


# ------------------------------------------------------------------------ DP mechanisms
def _mechanism_own(name: str) -> set[str]:
    return set(DP_MECHANISM_CONFIGS[name].model_fields) - set(SampleLevelPrivacy.model_fields)


def test_mechanism_configs_are_the_factory_registry():
    # DIFF2 is a round-level estimator (client release + server step), not a per-step oracle.
    assert list(DP_MECHANISM_CONFIGS) == [*DP_ORACLES, "diff2"]


@pytest.mark.parametrize("name", list(DP_ORACLES))
def test_mechanism_fields_are_its_own_factory_arguments(name):
    # What dp_sgd's factory takes is what every mechanism takes (the shared keys feed it);
    # a mechanism's own keys are the arguments its factory adds to those.
    shared = set(inspect.signature(DP_ORACLES["dp_sgd"]).parameters)
    own = set(inspect.signature(DP_ORACLES[name]).parameters) - shared
    assert _mechanism_own(name) == own


def test_rho_under_dp_sgd_is_refused_at_its_line(tmp_path):
    text = ("name: t\nprivacy:\n  sample_level:\n    enabled: true\n    epsilon: 1.0\n"
            "    rho: 0.05\n")
    err = _error(tmp_path, text)
    assert "s.yaml:6:" in err
    assert "privacy.sample_level.rho" in err
    assert "rho applies to dp_sat, dp_sat_momentum, dp_sam" in err


def test_rho_reaches_the_mechanism(tmp_path):
    # The block's rho is the keyword the factory receives (build_local_rule splats it).
    sc = _load(tmp_path, "name: t\nprivacy:\n  sample_level: {mechanism: dp_sam, rho: 0.25}\n")
    assert sc.privacy.sample_level.factory_kwargs() == {"rho": 0.25}
    assert "rho" in inspect.signature(DP_ORACLES["dp_sam"]).parameters


# ------------------------------------------------------------------------ aggregation rules
def test_rule_configs_are_the_server_rules():
    assert list(RULE_CONFIGS) == list(RULES)


def test_a_key_of_another_rule_is_refused_at_its_line(tmp_path):
    text = ("name: t\nserver:\n  aggregation:\n    rule: krum\n    num_byzantine: 1\n"
            "    trim_ratio: 0.2\n")
    err = _error(tmp_path, text)
    assert "s.yaml:6:" in err
    assert "server.aggregation.trim_ratio" in err
    assert "trim_ratio applies to trimmed_mean only" in err


def test_num_byzantine_without_a_rule_that_reads_it_is_refused():
    with pytest.raises(ValueError, match="num_byzantine applies to rules krum"):
        AggregationConfig(rule="median", num_byzantine=2)
    # ... but nnm / arc before any rule read it.
    assert AggregationConfig(rule="median", pre=["nnm"], num_byzantine=2).num_byzantine == 2


@pytest.mark.parametrize(("rule", "factor", "offset"),
                         [("krum", 2, 3), ("multi_krum", 2, 3), ("bulyan", 4, 3), ("mda", 2, 1)])
def test_n_conditions_are_the_papers(rule, factor, offset):
    # Blanchard et al. 2017 (n >= 2f + 3), El Mhamdi et al. 2018 (n >= 4f + 3), MDA 2f + 1:
    # the server's minimum and the schema's check read the same class attribute.
    f = 2
    assert min_inputs(rule, {"num_byzantine": f}) == factor * f + offset
    cfg = AggregationConfig(rule=rule, num_byzantine=f)
    assert check_aggregation(cfg, factor * f + offset) is None
    assert check_aggregation(cfg, factor * f + offset - 1) is not None


def test_rule_parameters_reach_the_rule_with_the_configs_bounds():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]], dtype=torch.float64)
    # trimmed mean, β = 0.2 of 5 inputs: drop one from each end, mean of 1, 2, 3 = 2.
    assert float(aggregate(x, "trimmed_mean", trim_ratio=0.2)[0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"trim_ratio must be < 0.5, got 0.5"):
        aggregate(x, "trimmed_mean", trim_ratio=0.5)
    with pytest.raises(ValueError, match="max_iters must be >= 1, got 0"):
        aggregate(x, "geometric_median", max_iters=0)
