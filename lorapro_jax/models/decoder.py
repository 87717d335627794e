"""Our decoder family in linen: Llama 2 / 3.x, Mistral, Qwen2 / 2.5 and Gemma (first generation).

One implementation with switches (:class:`DecoderConfig`) instead of one class per family; the
switches a family needs:

=================  ==========================================================================
Llama 2 / 3.x      SwiGLU, RMSNorm ``w · x̂``; grouped-query attention; ``rope_scaling``
                   ``"llama3"`` (3.1+); tied or untied head; ``attention_bias`` / ``mlp_bias``
Mistral            as Llama, plus ``sliding_window`` (tokens attend to the last ``w`` positions)
Qwen2 / 2.5        as Llama, plus biases on ``q_proj``, ``k_proj``, ``v_proj``
Gemma (1)          GeGLU; RMSNorm ``(1 + w) · x̂`` in float32; embeddings × sqrt(hidden) rounded to
                   the activation dtype; tied head; ``head_dim`` ≠ hidden / heads (7B: 256 × 16)
=================  ==========================================================================

:meth:`DecoderConfig.from_hf` reads a Hugging Face ``config.json`` dict;
:func:`lorapro_jax.models.load_pretrained` loads the weights.

**Gemma's activation.** Google's reference (and the ``hidden_activation`` key that real Gemma-1
``config.json`` files carry: ``"gelu_pytorch_tanh"``) uses the tanh approximation of GELU, while
transformers 4.57's PyTorch ``GemmaMLP`` reads the legacy ``hidden_act`` key, which those same files
set to ``"gelu"`` (exact, erf). We follow the model's authors: ``hidden_activation`` wins when
present, else ``hidden_act``. On a real Gemma-1 checkpoint our logits therefore differ from
transformers' by what the gap between the two GELUs (at most 4.7e-4, at x ≈ 2.7) adds up to (1e-3
on the logits of our tiny test model); ``DecoderConfig.from_hf(config, activation="gelu")``
reproduces transformers exactly.

**Speed.** The layers run under one ``nn.scan`` (parameters stacked on a leading axis), unrolled
by default (``scan_unroll``; parameters are always created with the loop rolled); attention goes
through ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPU for 16-bit compute, XLA
elsewhere); RMSNorm and the gated activation are recomputed in the backward pass from their
16-bit inputs; ``remat`` and ``scan_unroll`` trade memory, speed and compile time
(``docs/llm.md`` has the measurements).

**Masks, positions, cache.** ``model.apply({"params": p}, input_ids)`` is causal attention over the
whole row (the fast path used for training). ``attention_mask`` (``(B, T)``, 1 = token, 0 = pad)
marks padding anywhere in a row, left padding for batched prompts included; positions then count
real tokens only (``cumsum(mask) - 1``, as Hugging Face's ``generate`` does), so a left-padded row
gets the logits of the same row unpadded. With ``cache=`` (a :class:`KVCache` from
:func:`init_cache`), the call appends the new tokens' keys and values to the cache and returns
``(logits, cache)``: :func:`lorapro_jax.models.generate` prefills and decodes this way.

The linear layers are ``nn.Dense`` with Hugging Face's names, so ``lorapro_jax.inject`` adapts them
by path; because the layers are scanned, each parameter and adapter factor carries the layer axis
first (``lora_a`` of ``q_proj``: ``(num_layers, hidden, heads · head_dim)``, the ``*stack`` axes of
the adapter contract). Parameter tree::

  model/embed_tokens/embedding                 (vocab, hidden)
  model/layers/input_layernorm/weight          (L, hidden)
  model/layers/self_attn/{q,k,v,o}_proj/kernel (L, n_in, n_out)   (+ bias (L, n_out) if enabled)
  model/layers/post_attention_layernorm/weight (L, hidden)
  model/layers/mlp/{gate,up,down}_proj/kernel  (L, n_in, n_out)
  model/norm/weight                            (hidden,)
  lm_head/kernel                               (hidden, vocab)   (absent when embeddings are tied)

Example:

>>> import jax, jax.numpy as jnp
>>> from lorapro_jax.models import DecoderConfig, DecoderForCausalLM
>>> model = DecoderForCausalLM(DecoderConfig.tiny())
>>> tokens = jnp.zeros((2, 16), jnp.int32)
>>> params = model.init(jax.random.key(0), tokens)["params"]
>>> params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape
(2, 32, 32)
>>> model.apply({"params": params}, tokens).shape
(2, 16, 64)
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lorapro_jax.sharding import DATA, FSDP

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Hugging Face model_type -> the switches that are fixed for the family
DECODER_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
# Hugging Face activation names -> ours ("gelu_new" is GPT-2's name for the same tanh form)
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu": "gelu"}
_HF_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, Hugging Face's ``rope_scaling``.

  ``"linear"``: every inverse frequency divided by ``factor``. ``"llama3"`` (Llama 3.1+): with
  wavelength ``λ = 2π / inv_freq``, keep frequencies with ``λ < original / high_freq_factor``,
  divide those with ``λ > original / low_freq_factor`` by ``factor``, and blend in between with
  ``s = (original / λ − low) / (high − low)``: ``(1 − s) · f / factor + s · f``.
  """

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ("linear", "llama3"):
      raise ValueError(f"rope scaling {self.kind!r} is not supported; expected 'linear' or "
                       "'llama3' (or no rope_scaling)")
    if self.factor <= 0:
      raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
      raise ValueError(f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
                       f"low_freq_factor ({self.low_freq_factor}) > 0")

  @classmethod
  def from_hf(cls, rope_scaling: Mapping[str, Any] | None) -> "RopeScaling | None":
    """From a ``config.json``'s ``rope_scaling`` (key ``rope_type``, older files ``type``)."""
    if not rope_scaling:
      return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind == "default":
      return None
    if kind == "linear":
      return cls("linear", float(rope_scaling["factor"]))
    if kind == "llama3":
      return cls("llama3", float(rope_scaling["factor"]), float(rope_scaling["low_freq_factor"]),
                 float(rope_scaling["high_freq_factor"]),
                 int(rope_scaling["original_max_position_embeddings"]))
    raise ValueError(f"rope_scaling type {kind!r} is not supported; expected 'default', "
                     "'linear' or 'llama3'")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape, family switches and numerics of the decoder.

  Family switches: ``biases`` names the projections (of ``PROJECTIONS``) that have a bias (Qwen2:
  q, k, v); ``activation`` of the gated MLP (``"silu"``: SwiGLU, ``"gelu_tanh"`` / ``"gelu"``:
  GeGLU); ``norm_unit_offset`` (Gemma) scales RMSNorm by ``1 + w`` in float32 (weights init 0)
  instead of ``w`` in the activation dtype; ``scale_embeddings`` (Gemma) multiplies the embeddings
  by ``sqrt(hidden_size)`` rounded to the activation dtype; ``sliding_window`` (Mistral) lets each
  token attend to the last ``sliding_window`` positions, itself included; ``family`` is the
  Hugging Face ``model_type`` (names the record used for export).

  Numerics: ``dtype`` of activations and matrix products, ``param_dtype`` of parameters.
  ``remat``: what the backward pass keeps of each layer's forward — ``"none"`` keeps everything
  (fastest, most memory), ``"full"`` keeps only the layer inputs, ``"dots"`` keeps matrix-product
  outputs (``jax.checkpoint_policies.checkpoint_dots``), ``"dots_no_batch"`` those without batch
  dimensions. ``attention``: the ``implementation`` handed to ``jax.nn.dot_product_attention``;
  ``None`` picks ``"cudnn"`` on GPU for 16-bit compute (XLA for one-token decode steps) and XLA
  otherwise. ``scan_unroll``: layers per iteration of the layer loop; ``None`` (the default)
  unrolls it, ``num_layers`` per iteration: no per-iteration slicing of the stacked weights and
  saved activations, parameters still stacked (1B LoRA step on an H200: 87.9 ms unrolled against
  101.8 rolled; its XLA compile 15-17 s with the copies below, against 8). ``1`` keeps the loop
  rolled (one layer compiled).
  ``copy_layer_weights`` (with the loop unrolled, when training or scoring: no cache): each
  layer reads its weights through an optimization barrier, i.e. from a copy of its slice of the
  stacked weights. Without it XLA fuses every layer's own slice into that layer's GEMM kernels, so
  it autotunes and compiles each kernel once per layer; with it the layers share their kernels
  (1B LoRA step on an H200: XLA compile 49.1 -> 16.9 s, first step 60.7 -> 32.6 s, step 88.9 ->
  88.3 ms; 7B: compile 71.5 -> 19.5 s, step 219.9 -> 219.0 ms). The copies raise peak memory (1B:
  15.7 -> 17.3 GiB; 7B at 4 x 1024: 36.8 -> 44.4 GiB): ``False`` trades the compile time back for
  that memory. Not used when a mesh splits the weights (an ``fsdp`` axis > 1: not measured there).
  """

  vocab_size: int = 32000
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: int = 4
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  biases: tuple[str, ...] = ()
  activation: str = "silu"
  norm_unit_offset: bool = False
  scale_embeddings: bool = False
  sliding_window: int | None = None
  family: str = "llama"
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  remat: str = "none"
  attention: str | None = None
  scan_unroll: int | None = None
  copy_layer_weights: bool = True
  initializer_range: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "biases", tuple(self.biases))
    if self.scan_unroll is None:
      object.__setattr__(self, "scan_unroll", self.num_layers)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                       f"({self.num_heads}); pass head_dim explicitly")
    if self.head_size % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_size}")
    if not 1 <= self.scan_unroll <= self.num_layers:
      raise ValueError(f"scan_unroll must be in [1, num_layers={self.num_layers}], got "
                       f"{self.scan_unroll}")
    if not isinstance(self.copy_layer_weights, bool):
      raise ValueError(f"copy_layer_weights must be True or False, got "
                       f"{self.copy_layer_weights!r}")
    if self.attention not in (None, "xla", "cudnn"):
      raise ValueError(f"attention must be None, 'xla' or 'cudnn', got {self.attention!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    unknown = sorted(set(self.biases) - set(PROJECTIONS))
    if unknown:
      raise ValueError(f"biases {unknown} are not projections; expected some of {PROJECTIONS}")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
    if self.family not in DECODER_FAMILIES:
      raise ValueError(f"family must be one of {DECODER_FAMILIES}, got {self.family!r}")

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> "DecoderConfig":
    """The config of a Hugging Face ``config.json`` (a dict); ``overrides`` set any field.

    Reads ``model_type`` (``DECODER_FAMILIES``), the shape, ``head_dim`` (else hidden / heads),
    ``rope_theta``, ``rope_scaling`` (``rope_type`` or the older ``type``), ``rms_norm_eps``,
    ``tie_word_embeddings``, biases (Llama's ``attention_bias`` / ``mlp_bias``, Gemma's
    ``attention_bias``; Qwen2's q/k/v always), Mistral's ``sliding_window``, the activation
    (Gemma: ``hidden_activation`` before ``hidden_act``, see the module doc) and the checkpoint
    dtype (``dtype``, older files ``torch_dtype``; float32 if absent), which becomes both
    ``param_dtype`` and ``dtype`` unless overridden.
    """
    family = hf_config.get("model_type")
    if family not in DECODER_FAMILIES:
      raise ValueError(f"model_type {family!r} (architectures {hf_config.get('architectures')}) "
                       f"is not supported; supported: {DECODER_FAMILIES}")
    get = hf_config.get
    if get("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError(f"partial_rotary_factor={get('partial_rotary_factor')} is not supported "
                       "(rotary embeddings over the whole head only)")
    dtype_name = get("dtype") or get("torch_dtype") or "float32"
    if dtype_name not in _HF_DTYPES:
      raise ValueError(f"checkpoint dtype {dtype_name!r} is not supported; expected one of "
                       f"{sorted(_HF_DTYPES)}")
    dtype = _HF_DTYPES[dtype_name]
    activation = get("hidden_act", "silu")
    biases: tuple[str, ...] = ()
    sliding_window = None
    if family == "llama":
      biases = (PROJECTIONS[:4] if get("attention_bias") else ()) + (
          PROJECTIONS[4:] if get("mlp_bias") else ())
    elif family == "mistral":
      sliding_window = get("sliding_window")
    elif family == "qwen2":
      biases = PROJECTIONS[:3]
      if get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=True (sliding attention on some layers) is "
                         "not supported")
    elif family == "gemma":
      activation = get("hidden_activation") or activation
      biases = PROJECTIONS[:4] if get("attention_bias") else ()
    if activation not in _HF_ACTIVATIONS:
      raise ValueError(f"activation {activation!r} is not supported; expected one of "
                       f"{sorted(_HF_ACTIVATIONS)}")
    fields = dict(
        family=family, vocab_size=int(hf_config["vocab_size"]),
        hidden_size=int(hf_config["hidden_size"]),
        intermediate_size=int(hf_config["intermediate_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        num_kv_heads=int(get("num_key_value_heads") or hf_config["num_attention_heads"]),
        head_dim=get("head_dim"), rope_theta=float(get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling.from_hf(get("rope_scaling")),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", family == "gemma")),
        biases=biases, activation=_HF_ACTIVATIONS[activation], norm_unit_offset=family == "gemma",
        scale_embeddings=family == "gemma", sliding_window=sliding_window, dtype=dtype,
        param_dtype=dtype, initializer_range=float(get("initializer_range", 0.02)))
    return cls(**{**fields, **overrides})

  @classmethod
  def llama_1b(cls, **overrides) -> "DecoderConfig":
    """TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, SwiGLU 5632."""
    return cls(**overrides)

  @classmethod
  def base_768(cls, **overrides) -> "DecoderConfig":
    """A T5-base-sized Llama-style decoder: hidden 768, 12 layers, 12 heads, SwiGLU 2048."""
    fields = dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                  num_kv_heads=12)
    return cls(**{**fields, **overrides})

  @classmethod
  def tiny(cls, **overrides) -> "DecoderConfig":
    """A few-kilobyte decoder for tests on the CPU."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2)
    return cls(**{**fields, **overrides})

  def matmul_params(self) -> int:
    """Parameters that take part in matrix products per token (layers + LM head, no embedding)."""
    h, f, d = self.hidden_size, self.intermediate_size, self.head_size
    attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
    return self.num_layers * (attention + 3 * h * f) + h * self.vocab_size


class KVCache(NamedTuple):
  """Keys and values of every layer for ``size`` slots, filled left to right.

  ``key`` / ``value``: ``(num_layers, batch, size, num_kv_heads, head_dim)`` in the activation
  dtype (after RoPE); ``mask``: ``(batch, size)``, True where a slot holds a real token (not
  padding, not yet written); ``end``: ``()`` int32, the number of slots written.
  """

  key: jax.Array
  value: jax.Array
  mask: jax.Array
  end: jax.Array


def init_cache(config: DecoderConfig, batch: int, size: int) -> KVCache:
  """An empty cache of ``size`` slots (prompt plus new tokens) for ``batch`` rows."""
  shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_size)
  return KVCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype),
                 jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))


class RMSNorm(nn.Module):
  """``x̂ = x / sqrt(mean(x²) + eps)`` in float32, then ``w · x̂`` (Llama: x̂ rounded to the
  activation dtype first) or ``(1 + w) · x̂`` in float32 (Gemma, ``unit_offset``)."""

  eps: float
  dtype: Any
  param_dtype: Any
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    weight = self.param("weight", init, (x.shape[-1],), self.param_dtype)
    return _recomputed(functools.partial(rms_normalize, eps=self.eps, dtype=self.dtype,
                                         unit_offset=self.unit_offset))(x, weight)


def rms_normalize(x, weight, *, eps, dtype, unit_offset=False):
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  if unit_offset:
    return (normed * (1.0 + weight.astype(jnp.float32))).astype(dtype)
  return normed.astype(dtype) * weight.astype(dtype)


def gated_activation(gate, up, *, activation: str):
  """``act(gate) · up``: SwiGLU (``silu``) or GeGLU (``gelu_tanh``, ``gelu``)."""
  if activation == "silu":
    return nn.silu(gate) * up
  return nn.gelu(gate, approximate=activation == "gelu_tanh") * up


def _recomputed(fn):
  """``fn`` whose internals the backward pass recomputes from its (16-bit) inputs.

  Without it autodiff keeps float32 copies of normalised activations and every intermediate of
  ``silu(g) * u`` for the backward pass: on the 1B config that was 18 GB of residuals per step,
  written in the forward and read back in the backward (measured: 128.8 ms LoRA step, 42% of it
  elementwise work). Recomputing these cheap elementwise pieces costs one fused pass.
  """
  return jax.checkpoint(fn, prevent_cse=False)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
  """Inverse frequencies ``1 / theta^(2i / d)``, ``i < d/2``, in float32, scaled as configured."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  original = scaling.original_max_position_embeddings
  wavelength = 2 * math.pi / inv_freq
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  scaled = jnp.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
  smooth = (original / wavelength - low) / (high - low)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelength >= original / high) & (wavelength <= original / low)
  return jnp.where(medium, blended, scaled)


def rotary_tables(positions: jax.Array, inv_freq: jax.Array):
  """(sin, cos) of shape (B, T, head_dim) for Hugging Face's ``rotate_half`` layout, in float32;
  ``positions`` is (B, T) or (1, T)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotates (B, T, heads, head_dim) by the per-position tables, in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def _attention_impl(config: DecoderConfig, query_length: int) -> str:
  if config.attention is not None:
    return config.attention
  sixteen_bit = jnp.dtype(config.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  # a one-token decode step reads the cache once: a flash kernel has nothing to tile
  gpu_flash = jax.default_backend() == "gpu" and sixteen_bit and query_length > 1
  return "cudnn" if gpu_flash else "xla"


def _dense(config: DecoderConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=name in config.biases, dtype=config.dtype,
                  param_dtype=config.param_dtype,
                  kernel_init=nn.initializers.normal(config.initializer_range), name=name)


def _rows_over_mesh(x: jax.Array) -> jax.Array:
  """``x`` with its batch rows split over the current mesh's (data, fsdp) axes, if a mesh is set.

  The train step sets its mesh (:func:`lorapro_jax.train.make_train_step`); without one this is
  the identity. Every activation between the layer's products is pinned so (the block's input and
  output, q/k/v, the attention output, the MLP's hidden units): that is fsdp's contract, each
  device keeps its own rows and gathers the weights. Left to itself, XLA's propagation follows
  the kernels' splits into the activations (a product by a kernel split on its output axis gives
  an output split on features) and then swaps rows between the GPUs (collective-permutes and
  transposes: 8 ms of a 143 ms step at 1b, fsdp 2 on 2 H200s, on the compute stream). For q, k
  and v it is also required on GPUs: cuDNN attention's sharding rule refuses inputs of different
  shardings ("Query, key and value should have same sharding").
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(axis for axis in (DATA, FSDP) if axis in mesh.axis_names)
  if mesh.empty or not axes:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def _weights_split_over_mesh() -> bool:
  """Whether the current mesh (set by the train step) splits the weights: an fsdp axis > 1."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get(FSDP, 1) > 1


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; writes its keys / values into ``kv`` if given."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, sin, cos, mask, kv, end):
    c = self.config
    batch, length, _ = x.shape
    d = c.head_size
    q = _dense(c, c.num_heads * d, "q_proj")(x).reshape(batch, length, c.num_heads, d)
    k = _dense(c, c.num_kv_heads * d, "k_proj")(x).reshape(batch, length, c.num_kv_heads, d)
    v = _dense(c, c.num_kv_heads * d, "v_proj")(x).reshape(batch, length, c.num_kv_heads, d)
    q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
    q, k, v = _rows_over_mesh(q), _rows_over_mesh(k), _rows_over_mesh(v)
    if kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), end, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), end, axis=1)
      kv = (k, v)
    implementation = _attention_impl(c, length)
    if mask is None:  # the training fast path: causal (cuDNN skips the upper triangle)
      window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                         implementation=implementation)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    out = _rows_over_mesh(out.reshape(batch, length, c.num_heads * d))
    return _dense(c, c.hidden_size, "o_proj")(out), kv


class MLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = _rows_over_mesh(_dense(c, c.intermediate_size, "gate_proj")(x))
    up = _rows_over_mesh(_dense(c, c.intermediate_size, "up_proj")(x))
    act = _recomputed(functools.partial(gated_activation, activation=c.activation))
    return _dense(c, c.hidden_size, "down_proj")(act(gate, up))


class DecoderLayer(nn.Module):
  """Pre-norm block; ``(carry, per-layer output)`` so that ``nn.scan`` can stack it."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, sin, cos, mask, kv, end):
    c = self.config
    norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                             unit_offset=c.norm_unit_offset)
    x = _rows_over_mesh(x)
    attended, kv = Attention(c, name="self_attn")(norm(name="input_layernorm")(x), sin, cos,
                                                  mask, kv, end)
    x = _rows_over_mesh(x + attended)
    x = x + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
    return _rows_over_mesh(x), kv


def _remat_policy(name: str):
  return {
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


def _attention_layout(config: DecoderConfig, length: int, attention_mask, positions, cache):
  """(mask (B, 1, T, S) or None, positions (B or 1, T), slot mask of the cache after the write).

  Query ``t`` sits in slot ``end + t``; it sees slot ``s`` when ``s ≤ end + t``, the slot holds a
  real token, and (sliding window ``w``) ``s > end + t − w``. Slot distance equals position
  distance within a row because padding is only ever before a row's tokens or after them.
  """
  if cache is None and attention_mask is None:
    if positions is None:
      positions = jnp.arange(length)[None]
    return None, positions, None
  if attention_mask is None:
    batch = cache.mask.shape[0]
    new = jnp.ones((batch, length), bool)
  else:
    new = jnp.asarray(attention_mask).astype(bool)
  if cache is None:
    end, seen, slots = 0, 0, new
  else:
    end, seen = cache.end, jnp.sum(cache.mask, axis=1, keepdims=True)
    slots = jax.lax.dynamic_update_slice_in_dim(cache.mask, new, end, axis=1)
  if positions is None:
    positions = jnp.maximum(seen + jnp.cumsum(new, axis=1) - 1, 0)
  query_slot = end + jnp.arange(length)[:, None]
  key_slot = jnp.arange(slots.shape[1])[None, :]
  allowed = key_slot <= query_slot
  if config.sliding_window is not None:
    allowed &= key_slot > query_slot - config.sliding_window
  mask = allowed[None, None] & slots[:, None, None, :]
  return mask, positions, slots


class Decoder(nn.Module):
  """Embedding, the scanned decoder layers and the final norm: hidden states out (with the
  updated cache when one is given)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    c = self.config
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                 embedding_init=nn.initializers.normal(c.initializer_range),
                 name="embed_tokens")(input_ids)
    if c.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
    mask, positions, slots = _attention_layout(c, input_ids.shape[1], attention_mask, positions,
                                               cache)
    sin, cos = rotary_tables(positions, rope_frequencies(c.head_size, c.rope_theta,
                                                         c.rope_scaling))
    # Creating parameters (``init``, or ``init_adapters``' apply) keeps the loop rolled: the tree
    # is the same whatever the unroll (the scan stacks the layers), and XLA then compiles one
    # layer instead of num_layers (1b, 22 layers unrolled on an H200: 150 s of init -> 10 s).
    unroll = 1 if self.is_mutable_collection("params") else c.scan_unroll
    layer = DecoderLayer
    if unroll > 1 and cache is None and c.copy_layer_weights and not _weights_split_over_mesh():
      layer = nn.map_variables(layer, "params", trans_in_fn=jax.lax.optimization_barrier,
                               mutable=False)
    if c.remat != "none":
      layer = nn.remat(layer, policy=_remat_policy(c.remat), prevent_cse=False)
    layers = nn.scan(layer, variable_axes={"params": 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                     length=c.num_layers, unroll=unroll)
    kv = None if cache is None else (cache.key, cache.value)
    end = None if cache is None else cache.end
    x, kv = layers(c, name="layers")(x, sin, cos, mask, kv, end)
    hidden = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, c.norm_unit_offset, name="norm")(x)
    if cache is None:
      return hidden
    return hidden, KVCache(kv[0], kv[1], slots, cache.end + input_ids.shape[1])


