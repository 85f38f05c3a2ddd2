"""The client's uplink chain (clip -> noise -> codec) and DP-FedSAM's accounting.

Independent facts: what leaves a client (on the serial worker, in a Flower ClientApp's
reply, through the vmap engine) is the raw local delta clipped by hand to C, plus noise whose
empirical std is σC/√m (χ² interval over the d coordinates) and which is exactly the draw of
the client's own ``client_noise`` stream, then top-k of THAT vector (k non-zeros holding
noise; the error-feedback residual is what top-k left out of it); state keyed by step name
survives an inserted step; a sample-weighted mean is refused; per-tensor clipping of K
tensors is accounted at σ/√K (sensitivity C√K by hand).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_scenario
from scipy import stats

import fedflat
from fedflat.client.uplink import UplinkContext, chain, encode, state_key
from fedflat.comm.codecs import make_codec, with_error_feedback
from fedflat.errors import ScenarioError
from fedflat.privacy.accounting import epsilon as accounted_epsilon
from fedflat.privacy.client_noise import clip_delta
from fedflat.privacy.plan import resolve_privacy
from fedflat.rng import stream
from fedflat.runtime.build import build_data, build_pipeline, build_schedule, initial_params
from fedflat.runtime.checkpoint import load_latest
from fedflat.runtime.worker import EF_KEY, ClientJob, ClientWorker, RoundPayload
from fedflat.scenario.loader import dump_scenario, load_scenario
from fedflat.server.pipeline import ServerRound

SIGMA, CLIP, M = 0.8, 0.05, 4  # σ, C, expected clients per round m
STD = SIGMA * CLIP / math.sqrt(M)  # each client's noise std σC/√m
CLIENTS = (0, 3, 5, 8)
ROUND = 1
TOP_K = 20


def dp_scenario(**over) -> dict:
    """tiny_scenario with DP-FedSAM's client-side noise (σ given, so nothing to calibrate)."""
    base = {"server.sampling": "poisson", "server.clients_per_round": M,
            "server.aggregation.weighting": "uniform",
            "privacy.user_level": {"enabled": True, "noise_multiplier": SIGMA,
                                   "clip_norm": CLIP, "noise_placement": "client"}}
    return tiny_scenario(**{**base, **over})


def run_worker(raw: dict, clients=CLIENTS):
    sc = load_scenario(raw).scenario
    fed = build_data(sc)
    w = ClientWorker(sc, fed, threads=1)
    params = initial_params(sc, w.model)
    jobs = [ClientJob(round=ROUND, client_id=c, lr=0.05) for c in clients]
    return sc, w, params, w.run(RoundPayload(ROUND, params, {}), jobs, [{}] * len(jobs))


def raw_deltas(clients=CLIENTS) -> dict[int, torch.Tensor]:
    """The local deltas without DP and with the fp32 codec (same "client" stream)."""
    _, _, _, res = run_worker(tiny_scenario(**{"server.clients_per_round": M}), clients)
    return {r.client_id: r.delta for r in res}


def hand_clip(x: torch.Tensor) -> torch.Tensor:
    return x * min(1.0, CLIP / float(x.norm()))


def own_noise(seed: int, client_id: int, d: int) -> torch.Tensor:
    return torch.randn(d, generator=stream(seed, "client_noise", ROUND, client_id)) * STD


def chi2_std_ok(x: torch.Tensor, std: float, alpha: float = 1e-4) -> bool:
    """Σx²/std² inside the central 1−α interval of χ²(n): the tolerance of an n-sample std."""
    v = x.double().flatten().numpy()
    lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], v.size)
    return bool(lo <= (v**2).sum() / std**2 <= hi)


@pytest.fixture(scope="module")
def raw():
    return raw_deltas()


