"""Shakespeare by speaking role: LEAF-style next-character prediction.

LEAF (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018; data from
McMahan et al., 2017) makes one client per (play, role): the role's lines are one text,
and every window of ``SEQ_LEN = 80`` characters is a sample whose label is the character
that follows it. The vocabulary is LEAF's ``ALL_LETTERS`` (80 characters, index = the
position in that string; LEAF's ``letter_to_index``).

What this module does (read from ``<data_dir>/shakespeare_plays/<play>.txt``):

- **Roles** follow the client-id rule of that folder's SOURCE.md (the rule behind
  ``roles.tsv``): blocks after the first ACT/INDUCTION/PROLOGUE/SCENE heading, a label
  line starts a turn, unlabelled blocks continue the current speaker, headings reset it,
  stage directions (``[...]``) are dropped. A role's text is its speech lines, each
  followed by ``"\\n"`` (newline is in LEAF's vocabulary). ``roles.tsv`` was made by a
  heuristic with some unstated details; our per-role line and character counts agree
  with it exactly for most roles (a test checks the share), not for all.
- **Samples**: window ``i`` is ``text[i:i+80]`` with label ``text[i+80]`` for
  ``i = 0, stride, 2·stride, ...`` (``stride = 1`` is LEAF: every position), so a role
  with ``L`` characters has ``ceil((L-80)/stride)`` samples.
- **Train/test per role**: the *last* ``max(1, round(test_fraction·n))`` samples of the
  role (in text order) are its test set, the rest its training set: a temporal split
  as in McMahan et al. / LEAF's non-random sample split, so the test text comes after
  the training text. Roles with fewer than 2 samples are dropped (they cannot have
  both). The windows at the boundary overlap the training text by up to 79 characters,
  as in LEAF.
- **Client order**: a fixed permutation (``SPLIT_SEED``) of all kept roles, so the first
  ``num_clients`` roles span many plays; it does not depend on the run seed.
- **Encoding**: inputs are stored as float32 character indices ``[n, 80]`` (exact for
  integers < 2^24) so that the runtime's float pipeline moves them unchanged; the text
  models cast them back to ``long`` (:class:`fedflat.models.zoo.CharLSTM`). Characters
  outside the vocabulary (none occur in these files) map to the space's index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedflat.errors import DataError

SEQ_LEN = 80
# LEAF's models/shakespeare ALL_LETTERS, verbatim (80 characters).
ALL_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
VOCAB_SIZE = len(ALL_LETTERS)
_INDEX = {c: i for i, c in enumerate(ALL_LETTERS)}
_UNKNOWN = _INDEX[" "]

_START = re.compile(r"^(ACT|INDUCTION|PROLOGUE|SCENE [IVXLC]+)")
_HEADING = re.compile(r"^(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)", re.IGNORECASE)
_LABEL_DOT = re.compile(r"^[A-Z][A-Za-z'\- ]{0,40}\.$")
_LABEL_CAPS = re.compile(r"^[A-Z][A-Z'\- ]{1,40}$")


def encode(text: str) -> np.ndarray:
    """Character indices in ``ALL_LETTERS`` (int64); unknown characters -> space."""
    return np.fromiter((_INDEX.get(c, _UNKNOWN) for c in text), dtype=np.int64, count=len(text))


def decode(indices: np.ndarray) -> str:
    """Inverse of :func:`encode` for in-vocabulary text."""
    return "".join(ALL_LETTERS[int(i)] for i in indices)


def parse_roles(text: str) -> dict[str, list[str]]:
    """Speech lines of each role of one play, in order of first appearance."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line)), len(lines))
    roles: dict[str, list[str]] = {}
    current: str | None = None
    for raw in re.split(r"\n\s*\n", "\n".join(lines[start:])):
        block = [line for line in raw.split("\n") if line.strip()]
        if not block or block[0].startswith("["):
            continue
        if _HEADING.match(block[0]):
            current = None
            continue
        if len(block) >= 2 and (_LABEL_DOT.match(block[0]) or _LABEL_CAPS.match(block[0])):
            current = block[0].removesuffix(".")
            speech = block[1:]
        elif current is None:
            continue
        else:
            speech = block
        roles.setdefault(current, []).extend(s for s in speech if not s.startswith("["))
    return roles


@dataclass(frozen=True)
class RoleText:
    """One client: its (play, role) id and its encoded text."""

    play: str
    role: str
    codes: np.ndarray  # int64 character indices


def read_roles(folder: Path) -> list[RoleText]:
    """All roles of all plays in ``folder`` (plays sorted by file name)."""
    out = []
    for path in sorted(folder.glob("*.txt")):
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"dataset 'shakespeare': cannot read {path}: {err}") from err
        for role, speech in parse_roles(text).items():
            out.append(RoleText(path.stem, role, encode("".join(s + "\n" for s in speech))))
    return out


def windows(codes: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of one role: ``x [n, SEQ_LEN]`` and next-character labels ``y [n]``."""
    starts = np.arange(0, max(len(codes) - SEQ_LEN, 0), stride)
    x = codes[starts[:, None] + np.arange(SEQ_LEN)]
    return x.reshape(len(starts), SEQ_LEN), codes[starts + SEQ_LEN]


def split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) sample counts of a role with ``n >= 2`` samples: last ones are test."""
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    return n - n_test, n_test
