"""The tokenised examples of a data set, held as flat arrays instead of Python lists.

An `Examples` is a read-only sequence whose items are the ``{"input_ids": [...], "labels": [...]}``
dicts a list of examples holds, made when indexed from four arrays:

- ``input_ids`` (uint32): every example's tokens, one after the other;
- ``trained`` (uint8): 1 where the label is the token itself, 0 where it is -100;
- ``offsets`` (int64, n + 1): example i is ``input_ids[offsets[i]:offsets[i + 1]]``;
- ``label_pos`` / ``label_val`` (int64 / int32): the rare trained labels that are not the token
  (pre-tokenized records may carry any label), as (position in input_ids, label) pairs.

The arrays may be memory maps of a cache folder (`lowrank.data.cache`): an example's tokens are
read from the page cache when it is indexed, so a process holds only the offsets (8 bytes per
example) whatever the size of the data. 58 bytes per token as lists of ints become 5.

`ExampleWriter` appends examples to four binary files (or in-memory buffers) a chunk at a time.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

# The label of a position that is not trained (what torch's cross_entropy ignores by default).
IGNORE_INDEX = -100

# name -> dtype of the files (raw little-endian arrays, no header: their lengths are in meta.json).
ARRAYS = {"input_ids": np.dtype("<u4"), "trained": np.dtype("u1"), "offsets": np.dtype("<i8"),
          "label_pos": np.dtype("<i8"), "label_val": np.dtype("<i4")}


class Examples(Sequence):
    """Examples over flat arrays; `index` selects and orders a subset (an eval split)."""

    def __init__(self, arrays: dict[str, np.ndarray], index: np.ndarray | None = None):
        self.arrays = arrays
        self.index = index
        offsets = arrays["offsets"]
        all_lengths = np.diff(offsets)
        self.lengths = all_lengths if index is None else all_lengths[index]  # tokens per example, in order

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(np.arange(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        j = int(self.index[i]) if self.index is not None else int(i % len(self))
        a = self.arrays
        start, end = int(a["offsets"][j]), int(a["offsets"][j + 1])
        ids = np.asarray(a["input_ids"][start:end], dtype=np.int64)
        labels = np.where(a["trained"][start:end] != 0, ids, IGNORE_INDEX)
        if len(a["label_pos"]):
            lo, hi = np.searchsorted(a["label_pos"], [start, end])
            labels[a["label_pos"][lo:hi] - start] = a["label_val"][lo:hi]
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def subset(self, indices) -> "Examples":
        """The examples at `indices` (positions in this sequence), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Examples(self.arrays, indices if self.index is None else self.index[indices])

    def __eq__(self, other):
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Examples({len(self)} examples, {int(self.lengths.sum())} tokens)"


def example_lengths(examples) -> np.ndarray:
    """Tokens per example, without making the examples when they are `Examples`."""
    if isinstance(examples, Examples):
        return examples.lengths
    return np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)


class ExampleWriter:
    """Appends examples to the five arrays; `files` maps each name of ARRAYS to a binary file
    (default: in-memory buffers)."""

    def __init__(self, files: dict | None = None):
        self.files = files or {name: io.BytesIO() for name in ARRAYS}
        self.n_examples = self.n_tokens = self.n_label_values = 0
        self.files["offsets"].write(np.zeros(1, ARRAYS["offsets"]).tobytes())

    def add(self, ids: np.ndarray, trained: np.ndarray, labels: np.ndarray | None = None) -> None:
        """One example: its ids, which positions are trained, and (pre-tokenized records) their
        labels, of which only those that are not the token itself are kept."""
        self.files["input_ids"].write(np.asarray(ids, ARRAYS["input_ids"]).tobytes())
        self.files["trained"].write(np.asarray(trained, ARRAYS["trained"]).tobytes())
        if labels is not None:
            odd = np.flatnonzero(trained & (labels != ids))
            if len(odd):
                self.files["label_pos"].write((odd + self.n_tokens).astype(ARRAYS["label_pos"]).tobytes())
                self.files["label_val"].write(labels[odd].astype(ARRAYS["label_val"]).tobytes())
                self.n_label_values += len(odd)
        self.n_tokens += len(ids)
        self.n_examples += 1
        self.files["offsets"].write(np.array([self.n_tokens], ARRAYS["offsets"]).tobytes())

    def counts(self) -> dict[str, int]:
        """Entries per array, as meta.json records them."""
        return {"input_ids": self.n_tokens, "trained": self.n_tokens, "offsets": self.n_examples + 1,
                "label_pos": self.n_label_values, "label_val": self.n_label_values}

    def in_memory(self) -> Examples:
        """The examples written to in-memory buffers."""
        return Examples({name: np.frombuffer(f.getbuffer(), ARRAYS[name]) for name, f in self.files.items()})