# ----------------------------------------------------------------------------- the chain
def test_state_keyed_by_step_name_survives_an_inserted_step():
    codec = with_error_feedback(make_codec("top_k", k=3))
    x = torch.tensor([5.0, -4.0, 0.1, 3.0, -0.2, 0.3, 2.0])
    ctx = UplinkContext(0, 0, 0)
    _, st, m = chain(encode(codec)).update(x, {}, ctx)
    assert set(st) == {state_key("codec", "residual")}
    # top-3 of x keeps 5, -4, 3: the residual is the rest (hand computation)
    torch.testing.assert_close(st[state_key("codec", "residual")],
                               torch.tensor([0.0, 0.0, 0.1, 0.0, -0.2, 0.3, 2.0]))
    assert m["bytes_up"] == 4 + 3 * 4 + 3 * 4  # header, k float32 values, k int32 indices
    # a clip step inserted before the codec: the codec still finds its residual
    y = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])
    sent, st2, _ = chain(clip_delta(clip_norm=1.0), encode(codec)).update(y, st, ctx)
    carried = torch.tensor([0.0, 0.0, 0.1, 0.0, -0.2, 0.3, 3.0])  # clip(y) + residual
    assert torch.count_nonzero(sent) == 3
    torch.testing.assert_close(sent[[4, 5, 6]], carried[[4, 5, 6]])
    assert set(st2) == {state_key("codec", "residual")}
    with pytest.raises(ValueError, match="no step"):
        chain(clip_delta(clip_norm=1.0)).update(y, st, ctx)  # state of a removed step
    with pytest.raises(ValueError, match="unique"):
        chain(encode(codec), encode(codec))


# ---------------------------------------------------------------- what leaves the client
def test_serial_worker_sends_clipped_delta_plus_own_noise(raw):
    sc, w, _, res = run_worker(dp_scenario())
    d = w.model.num_params
    noise = []
    for r in res:
        x = raw[r.client_id]
        assert float(x.norm()) > CLIP  # the precondition: every delta gets clipped
        clipped = hand_clip(x)
        e = r.delta - clipped
        noise.append(e)
        # the noise is the client's own stream (hence the same on every backend) ...
        torch.testing.assert_close(e, own_noise(sc.seed, r.client_id, d), rtol=0, atol=1e-6)
        # ... and what it was added to had norm C (clipped before the noise)
        before = r.delta - own_noise(sc.seed, r.client_id, d)
        assert float(before.norm()) == pytest.approx(CLIP, rel=1e-5)
        assert r.metrics["dp/noise_std"] == pytest.approx(STD)
        assert r.metrics["bytes_up"] == 4 + 4 * d  # fp32: header + d floats
    assert chi2_std_ok(torch.stack(noise), STD)
    assert not chi2_std_ok(torch.stack(noise), STD * 1.1)  # the test has the power to tell


def test_top_k_runs_after_the_noise_and_its_residual_holds_noise(raw):
    sc, w, _, res = run_worker(dp_scenario(**{
        "comm.uplink": {"codec": "top_k", "k": TOP_K, "error_feedback": True}}))
    d = w.model.num_params
    for r in res:
        noisy = hand_clip(raw[r.client_id]) + own_noise(sc.seed, r.client_id, d)
        sent_ix = torch.nonzero(r.delta).flatten()
        assert len(sent_ix) == TOP_K
        assert set(sent_ix.tolist()) == set(torch.topk(noisy.abs(), TOP_K).indices.tolist())
        torch.testing.assert_close(r.delta[sent_ix], noisy[sent_ix], rtol=0, atol=1e-6)
        torch.testing.assert_close(r.client_state[EF_KEY], noisy - r.delta, rtol=0, atol=1e-6)
        assert r.metrics["bytes_up"] == 4 + 8 * TOP_K  # header + k float32 + k int32


