"""Tiny random transformers (PyTorch) decoders of each family we load, for parity tests.

Odd sizes on purpose: q/o projections are not square (``head_dim · heads ≠ hidden``) wherever the
family allows, so a missing transpose shows in the numbers; GQA ratios > 1; Qwen2's q/k/v biases;
Llama 3's "llama3" RoPE scaling with a short ``original_max_position_embeddings`` so that it acts
within a dozen positions; Mistral's sliding window shorter than the test sequences; tied and untied
heads. Weights are redrawn with large variances (norm weights too) so that every tensor moves the
logits.
"""
import jax
import numpy as np
import torch
import transformers as T

from lorapro_jax.models import DecoderConfig

CASES = {
    "llama3": lambda: T.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False),
    "llama2_tied_bias": lambda: T.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=6,
        rope_scaling={"type": "linear", "factor": 2.0}, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6, max_position_embeddings=64,
        tie_word_embeddings=True),
    "mistral": lambda: T.MistralConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=5,
        rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False),
    "qwen2": lambda: T.Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=True),
    # real Gemma-1 files carry hidden_act "gelu" next to hidden_activation "gelu_pytorch_tanh";
    # transformers reads the former, we the latter (decoder.py): set both alike to compare
    "gemma": lambda: T.GemmaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, max_position_embeddings=64),
}
CAUSAL_LM = {"llama": T.LlamaForCausalLM, "mistral": T.MistralForCausalLM,
             "qwen2": T.Qwen2ForCausalLM, "gemma": T.GemmaForCausalLM}


def torch_model(case: str, seed: int = 0) -> torch.nn.Module:
  """The case's PyTorch model in float32 with redrawn weights, in eval mode, eager attention."""
  config = CASES[case]()
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = CAUSAL_LM[config.model_type](config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):  # Llama-style norms scale by w, Gemma's by 1 + w
        param.copy_((0.0 if config.model_type == "gemma" else 1.0)
                    + 0.3 * torch.randn_like(param))
      else:
        param.copy_((0.5 if "embed_tokens" in name else 0.15) * torch.randn_like(param))
  return model


def our_config(model: torch.nn.Module, **overrides) -> DecoderConfig:
  return DecoderConfig.from_hf(model.config.to_dict(),
                               **{"dtype": np.float32, "param_dtype": np.float32, **overrides})


def to_ours(model: torch.nn.Module) -> dict:
  """The state dict as our param tree, by its own rules (independent of the loader): Linear
  weights transposed into kernels, layers stacked on a leading axis."""
  tied = model.config.tie_word_embeddings
  layers: dict = {}
  params: dict = {}
  for name, value in model.state_dict().items():
    value = value.detach().float().numpy()
    *module, leaf = name.split(".")
    if name == "lm_head.weight" and tied:
      continue
    if module[-1] == "embed_tokens":
      leaf = "embedding"
    elif leaf == "weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    if module[:2] == ["model", "layers"]:
      node = layers.setdefault(int(module[2]), {})
      for key in module[3:]:
        node = node.setdefault(key, {})
      node[leaf] = value
    else:
      node = params
      for key in module:
        node = node.setdefault(key, {})
      node[leaf] = value
  params["model"]["layers"] = jax.tree.map(lambda *xs: np.stack(xs),
                                           *[layers[i] for i in sorted(layers)])
  return params


def left_padded(lengths, total: int, vocab: int, seed: int = 0):
  """(ids, mask) of rows with ``lengths`` real tokens, left-padded (pad id 0) to ``total``."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for row, length in enumerate(lengths):
    ids[row, total - length:] = rng.integers(1, vocab, length)
    mask[row, total - length:] = 1
  return ids, mask


def torch_logits(model, ids, mask=None) -> np.ndarray:
  """PyTorch logits; with a mask, positions counted over real tokens as ``generate`` does."""
  ids = torch.as_tensor(ids)
  kwargs = {}
  if mask is not None:
    mask = torch.as_tensor(mask)
    kwargs = dict(attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
  with torch.no_grad():
    return model(ids, **kwargs).logits.float().numpy()
