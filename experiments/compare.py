"""Does it deliver? Every method of the table, its learning rate tuned on a validation split,
reported on a held-out test split over seeds (issue 18).

The protocol, per task, for every method of :data:`lorapro_jax.methods.METHODS` with the same
steps and the same batches (the batch order depends on the seed only):

1. **grid**: each method trains at every learning rate of its grid (``points`` rates log-spaced
   over ``span`` decades, geometrically centred on ``LR_CENTRES[method]``) with each selection
   seed, and is evaluated on the validation split only;
2. **select**: per method, the rate with the best validation metric, averaged over the selection
   seeds (ties: the smaller rate; a diverged run counts as the worst);
3. **test**: the chosen rate trains again with each test seed and is evaluated on the validation
   split and, once per seed, on the test split: reported as mean ± sample std (ddof = 1). (A run
   depends only on its method, rate and seed, so a test seed that was also a selection seed
   trains exactly its grid run again; weights are not kept between phases.)

The default protocol is 7 methods × (5 rates × 2 selection seeds + 5 test seeds) = 105 runs of
200 updates of 32 words per task. Every finished run is one JSON file
(``<out>/<task>/runs/<method>/...``) and a run whose file exists is not run again, so the same
command resumes: with ``--budget-minutes M`` it starts no run after M minutes and exits with
status 3 (incomplete; run it again), which fits 10-minute calls on a GPU machine. Once every run exists it writes ``compare.json`` (protocol, full grid, selection,
test results), ``compare.md`` (the table) and two plots into ``<out>/<task>``:
``lr_sweep.png`` (validation metric against learning rate per method, band ±1 std over the
selection seeds, the chosen rate's test mean ± std marked) and ``loss_curves.png`` (training loss
at the chosen rate, mean ± std over the test seeds). The test split is never used to choose.

Tasks, offline, from the VADER lexicon (``vaderSentiment``: 7,517 tokens, each the mean of ten
human ratings on -4..+4):

* ``vader_sentiment``: is the token positive? Tokens with |mean| < 0.5 are dropped; the test split
  is the demo's seeded 20% dev split (:func:`lorapro_jax.data.vader.vader_sentiment`), validation a
  seeded 20% of the rest. Accuracy (selects), F1, MCC; baseline: the test split's majority rate.
* ``vader_rating``: the mean rating / 4 of every token, regressed with a squared error; splits
  made the same way. Pearson (selects) and Spearman.

Model: the pretrained MiniLM-L6 encoder + mean pooling + a linear head (:mod:`lorapro_jax.demo`:
LoRA r = 8, alpha 16 on the attention and MLP projections, dynamic rank from 12 to 8); ``--tiny``
swaps in a random 2-layer BERT of width 32 (tests, smoke runs).

Usage::

  python experiments/compare.py --task vader_sentiment --out results/compare
  python experiments/compare.py --task vader_rating --out results/compare --budget-minutes 9
  python experiments/compare.py --task vader_sentiment --quick --tiny --out /tmp/compare   # CI

One jitted train step per method serves all its learning rates and seeds: the peak rate is an
``optax.inject_hyperparams`` hyperparameter held in the optimizer state, not a constant of the
compiled program.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
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
from lorapro_jax.data.vader import load_vader_lexicon, vader_sentiment  # noqa: E402
from lorapro_jax.demo import (build_method, classifier_inputs, load_minilm,  # noqa: E402
                             minilm_path)
from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.schedules import make_schedule  # noqa: E402
from lorapro_jax.train import (TrainState, evaluate, fit, make_eval_step,  # noqa: E402
                               make_train_step, write_json)
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

  steps: int = 200                 # updates per run (linear schedule, warm-up 6%)
  batch_size: int = 32
  points: int = 5                  # learning rates per method
  span: float = 2.0                # decades covered by each grid
  select_seeds: tuple[int, ...] = (0, 1)
  test_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  max_length: int = 8              # tokens per word (VADER tokens are short)
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
                 max_examples=64)


# ------------------------------------------------------------------------------------- tasks


class Task(NamedTuple):
  """Tokenised splits and how to score them."""

  name: str
  splits: dict[str, dict[str, np.ndarray]]  # "train", "validation", "test"
  regression: bool                          # one output and a squared error, else 2 classes
  metrics: tuple[str, ...]                  # the first one selects (higher is better)
  baseline: float | None                    # majority rate of the test split (classification)


def _three_way(rest: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, dict]:
  train, validation = split_arrays(rest, 0.2, seed=1)
  return {"train": train, "validation": validation, "test": test}


def vader_splits(name: str) -> dict[str, dict[str, np.ndarray]]:
  """Raw rows (``text``, ``label``) of a task's fixed train / validation / test split."""
  if name == "vader_sentiment":
    rest, test = vader_sentiment(margin=0.5, dev_fraction=0.2, seed=0)
    return _three_way(rest, test)
  lexicon = load_vader_lexicon()
  lexicon["label"] = lexicon["rating"] / 4.0  # in [-1, 1]
  return _three_way(*split_arrays(lexicon, 0.2, seed=0))


