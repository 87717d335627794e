"""Does it deliver? Every method of the table, its learning rate tuned on a validation split,
reported on a held-out test split over seeds (issue 18).

The protocol, per task, for every method of :data:`lorapro_jax.methods.METHODS` with the same
steps and the same batches (the batch order depends on the seed only):

1. **grid**: each method trains at every learning rate of its grid (``points`` rates log-spaced
   over ``span`` decades, geometrically centred on ``LR_CENTRES[method]``) with each selection
   seed, and is evaluated on the validation split only. While the best rate is the grid's first
   or last, the grid grows by one more rate past that edge (at most ``extend`` = 2): a choice on
   the edge says the method's range was guessed wrong, not that the edge is its best;
2. **select**: per method, the rate with the best validation metric, averaged over the selection
   seeds (ties: the smaller rate; a diverged run counts as the worst);
3. **test**: the chosen rate with each test seed, evaluated on the validation split and, once per
   seed, on the test split: reported as mean ± sample std (ddof = 1). A test seed that is also a
   selection seed is the grid's run at that rate (same rate, same seed: the same training), so
   only the other test seeds train.

The default protocol is 7 methods × (5 rates × 2 selection seeds + 3 more test seeds) = 91 runs
(plus 2 per rate added past an edge) of
150 updates of 32 words per task (about 25 minutes per task on 2 CPU cores, one run after
another; a few on a GPU, runs side by side). The runs of a phase train side by side (:class:`MethodTrainer`:
one ``jax.vmap`` of the library's train step over their stacked states). Every finished method is
one JSON file (``<out>/<task>/runs/<method>.json``: its grid, choice and test runs) and a method
whose file exists is not run again, so the same command resumes: with ``--budget-minutes M`` it
starts no method after M minutes and exits with status 3 (incomplete; run it again), which fits
10-minute calls on a GPU machine. Once every method of a task exists it writes ``compare.json``
(protocol, full grid, selection, test results), ``compare.md`` (the table) and two plots into
``<out>/<task>``: ``lr_sweep.png`` (validation metric against learning rate per method, band ±1
std over the selection seeds, the chosen rate's test mean ± std marked) and ``loss_curves.png``
(training loss at the chosen rate, mean ± std over the test seeds). The test split is never used
to choose.

Tasks, offline, from the VADER lexicon (``vaderSentiment``: 7,517 tokens, each the mean of ten
human ratings on -4..+4):

* ``vader_sentiment``: is the token positive? Tokens with |mean| < 0.5 are dropped; the test split
  is the demo's seeded 20% dev split (:func:`lorapro_jax.data.vader.vader_sentiment`), validation a
  seeded 20% of the rest. Accuracy (selects), F1, MCC.
* ``vader_rating``: the mean rating / 4 of every token, regressed with a squared error; splits
  made the same way. Pearson (selects) and Spearman.
* ``vader_intensity``: the mean rating rounded to an integer, 9 classes (-4..+4) of every token;
  the same splits as ``vader_rating``. Accuracy (selects) and macro F1. Finer than the sign:
  the pretrained features separate positive from negative words, but not "good" from "great".

Classification tables also give the majority baseline: the training split's most frequent
class, scored on the test split.

Model: the pretrained MiniLM-L6 encoder + mean pooling + a linear head (:mod:`lorapro_jax.demo`:
LoRA r = 8, alpha 16 on the attention and MLP projections, dynamic rank from 12 to 8); ``--tiny``
swaps in a random 2-layer BERT of width 32 (tests, smoke runs).

Usage::

  python experiments/compare.py --out results/compare          # every task (make compare)
  python experiments/compare.py --task vader_rating --out results/compare --budget-minutes 9
  python experiments/compare.py --task vader_sentiment --quick --tiny --out /tmp/compare   # CI
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.results_table import mean_std  # noqa: E402
from lorapro_jax.data.batching import (BatchIterator, eval_batches, split_arrays,  # noqa: E402
                                       tokenize)
from lorapro_jax.data.vader import (load_vader_lexicon, vader_sentiment,  # noqa: E402
                                    validation_split)
from lorapro_jax.demo import (build_method, classifier_inputs, load_minilm,  # noqa: E402
                             minilm_path)
from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.metrics import compute_metrics, majority_baseline  # noqa: E402
from lorapro_jax.schedules import make_schedule  # noqa: E402
from lorapro_jax.train import (TrainState, make_eval_step, make_train_step,  # noqa: E402
                               write_json)
from lorapro_jax.trees import count_params  # noqa: E402

# Geometric centre of each method's learning-rate grid. Adam on the LoRA factors moves them by
# about lr per step whatever the gradient's size, so the LoRA family shares one range (the demo's
# quick-run choice, 1e-3); rsLoRA's scale alpha/sqrt(r) is sqrt(8) = 2.8x LoRA's, so the same
# factor steps move the kernel 2.8x further and its range sits lower; full fine-tuning moves
# every kernel by about lr; LoRA-Pro full forms its Adam direction on the full-rank equivalent
# gradient, so its rate moves the kernel as full fine-tuning's does and its range sits between.
LR_CENTRES = {"full": 5e-5, "lora": 1e-3, "rslora": 3e-4, "lora_pro": 1e-3,
              "lora_pro_full": 1e-4, "dynamic_rank": 1e-3, "lora_pro_dynamic_rank": 1e-3}
INCOMPLETE = 3  # exit status: the budget ran out before every run finished


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The comparison's settings (saved with the results)."""

  steps: int = 150                 # updates per run (linear schedule, warm-up 6%)
  batch_size: int = 32
  points: int = 5                  # learning rates per method
  span: float = 2.0                # decades covered by each grid
  extend: int = 2                  # rates added past an edge the choice sits on, at most
  select_seeds: tuple[int, ...] = (0, 1)
  test_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  max_length: int = 6              # tokens per word with [CLS] and [SEP] (1% of VADER's are longer)
  max_examples: int | None = None  # rows kept per split (None: all)

  def __post_init__(self):
    if self.points < 2 or self.span <= 0:
      raise ValueError(f"need points >= 2 and span > 0, got {self.points} and {self.span}")
    if not self.select_seeds or len(self.test_seeds) < 2:
      raise ValueError(f"need a selection seed and >= 2 test seeds (a std), got "
                       f"{self.select_seeds} and {self.test_seeds}")

  def grid(self, method: str) -> list[float]:
    """``points`` learning rates, log-spaced over ``span`` decades around the method's centre."""
    half = 10.0 ** (self.span / 2)
    centre = LR_CENTRES[method]
    return [float(lr) for lr in np.geomspace(centre / half, centre * half, self.points)]


