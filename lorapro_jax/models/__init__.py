"""Models: LoRA presets for Hugging Face Flax families (``presets``) and our own compact models
(``llama``: a fast Llama-style decoder). Importing this package imports no transformers code."""
from lorapro_jax.models.presets import PRESETS, fix_t5_clip, hf_example_inputs, preset
from lorapro_jax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel
