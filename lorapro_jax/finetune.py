"""Fine-tune a Llama / Mistral / Qwen2 / Gemma checkpoint on disk on instruction data, score it on
GSM8K-style questions and export the adapter: the whole LLM road in one command.

.. code-block:: bash

  python -m lorapro_jax.finetune --model checkpoints/Llama-2-7b-hf --train MetaMathQA-395K.json \\
      --eval gsm8k_test.jsonl --method lora_pro --max-train-examples 100000 --out runs/metamath

What one run does (:func:`finetune`, configured by :class:`FinetuneConfig`, whose defaults are the
LoRA-Pro paper's LLaMA-2-7B / MetaMathQA settings: r 8, alpha 16 on all seven linear layers, lr
2e-5, cosine with 3% warm-up, batch 32, length 1024, one epoch, bf16 compute):

1. the checkpoint directory's own tokenizer (``AutoTokenizer``, offline) encodes the training rows
   (MetaMathQA ``{"query", "response"}`` or GSM8K ``{"question", "answer"}``, ``.json`` or
   ``.jsonl``) in the Alpaca prompt, learning the response tokens only
   (:mod:`lorapro_jax.data.instruct`);
2. :func:`lorapro_jax.models.load_pretrained` reads the weights (onto a ``(data, fsdp)`` mesh with
   ``--mesh``, each tensor placed as it is read), stored in ``base_dtype``;
3. the method of :data:`lorapro_jax.methods.METHODS` builds the adapters (the family's preset
   targets), the optimizer chain and its regulariser; :func:`lorapro_jax.train.fit` trains with a
   tqdm bar, TensorBoard scalars (``OUT/tb``) and Orbax checkpoints (``OUT/checkpoints``: every
   ``save_every`` steps and at each evaluation, data position included). Running the same command
   again resumes from the newest checkpoint and continues exactly (same batches, same updates);
4. each evaluation decodes the eval prompts greedily with the KV cache
   (:func:`lorapro_jax.models.generate`, adapters injected, nothing merged), takes the number after
   ``####`` (or MetaMath's ``The answer is``) as the reference scripts do, and scores exact match;
   the generations go to ``OUT/eval/step_N.jsonl``;
5. at the end the adapter is written in PEFT's format (``OUT/adapter``; ``peft`` / vLLM load it
   onto the original checkpoint) and, with ``--merged``, the merged model as a Hugging Face
   checkpoint (``OUT/merged``, PyTorch layout, the tokenizer beside it). ``OUT/results.json`` holds
   the loss history, evaluations and timings.

>>> config = FinetuneConfig(model="ckpt", train_file="train.jsonl", out="run")
>>> config.rank, config.alpha, config.learning_rate, config.warmup_ratio, config.compute_dtype
(8, 16.0, 2e-05, 0.03, 'bfloat16')
>>> FinetuneConfig(model="ckpt", train_file="t.jsonl", out="run", batch_size=32,
...                micro_batch_size=6)  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: batch_size 32 is not a multiple of micro_batch_size 6...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorapro_jax.checkpoint import TrainCheckpointer
from lorapro_jax.data.batching import BatchIterator, eval_batches
from lorapro_jax.data.instruct import encode_causal, extract_answer, load_instruction_json
from lorapro_jax.dynamic_rank import DynamicRankConfig, rank_pattern, shrink
from lorapro_jax.methods import METHODS
from lorapro_jax.metrics import exact_match
from lorapro_jax.models import generate, load_pretrained, preset, save_pretrained
from lorapro_jax.models.decoder import REMAT_POLICIES
from lorapro_jax.peft_format import export_merged, export_peft
from lorapro_jax.schedules import make_schedule
from lorapro_jax.sharding import (batch_sharding, check_hosts_can_feed, initialize_distributed,
                                  make_mesh, mesh_batches, param_shardings, place,
                                  state_shardings)
from lorapro_jax.train import (TrainState, cast_floating, evaluate, fit, make_eval_step,
                               make_train_step, write_json)
from lorapro_jax.trees import combine, count_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# fields a resumed run may change: they shape evaluation, checkpoint cadence and export only
RESUMABLE_CHANGES = ("eval_file", "eval_every", "eval_batch_size", "max_eval_examples",
                     "max_new_tokens", "save_every", "merged", "mesh", "scan_layers",
                     "no_layer_weight_copies")
RUN_CONFIG = "run_config.json"


def _field(default: Any, help: str, **flag: Any) -> Any:  # noqa: A002 (argparse's name)
  """A dataclass field carrying its command-line help (and ``flag``, ``parse`` overrides)."""
  return dataclasses.field(default=default, metadata={"help": help, **flag})


def _int_tuple(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split(","))


def _optional(parse):
  return lambda text: None if text.lower() == "none" else parse(text)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """One fine-tuning run; the defaults are the LoRA-Pro paper's LLaMA-2-7B MetaMathQA settings.
  Every field is also a command-line flag (``--learning-rate``, ...; see ``--help``)."""

  model: str = _field(None, "Hugging Face checkpoint directory (config.json, safetensors, "
                      "tokenizer files)")
  train_file: str = _field(None, "training rows, .json or .jsonl: {query, response} "
                           "(MetaMathQA) or {question, answer} (GSM8K)", flag="--train")
  out: str = _field(None, "run directory: checkpoints, TensorBoard, evaluations, exports")
  eval_file: str | None = _field(None, "GSM8K-style rows scored by exact match of the final "
                                 "number (default: no evaluation)", flag="--eval")
  method: str = _field("lora_pro", "a name of lorapro_jax.methods.METHODS", choices=list(METHODS))
  rank: int = _field(8, "LoRA rank (dynamic rank: the target rank)")
  alpha: float = _field(16.0, "LoRA alpha (scale alpha / r)")
  targets: tuple[str, ...] | None = _field(
      None, "comma-separated LoRA targets (default: the family preset, all seven projections)",
      parse=lambda text: tuple(text.split(",")))
  dropout: float = _field(0.0, "adapter dropout")
  learning_rate: float = _field(2e-5, "peak learning rate")
  schedule: str = _field("cosine", "learning-rate schedule after warm-up",
                         choices=["cosine", "linear", "constant"])
  warmup_ratio: float = _field(0.03, "linear warm-up, as a fraction of the steps")
  weight_decay: float = _field(0.0, "decoupled weight decay")
  clip_norm: float | None = _field(1.0, "clip gradients to this global norm ('none': off)",
                                   parse=_optional(float))
  batch_size: int = _field(32, "rows per update (all devices and hosts together)")
  micro_batch_size: int | None = _field(
      None, "rows per forward/backward pass; the batch is accumulated from batch_size / "
      "micro_batch_size of them (default: the whole batch at once)", parse=_optional(int))
  max_length: int = _field(1024, "tokens per training row (prompt + response, truncated)")
  epochs: float = _field(1.0, "passes over the training rows")
  max_steps: int | None = _field(None, "cap the schedule at this many updates",
                                 parse=_optional(int))
  max_train_examples: int | None = _field(None, "use the first N training rows (the paper: "
                                          "100000)", parse=_optional(int))
  max_eval_examples: int | None = _field(None, "score the first N eval rows",
                                         parse=_optional(int))
  max_new_tokens: int = _field(256, "tokens generated per eval question")
  eval_batch_size: int = _field(32, "eval questions decoded together")
  eval_every: int = _field(0, "evaluate every N updates (0: at the end only)")
  save_every: int = _field(200, "checkpoint every N updates (and at every evaluation)")
  compute_dtype: str = _field("bfloat16", "dtype of the forward and backward passes",
                              choices=list(DTYPES))
  base_dtype: str = _field("bfloat16", "dtype the frozen base weights are stored in",
                           choices=list(DTYPES))
  remat: str = _field("none", "what the backward pass keeps of each layer (memory vs speed)",
                      choices=list(REMAT_POLICIES))
  scan_layers: bool = _field(False, "keep the layer loop rolled (one layer compiled): shorter "
                             "compile, slower steps; by default it is unrolled (1B LoRA on an "
                             "H200: 88 vs 102 ms a step; its XLA compile 15-17 s unrolled)")
  no_layer_weight_copies: bool = _field(
      False, "with the loop unrolled, let each layer's kernels read its slice of the stacked "
      "weights in place instead of a copy (DecoderConfig.copy_layer_weights=False): less peak "
      "memory, but XLA then compiles the kernels once per layer (7B LoRA on an H200: 36.8 vs "
      "44.4 GiB, compile 72 vs 20 s)")
  mesh: tuple[int, int] | None = _field(None, "data,fsdp device mesh, e.g. 1,8 (default: one "
                                        "device)", parse=_optional(_int_tuple))
  dem_weight: float = _field(0.0, "dynamic rank's DEM penalty weight")
  seed: int = _field(0, "seed of the adapters' init and the data order")
  merged: bool = _field(False, "also export the merged model (OUT/merged)")

  def __post_init__(self):
    for name in ("model", "train_file", "out"):
      if not getattr(self, name):
        raise ValueError(f"FinetuneConfig.{name} is required")
    METHODS[self.method]  # noqa: B018 (a KeyError listing the methods)
    micro = self.micro_batch_size or self.batch_size
    if self.batch_size < 1 or micro < 1 or self.batch_size % micro:
      raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                       f"{self.micro_batch_size} (both >= 1)")
    for name in ("compute_dtype", "base_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {list(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r}: expected one of {REMAT_POLICIES}")
    if self.mesh is not None and len(self.mesh) != 2:
      raise ValueError(f"mesh must be (data, fsdp), got {self.mesh!r}")
    if self.max_new_tokens < 1 or self.eval_batch_size < 1 or self.save_every < 1:
      raise ValueError("max_new_tokens, eval_batch_size and save_every must be >= 1")
    if self.targets is not None:
      object.__setattr__(self, "targets", tuple(self.targets))
    if self.mesh is not None:
      object.__setattr__(self, "mesh", tuple(self.mesh))

  @property
  def accum_steps(self) -> int:
    return self.batch_size // (self.micro_batch_size or self.batch_size)


# -------------------------------------------------------------------------------- pieces


def load_tokenizer(directory: str):
  """The checkpoint's own tokenizer (``AutoTokenizer``, local files only)."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError) as error:
    raise FileNotFoundError(f"no usable tokenizer files in {directory} (tokenizer.json / "
                            f"tokenizer.model + tokenizer_config.json): {error}") from error