def _client_app_reply(raw_sc: dict, client_id: int):
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedflat.flower import messages
    from fedflat.flower.client_app import ClientSettings, make_client_app

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    sc = load_scenario(raw_sc).scenario
    fed = build_data(sc)
    params = initial_params(sc, ClientWorker(sc, fed, threads=1).model)
    content = messages.encode_instruction(RoundPayload(ROUND, params, {}),
                                          ClientJob(ROUND, client_id, 0.05), {}, dump_scenario(sc))
    ctx = Context(run_id=1, node_id=7001, node_config={"partition-id": client_id},
                  state=RecordDict(), run_config={})
    reply = make_client_app(ClientSettings(threads=1))(
        Message(content, dst_node_id=7001, message_type="train"), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return sc, messages.decode_result(reply.content)


def test_flower_client_app_reply_carries_the_noisy_encoded_delta(raw):
    pytest.importorskip("flwr")
    cid = CLIENTS[1]
    dense = dp_scenario()
    sc, got = _client_app_reply(dense, cid)
    _, _, _, serial = run_worker(dense, (cid,))
    assert torch.equal(got.delta, serial[0].delta)  # ClientApp == serial worker, bit for bit
    e = got.delta - hand_clip(raw[cid])
    assert chi2_std_ok(e, STD)
    torch.testing.assert_close(e, own_noise(sc.seed, cid, e.numel()), rtol=0, atol=1e-6)
    sparse = dp_scenario(**{"comm.uplink": {"codec": "top_k", "k": TOP_K,
                                            "error_feedback": True}})
    _, got = _client_app_reply(sparse, cid)
    _, _, _, serial = run_worker(sparse, (cid,))
    assert torch.equal(got.delta, serial[0].delta)
    assert int(torch.count_nonzero(got.delta)) == TOP_K
    assert torch.equal(got.client_state[EF_KEY], serial[0].client_state[EF_KEY])


def test_vmap_engine_sends_the_same_noise(raw):
    sc, w, _, res = run_worker(dp_scenario(**{"runtime.backend": "vmap"}))
    assert w.chunks is not None
    d = w.model.num_params
    for r in res:
        # float tolerance: the engine sums the local steps in another order
        torch.testing.assert_close(r.delta, hand_clip(raw[r.client_id])
                                   + own_noise(sc.seed, r.client_id, d), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- accounting
def test_sample_weighted_mean_is_refused_with_client_noise():
    with pytest.raises(ScenarioError) as err:
        load_scenario(dp_scenario(**{"server.aggregation.weighting": "samples"}))
    msg = str(err.value)
    assert "server.aggregation.weighting" in msg
    assert "noise_placement" in msg
    assert "uniform" in msg


def test_server_takes_the_uniform_mean_of_what_clients_sent():
    sc = load_scenario(dp_scenario()).scenario
    pipe = build_pipeline(sc, sc.data.num_clients)
    # A full expected cohort of M rows (fewer would be topped up with noise, see
    # test_dp_central): rows 1..3 differ, the rest are zero.
    deltas = torch.zeros(M, 2)
    deltas[:3] = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    weights = torch.ones(M)
    weights[:3] = torch.tensor([100.0, 1.0, 7.0])
    rnd = ServerRound(round=0, params=torch.zeros(2), deltas=deltas, weights=weights,
                      client_ids=list(range(M)), num_clients=sc.data.num_clients)
    out, _, _ = pipe.apply(rnd, pipe.init(rnd.params), torch.Generator().manual_seed(0))
    # (Δ1 + Δ2 + Δ3)/M by hand, whatever the sample counts; server lr 1
    torch.testing.assert_close(out.new_params, torch.tensor([3.0, 5.0]) / M)


def test_per_tensor_clipping_is_accounted_at_sigma_over_sqrt_k():
    raw_sc = dp_scenario(**{"privacy.user_level.clip_scope": "per_tensor"})
    sc = load_scenario(raw_sc).scenario
    fed = build_data(sc)
    w = ClientWorker(sc, fed, threads=1)
    k = len(w.model.segments)
    assert k == 2  # logistic regression: weight and bias
    # Sensitivity by hand: every tensor long enough is clipped to C, so the delta has
    # norm C√K; the noise is σC/√m per coordinate, N(0, σ²C²) on the sum of m clients.
    big = torch.ones(w.model.num_params) * 10.0
    clipped, _, _ = clip_delta(clip_norm=CLIP, clip_scope="per_tensor",
                               segments=w.model.segments).update(big, {}, UplinkContext(0, 0, 0))
    assert float(clipped.norm()) == pytest.approx(CLIP * math.sqrt(k), rel=1e-6)
    multiplier = SIGMA * CLIP / (CLIP * math.sqrt(k))
    plan = resolve_privacy(sc, fed.client_sizes(), build_schedule(sc), num_tensors=k)
    assert plan.user_sigma == SIGMA  # what the clients apply
    assert plan.user_sigma_accounted == pytest.approx(multiplier)
    for _ in range(sc.server.rounds):
        plan.record_round()
    q = M / sc.data.num_clients
    want = accounted_epsilon(sampling_rate=q, steps=sc.server.rounds,
                             noise_multiplier=multiplier, delta=sc.privacy.user_level.delta)
    assert plan.metrics(sc.data.num_clients)["epsilon_user"] == pytest.approx(want)
    # global clipping of the same model keeps σ
    glob = resolve_privacy(load_scenario(dp_scenario()).scenario, fed.client_sizes(),
                           build_schedule(sc), num_tensors=k)
    assert glob.user_sigma_accounted == SIGMA


def test_per_tensor_target_epsilon_applies_sqrt_k_times_the_calibrated_sigma():
    raw_sc = dp_scenario(**{"privacy.user_level": {
        "enabled": True, "epsilon": 4.0, "clip_norm": CLIP, "noise_placement": "client",
        "clip_scope": "per_tensor"}})
    sc = load_scenario(raw_sc).scenario
    sizes = np.full(sc.data.num_clients, 50)
    k = 5
    plan = resolve_privacy(sc, sizes, build_schedule(sc), num_tensors=k)
    assert plan.user_sigma == pytest.approx(plan.user_sigma_accounted * math.sqrt(k))
    assert plan.scenario.privacy.user_level.noise_multiplier == plan.user_sigma
    eps = accounted_epsilon(sampling_rate=M / sc.data.num_clients, steps=sc.server.rounds,
                            noise_multiplier=plan.user_sigma / math.sqrt(k),
                            delta=sc.privacy.user_level.delta)
    assert eps <= 4.0
    assert eps == pytest.approx(4.0, abs=0.05)


def test_run_ledger_records_the_per_tensor_multiplier(tmp_path):
    raw_sc = dp_scenario(**{"privacy.user_level.clip_scope": "per_tensor",
                            "server.rounds": 2, "eval.every": 2})
    res = fedflat.run(raw_sc, out=tmp_path / "run")
    ledger = json.loads((tmp_path / "run" / "privacy.json").read_text())["user_level"]
    assert ledger["noise_multiplier"] == SIGMA
    assert ledger["accounted_noise_multiplier"] == pytest.approx(SIGMA / math.sqrt(2))
    assert ledger["rounds_accounted"] == 2
    want = accounted_epsilon(sampling_rate=M / 12, steps=2, noise_multiplier=SIGMA / math.sqrt(2),
                             delta=1e-5)
    assert res.metrics[-1]["epsilon_user"] == pytest.approx(want)


# ------------------------------------------------------- every backend, resume, bit for bit
WIRE = {"server.rounds": 3, "output.keep_checkpoints": 10,
        "comm.uplink": {"codec": "top_k", "k": TOP_K, "error_feedback": True}}


@pytest.mark.slow
def test_resumed_equals_uninterrupted_with_the_residual_of_noisy_deltas(tmp_path):
    ref = fedflat.run(dp_scenario(**WIRE), out=tmp_path / "r")
    assert any(EF_KEY in st for st in
               load_latest(ref.run_dir)["server"]["client_states"].values())
    for p in (ref.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 1:
            p.unlink()
    (ref.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(ref.run_dir)
    assert torch.equal(resumed.params, ref.params)


def test_audit_runs_the_clients_own_clip_and_noise():
    from fedflat.audit.scenario_audit import audit_scenario

    sc = tiny_scenario(**{
        "privacy.user_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-5,
                               "clip_norm": 1.0, "noise_placement": "client"},
        "server.sampling": "poisson", "server.sampling_rate": 0.1, "server.rounds": 30,
        "server.aggregation.weighting": "uniform"})
    ok = audit_scenario(sc, canaries=500)
    assert ok.mechanism == "local_noise"
    assert not ok.flagged
    assert audit_scenario(sc, canaries=500, fault="noise_off").flagged


@pytest.mark.ray
@pytest.mark.slow
def test_ray_equals_serial_with_client_noise(tmp_path, ray_session):
    sc = dp_scenario(**WIRE)
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}},
                         out=tmp_path / "r")
    assert torch.equal(serial.params, on_ray.params)
    assert [m["clients"] for m in serial.metrics] == [m["clients"] for m in on_ray.metrics]


@pytest.mark.slow
def test_flower_server_app_equals_serial_with_client_noise(tmp_path):
    pytest.importorskip("flwr")
    from test_flower import LocalGrid, flower_run, nodes_for, same_records

    sc = dp_scenario(**WIRE)
    serial = fedflat.run(sc, out=tmp_path / "serial")
    res = flower_run(sc, tmp_path / "flower", LocalGrid(nodes_for(12)))
    assert torch.equal(res.params, serial.params)
    same_records(res.metrics, serial.metrics)
