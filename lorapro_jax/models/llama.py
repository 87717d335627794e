"""A compact, fast Llama-style decoder in linen (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Built for fine-tuning benchmarks and experiments where Hugging Face's FlaxLlama is slower than it
needs to be: the layers run under one ``nn.scan`` (one compiled layer body, parameters stacked on a
leading axis), attention goes through ``jax.nn.dot_product_attention`` (cuDNN flash attention on
GPU, XLA elsewhere), matrix products run in bfloat16 on float32 parameters, and a rematerialisation
policy trades memory for recomputation.

The linear layers are plain ``nn.Dense`` modules with Hugging Face's names (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``lm_head``), so
``lorapro_jax.inject`` adapts them by path like any other linen model. Because the layers are
scanned, each parameter (and each adapter factor) carries the layer axis first:
``params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]`` has shape
``(num_layers, hidden, heads * head_dim)`` and an injected ``lora_a`` has shape
``(num_layers, n_in, r)`` — the ``*stack`` axes of the adapter contract.

Parameter tree (scanned layers stacked on axis 0)::

  model/embed_tokens/embedding                 (vocab, hidden)
  model/layers/input_layernorm/weight          (L, hidden)
  model/layers/self_attn/{q,k,v,o}_proj/kernel (L, n_in, n_out)
  model/layers/post_attention_layernorm/weight (L, hidden)
  model/layers/mlp/{gate,up,down}_proj/kernel  (L, n_in, n_out)
  model/norm/weight                            (hidden,)
  lm_head/kernel                               (hidden, vocab)   (absent when embeddings are tied)

The forward pass equals Hugging Face's ``LlamaForCausalLM`` (``rotate_half`` RoPE, RMSNorm in
float32, no biases): ``tests/test_llama_model.py`` checks it against ``FlaxLlamaForCausalLM`` with
the same weights.

Example::

  import jax, jax.numpy as jnp
  from lorapro_jax.models.llama import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig.tiny()
  model = LlamaForCausalLM(config)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  logits = model.apply({"params": params}, tokens)          # (2, 16, vocab)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of the decoder.

  ``remat``: what the backward pass keeps of each layer's forward — ``"none"`` keeps everything
  (fastest, most memory), ``"full"`` keeps only the layer inputs, ``"dots"`` keeps matrix-product
  outputs (``jax.checkpoint_policies.checkpoint_dots``), ``"dots_no_batch"`` those without batch
  dimensions. ``attention``: the ``implementation`` handed to ``jax.nn.dot_product_attention``;
  ``None`` picks ``"cudnn"`` on GPU for 16-bit compute and XLA otherwise. ``scan_unroll``: layers
  per iteration of the layer loop (``num_layers`` unrolls it fully: longer compilation, no
  per-iteration slicing of the stacked weights and activations); parameters stay stacked.
  """

  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: int = 4
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "none"
  attention: str | None = None
  scan_unroll: int = 1
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                       f"({self.num_heads}); pass head_dim explicitly")
    if not 1 <= self.scan_unroll <= self.num_layers:
      raise ValueError(f"scan_unroll must be in [1, num_layers={self.num_layers}], got "
                       f"{self.scan_unroll}")
    if self.attention not in (None, "xla", "cudnn"):
      raise ValueError(f"attention must be None, 'xla' or 'cudnn', got {self.attention!r}")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def llama_1b(cls, **overrides) -> "LlamaConfig":
    """TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, SwiGLU 5632."""
    return cls(**overrides)

  @classmethod
  def base_768(cls, **overrides) -> "LlamaConfig":
    """A T5-base-sized Llama-style decoder: hidden 768, 12 layers, 12 heads, SwiGLU 2048."""
    fields = dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                  num_kv_heads=12)
    return cls(**{**fields, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A few-kilobyte decoder for tests on the CPU."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2)
    return cls(**{**fields, **overrides})

  def matmul_params(self) -> int:
    """Parameters that take part in matrix products per token (layers + LM head, no embedding)."""
    h, f, d = self.hidden_size, self.intermediate_size, self.head_size
    attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
    return self.num_layers * (attention + 3 * h * f) + h * self.vocab_size


class RMSNorm(nn.Module):
  """``x / sqrt(mean(x^2) + eps) * weight``, statistics in float32."""

  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return _recomputed(functools.partial(rms_normalize, eps=self.eps, dtype=self.dtype))(x, weight)


def rms_normalize(x, weight, *, eps, dtype):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * weight.astype(jnp.float32)).astype(dtype)


def swiglu(gate, up):
  return nn.silu(gate) * up


def _recomputed(fn):
  """``fn`` whose internals the backward pass recomputes from its (16-bit) inputs.

  Without it autodiff keeps float32 copies of normalised activations and every intermediate of
  ``silu(g) * u`` for the backward pass: on the 1B config that was 18 GB of residuals per step,
  written in the forward and read back in the backward (measured: 128.8 ms LoRA step, 42% of it
  elementwise work). Recomputing these cheap elementwise pieces costs one fused pass.
  """
  return jax.checkpoint(fn, prevent_cse=False)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float):
  """(sin, cos) of shape (T, head_dim) for Hugging Face's ``rotate_half`` layout, in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates (B, T, heads, head_dim) by the per-position tables, in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def _attention_impl(config: LlamaConfig) -> str:
  if config.attention is not None:
    return config.attention
  sixteen_bit = jnp.dtype(config.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if jax.default_backend() == "gpu" and sixteen_bit else "xla"


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, sin, cos):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                              kernel_init=nn.initializers.normal(c.initializer_range))
    batch, length, _ = x.shape
    d = c.head_size
    q = dense(c.num_heads * d, name="q_proj")(x).reshape(batch, length, c.num_heads, d)
    k = dense(c.num_kv_heads * d, name="k_proj")(x).reshape(batch, length, c.num_kv_heads, d)
    v = dense(c.num_kv_heads * d, name="v_proj")(x).reshape(batch, length, c.num_kv_heads, d)
    q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       implementation=_attention_impl(c))
    return dense(c.hidden_size, name="o_proj")(out.reshape(batch, length, c.num_heads * d))


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                              kernel_init=nn.initializers.normal(c.initializer_range))
    gate = dense(c.intermediate_size, name="gate_proj")(x)
    up = dense(c.intermediate_size, name="up_proj")(x)
    return dense(c.hidden_size, name="down_proj")(_recomputed(swiglu)(gate, up))


class DecoderLayer(nn.Module):
  """Pre-norm block; ``(carry, None)`` in and out so that ``nn.scan`` can stack it."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, sin, cos):
    c = self.config
    norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
    x = x + Attention(c, name="self_attn")(norm(name="input_layernorm")(x), sin, cos)
    x = x + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
    return x, None


