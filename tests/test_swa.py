"""SWA ``collect: official`` against the reference schedule (debcaldarola/fedsam)."""

from __future__ import annotations

import torch
from conftest import tiny_scenario

import fedflat
from fedflat.rng import stream
from fedflat.server.pipeline import ServerRound
from fedflat.server.swa import swa_step


def test_official_collects_after_start_only_and_averages_by_hand():
    # Reference, models/main.py: update_swa_model(1 / (swa_n + 1)) when
    # `i > swa_start and (i - swa_start) % swa_c == 0`. With start 2, c = 3 and 10 rounds
    # that is i = 5 and 8 (not 2): two models, and x_SWA = (x_5 + x_8) / 2.
    step = swa_step(start_round=2, cycle=3, collect="official")
    state = step.init(torch.zeros(1))
    models = [torch.tensor([float(v)]) for v in (7, 1, 4, -2, 9, 3, 5, 0, 11, 6)]
    seen = []
    for r, x in enumerate(models):
        rnd = ServerRound(round=r, params=torch.zeros(1), deltas=torch.zeros(1, 1),
                          weights=torch.ones(1), client_ids=[0], num_clients=1, new_params=x)
        rnd, state, metrics = step.apply(rnd, state, stream(0, "server", r))
        seen.append((metrics.get("swa_models"), None if rnd.eval_params is None
                     else float(rnd.eval_params)))
    # Before round 5 nothing is averaged; after it x_SWA = x_5 = 3; after round 8,
    # (3 + 11) / 2 = 7.
    assert seen == [(None, None)] * 5 + [(1.0, 3.0)] * 3 + [(2.0, 7.0)] * 2
    assert state.n == 2


def test_official_model_count_in_a_run(tmp_path):
    # 7 rounds, SWA from round 2 with c = 2: collections after rounds 4 and 6 only.
    sc = tiny_scenario(**{"server.rounds": 7, "eval.every": 1,
                          "server.swa": {"enabled": True, "start": 2, "cycle": 2,
                                         "collect": "official"}})
    res = fedflat.run(sc, out=tmp_path / "r")
    assert [m.get("swa_models") for m in res.metrics] == [None] * 4 + [1.0, 1.0, 2.0]