QUICK = Protocol(steps=8, batch_size=8, points=5, select_seeds=(0,), test_seeds=(0, 1),
                 max_examples=64, extend=0)


# ------------------------------------------------------------------------------------- tasks


class Task(NamedTuple):
  """Tokenised splits and how to score them."""

  name: str
  splits: dict[str, dict[str, np.ndarray]]  # "train", "validation", "test"
  num_labels: int                           # 1: regression with a squared error
  metrics: tuple[str, ...]                  # the first one selects (higher is better)
  baseline: float | None                    # the training split's majority class, scored on test

  @property
  def regression(self) -> bool:
    return self.num_labels == 1


def _three_way(rest: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, dict]:
  train, validation = validation_split(rest)
  return {"train": train, "validation": validation, "test": test}


INTENSITY_LEVELS = 9  # the mean rating rounded to an integer of -4..+4


def vader_splits(name: str) -> dict[str, dict[str, np.ndarray]]:
  """Raw rows (``text``, ``label``) of a task's fixed train / validation / test split."""
  if name == "vader_sentiment":
    rest, test = vader_sentiment(margin=0.5, dev_fraction=0.2, seed=0)
    return _three_way(rest, test)
  lexicon = load_vader_lexicon()
  if name == "vader_rating":
    lexicon["label"] = lexicon["rating"] / 4.0  # in [-1, 1]
  elif name == "vader_intensity":
    lexicon["label"] = (np.clip(np.round(lexicon["rating"]), -4, 4) + 4).astype(np.int32)
  else:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  return _three_way(*split_arrays(lexicon, 0.2, seed=0))


# name: (outputs, metrics; the first selects)
TASKS = {"vader_sentiment": (2, ("accuracy", "f1", "mcc")),
         "vader_rating": (1, ("pearson", "spearman")),
         "vader_intensity": (INTENSITY_LEVELS, ("accuracy", "f1_macro"))}


def load_task(name: str, tokenizer: Any, protocol: Protocol) -> Task:
  num_labels, metrics = TASKS[name]
  splits = {}
  for split, rows in vader_splits(name).items():
    rows = {k: v[:protocol.max_examples] for k, v in rows.items()}
    encoded = tokenize(tokenizer, [str(t) for t in rows["text"]], protocol.max_length)
    encoded["labels"] = rows["label"].astype(np.float32 if num_labels == 1 else np.int32)
    splits[split] = encoded
  baseline = (None if num_labels == 1
              else majority_baseline(splits["train"]["labels"], splits["test"]["labels"]))
  return Task(name, splits, num_labels, metrics, baseline)


def load_encoder(tiny: bool, tokenizer: Any):
  """The pretrained MiniLM-L6 (or, ``tiny``, a random 2-layer BERT of width 32)."""
  from transformers import BertConfig, FlaxBertModel
  if not tiny:
    return load_minilm()
  return FlaxBertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64), seed=0)


# ---------------------------------------------------------------------------------- training


class Run(NamedTuple):
  """One trained setting: its record (``lr``, ``seed``, ``loss`` per step, ``validation``
  metrics, ``trainable_params``) and where its weights are (an index into a group)."""

  record: dict[str, Any]
  group: Any   # the trainer's handle on the weights (never read by the protocol)
  index: int


