"""Our decoder against transformers' PyTorch models (Llama 3 / 2, Mistral, Qwen2, Gemma), float32.

The PyTorch weights go into our tree by the test's own rules (hf_decoders.to_ours), not the
loader's, so these tests pin the model; tests/test_loader.py pins the loader.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_decoders import CASES, left_padded, our_config, to_ours, torch_logits, torch_model

from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, RopeScaling, init_cache
from lorapro_jax.models.decoder import flops_per_token

ATOL = 1e-4  # float32 logits of order 1; the implementations differ by summation order only


@functools.lru_cache
def forward(config: DecoderConfig):
  """The jitted ``apply`` of the decoder (one compilation per config and input shape)."""
  return jax.jit(DecoderForCausalLM(config).apply)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  hf = torch_model(request.param)
  return hf, our_config(hf), to_ours(hf)


def test_logits_equal_pytorch(case):
  hf, config, params = case
  ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 11))
  expected = torch_logits(hf, ids)
  ours = forward(config)({"params": params}, ids)
  np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)
  assert float(np.std(expected)) > 0.3  # a non-trivial comparison


def test_left_padded_batch_equals_pytorch_and_the_rows_alone(case):
  hf, config, params = case
  lengths = (11, 7, 3)
  ids, mask = left_padded(lengths, 11, config.vocab_size, seed=2)
  expected = torch_logits(hf, ids, mask)
  ours = np.asarray(forward(config)({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], expected[real], atol=ATOL, rtol=0)
  alone = forward(config)({"params": params}, ids[2:, 11 - lengths[2]:])  # the shortest row
  np.testing.assert_allclose(ours[2, 11 - lengths[2]:], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "gemma"])  # the others: through generate's tests
def test_kv_cache_steps_equal_the_full_forward(name):
  """Prefill a left-padded batch into a cache, then feed tokens one or two at a time (Mistral's
  sliding window of 5 spans the cache's pieces)."""
  hf = torch_model(name)
  config, params = our_config(hf), to_ours(hf)
  ids, mask = left_padded((9, 5), 9, config.vocab_size, seed=3)
  full = np.asarray(forward(config)({"params": params}, ids, mask))
  cache = init_cache(config, 2, 12)
  pieces = []
  for start, stop in ((0, 6), (6, 7), (7, 9)):
    logits, cache = forward(config)({"params": params}, ids[:, start:stop], mask[:, start:stop],
                                    cache=cache)
    pieces.append(np.asarray(logits))
  assert int(cache.end) == 9
  real = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(pieces, 1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,override", [
    ("llama3", dict(rope_scaling=None)),
    ("llama2_tied_bias", dict(rope_scaling=None)),
    ("mistral", dict(sliding_window=None)),
    ("gemma", dict(activation="gelu")),
    ("gemma", dict(scale_embeddings=False)),
])
def test_each_family_switch_is_exercised(name, override):
  """Dropping any one switch breaks parity: the tests above can fail (exact instead of tanh GELU
  moves Gemma's logits by about 1e-3, ten times the tolerance)."""
  hf = torch_model(name)
  ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, (1, 11))
  wrong = forward(our_config(hf, **override))({"params": to_ours(hf)}, ids)
  assert float(np.max(np.abs(wrong - torch_logits(hf, ids)))) > 5 * ATOL


# Published config.json contents (fields that matter) and the published parameter counts.
REAL_CONFIGS = {
    "Llama-3.1-8B": (dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16", hidden_act="silu",
        attention_bias=False, mlp_bias=False), 8_030_261_248),
    "Mistral-7B-v0.1": (dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0,
        sliding_window=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        torch_dtype="bfloat16", hidden_act="silu"), 7_241_732_096),
    "Qwen2.5-7B": (dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
        sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16",
        hidden_act="silu"), 7_615_616_512),
    "gemma-7b": (dict(
        model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
        rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="gelu",
        hidden_activation="gelu_pytorch_tanh", torch_dtype="bfloat16"), 8_537_680_896),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_configs_give_the_published_parameter_counts(name):
  hf_config, published = REAL_CONFIGS[name]
  config = DecoderConfig.from_hf(hf_config)
  shapes = jax.eval_shape(DecoderForCausalLM(config).init, jax.random.key(0),
                          jnp.zeros((1, 1), jnp.int32))["params"]
  assert sum(x.size for x in jax.tree.leaves(shapes)) == published
  assert config.param_dtype == config.dtype == jnp.bfloat16


