"""Models: our decoder family (Llama 2/3.x, Mistral, Qwen2, Gemma) loaded from Hugging Face
checkpoints, with KV-cache generation; one record per model family (``families``) and LoRA
presets (``presets``). Importing this package imports no transformers code."""
from lorapro_jax.models.families import FAMILIES, Family, fix_t5_clip, get_family
from lorapro_jax.models.presets import hf_example_inputs, preset
from lorapro_jax.models.decoder import (Decoder, DecoderConfig, DecoderForCausalLM, KVCache,
                                        RopeScaling, init_cache)
from lorapro_jax.models.loader import (hf_tensor_name, load_pretrained, save_pretrained,
                                       to_hf_config)
from lorapro_jax.models.generate import generate