def stop_ids(tokenizer: Any, directory: str) -> tuple[int, ...]:
  """Ids that end a generation: the tokenizer's EOS and ``generation_config.json``'s
  ``eos_token_id`` (Llama 3 lists several)."""
  ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  path = os.path.join(directory, "generation_config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as handle:
      listed = json.load(handle).get("eos_token_id")
    ids += [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
  return tuple(dict.fromkeys(int(i) for i in ids))


def pad_id(tokenizer: Any) -> int:
  """The pad id of prompts and generations: the tokenizer's pad, else its EOS, else 0."""
  for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if candidate is not None:
      return int(candidate)
  return 0


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> dict:
  """``input_ids`` and ``attention_mask`` of the prompts, left-padded to the longest (the layout
  :func:`lorapro_jax.models.generate` continues), and ``labels``: the row numbers."""
  encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
  longest = max(len(ids) for ids in encoded)
  if longest > max_length:
    row = next(i for i, ids in enumerate(encoded) if len(ids) == longest)
    raise ValueError(f"eval prompt {row} has {longest} tokens, more than max_length="
                     f"{max_length}")
  ids = np.full((len(encoded), longest), pad_id(tokenizer), np.int32)
  mask = np.zeros((len(encoded), longest), np.int32)
  for row, tokens in enumerate(encoded):
    ids[row, longest - len(tokens):] = tokens
    mask[row, longest - len(tokens):] = 1
  return {"input_ids": ids, "attention_mask": mask, "labels": np.arange(len(encoded))}


def causal_lm_loss(model: Any):
  """``loss_fn(params, batch, rng)`` of :func:`lorapro_jax.train.make_train_step`: mean
  next-token cross-entropy over the positions where ``batch["loss_mask"]`` is 1 (``loss_mask[t]``
  weights the prediction of token t+1, as :func:`lorapro_jax.data.instruct.encode_causal` makes
  it). Right padding needs no mask in the forward pass: causal attention never looks ahead."""

  def loss_fn(params, batch, rng):
    rngs = {"dropout": rng}  # adapter dropout, active when the LoRAConfig asks for it
    logits = model.apply({"params": params}, batch["input_ids"], rngs=rngs)
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), batch["input_ids"][:, 1:])
    weights = batch["loss_mask"][:, :-1]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0), None

  return loss_fn