def test_from_hf_reads_each_family_switch():
  llama = DecoderConfig.from_hf(REAL_CONFIGS["Llama-3.1-8B"][0])
  assert llama.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
  assert (llama.num_kv_heads, llama.head_size, llama.rms_norm_eps) == (8, 128, 1e-5)
  gemma = DecoderConfig.from_hf(REAL_CONFIGS["gemma-7b"][0])
  assert gemma.activation == "gelu_tanh"  # hidden_activation wins over the legacy hidden_act
  assert gemma.norm_unit_offset and gemma.scale_embeddings and gemma.tie_word_embeddings
  assert gemma.head_size == 256 and gemma.num_heads * gemma.head_size != gemma.hidden_size
  assert DecoderConfig.from_hf(REAL_CONFIGS["Qwen2.5-7B"][0]).biases == (
      "q_proj", "k_proj", "v_proj")
  assert DecoderConfig.from_hf(REAL_CONFIGS["Mistral-7B-v0.1"][0]).sliding_window == 4096
  newer = {**REAL_CONFIGS["Mistral-7B-v0.1"][0], "dtype": "float16", "sliding_window": None}
  del newer["torch_dtype"]
  config = DecoderConfig.from_hf(newer, remat="full")
  assert (config.dtype, config.sliding_window, config.remat) == (jnp.float16, None, "full")


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gemma2"), r"model_type 'gemma2' .* not supported"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), r"rope_scaling type 'yarn'"),
    (dict(torch_dtype="int8"), r"checkpoint dtype 'int8'"),
    (dict(hidden_act="relu"), r"activation 'relu'"),
    (dict(model_type="qwen2", use_sliding_window=True), r"use_sliding_window=True"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5"),
])
def test_from_hf_rejects_what_it_cannot_run(change, message):
  with pytest.raises(ValueError, match=message):
    DecoderConfig.from_hf({**REAL_CONFIGS["Llama-3.1-8B"][0], **change})


@pytest.fixture(scope="module")
def llama():
  hf = torch_model("llama3")
  return our_config(hf), to_ours(hf)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing(llama, remat):
  config, params = llama
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, config.vocab_size)

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  plain = grad(params, DecoderForCausalLM(config))
  rematted = grad(params, DecoderForCausalLM(dataclasses.replace(config, remat=remat)))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unrolled_layer_loop_changes_nothing(llama):
  config, params = llama
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, config.vocab_size)
  rolled = forward(dataclasses.replace(config, scan_unroll=1))({"params": params}, tokens)
  for unroll in (2, None):  # two layers per iteration; all (the default)
    unrolled = forward(dataclasses.replace(config, scan_unroll=unroll))({"params": params}, tokens)
    np.testing.assert_allclose(unrolled, rolled, rtol=1e-6, atol=1e-6)
  assert DecoderConfig.tiny().scan_unroll == DecoderConfig.tiny().num_layers


def _scan_unrolls(fn, *args) -> list[int]:
  """The ``unroll`` of every scan in ``fn``'s jaxpr (the layer loop's, here)."""
  return [eqn.params["unroll"] for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns
          if eqn.primitive.name == "scan"]


def test_creating_parameters_keeps_the_layer_loop_rolled(llama):
  """init (and init_adapters' apply) compiles one layer whatever ``scan_unroll``; the tree and the
  values are those of the rolled loop, and applying the model does unroll."""
  config, _ = llama
  unrolled = DecoderForCausalLM(dataclasses.replace(config, scan_unroll=config.num_layers))
  rolled = DecoderForCausalLM(dataclasses.replace(config, scan_unroll=1))
  tokens = jnp.zeros((1, 8), jnp.int32)
  key = jax.random.key(3)
  assert _scan_unrolls(unrolled.init, key, tokens) == [1]
  created = unrolled.init(key, tokens)
  chex.assert_trees_all_equal(created, rolled.init(key, tokens))
  assert _scan_unrolls(unrolled.apply, created, tokens) == [config.num_layers]


