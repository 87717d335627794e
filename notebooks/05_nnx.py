# %% [markdown]
# # LoRA-Pro and dynamic rank for a flax.nnx model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/05_nnx.ipynb)
#
# Flax's NNX API keeps parameters inside modules, and `nnx.Optimizer(model, tx,
# wrt=nnx.LoRAParam)` runs any optax transform on the adapters. Here we put LoRA adapters into an
# existing NNX model without editing its code (`lorapro_jax.nnx.inject`), fine-tune them with
# **LoRA-Pro** (Wang et al., ICLR 2025) chained with **DoRA dynamic rank** (Mao et al., ACL 2024 —
# not the weight-decomposed "DoRA"), checkpoint the run with Orbax, merge, and export the shrunk
# adapter in the PEFT format that PyTorch's `peft` loads onto a PyTorch twin of the model.
#
# The task is made so that LoRA fits it: the "pretrained" model is a random network, and the new
# task is the same network with **low-rank changes in some of its weight matrices**. Dynamic rank
# starts every adapter at rank r' = ⌈1.5·r⌉ and prunes components on a cubic schedule to a global
# budget of r per kernel on average, so kernels end with different ranks.

# %%
# On Colab: clone lorapro_jax and install it, with peft for the PyTorch check (Colab has torch).
# Where lorapro_jax is already importable (a local checkout, CI), nothing happens.
import importlib.util
import subprocess
import sys

REPOSITORY = "https://github.com/lorapro-jax/lorapro_jax.git"
if importlib.util.find_spec("lorapro_jax") is None:
  if importlib.util.find_spec("google.colab") is None:
    raise ImportError(f"lorapro_jax is not installed: git clone {REPOSITORY} && pip install -e ./lorapro_jax")
  subprocess.run(["git", "clone", "-q", "--depth=1", REPOSITORY, "/content/lorapro_jax"], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/lorapro_jax", "peft"], check=True)

import jax

ACCELERATOR = jax.devices()[0].platform  # "tpu", "gpu" or "cpu"
print(f"jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind} ({ACCELERATOR})")

# %% tags=["parameters"]
import os

TINY = os.environ.get("LORAPRO_NOTEBOOK_TINY") == "1"  # set by tests/test_notebooks.py: tiny sizes, offline, CPU
WIDTH = 16 if TINY else 64           # model width
HIDDEN = 32 if TINY else 256         # MLP hidden size
NUM_LAYERS = 2 if TINY else 4
TARGET_RANK = 2 if TINY else 4       # r: the average rank per adapted kernel after pruning
STEPS = 200 if TINY else 1000
INTERVAL = 5 if TINY else 10         # steps between pruning events
BATCH_SIZE = 64 if TINY else 256
LEARNING_RATE = 3e-2 if TINY else 1e-2

# %% [markdown]
# ## An NNX model with Hugging Face's module names
#
# Any NNX model works; this one names its layers as Hugging Face's Llama does
# (`model.layers.{i}.mlp.up_proj`), so that the PEFT export below fits a PyTorch model with the same
# names. The new task changes the up / down projections of layer i by random updates of ranks
# `CHANGE_RANKS[i]` (0: unchanged).

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.up_proj = nnx.Linear(WIDTH, HIDDEN, rngs=rngs)
    self.down_proj = nnx.Linear(HIDDEN, WIDTH, rngs=rngs)


class Layer(nnx.Module):
  def __init__(self, rngs):
    self.mlp = MLP(rngs)

  def __call__(self, h):
    return h + self.mlp.down_proj(jnp.tanh(self.mlp.up_proj(h)))


class Body(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([Layer(rngs) for _ in range(NUM_LAYERS)])


class Model(nnx.Module):
  def __init__(self, rngs):
    self.model = Body(rngs)
    self.lm_head = nnx.Linear(WIDTH, 8, rngs=rngs)

  def __call__(self, h):
    for layer in self.model.layers:
      h = layer(h)
    return self.lm_head(h)


pretrained = Model(nnx.Rngs(0))

# The new task: the same network with low-rank changes in some kernels.
CHANGE_RANKS = [(2 * TARGET_RANK, 0), (0, 2 * TARGET_RANK)] + [(TARGET_RANK, TARGET_RANK)] * (NUM_LAYERS - 2)
teacher = nnx.clone(pretrained)
key = jax.random.key(1)
for layer, ranks in zip(teacher.model.layers, CHANGE_RANKS):
  for linear, rank in zip((layer.mlp.up_proj, layer.mlp.down_proj), ranks):
    key, k1, k2 = jax.random.split(key, 3)
    n_in, n_out = linear.kernel.shape
    change = jax.random.normal(k1, (n_in, rank)) @ jax.random.normal(k2, (rank, n_out))
    linear.kernel[...] += change / np.sqrt(n_in * max(rank, 1))

def batch(step):
  x = jax.random.normal(jax.random.key(1000 + step), (BATCH_SIZE, WIDTH))
  return x, teacher(x)

x_eval, y_eval = batch(-1)
print(f"pretrained model's loss on the new task: {float(jnp.mean((pretrained(x_eval) - y_eval) ** 2)):.4f}")

# %% [markdown]
# ## Inject adapters, train with LoRA-Pro + dynamic rank
#
# One `DynamicRankConfig` describes the pruning; `lora_config` turns a `LoRAConfig` into the
# adapters it prunes (gated: `dK = s·A·diag(c)·B`, rank r' = ⌈1.5·r⌉). `inject` wraps every targeted
# `nnx.Linear` in a `LoRALayer` whose adapter leaves are `nnx.LoRAParam`s; `lnnx.scales(model)` reads
# each adapter's scale `s = alpha / r'` from its module. The step is NNX's usual one: gradients of
# the `nnx.LoRAParam` state only, `opt.update(model, grads)` inside `nnx.jit`.

# %%
from lorapro_jax import DynamicRankConfig, LoRAConfig, count_params, dynamic_rank, lora_pro
from lorapro_jax import nnx as lnnx

dynamic = DynamicRankConfig(STEPS, TARGET_RANK, interval=INTERVAL)
config = dynamic.lora_config(LoRAConfig(alpha=2.0 * TARGET_RANK, targets=("up_proj", "down_proj")))
model = lnnx.inject(pretrained, config, rngs=nnx.Rngs(2))
print(f"adapters: {count_params(lnnx.adapters(model)):,} parameters, rank {config.rank} each; "
      f"the base has {count_params(nnx.state(pretrained, nnx.Param)):,}")
assert bool(jnp.array_equal(model(x_eval), pretrained(x_eval)))  # gates c = 0: the base's outputs

tx = optax.chain(lora_pro(optax.cosine_decay_schedule(LEARNING_RATE, STEPS), lnnx.scales(model)),
                 dynamic_rank(dynamic))
opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


@nnx.jit
def train_step(model, opt, x, y):
  loss = lambda model: jnp.mean((model(x) - y) ** 2)
  value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  opt.update(model, grads)
  return value


eval_loss = nnx.jit(lambda model: jnp.mean((model(x_eval) - y_eval) ** 2))
loss_before = float(eval_loss(model))
losses = [float(train_step(model, opt, *batch(step))) for step in range(STEPS)]
loss_after = float(eval_loss(model))
print(f"loss on the new task {loss_before:.4f} -> {loss_after:.4f}")

# %%
from lorapro_jax import rank_pattern
from lorapro_jax.dynamic_rank import plot_rank_heatmap

opt_state = nnx.as_pure(opt.opt_state)  # NNX keeps optimizer leaves in Variables
ranks = rank_pattern(opt_state)
print(ranks)

plt.figure(figsize=(6, 3))
plt.semilogy(losses)
for event in dynamic.events:
  plt.axvline(event, color="k", alpha=0.1)
plt.xlabel("step"); plt.ylabel("training loss"); plt.title("LoRA-Pro + dynamic rank (grey: pruning events)")
plt.show()
heatmap = plot_rank_heatmap(ranks, title="live ranks per layer and matrix")
heatmap

# %% [markdown]
# ## Checkpoint, merge, export
#
# * **Orbax**: everything a step changes is `nnx.state(model, nnx.Any(nnx.LoRAParam,
#   nnx.Not(nnx.Param)))` (adapters, rng streams) plus `nnx.state(opt)`; the frozen base is not
#   saved. A fresh model and optimizer restored from it continue bit for bit.
# * **merge**: each `LoRALayer` becomes its base layer again, with `K0 + s·A·diag(c)·B`.
# * **PEFT**: `shrink` drops the pruned components and folds the gates into B; `export_peft`
#   writes per-module ranks (`rank_pattern`) and alphas so that PEFT reproduces each scale.

# %%
import tempfile

from lorapro_jax import TrainCheckpointer

trained = nnx.Any(nnx.LoRAParam, nnx.Not(nnx.Param))
out_dir = tempfile.mkdtemp(prefix="lorapro_nnx_")
with TrainCheckpointer(os.path.join(out_dir, "checkpoints"), config) as checkpoints:
  checkpoints.save((nnx.state(model, trained), nnx.state(opt)), step=STEPS)
  checkpoints.wait_until_finished()
  fresh = lnnx.inject(pretrained, config, rngs=nnx.Rngs(3))
  fresh_opt = nnx.Optimizer(fresh, tx, wrt=nnx.LoRAParam)
  restored = checkpoints.restore((nnx.state(fresh, trained), nnx.state(fresh_opt)))
nnx.update(fresh, restored.state[0])
nnx.update(fresh_opt, restored.state[1])
print("restored step", int(fresh_opt.step[...]))

merged = lnnx.merge(model)
print("merged layer:", type(merged.model.layers[0].mlp.up_proj).__name__,
      "| max |merged - adapted| =", float(jnp.abs(merged(x_eval) - model(x_eval)).max()))

# %%
from lorapro_jax import export_peft, shrink

peft_dir = os.path.join(out_dir, "peft_adapter")
written = export_peft(shrink(lnnx.adapters(model), opt_state), config, peft_dir, family="llama", ranks=ranks)
print(f"r = {written['r']}, lora_alpha = {written['lora_alpha']}, rank_pattern = {written['rank_pattern']}")

# %% [markdown]
# ## The adapter in PyTorch
#
# A PyTorch model with the same module names gets the pretrained weights (a `Linear` weight is the
# transposed kernel) and `peft` loads the exported adapter onto it.

# %%
import torch
import peft


class TorchLayer(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.mlp = torch.nn.Module()
    self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(WIDTH, HIDDEN), torch.nn.Linear(HIDDEN, WIDTH)

  def forward(self, h):
    return h + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(h)))


class TorchModel(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.model = torch.nn.Module()
    self.model.layers = torch.nn.ModuleList([TorchLayer() for _ in range(NUM_LAYERS)])
    self.lm_head = torch.nn.Linear(WIDTH, 8)

  def forward(self, h):
    for layer in self.model.layers:
      h = layer(h)
    return self.lm_head(h)


torch_model = TorchModel()
weights = {}
for path, variable in nnx.to_flat_state(nnx.state(pretrained, nnx.Param)):
  name, value = ".".join(map(str, path)), torch.tensor(np.asarray(variable[...]))
  weights[name.replace(".kernel", ".weight")] = value.T if name.endswith("kernel") else value
torch_model.load_state_dict(weights)
with torch.no_grad():
  torch_outputs = peft.PeftModel.from_pretrained(torch_model.eval(), peft_dir)(
      torch.tensor(np.asarray(x_eval))).numpy()
print("max |PyTorch + PEFT - NNX| =", float(np.abs(torch_outputs - np.asarray(model(x_eval))).max()))

# %%
# The checked outcome: the adapters learned much of the change, pruning met the budget, the
# checkpoint restores exactly, and the merged and PyTorch models give the adapted model's outputs.
assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
assert sum(ranks.values()) == TARGET_RANK * 2 * NUM_LAYERS, ranks
np.testing.assert_array_equal(fresh(x_eval), model(x_eval))
np.testing.assert_allclose(merged(x_eval), model(x_eval), rtol=0, atol=1e-4)
np.testing.assert_allclose(torch_outputs, model(x_eval), rtol=0, atol=1e-4)
print(f"OK: loss {loss_before:.4f} -> {loss_after:.4f}; {sum(ranks.values())} live components = budget; "
      f"checkpoint, merge and PyTorch + PEFT agree")
