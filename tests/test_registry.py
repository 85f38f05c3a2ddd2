"""One registry per family: oracle configs are a union tagged by name, one class per oracle.

Checked against independent facts: each factory's own signature, the YAML file's lines, a
gradient computed with plain autograd, and SAM's definition (ρ = 0 is SGD).
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
import yaml
from torch import nn

from fedflat.client.local_corrections import PREV_GLOBAL_UPDATE
from fedflat.client.optim import sgd
from fedflat.client.oracle_base import UpdateContext
from fedflat.client.oracles import FEDSMOO_S, ORACLE_NAMES, ORACLE_REGISTRY
from fedflat.client.update import LocalRule, LocalSchedule, client_update
from fedflat.errors import ScenarioError
from fedflat.models.flat import FlatModel
from fedflat.rng import stream
from fedflat.runtime.build import local_rule_parts
from fedflat.scenario import dump_scenario, load_scenario
from fedflat.scenario.local_rule import ORACLE_CONFIGS, CorrectionConfig, OracleConfig
from fedflat.scenario.reference import iter_keys
from fedflat.scenario.schema import ClientConfig

torch.set_num_threads(1)

# Factory arguments that do not come from the oracle block: weight_decay is the client
# optimizer's, eps / select are numerical guards and model selectors set in code.
_NOT_IN_BLOCK = {"weight_decay", "eps", "select"}


def _own_keys(name: str) -> set[str]:
    return set(ORACLE_CONFIGS[name].model_fields) - {"name"}


def _foreign_key(name: str) -> str:
    """A key of some other oracle that ``name`` does not take."""
    return next(k for other in ORACLE_CONFIGS for k in sorted(_own_keys(other))
                if k not in _own_keys(name))


# ------------------------------------------------------------------------ one source
def test_union_names_are_the_registry_names():
    union = typing.get_args(ClientConfig.model_fields["oracle"].annotation)
    union_names = [typing.get_args(c.model_fields["name"].annotation)[0] for c in union]
    assert union_names == list(ORACLE_CONFIGS) == list(ORACLE_REGISTRY) == list(ORACLE_NAMES)
    for name, entry in ORACLE_REGISTRY.items():
        assert entry.config is ORACLE_CONFIGS[name]


@pytest.mark.parametrize("name", list(ORACLE_REGISTRY))
def test_config_fields_are_the_factory_arguments(name):
    entry = ORACLE_REGISTRY[name]
    params = inspect.signature(entry.factory).parameters
    assert _own_keys(name) == set(params) - _NOT_IN_BLOCK
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= _own_keys(name)


def test_reference_lists_each_oracles_own_keys():
    keys = {k for k, *_ in iter_keys()}
    assert "client.oracle.name" in keys
    expected = {f"client.oracle ({n}).{k}" for n in ORACLE_CONFIGS for k in _own_keys(n)}
    assert {k for k in keys if k.startswith("client.oracle ")} == expected


# ------------------------------------------------------------------------ foreign keys
@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_a_key_of_another_oracle_is_refused_at_its_line(tmp_path, name):
    key = _foreign_key(name)
    path = tmp_path / "s.yaml"
    path.write_text(f"name: t\nclient:\n  oracle:\n    name: {name}\n    {key}: 0.5\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), 5, f"client.oracle.{key}")
    assert f"not a key of oracle {name!r}" in err.message
    own = sorted(_own_keys(name))
    if own:
        assert all(k in err.message for k in own)


def test_the_issue_example_names_the_first_foreign_key():
    block = {"name": "sam", "beta0": 0.9, "eta_f": 3, "variant": "davda54"}
    with pytest.raises(ScenarioError, match=r"client\.oracle\.beta0: not a key of oracle "
                                            r"'sam' \(its keys: rho, wd_in_perturbation\)"):
        load_scenario({"client": {"oracle": block}})


def test_foreign_override_is_refused_and_own_override_applies():
    with pytest.raises(ScenarioError, match=r"--set client\.oracle\.eta_f.*oracle 'sam'"):
        load_scenario({"method": "fedsam"}, ["client.oracle.eta_f=3"])
    assert load_scenario({"method": "fedsam"}, ["client.oracle.rho=0.3"]
                         ).scenario.client.oracle.rho == 0.3


def test_unknown_oracle_name_is_refused_with_a_suggestion():
    with pytest.raises(ScenarioError, match=r"client\.oracle\.name: unknown oracle 'sma' "
                                            r"\(did you mean 'sam'\?\)"):
        load_scenario({"client": {"oracle": {"name": "sma"}}})


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_resolved_scenario_with_each_oracle_loads_again(name):
    sc = load_scenario({"client": {"oracle": {"name": name}}}).scenario
    assert type(sc.client.oracle) is ORACLE_CONFIGS[name]
    assert load_scenario(yaml.safe_load(dump_scenario(sc))).scenario == sc


# ------------------------------------------------------------------------ client steps
def _model() -> FlatModel:
    # The module's own initial values are never used: the steps start from init_params.
    return FlatModel(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(),
                                   nn.Linear(6, 3)))


def _one_step(oracle: OracleConfig, lr: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    w0 = model.init_params(stream(0, "init"))
    built, corrections = local_rule_parts(oracle, CorrectionConfig())
    rule = LocalRule(oracle=built, corrections=corrections,
                     optimizer=sgd(momentum=0.0, weight_decay=0.0),
                     schedule=LocalSchedule(batch_size=8, epochs=None, steps=1))
    far = torch.randn(w0.shape, generator=gen)  # server vectors the LESAM/SMOO oracles read
    ctx = UpdateContext(model=model, x_global=w0, round=1, client_id=0, num_samples=8,
                        broadcast={PREV_GLOBAL_UPDATE: far, FEDSMOO_S: far})
    res = client_update(rule, ctx, x, y, lr=lr, gen=stream(0, "client", 1, 0))
    assert res.steps == 1
    return w0, res.delta


def test_sgd_step_is_minus_lr_times_the_autograd_gradient():
    w0, delta = _one_step(ORACLE_CONFIGS["sgd"]())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    module = _model().module
    torch.nn.utils.vector_to_parameters(w0, module.parameters())
    loss = nn.functional.cross_entropy(module(x), y)
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, module.parameters())])
    torch.testing.assert_close(delta, -0.1 * g)


@pytest.mark.parametrize("name", [n for n in ORACLE_CONFIGS if n != "sgd"])
def test_every_oracle_builds_a_step_that_is_not_sgd(name):
    # Defaults (ρ = 0.05 ...) perturb, so each oracle's step must differ from SGD's: the
    # factory received the block, not a silent fallback.
    _, delta = _one_step(ORACLE_CONFIGS[name]())
    _, plain = _one_step(ORACLE_CONFIGS["sgd"]())
    assert torch.isfinite(delta).all()
    assert not torch.equal(delta, plain)


def test_sam_with_rho_zero_from_the_scenario_is_sgd_bit_for_bit():
    # YAML (method preset + --set) -> SamOracle -> sam() -> the client step.
    sc = load_scenario({"method": "fedsam"}, ["client.oracle.rho=0"]).scenario
    assert sc.client.oracle.name == "sam"
    _, delta = _one_step(sc.client.oracle)
    _, plain = _one_step(ORACLE_CONFIGS["sgd"]())
    assert torch.equal(delta, plain)


# ------------------------------------------------------------------------------ codecs
def test_codec_union_names_are_the_registry_names():
    from fedflat.comm.codecs import CODEC_NAMES, CODEC_REGISTRY
    from fedflat.scenario.comm import CODEC_CONFIGS, CommConfig

    union = typing.get_args(CommConfig.model_fields["uplink"].annotation)
    names = [typing.get_args(c.model_fields["codec"].annotation)[0] for c in union]
    assert names == list(CODEC_CONFIGS) == list(CODEC_REGISTRY) == list(CODEC_NAMES)
    for name, entry in CODEC_REGISTRY.items():
        assert entry.config is CODEC_CONFIGS[name]
        # error_feedback wraps the codec (with_error_feedback); the rest are its arguments.
        own = set(entry.config.model_fields) - {"codec", "error_feedback"}
        assert own == set(inspect.signature(entry.factory).parameters), name


def test_a_key_of_another_codec_is_refused_at_its_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\ncomm:\n  downlink:\n    codec: sign\n    error_feedback: true\n"
                    "    ratio: 0.1\n")
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    err = info.value
    assert (err.line, err.key) == (6, "comm.downlink.ratio")
    assert "not a key of codec 'sign' (its keys: error_feedback)" in err.message
    assert "ratio applies to top_k, random_k" in err.message


def test_every_codec_in_the_registry_builds_and_sends_what_it_counts():
    from fedflat.comm.codecs import CODEC_REGISTRY, codec_from_config

    blocks = {"qsgd": {"levels": 4}, "top_k": {"k": 3}, "random_k": {"k": 3}}
    x = torch.linspace(-1.0, 1.0, 10)
    for name, entry in CODEC_REGISTRY.items():
        codec = codec_from_config(entry.config(**blocks.get(name, {})))
        enc = codec.encode(x, stream(0, "codec", 0))
        assert codec.decode(enc).shape == x.shape, name
        assert enc.nbytes == codec.wire_nbytes(x.numel()), name
