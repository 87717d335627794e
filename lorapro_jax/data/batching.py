"""Fixed-shape batches from in-memory arrays, shuffled deterministically, with a resumable position.

Every pipeline in ``lorapro_jax.data`` ends here: examples are tokenised/decoded once into a dict
of equally long numpy arrays (``input_ids`` of shape ``(N, max_length)``, ``labels`` of shape
``(N,)``, ...), and :class:`BatchIterator` cuts them into batches of one static shape, so a jitted
train step compiles once. The order of epoch ``e`` is ``permutation(N)`` drawn from
``numpy.random.default_rng([seed, e])``: it depends on nothing but the seed and the epoch, so the
position ``(epoch, index)`` is all a checkpoint needs to resume the exact same stream.

Example::

  it = BatchIterator({"x": np.arange(10), "y": np.arange(10) % 2}, batch_size=4, seed=0)
  first = next(it)
  saved = it.state()            # {"epoch": 0, "index": 4}
  second = next(it)
  it2 = BatchIterator({"x": np.arange(10), "y": np.arange(10) % 2}, batch_size=4, seed=0)
  it2.restore(saved)
  assert (next(it2)["x"] == second["x"]).all()
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
  if not arrays:
    raise ValueError("expected at least one array, got an empty mapping")
  lengths = {name: len(value) for name, value in arrays.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f"all arrays must have the same length, got {lengths}")
  n = next(iter(lengths.values()))
  if n == 0:
    raise ValueError("expected at least one example, got arrays of length 0")
  return n


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Endless (or ``epochs``-bounded) iterator of fixed-size batches over a dict of arrays.

  Args:
    arrays: equally long numpy arrays, one row per example.
    batch_size: rows per batch: the global batch (on many hosts, every host iterates the same
      batches and feeds its rows of each, :func:`lorapro_jax.sharding.mesh_batches`).
    seed: shuffling seed; ``shuffle=False`` keeps the stored order.
    drop_remainder: True (training) drops the last incomplete batch of each epoch so every batch
      has the static shape; False (evaluation) pads it with copies of row 0 and sets ``"mask"``
      to 0 on the padding, so metrics can ignore it.
    epochs: stop after this many epochs (None: endless).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = True, epochs: int | None = None):
    self.num_examples = _check_arrays(arrays)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_remainder and batch_size > self.num_examples:
      raise ValueError(f"batch_size {batch_size} exceeds the {self.num_examples} examples with "
                       "drop_remainder=True: no batch would ever be produced")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self.batch_size = batch_size
    self.seed = seed
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.epochs = epochs
    self.epoch = 0
    self.index = 0
    self._order = self._order_of(0)

  def _order_of(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  @property
  def steps_per_epoch(self) -> int:
    full, rest = divmod(self.num_examples, self.batch_size)
    return full + (0 if self.drop_remainder or rest == 0 else 1)

  def state(self) -> dict[str, int]:
    """The position to save with a checkpoint (plain ints, JSON-serialisable)."""
    return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continues from a position returned by :meth:`state` (same arrays and seed)."""
    if int(state.get("seed", self.seed)) != self.seed:
      raise ValueError(f"iterator state was saved with seed {state['seed']}, this iterator has "
                       f"seed {self.seed}")
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    if not 0 <= self.index <= self.num_examples:
      raise ValueError(f"index {self.index} outside [0, {self.num_examples}]")
    self._order = self._order_of(self.epoch)

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    remaining = self.num_examples - self.index
    if remaining <= 0 or (self.drop_remainder and remaining < self.batch_size):
      self.epoch += 1
      self.index = 0
      self._order = self._order_of(self.epoch)
    if self.epochs is not None and self.epoch >= self.epochs:
      raise StopIteration
    rows = self._order[self.index:self.index + self.batch_size]
    self.index += len(rows)
    mask = np.ones(self.batch_size, np.float32)
    if len(rows) < self.batch_size:
      mask[len(rows):] = 0.0
      rows = np.concatenate([rows, np.full(self.batch_size - len(rows), rows[0])])
    batch = {k: v[rows] for k, v in self.arrays.items()}
    batch["mask"] = mask
    return batch


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> BatchIterator:
  """One pass over all examples in stored order; the last batch is padded and masked."""
  return BatchIterator(arrays, batch_size, shuffle=False, drop_remainder=False, epochs=1)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int,
             pair: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Tokenises to fixed-shape int32 arrays ``input_ids``, ``attention_mask`` (and
  ``token_type_ids`` when the tokenizer makes them), padded/truncated to ``max_length``."""
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  encoded = tokenizer(list(texts), None if pair is None else list(pair), padding="max_length",
                      truncation=True, max_length=max_length, return_tensors="np")
  return {k: np.asarray(v, np.int32) for k, v in encoded.items()
          if k in ("input_ids", "attention_mask", "token_type_ids")}


def host_shard(arrays: Mapping[str, np.ndarray], process_index: int,
               process_count: int) -> dict[str, np.ndarray]:
  """The rows this host feeds of a global batch: a strided 1/process_count of every array."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside [0, {process_count})")
  return {k: np.asarray(v)[process_index::process_count] for k, v in arrays.items()}


def split_arrays(arrays: Mapping[str, np.ndarray], dev_fraction: float,
                 seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """A seeded random (train, dev) split of the rows."""
  n = _check_arrays(arrays)
  if not 0.0 < dev_fraction < 1.0:
    raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
  order = np.random.default_rng(seed).permutation(n)
  n_dev = max(1, int(round(n * dev_fraction)))
  dev, train = np.sort(order[:n_dev]), np.sort(order[n_dev:])
  return ({k: np.asarray(v)[train] for k, v in arrays.items()},
          {k: np.asarray(v)[dev] for k, v in arrays.items()})
