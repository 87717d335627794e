"""lorapro_jax: LoRA-Pro and DoRA dynamic-rank low-rank adapters for JAX/Flax.

The names here are the library's everyday surface, grouped as optax groups its own; everything
else stays in its module (one idea per module: see the README's module map), e.g.
``lorapro_jax.lora_pro.lora_pro_full_direction``, ``lorapro_jax.dynamic_rank.plot_rank_heatmap``,
``lorapro_jax.sharding``, ``lorapro_jax.models`` (our decoder family, ``load_pretrained``,
``generate``) and ``lorapro_jax.nnx`` (flax.nnx adapters).

>>> import jax.numpy as jnp, optax
>>> import lorapro_jax as lp
>>> params = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}
>>> optimizer = optax.chain(optax.clip_by_global_norm(1.0), lp.lora_pro(1e-3, scale=2.0))
>>> state = optimizer.init(params)
>>> sorted(lp.__all__)[:4]
['AdapterKeys', 'DynamicRankConfig', 'LoRAConfig', 'LoRADense']
"""
# The adapter contract and the Flax (linen) layers.
from lorapro_jax.adapters import AdapterKeys
from lorapro_jax.lora import LoRAConfig, LoRADense, LoRADenseGeneral, LoRAEinsum
# Adapters on an existing model, and the trees they live in.
from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.trees import combine, count_params, merge, split, unmerge
# LoRA-Pro (Wang et al. 2025) as optax transforms.
from lorapro_jax.lora_pro import equivalent_gradient, lora_pro, lora_pro_full, lora_pro_project
# DoRA dynamic rank (Mao et al. 2024), configured once.
from lorapro_jax.dynamic_rank import (DynamicRankConfig, dem_regularizer, dynamic_rank,
                                      rank_pattern, shrink)
# Fine-tuning methods as data, and the jitted steps.
from lorapro_jax.methods import METHODS
from lorapro_jax.train import TrainState, make_eval_step, make_train_step
from lorapro_jax.sharding import make_mesh
# Checkpoints and the PyTorch world.
from lorapro_jax.checkpoint import TrainCheckpointer
from lorapro_jax.peft_format import export_merged, export_peft, import_peft

__all__ = [
    "AdapterKeys", "LoRAConfig", "LoRADense", "LoRADenseGeneral", "LoRAEinsum",
    "init_adapters", "inject", "combine", "count_params", "merge", "split", "unmerge",
    "equivalent_gradient", "lora_pro", "lora_pro_full", "lora_pro_project",
    "DynamicRankConfig", "dem_regularizer", "dynamic_rank", "rank_pattern", "shrink",
    "METHODS", "TrainState", "make_eval_step", "make_train_step", "make_mesh",
    "TrainCheckpointer", "export_merged", "export_peft", "import_peft",
]

__version__ = "0.2.0"