def _check_resumable(path: str, config: FinetuneConfig) -> None:
  """Once a run has a checkpoint, its recorded config must agree with ``config`` where training
  depends on it; records ``config`` otherwise (a run that failed before its first checkpoint may
  be started again with other settings)."""
  current = dataclasses.asdict(config)
  checkpoints = os.path.join(os.path.dirname(path), "checkpoints")
  started = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
  if started and os.path.exists(path):
    with open(path, encoding="utf-8") as handle:
      recorded = json.load(handle)
    current_json = json.loads(json.dumps(current))
    differing = [f"{name}: {recorded.get(name)!r} recorded, {current_json[name]!r} now"
                 for name in current_json if name not in RESUMABLE_CHANGES
                 and recorded.get(name) != current_json[name]]
    if differing:
      raise ValueError(f"{os.path.dirname(path)} holds a run with another configuration ("
                       + "; ".join(differing) + "): give this run its own --out")
  write_json(path, current)


# ------------------------------------------------------------------------------------ run


def finetune(config: FinetuneConfig, *, stop_after: int | None = None,
             progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) ``config``; returns the results also written to ``OUT/results.json``.

  ``stop_after`` stops at that step of the unchanged schedule (evaluating and checkpointing
  there, as a pre-empted job's last checkpoint would be), so that a later call resumes it; the
  exports are written only once the schedule is complete.
  """
  if not os.path.isdir(config.model):
    raise FileNotFoundError(
        f"--model {config.model!r} is not a directory: download the checkpoint first, e.g. "
        f"`huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir {config.model}`")
  os.makedirs(config.out, exist_ok=True)
  _check_resumable(os.path.join(config.out, RUN_CONFIG), config)
  tokenizer = load_tokenizer(config.model)
  rows = load_instruction_json(config.train_file, max_examples=config.max_train_examples)
  train = encode_causal(tokenizer, rows["prompt"], rows["response"], config.max_length)
  examples = len(train["input_ids"])
  if examples < config.batch_size:
    raise ValueError(f"{config.train_file} gives {examples} rows, fewer than one batch of "
                     f"{config.batch_size}")
  check_hosts_can_feed(config.batch_size, has_mesh=config.mesh is not None)
  prompts = eval_rows = None
  if config.eval_file:  # read and checked before the model: a bad eval file fails fast
    eval_rows = load_instruction_json(config.eval_file, max_examples=config.max_eval_examples)
    prompts = encode_prompts(tokenizer, eval_rows["prompt"], config.max_length)
  total_steps = math.ceil(config.epochs * (examples // config.batch_size))
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  stop = total_steps if stop_after is None else min(stop_after, total_steps)

  mesh = None if config.mesh is None else make_mesh(*config.mesh)
  compute_dtype = DTYPES[config.compute_dtype]
  runtime = {"dtype": compute_dtype, "remat": config.remat,
             "scan_unroll": 1 if config.scan_layers else None,
             "copy_layer_weights": not config.no_layer_weight_copies}
  model, params = load_pretrained(config.model, dtype=DTYPES[config.base_dtype], mesh=mesh,
                                  overrides=runtime)
  family = model.config.family
  method = METHODS[config.method]
  dynamic = (DynamicRankConfig(total_steps=total_steps, target_rank=config.rank,
                               dem_weight=config.dem_weight) if method.prunes else None)
  targets = {} if config.targets is None else {"targets": config.targets}
  lora = method.lora_config(preset(family, rank=config.rank, alpha=config.alpha,
                                   dropout=config.dropout, **targets), dynamic)
  init_key, state_key = jax.random.split(jax.random.key(config.seed))
  adapted, base, trainable = method.prepare(model, params, lora, init_key,
                                            jnp.zeros((1, 8), jnp.int32))
  if not method.adapters:  # full fine-tuning keeps float32 master weights
    trainable = cast_floating(trainable, jnp.float32)
  schedule = make_schedule(config.schedule, config.learning_rate, total_steps,
                           warmup_ratio=config.warmup_ratio)
  optimizer = method.optimizer(schedule, scale=None if lora is None else lora.scales(trainable),
                               weight_decay=config.weight_decay, clip_norm=config.clip_norm,
                               dynamic=dynamic)
  state = TrainState.create(trainable, optimizer, state_key)
  placement = {}
  if mesh is not None:
    shardings = state_shardings(state, base, mesh)
    state = place(state, shardings)  # device_put refuses state.rng across hosts
    placement = {"state_sharding": shardings, "batch_sharding": batch_sharding(mesh),
                 "base_sharding": None if base is None else param_shardings(base, mesh)}
  train_step = make_train_step(causal_lm_loss(adapted), optimizer,
                               accum_steps=config.accum_steps, compute_dtype=compute_dtype,
                               regularizer=method.regularizer(dynamic), **placement)

  batches = BatchIterator(train, config.batch_size, seed=config.seed)  # global, on every host
  checkpoints = TrainCheckpointer(os.path.join(config.out, "checkpoints"), lora, keep=2,
                                  best_metric="exact_match" if config.eval_file else None)
  resumed_from = checkpoints.latest_step()
  if resumed_from is not None:
    restored = checkpoints.restore(state)
    state = restored.state
    batches.restore(restored.data_position)

  evaluate_fn = None
  if config.eval_file:
    evaluate_fn = _gsm8k_evaluator(config, adapted, base, tokenizer, prompts, eval_rows["answer"],
                                   compute_dtype)

  def evaluated(step: int) -> bool:
    return evaluate_fn is not None and (step == stop or (config.eval_every > 0
                                                         and step % config.eval_every == 0))

  def save_periodically(current: TrainState, metrics: Mapping) -> None:
    del metrics
    step = int(current.step)  # fit saves the evaluated steps itself, with their metrics
    if not evaluated(step) and (step % config.save_every == 0 or step == stop):
      checkpoints.save(current, data_position=batches.state())

  feed = mesh_batches(batches, mesh)  # each host's rows of every global batch
  try:
    state, results = fit(
        state, base, train_step, feed, stop, evaluate_fn=evaluate_fn,
        eval_every=config.eval_every, checkpointer=checkpoints, data_position=batches.state,
        schedule=schedule, log_dir=os.path.join(config.out, "tb"), on_step=save_periodically,
        progress=progress,
        extra_results={"method": config.method, "model": config.model, "family": family,
                       "total_steps": total_steps, "resumed_from": resumed_from,
                       "examples": examples, "trainable_params": count_params(trainable),
                       "run_config": dataclasses.asdict(config)})
  finally:
    checkpoints.close()
  if int(state.step) == total_steps:
    results["exports"] = _export(config, family, adapted, base, state, lora)
  write_json(os.path.join(config.out, "results.json"), results)
  return results


def _gsm8k_evaluator(config: FinetuneConfig, adapted: Any, base: Any, tokenizer: Any,
                     prompts: Mapping[str, np.ndarray], answers: Sequence[str],
                     compute_dtype: Any):
  """``evaluate_fn(state) -> {"exact_match"}``: greedy KV-cache decoding of the (left-padded)
  eval prompts, the final number of each generation against the reference ``answers``."""
  stops, pad = stop_ids(tokenizer, config.model), pad_id(tokenizer)

  def predict(params, batch):
    return {"predictions": generate(adapted, params, batch["input_ids"],
                                    attention_mask=batch["attention_mask"],
                                    max_new_tokens=config.max_new_tokens, eos_token_id=stops,
                                    pad_token_id=pad)}

  eval_step = make_eval_step(predict, compute_dtype=compute_dtype, jit=False)

  def evaluate_fn(state: TrainState) -> dict[str, float]:
    step = int(state.step)

    def score(predictions, labels, mask):
      texts = tokenizer.batch_decode(np.asarray(predictions), skip_special_tokens=True)
      predicted = [extract_answer(text) for text in texts]
      references = [answers[i] for i in labels]
      if jax.process_index() == 0:
        records = [{"row": int(i), "generated": text, "predicted": p, "answer": r,
                    "correct": p == r}
                   for i, text, p, r, m in zip(labels, texts, predicted, references, mask) if m]
        os.makedirs(os.path.join(config.out, "eval"), exist_ok=True)
        with open(os.path.join(config.out, "eval", f"step_{step}.jsonl"), "w",
                  encoding="utf-8") as handle:
          handle.writelines(json.dumps(record) + "\n" for record in records)
      return {"exact_match": exact_match(predicted, references, mask)}

    return evaluate(eval_step, state, base, eval_batches(prompts, config.eval_batch_size),
                    ("exact_match",), score_fn=score)

  return evaluate_fn


def _export(config: FinetuneConfig, family: str, adapted: Any, base: Any, state: TrainState,
            lora: Any) -> dict[str, str]:
  """PEFT adapter (``OUT/adapter``) and, with ``merged``, the merged checkpoint (``OUT/merged``);
  full fine-tuning writes its model as ``OUT/merged``. Re-running a finished run rewrites them."""
  if jax.process_index() != 0:
    return {}
  merged_dir = os.path.join(config.out, "merged")
  dtype = DTYPES[config.base_dtype]
  if lora is None:
    save_pretrained(adapted, state.trainable, merged_dir, source=config.model, dtype=dtype,
                    overwrite=True)
    return {"merged": merged_dir}
  trainable = state.trainable
  ranks = None
  if METHODS[config.method].prunes:  # live components only, each module at its own rank
    trainable, ranks = shrink(trainable, state.opt_state), rank_pattern(state.opt_state)
  adapter_dir = os.path.join(config.out, "adapter")
  export_peft(trainable, lora, adapter_dir, family=family, base_model_name_or_path=config.model,
              task_type="CAUSAL_LM", ranks=ranks, overwrite=True)
  exports = {"adapter": adapter_dir}
  if config.merged:
    export_merged(combine(base, state.trainable), lora, merged_dir, hf_model=adapted,
                  source=config.model, overwrite=True)
    exports["merged"] = merged_dir
  return exports


# ------------------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m lorapro_jax.finetune",
                                   description=__doc__.split("\n\n")[0])
  for field in dataclasses.fields(FinetuneConfig):
    meta = field.metadata
    flag = meta.get("flag", "--" + field.name.replace("_", "-"))
    if field.type == "bool":
      parser.add_argument(flag, dest=field.name, action="store_true", help=meta["help"])
      continue
    parse = meta.get("parse") or (type(field.default) if field.default is not None else str)
    parser.add_argument(flag, dest=field.name, type=parse, default=field.default,
                        choices=meta.get("choices"), help=meta["help"],
                        required=field.name in ("model", "train_file", "out"))
  parser.add_argument("--stop-after", type=int, help="stop at this step of the schedule (a "
                      "later run with the same flags resumes)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = vars(_parser().parse_args(argv))
  stop_after, progress = args.pop("stop_after"), not args.pop("no_progress")
  initialize_distributed()  # multi-host when JAX_COORDINATOR_ADDRESS etc. say so
  results = finetune(FinetuneConfig(**args), stop_after=stop_after, progress=progress)
  last = results["history"][-1] if results["history"] else {}
  print(f"step {last.get('step', results['steps'])}: loss {last.get('loss', float('nan')):.4f}, "
        f"evaluation {results['final']}; {os.path.join(args['out'], 'results.json')}")
  return results


if __name__ == "__main__":
  main()