class MethodTrainer:
  """Trains one method of the table on a task, many settings at once.

  ``fit(settings)`` trains every ``(lr, seed)`` of ``settings``, ``side_by_side`` at a time
  (None: all): their states are stacked on a leading axis and one ``jax.vmap`` of the library's
  train step updates them all (each with its own batches, adapters, head and peak rate; the frozen
  base is shared). On a GPU that fills the device (the words are short, one run's batch leaves it
  idle); on a CPU it does not pay (batched products are slower there than one run after another:
  measured 1.8-2x per run-step on 2 cores), so there ``side_by_side`` is 1 and each run calls the
  library's jitted step as it is.
  ``test(runs)`` scores trained runs on the test split. The peak rate is an
  ``optax.inject_hyperparams`` hyperparameter held in each optimizer state.
  """

  def __init__(self, name: str, task: Task, encoder: Any, protocol: Protocol,
               side_by_side: int | None = None):
    self.task, self.protocol, self.side_by_side = task, protocol, side_by_side
    self.example = {k: v[:2] for k, v in task.splits["train"].items()}
    self._build = lambda seed: build_method(
        name, encoder.module, encoder.params, self.example, protocol.steps,
        jax.random.key(seed), num_labels=task.num_labels)
    setup = self._build(0)
    self.base = setup.base
    model, method = setup.model, setup.method
    unit = make_schedule("linear", 1.0, protocol.steps, warmup_ratio=0.06)

    def optimizer(peak):
      return method.optimizer(lambda count: peak * unit(count), scale=setup.scale,
                              dynamic=setup.dynamic)

    self.optimizer = optax.inject_hyperparams(optimizer)

    def outputs(params, batch):
      return model.apply({"params": params}, *classifier_inputs(batch)).astype(jnp.float32)

    def loss_fn(params, batch, rng):  # also ``self.loss_fn``: the tests train a run alone
      del rng
      out = outputs(params, batch)
      if task.regression:
        return jnp.mean((out[:, 0] - batch["labels"]) ** 2), out
      log_probs = jax.nn.log_softmax(out)
      return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], 1)), out

    def predict_fn(params, batch):
      out = outputs(params, batch)
      return {"predictions": out[:, 0] if task.regression else jnp.argmax(out, -1)}

    self.loss_fn = loss_fn
    # the update reads each run's peak from its state, so this one step serves every rate
    step = make_train_step(loss_fn, self.optimizer(peak=1.0), jit=False,
                           regularizer=method.regularizer(setup.dynamic))
    self.train_step = jax.jit(step, donate_argnums=0)
    self.train_steps = jax.jit(jax.vmap(step, in_axes=(0, None, 0)), donate_argnums=0)
    self.predict = jax.jit(jax.vmap(make_eval_step(predict_fn, jit=False),
                                    in_axes=(0, None, None)))

  def fit(self, settings: Sequence[tuple[float, int]]) -> list[Run]:
    """Trains every ``(lr, seed)``, ``side_by_side`` at a time: seed ``s`` fixes the head's and
    adapters' initialisation and the order of the batches, so a setting's result does not depend
    on what it is trained with."""
    size = self.side_by_side or len(settings)
    return [run for start in range(0, len(settings), size)
            for run in self._fit_group(settings[start:start + size])]

  def _fit_group(self, settings: Sequence[tuple[float, int]]) -> list[Run]:
    setups = {seed: self._build(seed) for seed in sorted({seed for _, seed in settings})}
    for setup in setups.values():  # the shared frozen base must be the same for every seed
      if jax.tree.structure(setup.base) != jax.tree.structure(self.base) or not all(
          a is b or np.array_equal(a, b)
          for a, b in zip(jax.tree.leaves(setup.base), jax.tree.leaves(self.base))):
        raise AssertionError("the frozen base depends on the seed: runs cannot share it")
    states = [TrainState.create(setups[seed].trainable, self.optimizer(peak=lr),
                                jax.random.key(seed)) for lr, seed in settings]
    streams = [BatchIterator(self.task.splits["train"], self.protocol.batch_size, seed=seed)
               for _, seed in settings]
    started, losses = time.perf_counter(), []
    if len(settings) == 1:  # the library's step as it is: no batch axis of one to carry around
      state, stream = states[0], streams[0]
      for _ in range(self.protocol.steps):
        state, metrics = self.train_step(state, self.base, next(stream))
        losses.append(metrics["loss"][None])
      stacked = jax.tree.map(lambda x: x[None], state)
    else:
      stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
      for _ in range(self.protocol.steps):
        batches = [next(stream) for stream in streams]
        batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        stacked, metrics = self.train_steps(stacked, self.base, batch)
        losses.append(metrics["loss"])
    del states
    losses = np.asarray(jax.device_get(losses), np.float64).T        # (settings, steps)
    validation = self._score(stacked, "validation")
    seconds = (time.perf_counter() - started) / len(settings)
    params = count_params(jax.tree.map(lambda x: x[0], stacked.trainable))
    return [Run({"lr": lr, "seed": seed, "loss": losses[i].tolist(), "validation": validation[i],
                 "trainable_params": params, "seconds": seconds}, stacked, i)
            for i, (lr, seed) in enumerate(settings)]

  def test(self, runs: Sequence[Run]) -> list[dict[str, float]]:
    """The test metrics of each run (the only place the test split is read): only these runs'
    weights are taken out of their groups and scored, each once."""
    scores: dict[tuple[int, int], dict[str, float]] = {}
    groups = {id(run.group): run.group for run in runs}
    for key, group in groups.items():
      indices = [run.index for run in runs if id(run.group) == key]
      chosen = jax.tree.map(lambda x, i=np.asarray(indices): x[i], group)
      scores.update(zip([(key, i) for i in indices], self._score(chosen, "test")))
    return [scores[(id(run.group), run.index)] for run in runs]

  def _score(self, stacked: TrainState, split: str) -> list[dict[str, float]]:
    predictions, labels, masks = [], [], []
    for batch in eval_batches(self.task.splits[split], 256):
      predictions.append(np.asarray(self.predict(stacked, self.base, batch)["predictions"]))
      labels.append(batch["labels"])
      masks.append(batch["mask"])
    predictions = np.concatenate(predictions, axis=1)
    labels, mask = np.concatenate(labels), np.concatenate(masks)
    return [compute_metrics(self.task.metrics, row, labels, mask) for row in predictions]


# ---------------------------------------------------------------------------------- protocol


class Trainer(typing.Protocol):
  """What :func:`run_protocol` needs of a method's trainer (:class:`MethodTrainer`)."""

  def fit(self, settings: Sequence[tuple[float, int]]) -> list[Run]: ...
  def test(self, runs: Sequence[Run]) -> list[dict[str, float]]: ...


