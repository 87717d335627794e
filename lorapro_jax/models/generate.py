"""Batched generation with a KV cache: one jitted prefill plus a ``lax.while_loop`` of decode steps.

:func:`generate` runs a :class:`~lorapro_jax.models.decoder.DecoderForCausalLM` (adapters injected
or not: ``lorapro_jax.inject(model, config)`` works as it is, nothing is merged) on left-padded
prompts: the prompts go through the model once, filling a cache of ``prompt + max_new_tokens``
slots, then each step feeds the last token and appends its keys and values. Positions count real
tokens (``cumsum(mask) - 1``), as in Hugging Face's ``generate``, so a padded prompt continues as
it would alone. Decoding is greedy by default; ``temperature > 0`` samples (after top-p
filtering when ``top_p < 1``) with ``key``. A row stops at one of ``eos_token_id`` and is
filled with ``pad_token_id`` after it; the loop ends when every row has stopped.

Compilation: one per (batch, bucketed prompt length, ``max_new_tokens``, greedy or sampling):
prompts are left-padded to a multiple of ``bucket`` tokens, so prompt lengths that share a
bucket share a compiled program.

>>> import jax, jax.numpy as jnp
>>> from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, generate
>>> model = DecoderForCausalLM(DecoderConfig.tiny(dtype=jnp.float32))
>>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
>>> prompts = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])      # row 0 left-padded
>>> mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
>>> tokens = generate(model, params, prompts, attention_mask=mask, max_new_tokens=4)
>>> tokens.shape
(2, 4)
>>> alone = generate(model, params, prompts[:1, 2:], max_new_tokens=4)
>>> bool((alone == tokens[:1]).all())                             # padding changes nothing
True
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lorapro_jax.models.decoder import DecoderConfig, init_cache


def decoder_config(model: nn.Module) -> DecoderConfig:
  """The :class:`DecoderConfig` of ``model`` or of the model it wraps (``inject``)."""
  node = model
  while not isinstance(getattr(node, "config", None), DecoderConfig):
    if not isinstance(getattr(node, "module", None), nn.Module):
      raise TypeError(f"{type(model).__name__} is not a DecoderForCausalLM nor wraps one "
                      "(lorapro_jax.inject): generate needs the decoder's KV cache")
    node = node.module
  return node.config


def _pick(logits, key, temperature, top_p, greedy: bool):
  """Next token per row: argmax, or a sample from ``softmax(logits / temperature)`` restricted to
  the smallest set of tokens whose probability reaches ``top_p`` (the top token always kept)."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(
      sorted_logits, axis=-1)
  sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(key, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "eos",
                                             "pad_token_id"))
def _generate(model, params, input_ids, attention_mask, key, temperature, top_p, *,
              max_new_tokens: int, greedy: bool, eos: tuple[int, ...], pad_token_id: int):
  config = decoder_config(model)
  batch, length = input_ids.shape
  cache = init_cache(config, batch, length + max_new_tokens)
  logits, cache = model.apply({"params": params}, input_ids, attention_mask, cache=cache)
  key, sub = jax.random.split(key)
  token = _pick(logits[:, -1], sub, temperature, top_p, greedy)
  eos_ids = jnp.asarray(eos, jnp.int32)
  done = jnp.isin(token, eos_ids)
  out = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

  def running(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def decode(state):
    step, token, cache, done, out, key = state
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad_token_id, _pick(logits[:, -1], sub, temperature, top_p, greedy))
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
    return step + 1, token, cache, done | jnp.isin(token, eos_ids), out, key

  state = (jnp.int32(1), token, cache, done, out, key)
  return jax.lax.while_loop(running, decode, state)[4]


def generate(model: nn.Module, params: Any, input_ids: jax.Array, *,
             attention_mask: jax.Array | None = None, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             bucket: int = 64) -> jax.Array:
  """New tokens ``(batch, max_new_tokens)`` after left-padded prompts ``input_ids`` (B, T).

  Args:
    model: a ``DecoderForCausalLM``, or one wrapped by ``lorapro_jax.inject``.
    params: its params (with the adapter leaves for an injected model).
    attention_mask: (B, T), 1 for prompt tokens, 0 for the left padding (default: no padding).
    max_new_tokens: tokens to generate per row (>= 1).
    temperature: 0 (default) decodes greedily; > 0 samples with ``key``.
    top_p: nucleus sampling threshold in (0, 1].
    eos_token_id: id(s) that end a row; later positions hold ``pad_token_id``.
    bucket: prompts are left-padded to a multiple of this many tokens (fewer compilations).
  """
  decoder_config(model)  # fails early for a model without our KV cache
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, "
                     f"top_p={top_p}")
  greedy = temperature == 0
  if not greedy and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(...)")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids "
                     f"{input_ids.shape}")
  extra = -input_ids.shape[1] % bucket
  input_ids = jnp.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_token_id)
  attention_mask = jnp.pad(jnp.asarray(attention_mask, jnp.int32), ((0, 0), (extra, 0)))
  eos = () if eos_token_id is None else tuple(
      int(i) for i in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
  return _generate(model, params, input_ids, attention_mask,
                   jax.random.key(0) if key is None else key, jnp.float32(temperature or 1.0),
                   jnp.float32(top_p), max_new_tokens=max_new_tokens, greedy=greedy, eos=eos,
                   pad_token_id=int(pad_token_id))
