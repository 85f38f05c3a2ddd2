"""Per-client state (SCAFFOLD control variates, error-feedback residuals, BatchNorm
statistics, ...) as rows of one array per state key.

A dict of small tensors per client costs a Python object per tensor and, checkpointed,
one pickled storage per tensor (10-40 s for 10⁵ clients). :class:`ClientStore` holds only
the clients that have state, each key's values as rows of one ``[capacity, *shape]``
tensor grown by doubling, and pickles (``torch.save``, Ray) as one compact array per key.
It reads like the ``Mapping[int, dict[str, Tensor]]`` it replaces, so code and files that
iterate the clients' states keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_FORMAT = 1
_MIN_CAPACITY = 16


class _Rows:
    """One state key: a ``[capacity, *shape]`` tensor, the row of each client, free rows."""

    __slots__ = ("data", "free", "slot", "used")

    def __init__(self, like: Tensor, capacity: int = _MIN_CAPACITY) -> None:
        self.data = like.new_empty((capacity, *like.shape))
        self.slot: dict[int, int] = {}
        self.free: list[int] = []
        self.used = 0  # rows ever handed out (the high-water mark)

    def fits(self, value: Tensor) -> bool:
        return value.shape == self.data.shape[1:] and value.dtype == self.data.dtype

    def put(self, client: int, value: Tensor) -> None:
        row = self.slot.get(client)
        if row is None:
            if self.free:
                row = self.free.pop()
            else:
                if self.used == len(self.data):
                    grown = self.data.new_empty((2 * len(self.data), *self.data.shape[1:]))
                    grown[: self.used] = self.data[: self.used]
                    self.data = grown
                row, self.used = self.used, self.used + 1
            self.slot[client] = row
        self.data[row] = value

    def drop(self, client: int) -> None:
        row = self.slot.pop(client, None)
        if row is not None:
            self.free.append(row)

    def get(self, client: int) -> Tensor:
        return self.data[self.slot[client]].clone()

    def compact(self) -> tuple[Tensor, Tensor]:
        """(client ids, their rows) in client order, as fresh contiguous tensors (a view
        would pickle the whole grown storage)."""
        ids = torch.tensor(sorted(self.slot), dtype=torch.int64)
        rows = torch.tensor([self.slot[c] for c in ids.tolist()], dtype=torch.int64)
        return ids, self.data.index_select(0, rows)

    @classmethod
    def from_arrays(cls, ids: Tensor, rows: Tensor) -> _Rows:
        out = cls(rows[0] if len(rows) else rows.new_empty(rows.shape[1:]),
                  capacity=max(len(rows), _MIN_CAPACITY))
        out.data[: len(rows)] = rows
        out.slot = dict(zip(ids.tolist(), range(len(rows)), strict=True))
        out.used = len(rows)
        return out


class ClientStore(Mapping[int, dict[str, Tensor]]):
    """The per-client state of a run: ``store[c]`` is client c's state dict (a copy).

    Only clients with a non-empty state are held; ``put`` replaces a client's whole state
    (keys it no longer has are dropped). A value whose shape or dtype differs from its
    key's rows is kept apart as a tensor of its own, so no state is ever refused.
    """

    def __init__(self) -> None:
        self._rows: dict[str, _Rows] = {}
        self._keys: dict[int, tuple[str, ...]] = {}  # each client's keys, in its dict order
        self._odd: dict[tuple[int, str], Tensor] = {}
        self._signatures: dict[tuple[str, ...], tuple[str, ...]] = {}

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, client: int) -> dict[str, Tensor]:
        keys = self._keys[int(client)]
        c = int(client)
        return {k: (self._odd[(c, k)].clone() if (c, k) in self._odd else self._rows[k].get(c))
                for k in keys}

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, client: object) -> bool:
        return client in self._keys

    # ------------------------------------------------------------------ updates
    def put(self, client: int, state: Mapping[str, Tensor]) -> None:
        """Set client ``client``'s state to ``state`` (an empty one removes the client)."""
        c = int(client)
        self.remove(c)
        if not state:
            return
        for k, v in state.items():
            v = v.detach()
            rows = self._rows.get(k)
            if rows is None:
                rows = self._rows[k] = _Rows(v)
            if rows.fits(v):
                rows.put(c, v)
            else:
                self._odd[(c, k)] = v.clone()
        keys = tuple(state)
        self._keys[c] = self._signatures.setdefault(keys, keys)  # one tuple per key order

    def remove(self, client: int) -> None:
        c = int(client)
        for k in self._keys.pop(c, ()):
            if self._odd.pop((c, k), None) is None:
                self._rows[k].drop(c)

    def put_many(self, clients: Sequence[int], states: Sequence[Mapping[str, Tensor]]) -> None:
        for c, s in zip(clients, states, strict=True):
            self.put(c, s)

    def get_many(self, clients: Iterable[int]) -> list[dict[str, Tensor]]:
        """The states of ``clients`` (``{}`` for a client without state): what a round moves."""
        return [self[c] if c in self._keys else {} for c in clients]

    def rows(self, key: str) -> tuple[Tensor, Tensor]:
        """``(client ids, values)`` of every client holding ``key`` in its rows, in client
        order (values ``[n, *shape]``, a copy)."""
        if key not in self._rows:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        return self._rows[key].compact()

    def nbytes(self) -> int:
        """Bytes of the row arrays (allocated capacity) and of the odd values."""
        return (sum(r.data.numel() * r.data.element_size() for r in self._rows.values())
                + sum(v.numel() * v.element_size() for v in self._odd.values()))

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # Key orders are few distinct tuples: stored once, referenced per client.
        signatures: dict[tuple[str, ...], int] = {}
        sig = [signatures.setdefault(keys, len(signatures)) for keys in self._keys.values()]
        return {"format": _FORMAT,
                "clients": torch.tensor(list(self._keys), dtype=torch.int64),
                "signature_of": torch.tensor(sig, dtype=torch.int64),
                "signatures": list(signatures),
                "rows": {k: r.compact() for k, r in self._rows.items()},
                "odd": dict(self._odd)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.get("format") != _FORMAT:
            raise ValueError(f"client store format {state.get('format')} is not {_FORMAT}")
        sigs = [tuple(s) for s in state["signatures"]]
        self._keys = {c: sigs[s] for c, s in zip(state["clients"].tolist(),
                                                 state["signature_of"].tolist(), strict=True)}
        self._rows = {k: _Rows.from_arrays(ids, rows) for k, (ids, rows) in state["rows"].items()}
        self._odd = dict(state["odd"])
        self._signatures = {s: s for s in sigs}

    @classmethod
    def from_dict(cls, states: Mapping[int, Mapping[str, Tensor]]) -> ClientStore:
        """A store holding ``states`` (a checkpoint written before the store existed)."""
        if isinstance(states, ClientStore):
            return states
        store = cls()
        for c, s in states.items():
            store.put(c, s)
        return store

    def __repr__(self) -> str:
        return (f"ClientStore({len(self)} clients, keys {sorted(self._rows)}, "
                f"{self.nbytes() / 2**20:.1f} MiB)")