TASKS = {"vader_sentiment": (False, ("accuracy", "f1", "mcc")),
         "vader_rating": (True, ("pearson", "spearman"))}


def load_task(name: str, tokenizer: Any, protocol: Protocol) -> Task:
  regression, metrics = TASKS[name]
  splits = {}
  for split, rows in vader_splits(name).items():
    rows = {k: v[:protocol.max_examples] for k, v in rows.items()}
    encoded = tokenize(tokenizer, [str(t) for t in rows["text"]], protocol.max_length)
    encoded["labels"] = rows["label"].astype(np.float32 if regression else np.int32)
    splits[split] = encoded
  labels = splits["test"]["labels"]
  baseline = None if regression else float(max(labels.mean(), 1.0 - labels.mean()))
  return Task(name, splits, regression, metrics, baseline)


def load_encoder(tiny: bool, tokenizer: Any):
  """The pretrained MiniLM-L6 (or, ``tiny``, a random 2-layer BERT of width 32)."""
  from transformers import BertConfig, FlaxBertModel
  if not tiny:
    return load_minilm()
  return FlaxBertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64), seed=0)


# ---------------------------------------------------------------------------------- training


class MethodTrainer:
  """Trains one method of the table on a task: ``run(lr, seed, with_test) -> record``.

  The model, the jitted train and eval steps and the optimizer's update are built once; a run
  builds the seed's head and adapters and an optimizer state holding its peak rate.
  """

  def __init__(self, name: str, task: Task, encoder: Any, protocol: Protocol):
    self.task, self.protocol = task, protocol
    self.example = {k: v[:2] for k, v in task.splits["train"].items()}
    self._build = lambda seed: build_method(
        name, encoder.module, encoder.params, self.example, protocol.steps,
        jax.random.key(seed), num_labels=1 if task.regression else 2)
    setup = self._build(0)
    model, method = setup.model, setup.method
    self.unit = make_schedule("linear", 1.0, protocol.steps, warmup_ratio=0.06)

    def optimizer(peak):
      return method.optimizer(lambda count: peak * self.unit(count), scale=setup.scale,
                              dynamic=setup.dynamic)

    self.optimizer = optax.inject_hyperparams(optimizer)

    def outputs(params, batch):
      return model.apply({"params": params}, *classifier_inputs(batch)).astype(jnp.float32)

    def loss_fn(params, batch, rng):
      del rng
      out = outputs(params, batch)
      if task.regression:
        return jnp.mean((out[:, 0] - batch["labels"]) ** 2), out
      log_probs = jax.nn.log_softmax(out)
      return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], 1)), out

    def predict_fn(params, batch):
      out = outputs(params, batch)
      return {"predictions": out[:, 0] if task.regression else jnp.argmax(out, -1)}

    # the update reads the peak from the state, so this one step serves every rate
    self.train_step = make_train_step(loss_fn, self.optimizer(peak=1.0),
                                      regularizer=method.regularizer(setup.dynamic))
    self.eval_step = make_eval_step(predict_fn)

  def score(self, state: TrainState, base: Any, split: str) -> dict[str, float]:
    """The task's metrics of ``state`` on ``split``."""
    return evaluate(self.eval_step, state, base, eval_batches(self.task.splits[split], 256),
                    self.task.metrics)

  def run(self, lr: float, seed: int, with_test: bool) -> dict[str, Any]:
    setup = self._build(seed)
    state = TrainState.create(setup.trainable, self.optimizer(peak=lr), jax.random.key(seed))
    started = time.perf_counter()
    state, results = fit(
        state, setup.base, self.train_step,
        BatchIterator(self.task.splits["train"], self.protocol.batch_size, seed=seed),
        self.protocol.steps, schedule=lambda count: lr * self.unit(count), progress=False)
    record = {"loss": [h["loss"] for h in results["history"]],
              "validation": self.score(state, setup.base, "validation"),
              "trainable_params": count_params(state.trainable),
              "seconds": time.perf_counter() - started}
    if with_test:
      record["test"] = self.score(state, setup.base, "test")
    return record