def _barriers(fn, *args) -> int:
  """How many optimization barriers ``fn``'s jaxpr holds, the layer loop's body included."""
  return str(jax.make_jaxpr(fn)(*args)).count("optimization_barrier")


def test_layer_weight_copies_change_nothing_and_are_made_only_where_they_help(llama):
  """``copy_layer_weights`` reads each layer's weights through an optimization barrier (one XLA
  kernel per GEMM for all layers instead of one per layer): values and gradients unchanged; only
  in the unrolled training / scoring forward, not when creating parameters, not in the rolled
  loop, not with a KV cache, not when a mesh splits the weights over fsdp."""
  from lorapro_jax.sharding import make_mesh
  config, params = llama
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, config.vocab_size)
  copied = DecoderForCausalLM(dataclasses.replace(config, copy_layer_weights=True))
  in_place = DecoderForCausalLM(dataclasses.replace(config, copy_layer_weights=False))

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, copied)),
                  jax.tree.leaves(jax.grad(loss)(params, in_place))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  apply = functools.partial(copied.apply, {"params": params})
  assert _barriers(apply, tokens) == 1  # the layer loop's body, unrolled by XLA
  assert _barriers(jax.grad(lambda p: loss(p, copied)), params) >= 1
  assert _barriers(functools.partial(in_place.apply, {"params": params}), tokens) == 0
  rolled = DecoderForCausalLM(dataclasses.replace(config, scan_unroll=1))
  assert _barriers(functools.partial(rolled.apply, {"params": params}), tokens) == 0
  assert _barriers(copied.init, jax.random.key(0), tokens) == 0
  cache = init_cache(copied.config, 2, 8)
  assert _barriers(lambda ids: apply(ids, cache=cache), tokens) == 0
  with jax.set_mesh(make_mesh(data=4, fsdp=2)):
    assert _barriers(apply, tokens) == 0
  with jax.set_mesh(make_mesh(data=8, fsdp=1)):  # data parallel: weights whole on every device
    assert _barriers(apply, tokens) == 1


def test_bf16_compute_stays_close_to_float32(llama):
  config, params = llama
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, config.vocab_size)
  exact = forward(config)({"params": params}, tokens)
  bf16 = forward(dataclasses.replace(config, dtype=jnp.bfloat16))({"params": params}, tokens)
  assert bf16.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(bf16.astype(jnp.float32) - exact) / jnp.linalg.norm(exact)
  assert float(rel) < 3e-2


def test_flop_count_matches_parameter_count():
  config = DecoderConfig.llama_1b()
  params = jax.eval_shape(DecoderForCausalLM(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  total = sum(x.size for x in jax.tree.leaves(params))
  embedding = config.vocab_size * config.hidden_size
  norms = (2 * config.num_layers + 1) * config.hidden_size
  assert config.matmul_params() == total - embedding - norms
  assert total == 1_100_048_384  # TinyLlama-1.1B's published parameter count
  attention = 3 * 22 * 2 * 1024 * 2048
  assert flops_per_token(config, 1024, train_base=False) == 4 * config.matmul_params() + attention


def test_bad_config_is_rejected():
  with pytest.raises(ValueError, match="remat"):
    DecoderConfig.tiny(remat="sometimes")
  with pytest.raises(ValueError, match="scan_unroll"):
    DecoderConfig.tiny(scan_unroll=3)
  with pytest.raises(ValueError, match="copy_layer_weights must be True or False, got 'yes'"):
    DecoderConfig.tiny(copy_layer_weights="yes")
  with pytest.raises(ValueError, match="num_kv_heads"):
    DecoderConfig.tiny(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match=r"biases \['lm_head'\]"):
    DecoderConfig.tiny(biases=("q_proj", "lm_head"))
  with pytest.raises(ValueError, match="activation"):
    DecoderConfig.tiny(activation="relu")
