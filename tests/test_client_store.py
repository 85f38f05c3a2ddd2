"""ClientStore: per-client state as rows of one array per key."""

from __future__ import annotations

import io

import pytest
import torch

from fedflat.runtime.client_store import ClientStore


def _state(c: int) -> dict[str, torch.Tensor]:
    # values that name their client, so a mixed-up row is visible
    return {"scaffold/c_i": torch.full((5,), float(c)), "step": torch.tensor(c)}


def test_put_get_returns_what_was_put_and_only_stateful_clients_are_held():
    store = ClientStore()
    for c in (7, 3, 900_000):
        store.put(c, _state(c))
    store.put(11, {})  # a client without state is not held
    assert sorted(store) == [3, 7, 900_000]
    assert len(store) == 3
    assert 11 not in store
    assert store.get(11, {}) == {}
    got = store[900_000]
    assert list(got) == ["scaffold/c_i", "step"]  # the client's key order
    assert torch.equal(got["scaffold/c_i"], torch.full((5,), 900_000.0))
    assert got["step"].item() == 900_000
    assert got["step"].dtype == torch.int64
    assert [s.get("step", torch.tensor(-1)).item() for s in store.get_many([3, 11, 7])] \
        == [3, -1, 7]


def test_get_is_a_copy_and_put_replaces_the_whole_state():
    store = ClientStore()
    store.put(1, _state(1))
    store[1]["scaffold/c_i"].add_(100.0)  # editing a returned state leaves the store alone
    assert torch.equal(store[1]["scaffold/c_i"], torch.ones(5))
    store.put(1, {"step": torch.tensor(4)})  # keys the new state lacks are dropped
    assert list(store[1]) == ["step"]
    store.put(1, {})
    assert 1 not in store
    assert len(store) == 0


def test_rows_grow_past_capacity_and_reuse_freed_rows():
    store = ClientStore()
    for c in range(100):  # beyond the initial 16 rows: grown by doubling
        store.put(c, _state(c))
    for c in range(0, 100, 2):
        store.remove(c)
    for c in range(100, 150):  # fill the freed rows
        store.put(c, _state(c))
    ids, rows = store.rows("scaffold/c_i")
    want = sorted(set(range(1, 100, 2)) | set(range(100, 150)))
    assert ids.tolist() == want
    assert torch.equal(rows[:, 0], torch.tensor(want, dtype=torch.float32))
    assert store._rows["scaffold/c_i"].data.shape[0] == 128  # 100 live rows at most


def test_a_value_of_another_shape_is_kept_apart():
    store = ClientStore()
    store.put(0, {"r": torch.zeros(3)})
    store.put(1, {"r": torch.arange(4.0)})  # not [3]: kept as its own tensor
    store.put(2, {"r": torch.zeros(3, dtype=torch.float64)})
    assert torch.equal(store[1]["r"], torch.arange(4.0))
    assert store[2]["r"].dtype == torch.float64
    assert store.rows("r")[0].tolist() == [0]


def test_checkpoint_round_trip_is_equal_and_writes_one_array_per_key():
    store = ClientStore()
    gen = torch.Generator().manual_seed(0)
    want = {}
    for c in range(0, 3000, 3):
        s = {"codec/residual": torch.randn(61, generator=gen),
             "bn": torch.randn(4, generator=gen, dtype=torch.float64)}
        if c % 2:
            s["odd"] = torch.randn(c % 5 + 1, generator=gen)
        store.put(c, s)
        want[c] = s
    store.remove(3)
    want.pop(3)
    buf = io.BytesIO()
    torch.save({"client_states": store}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)["client_states"]
    assert isinstance(back, ClientStore)
    assert sorted(back) == sorted(want)
    for c, s in want.items():
        got = back[c]
        assert list(got) == list(s)
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in s.items())
    # the pickle holds one storage per key (plus the small odd values), not one per client
    state = store.__getstate__()
    assert set(state["rows"]) == {"codec/residual", "bn", "odd"}
    assert state["rows"]["codec/residual"][1].shape == (len(want), 61)
    back.put(5000, {"bn": torch.zeros(4, dtype=torch.float64)})  # a loaded store keeps growing
    assert 5000 in back


def test_from_dict_reads_the_old_dict_of_dicts():
    old = {c: _state(c) for c in (4, 2)}
    store = ClientStore.from_dict(old)
    assert sorted(store) == [2, 4]
    assert torch.equal(store[4]["scaffold/c_i"], old[4]["scaffold/c_i"])
    assert ClientStore.from_dict(store) is store


def test_a_store_of_another_format_is_refused():
    state = ClientStore().__getstate__()
    state["format"] = 99
    with pytest.raises(ValueError, match="format 99"):
        ClientStore().__setstate__(state)
