"""lorapro_jax: LoRA-Pro and DoRA dynamic-rank low-rank adapters for JAX/Flax.

The public API is re-exported here; each module holds one idea (see README.md's module map).
"""
from lorapro_jax.adapters import AdapterKeys, adapter_paths, is_adapter, map_adapters
from lorapro_jax.lora import LoRAConfig, LoRADense, LoRADenseGeneral, LoRAEinsum
from lorapro_jax.inject import init_adapters, inject, linear_layer_paths
from lorapro_jax.trees import combine, count_params, merge, split, unmerge
from lorapro_jax.lora_pro import (LoRAProFullState, equivalent_gradient, lora_pro, lora_pro_adjust,
                                  lora_pro_full, lora_pro_full_direction, lora_pro_project)
from lorapro_jax.dynamic_rank import (DynamicRankConfig, DynamicRankState, dem_penalty,
                                      dem_regularizer, dynamic_rank, norm_ratio_scores,
                                      plot_rank_heatmap, pruning_events, rank_pattern,
                                      sensitivity_scores, shrink)
from lorapro_jax.methods import METHODS, Method
from lorapro_jax.train import TrainState, evaluate, fit, make_eval_step, make_train_step
from lorapro_jax.schedules import make_schedule
from lorapro_jax.metrics import (accuracy, compute_metrics, exact_match, f1_binary, f1_macro,
                                 matthews_corrcoef, pearson, spearman)
from lorapro_jax.sharding import (batch_sharding, initialize_distributed, make_mesh, shard_batch,
                                  state_shardings)
from lorapro_jax.checkpoint import (CheckpointCorruptError, CheckpointLockedError,
                                    CheckpointMismatchError, Restored, TrainCheckpointer)
from lorapro_jax.peft_format import (export_merged, export_peft, import_peft, read_peft_config,
                                     torch_module_names)

__version__ = "0.1.0"