class DecoderForCausalLM(nn.Module):
  """Token ids (B, T) -> next-token logits (B, T, vocab) in ``config.dtype``.

  ``attention_mask`` (B, T): 1 for tokens, 0 for padding; ``positions`` (B, T) override the
  positions counted from the mask; ``cache`` (:class:`KVCache`): append to it and return
  ``(logits, cache)``. A cache has a fixed size: writing past it is not detected under ``jit``
  (``lorapro_jax.models.generate`` sizes it to prompt + new tokens).
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    c = self.config
    out = Decoder(c, name="model")(input_ids, attention_mask, positions, cache)
    hidden, cache = out if cache is not None else (out, None)
    if c.tie_word_embeddings:
      embedding = self.variables["params"]["model"]["embed_tokens"]["embedding"]
      logits = hidden @ embedding.astype(c.dtype).T
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                        kernel_init=nn.initializers.normal(c.initializer_range),
                        name="lm_head")(hidden)
    return logits if cache is None else (logits, cache)


def flops_per_token(config: DecoderConfig, seq_len: int, *, train_base: bool) -> float:
  """Model FLOPs per token of one training step (remat recomputation not counted).

  Matrix products: ``6 N`` when the base weights are trained (forward, input and weight
  gradients), ``4 N`` when they are frozen (LoRA: no weight gradient; the rank-r adapters add
  under 1%, not counted). Attention: ``2 * 2 * T * d_attn / 2`` per layer forward (QK^T and PV,
  halved for the causal mask), times 3 for forward plus backward.
  """
  n = config.matmul_params()
  attention = 3 * config.num_layers * 2 * seq_len * config.num_heads * config.head_size
  return (6 if train_base else 4) * n + attention