def _select(records: Sequence[dict], metric: str) -> tuple[float, dict[float, list[float]]]:
  """The learning rate with the best mean validation ``metric`` (ties: the smaller rate; NaN,
  a diverged run, counts as -inf) and the values per rate."""
  values: dict[float, list[float]] = {}
  for record in records:
    value = record["validation"][metric]
    values.setdefault(record["lr"], []).append(-math.inf if math.isnan(value) else value)
  best = max(sorted(values), key=lambda lr: float(np.mean(values[lr])))  # max keeps the first
  return best, values


def _beyond_edge(records: Sequence[dict], metric: str, protocol: Protocol) -> float | None:
  """The next rate past the grid's edge if the choice sits on that edge (its optimum may lie
  beyond), else None; one grid step further, at most ``protocol.extend`` rates past the
  planned grid."""
  lr, values = _select(records, metric)
  rates = sorted(values)
  if len(rates) - protocol.points >= protocol.extend or rates[0] < lr < rates[-1]:
    return None
  step = 10.0 ** (protocol.span / (protocol.points - 1))
  return rates[0] / step if lr == rates[0] else rates[-1] * step


def run_method(trainer: Trainer, method: str, protocol: Protocol, metric: str,
               previous: dict[str, Any] | None = None) -> dict[str, Any]:
  """One method's protocol: the grid with the selection seeds (validation only), extended one
  rate at a time while the choice sits on its edge, the choice, then the test seeds at the
  chosen rate, each scored once on the test split.

  A test seed that is also a selection seed reuses its grid run (same rate, same seed: the
  same training), so only the other test seeds train again. ``previous``: this method's
  earlier result (its file), whose grid is extended if its choice sat on an edge; its test
  runs stand if the choice does not move.
  """
  if previous is None:
    grid = trainer.fit([(lr, seed) for lr in protocol.grid(method)
                        for seed in protocol.select_seeds])
  else:  # records only: their weights are gone, but a moved choice is a new rate anyway
    grid = [Run(record, None, -1) for record in previous["grid"]]
  while (beyond := _beyond_edge([run.record for run in grid], metric, protocol)) is not None:
    grid += trainer.fit([(beyond, seed) for seed in protocol.select_seeds])
  lr, values = _select([run.record for run in grid], metric)
  if previous is not None and previous["selection"]["lr"] == lr:
    tests = previous["test"]
  else:
    reused = {run.record["seed"]: run for run in grid if run.record["lr"] == lr}
    fresh = [seed for seed in protocol.test_seeds if seed not in reused]
    trained = {run.record["seed"]: run for run in (trainer.fit([(lr, s) for s in fresh])
                                                    if fresh else [])}
    runs = [reused.get(seed) or trained[seed] for seed in protocol.test_seeds]
    tests = [{**run.record, "test": scores} for run, scores in zip(runs, trainer.test(runs))]
  return {"grid": [run.record for run in grid],
          "selection": {"lr": lr, "validation_mean": float(np.mean(values[lr])),
                        "validation_by_lr": {f"{k:.4e}": v for k, v in sorted(values.items())}},
          "test": tests}


def run_protocol(trainer_of: Callable[[str], Trainer], methods: Sequence[str],
                 protocol: Protocol, metric: str, run_dir: str,
                 budget_seconds: float | None = None) -> dict[str, Any] | None:
  """Runs (or reads back) every method's protocol; the results, or None if the budget ran out.

  Each finished method is one file ``<run_dir>/<method>.json``, read back instead of trained
  again (unless its choice sits on the grid's edge with extensions left: then its grid is
  extended); with a budget no method starts after ``budget_seconds``.
  """
  started = time.perf_counter()
  done = {}
  for method in methods:
    path = os.path.join(run_dir, f"{method}.json")
    previous = None
    if os.path.exists(path):
      with open(path, encoding="utf-8") as handle:
        previous = json.load(handle)
      if _beyond_edge(previous["grid"], metric, protocol) is None:
        done[method] = previous
        continue
    if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
      return None
    done[method] = run_method(trainer_of(method), method, protocol, metric, previous)
    write_json(path, done[method])
  summary = {}
  for method, result in done.items():
    records = result["test"]
    summary[method] = {"lr": result["selection"]["lr"], "seeds": list(protocol.test_seeds),
                       "trainable_params": records[0]["trainable_params"]}
    for split in ("validation", "test"):
      for name in records[0][split]:
        mean, std = mean_std(r[split][name] for r in records)
        summary[method][f"{split}_{name}"] = {"mean": mean, "std": std,
                                              "values": [r[split][name] for r in records]}
  return {"grid": [{k: v for k, v in r.items() if k != "loss"}
                   for result in done.values() for r in result["grid"]],
          "selection": {m: result["selection"] for m, result in done.items()},
          "results": summary,
          "loss_curves": {m: [r["loss"] for r in result["test"]] for m, result in done.items()}}