# ---------------------------------------------------------------------------------- protocol

Train = Callable[[str, float, int, bool], dict]  # (method, lr, seed, with_test) -> record


def _run_path(run_dir: str, method: str, lr: float, seed: int, with_test: bool) -> str:
  return os.path.join(run_dir, method, f"lr{lr:.4e}_seed{seed}{'_test' if with_test else ''}.json")


def _select(records: Sequence[dict], metric: str) -> tuple[float, dict[float, list[float]]]:
  """The learning rate with the best mean validation ``metric`` (ties: the smaller rate; NaN,
  a diverged run, counts as -inf) and the values per rate."""
  values: dict[float, list[float]] = {}
  for record in records:
    value = record["validation"][metric]
    values.setdefault(record["lr"], []).append(-math.inf if math.isnan(value) else value)
  best = max(sorted(values), key=lambda lr: float(np.mean(values[lr])))  # max keeps the first
  return best, values


def run_protocol(train: Train, methods: Sequence[str], protocol: Protocol, metric: str,
                 run_dir: str, budget_seconds: float | None = None) -> dict[str, Any] | None:
  """Runs (or reads back) every run of the protocol; the results, or None if the budget ran out.

  ``train(method, lr, seed, with_test)`` trains one setting and returns its record: ``loss``
  (per step), ``validation`` metrics, and ``test`` metrics iff ``with_test``. Only the test phase
  asks for the test split, once per (method, test seed), at the rate chosen on validation.
  """
  started = time.perf_counter()

  def record_of(method: str, lr: float, seed: int, with_test: bool) -> dict | None:
    path = _run_path(run_dir, method, lr, seed, with_test)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as handle:
        return json.load(handle)
    if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
      return None
    record = {"method": method, "lr": lr, "seed": seed, **train(method, lr, seed, with_test)}
    write_json(path, record)
    return record

  grid = {method: [record_of(method, lr, seed, False) for lr in protocol.grid(method)
                   for seed in protocol.select_seeds] for method in methods}
  if any(record is None for records in grid.values() for record in records):
    return None
  selection, test = {}, {}
  for method in methods:
    lr, values = _select(grid[method], metric)
    selection[method] = {"lr": lr, "validation_mean": float(np.mean(values[lr])),
                         "validation_by_lr": {f"{k:.4e}": v for k, v in sorted(values.items())}}
    test[method] = [record_of(method, lr, seed, True) for seed in protocol.test_seeds]
  if any(record is None for records in test.values() for record in records):
    return None
  summary = {}
  for method, records in test.items():
    summary[method] = {"lr": selection[method]["lr"], "seeds": list(protocol.test_seeds),
                       "trainable_params": records[0]["trainable_params"]}
    for split in ("validation", "test"):
      for name in records[0][split]:
        mean, std = mean_std(r[split][name] for r in records)
        summary[method][f"{split}_{name}"] = {"mean": mean, "std": std,
                                              "values": [r[split][name] for r in records]}
  return {"grid": [{k: v for k, v in r.items() if k != "loss"} for rs in grid.values() for r in rs],
          "selection": selection, "results": summary,
          "loss_curves": {m: [r["loss"] for r in rs] for m, rs in test.items()}}


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
    lines.append(f"\nMajority-class baseline on the test split: {100 * payload['baseline']:.1f}%.")
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
    window = max(1, losses.shape[1] // 40)
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
            budget_seconds: float | None = None) -> dict[str, Any] | None:
  """Runs the protocol for ``task_name``; returns the report's payload (None: incomplete)."""
  from transformers import AutoTokenizer
  missing = sorted(set(METHODS) - set(LR_CENTRES))
  if missing:
    raise ValueError(f"methods {missing} of the table have no learning-rate centre in LR_CENTRES")
  started = time.perf_counter()
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  task = load_task(task_name, tokenizer, protocol)
  encoder = load_encoder(tiny, tokenizer)
  trainers: dict[str, MethodTrainer] = {}

  def train(method, lr, seed, with_test):
    if method not in trainers:
      trainers[method] = MethodTrainer(method, task, encoder, protocol)
    return trainers[method].run(lr, seed, with_test)

  task_dir = os.path.join(out_dir, task_name)
  names = [METHODS[m].name for m in methods]  # an unknown name: a KeyError listing the known
  results = run_protocol(train, names, protocol, task.metrics[0], os.path.join(task_dir, "runs"),
                         budget_seconds)
  if results is None:
    return None
  payload = {"task": task_name, "metric": task.metrics[0], "metrics": list(task.metrics),
             "model": "random tiny BERT" if tiny else "all-MiniLM-L6-v2 (pretrained)",
             "protocol": dataclasses.asdict(protocol), "lr_centres": LR_CENTRES,
             "split_sizes": {k: int(len(v["labels"])) for k, v in task.splits.items()},
             "baseline": task.baseline, "wall_seconds_this_call": time.perf_counter() - started,
             **results}
  write_report(payload, task_dir)
  return payload


