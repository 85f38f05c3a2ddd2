"""Shakespeare by role: LEAF's vocabulary, the role partition, the char-LSTM, FedAvg."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA_DIR, data_available, tiny_scenario

import fedflat
from fedflat.data import shakespeare as shk
from fedflat.data.datasets import load_dataset
from fedflat.errors import DataError
from fedflat.models.zoo import build_model

needs_data = pytest.mark.skipif(not data_available("shakespeare_plays"),
                                reason="shakespeare_plays not in the data directory")
PLAYS = Path(DATA_DIR, "shakespeare_plays")


def test_vocabulary_is_leafs_and_round_trips():
    # LEAF's ALL_LETTERS has 80 characters, newline first and '}' last.
    assert shk.VOCAB_SIZE == 80
    assert len(set(shk.ALL_LETTERS)) == 80
    assert shk.ALL_LETTERS[0] == "\n"
    assert shk.ALL_LETTERS[-1] == "}"
    text = "ROMEO.\nBut soft! what light through yonder window breaks?\n"
    codes = shk.encode(text)
    assert shk.decode(codes) == text
    # hand count: 11 punctuation marks and 10 digits, then 4 more marks before "A"
    assert shk.ALL_LETTERS.index("A") == 25
    assert codes[0] == 25 + 17
    assert shk.encode("$")[0] == shk.ALL_LETTERS.index(" ")  # out of vocabulary -> space


def test_windows_and_split_by_hand():
    codes = np.arange(85) % 80
    x, y = shk.windows(codes, 1)
    assert x.shape == (5, 80)
    assert list(y) == [80 % 80, 81 % 80, 82 % 80, 83 % 80, 84 % 80]
    assert list(x[2, :3]) == [2, 3, 4]
    assert len(shk.windows(codes, 2)[1]) == 3  # starts 0, 2, 4
    assert shk.split_sizes(2, 0.1) == (1, 1)
    assert shk.split_sizes(100, 0.1) == (90, 10)
    assert shk.split_sizes(1000, 0.1) == (900, 100)


def test_parse_roles_on_a_hand_made_play():
    play = ("TITLE\n\nPERSONS.\nHam.\n\nACT I.\n\nScene I. Here.\n\n[Enter Ham.]\n\n"
            "Ham.\nTo be, or not.\n[Aside.]\nThat is.\n\nHOR\nMy lord.\n\n[Exit.]\n\n"
            "Go on.\n\nACT II.\n\nOrphan line.\n")
    roles = shk.parse_roles(play)
    assert roles == {"Ham": ["To be, or not.", "That is."], "HOR": ["My lord.", "Go on."]}


@pytest.fixture(scope="module")
def shakespeare():
    return load_dataset("shakespeare", data_dir=DATA_DIR, seed=0, num_clients=40)


@needs_data
def test_roles_agree_with_roles_tsv():
    # roles.tsv (the data folder's own count) is an independent tally of lines and chars.
    mine = {(r.play, r.role): r for r in shk.read_roles(PLAYS)}
    with open(PLAYS / "roles.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    exact = sum(1 for row in rows if (row["play"], row["role"]) in mine
                and len(mine[row["play"], row["role"]].codes) == int(row["chars"]))
    assert len(rows) == 1295
    assert exact / len(rows) > 0.75  # measured 1,001 of 1,295 (heuristic details differ)
    king = mine["alls_well_that_ends_well", "KING"]
    ref = next(r for r in rows if (r["play"], r["role"]) == ("alls_well_that_ends_well", "KING"))
    assert len(king.codes) == int(ref["chars"]) == 15543
    assert int((king.codes == 0).sum()) == int(ref["lines"]) == 382  # one newline a line


@needs_data
def test_partition_by_role(shakespeare):
    ds = shakespeare
    roles = [r for r in shk.read_roles(PLAYS) if len(r.codes) - shk.SEQ_LEN >= 2]
    by_len = sorted(len(r.codes) - shk.SEQ_LEN for r in roles)
    sizes = sorted(len(a) + len(b) for a, b in zip(ds.train_groups, ds.test_groups, strict=True))
    assert len(ds.train_groups) == 40
    assert ds.num_classes == 80
    assert ds.in_shape == (80,)
    # every client's size is some role's window count, and each role once
    remaining = list(by_len)
    for s in sizes:
        remaining.remove(s)
    for tr, te in zip(ds.train_groups, ds.test_groups, strict=True):
        assert (len(tr), len(te)) == shk.split_sizes(len(tr) + len(te), 0.1)
        # temporal split: the test set's first window starts right after the last train one
        assert torch.equal(ds.x_train[tr[-1], 1:], ds.x_test[te[0], :-1])
        assert ds.y_train[tr[-1]] == ds.x_test[te[0], -1]
    assert sum(map(len, ds.train_groups)) == len(ds.y_train)
    assert float(ds.x_train.max()) < 80
    assert ds.x_train.dtype == torch.float32


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DataError, match="shakespeare_plays"):
        load_dataset("shakespeare", data_dir=str(tmp_path), seed=0, num_clients=2)


def test_char_lstm_output_shape_and_leaf_size():
    model = build_model("char_lstm", (80,), 80, lstm_hidden=256)
    x = torch.randint(0, 80, (3, 80)).float()
    assert model(x).shape == (3, 80)
    # hand count, LEAF sizes (PyTorch LSTMs carry two bias vectors per layer)
    h, e = 256, 8
    lstm = 4 * h * (e + h + 2) + 4 * h * (h + h + 2)
    assert sum(p.numel() for p in model.parameters()) == 80 * e + lstm + h * 80 + 80


@needs_data
@pytest.mark.slow
def test_fedavg_lowers_the_loss(tmp_path):
    sc = tiny_scenario(**{
        "data": {"dataset": "shakespeare", "data_dir": DATA_DIR, "num_clients": 6,
                 "partition": {"method": "natural"}, "shakespeare": {"stride": 16}},
        "model.name": "char_lstm", "model.lstm_hidden": 32,
        "client.lr": 1.0, "client.batch_size": 10, "client.local_epochs": None,
        "client.local_steps": 10, "server.rounds": 4, "server.clients_per_round": 3,
        "eval.every": 4})
    res = fedflat.run(sc, out=tmp_path / "run")
    first = res.initial
    last = res.metrics[-1]
    key = next(k for k in ("test_loss", "global_test_loss") if k in last)
    assert last[key] < first[key] - 0.3  # ln 80 = 4.38 at start; learning the unigram is easy