# ------------------------------------------------------------------------------------ report


def markdown_table(payload: dict[str, Any]) -> str:
  metric, metrics = payload["metric"], payload["metrics"]
  n = len(payload["protocol"]["test_seeds"])
  lines = [f"| method | lr (chosen on validation) | validation {metric} ×100 (selection seeds) | "
           + " | ".join(f"test {m} ×100 (mean ± std, {n} seeds)" for m in metrics)
           + " | trainable params |", "|---" * (3 + len(metrics)) + "|---|"]
  for method, row in payload["results"].items():
    cells = [f"{100 * row[f'test_{m}']['mean']:.1f} ± {100 * row[f'test_{m}']['std']:.1f}"
             for m in metrics]
    chosen = payload["selection"][method]
    lines.append(f"| {method} | {row['lr']:.2e} | {100 * chosen['validation_mean']:.1f} | "
                 + " | ".join(cells)
                 + f" | {row['trainable_params']:,} |")
  if payload["baseline"] is not None:
    lines.append(f"\nMajority-class baseline (the training split's most frequent class) on the test split: {100 * payload['baseline']:.1f}%.")
  return "\n".join(lines)


def plot_lr_sweep(payload: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metric = payload["metric"]
  figure, axis = plt.subplots(figsize=(8, 4.5))
  for method, choice in payload["selection"].items():
    lrs = sorted(float(k) for k in choice["validation_by_lr"])
    values = [np.asarray(choice["validation_by_lr"][f"{lr:.4e}"]) for lr in lrs]
    mean = np.array([v.mean() for v in values])
    std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
    line, = axis.plot(lrs, mean, "o-", label=method)
    axis.fill_between(lrs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    test = payload["results"][method][f"test_{metric}"]
    axis.errorbar([choice["lr"]], [test["mean"]], yerr=[test["std"]], fmt="D",
                  color=line.get_color(), markeredgecolor="black", capsize=3)
  axis.set(xscale="log", xlabel="peak learning rate", ylabel=metric,
           title=f"{payload['task']}: validation {metric} (band: ±1 std over seeds)\n"
                 f"◆ test {metric} at the chosen rate (±1 std over seeds)")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_loss_curves(payload: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(8, 4.5))
  for method, curves in payload["loss_curves"].items():
    losses = np.asarray(curves)                       # (seeds, steps)
    window = max(1, losses.shape[1] // 10)   # the batches are small: a loss per step is noisy
    kernel = np.ones(window) / window
    smooth = np.stack([np.convolve(row, kernel, mode="valid") for row in losses])
    steps = np.arange(window, losses.shape[1] + 1)
    mean, std = smooth.mean(0), smooth.std(0, ddof=1)
    line, = axis.plot(steps, mean, label=f"{method} (lr {payload['results'][method]['lr']:.1e})")
    axis.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
  axis.set(xlabel="step", ylabel="train loss (moving average)", yscale="log",
           title=f"{payload['task']}: training loss at the chosen rate\n(band: ±1 std over seeds)")
  axis.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def write_report(payload: dict[str, Any], out_dir: str) -> None:
  write_json(os.path.join(out_dir, "compare.json"),
             {k: v for k, v in payload.items() if k != "loss_curves"})
  with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as handle:
    handle.write(markdown_table(payload) + "\n")
  plot_lr_sweep(payload, os.path.join(out_dir, "lr_sweep.png"))
  plot_loss_curves(payload, os.path.join(out_dir, "loss_curves.png"))


# -------------------------------------------------------------------------------------- main


def compare(task_name: str, out_dir: str, protocol: Protocol = Protocol(), *,
            methods: Sequence[str] = tuple(METHODS), tiny: bool = False,
            budget_seconds: float | None = None,
            side_by_side: int | None = None) -> dict[str, Any] | None:
  """Runs the protocol for ``task_name``; returns the report's payload (None: incomplete).

  ``side_by_side``: runs trained at once (:class:`MethodTrainer`); 0 all of a phase, None the
  backend's default (1 on a CPU, all elsewhere)."""
  from transformers import AutoTokenizer
  missing = sorted(set(METHODS) - set(LR_CENTRES))
  if missing:
    raise ValueError(f"methods {missing} of the table have no learning-rate centre in LR_CENTRES")
  started = time.perf_counter()
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  task = load_task(task_name, tokenizer, protocol)
  encoder = load_encoder(tiny, tokenizer)
  task_dir = os.path.join(out_dir, task_name)
  names = [METHODS[m].name for m in methods]  # an unknown name: a KeyError listing the known
  if side_by_side is None and jax.default_backend() == "cpu":
    side_by_side = 1   # see MethodTrainer: one run after another is faster on a CPU
  results = run_protocol(lambda method: MethodTrainer(method, task, encoder, protocol,
                                                      side_by_side or None), names,
                         protocol, task.metrics[0], os.path.join(task_dir, "runs"),
                         budget_seconds)
  if results is None:
    return None
  payload = {"task": task_name, "metric": task.metrics[0], "metrics": list(task.metrics),
             "model": "random tiny BERT" if tiny else "all-MiniLM-L6-v2 (pretrained)",
             "protocol": dataclasses.asdict(protocol), "lr_centres": LR_CENTRES,
             "split_sizes": {k: int(len(v["labels"])) for k, v in task.splits.items()},
             "baseline": task.baseline, "wall_seconds_this_call": time.perf_counter() - started,
             "device": jax.devices()[0].device_kind, "side_by_side": side_by_side or "all",
             **results}
  write_report(payload, task_dir)
  return payload


def main(argv=None) -> dict[str, dict[str, Any]]:
  """Every task named (default: all) in turn; the payloads by task."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS),
                      help="tasks to run, in order (default: all)")
  parser.add_argument("--out", default="results/compare")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--quick", action="store_true",
                      help="CI size: 8 steps of 8 rows, 64 rows per split, 1 + 2 seeds")
  parser.add_argument("--tiny", action="store_true", help="a random 2-layer BERT (smoke runs)")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--points", type=int, help="learning rates per method (default 5)")
  parser.add_argument("--budget-minutes", type=float,
                      help=f"start no method after this long; exit {INCOMPLETE} if some remain")
  parser.add_argument("--side-by-side", type=int,
                      help="runs trained at once by one vmapped step (0: all of a phase; "
                           "default: 1 on a CPU, all on an accelerator)")
  args = parser.parse_args(argv)
  protocol = QUICK if args.quick else Protocol()
  overrides = {k: v for k, v in (("steps", args.steps), ("points", args.points)) if v is not None}
  protocol = dataclasses.replace(protocol, **overrides)
  started, payloads = time.perf_counter(), {}
  for task in args.task:
    budget = (None if args.budget_minutes is None
              else 60.0 * args.budget_minutes - (time.perf_counter() - started))
    payload = compare(task, args.out, protocol, methods=args.methods, tiny=args.tiny,
                      budget_seconds=budget, side_by_side=args.side_by_side)
    if payload is None:
      print("incomplete: the budget ran out; run the same command again to continue")
      raise SystemExit(INCOMPLETE)
    print(f"\n{task}:\n{markdown_table(payload)}")
    print(f"wrote {os.path.join(args.out, task)}/compare.json, compare.md, lr_sweep.png, "
          "loss_curves.png")
    payloads[task] = payload
  print(f"all tasks: {time.perf_counter() - started:.0f} s")
  return payloads


if __name__ == "__main__":
  main()