def main(argv=None) -> dict[str, Any] | None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", required=True, choices=sorted(TASKS))
  parser.add_argument("--out", default="results/compare")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--quick", action="store_true",
                      help="CI size: 8 steps of 8 rows, 64 rows per split, 1 + 2 seeds")
  parser.add_argument("--tiny", action="store_true", help="a random 2-layer BERT (smoke runs)")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--points", type=int, help="learning rates per method (default 5)")
  parser.add_argument("--budget-minutes", type=float,
                      help=f"start no run after this long; exit {INCOMPLETE} if runs remain")
  args = parser.parse_args(argv)
  protocol = QUICK if args.quick else Protocol()
  overrides = {k: v for k, v in (("steps", args.steps), ("points", args.points)) if v is not None}
  protocol = dataclasses.replace(protocol, **overrides)
  payload = compare(args.task, args.out, protocol, methods=args.methods, tiny=args.tiny,
                    budget_seconds=None if args.budget_minutes is None
                    else 60.0 * args.budget_minutes)
  if payload is None:
    print("incomplete: the budget ran out; run the same command again to continue")
    raise SystemExit(INCOMPLETE)
  print(markdown_table(payload))
  print(f"wrote {os.path.join(args.out, args.task)}/compare.json, compare.md, lr_sweep.png, "
        "loss_curves.png")
  return payload


if __name__ == "__main__":
  main()
