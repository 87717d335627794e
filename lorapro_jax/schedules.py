"""Learning-rate schedules with linear warm-up, as the papers use them (optax schedules).

``lr(t)`` rises linearly from 0 to ``peak`` over ``w = round(warmup_ratio·T)`` steps (or
``warmup_steps``), then decays to ``end`` at step T:

* ``cosine``:   ``end + (peak − end)·(1 + cos(π·(t − w)/(T − w)))/2``  (LoRA-Pro: warm-up 0.03)
* ``linear``:   ``peak + (end − peak)·(t − w)/(T − w)``                 (DoRA / HF default)
* ``constant``: ``peak`` after warm-up.

>>> lr = make_schedule("cosine", 1e-4, total_steps=1000, warmup_ratio=0.03)
>>> [round(float(lr(t)), 8) for t in (0, 15, 30, 515, 1000)]    # warm-up 30 steps, then cosine
[0.0, 5e-05, 0.0001, 5e-05, 0.0]
"""
from __future__ import annotations

import optax


def make_schedule(kind: str, peak: float, total_steps: int, *, warmup_ratio: float = 0.0,
                  warmup_steps: int | None = None, end: float = 0.0) -> optax.Schedule:
  """The schedule ``kind`` ('cosine', 'linear', 'constant') over ``total_steps`` updates."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  if peak <= 0:
    raise ValueError(f"peak learning rate must be > 0, got {peak}")
  if not 0.0 <= warmup_ratio < 1.0:
    raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
  warmup = round(warmup_ratio * total_steps) if warmup_steps is None else warmup_steps
  if not 0 <= warmup < total_steps:
    raise ValueError(f"warm-up of {warmup} steps must be shorter than the {total_steps} steps")
  decay_steps = total_steps - warmup
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"unknown schedule {kind!r}; expected 'cosine', 'linear' or 'constant'")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