def _remat_policy(name: str):
  return {
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


class LlamaModel(nn.Module):
  """Embedding, the scanned decoder layers and the final norm: hidden states out."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=nn.initializers.normal(c.initializer_range),
                     name="embed_tokens")
    x = embed(input_ids)
    sin, cos = rotary_tables(jnp.arange(input_ids.shape[-1]), c.head_size, c.rope_theta)
    layer = DecoderLayer
    if c.remat != "none":
      layer = nn.remat(layer, policy=_remat_policy(c.remat), prevent_cse=False)
    layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                     "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                     unroll=c.scan_unroll)
    x, _ = layers(c, name="layers")(x, sin, cos)
    return RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)


class LlamaForCausalLM(nn.Module):
  """Token ids (B, T) -> next-token logits (B, T, vocab) in ``config.dtype``."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    hidden = LlamaModel(c, name="model")(input_ids)
    if c.tie_word_embeddings:
      embedding = self.variables["params"]["model"]["embed_tokens"]["embedding"]
      return hidden @ embedding.astype(c.dtype).T
    return nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                    kernel_init=nn.initializers.normal(c.initializer_range),
                    name="lm_head")(hidden)


def flops_per_token(config: LlamaConfig, seq_len: int, *, train_base: bool) -> float:
  """Model FLOPs per token of one training step (remat recomputation not counted).

  Matrix products: ``6 N`` when the base weights are trained (forward, input and weight
  gradients), ``4 N`` when they are frozen (LoRA: no weight gradient; the rank-r adapters add
  under 1%, not counted). Attention: ``2 * 2 * T * d_attn / 2`` per layer forward (QK^T and PV,
  halved for the causal mask), times 3 for forward plus backward.
  """
  n = config.matmul_params()
  attention = 3 * config.num_layers * 2 * seq_len * config.num_heads * config.head_size
  return (6 if train_base else 4) * n + attention
