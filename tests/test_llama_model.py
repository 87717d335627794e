"""The compact Llama decoder against Hugging Face's FlaxLlamaForCausalLM with the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig as HFLlamaConfig
from transformers import FlaxLlamaForCausalLM

from lorapro_jax.models.llama import LlamaConfig, LlamaForCausalLM, flops_per_token


@pytest.fixture(scope="module")
def config():
  return LlamaConfig.tiny(dtype=jnp.float32, num_layers=3)


@pytest.fixture(scope="module")
def hf_model(config):
  hf_config = HFLlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      rms_norm_eps=config.rms_norm_eps, max_position_embeddings=64, tie_word_embeddings=False)
  return FlaxLlamaForCausalLM(hf_config, seed=3, dtype=jnp.float32)


def to_ours(hf_params, num_layers):
  """HF's per-layer dicts ("0", "1", ...) stacked on a leading layer axis, as nn.scan keeps them."""
  hf_params = jax.tree.map(np.asarray, hf_params)
  layers = [hf_params["model"]["layers"][str(i)] for i in range(num_layers)]
  return {
      "model": {
          "embed_tokens": hf_params["model"]["embed_tokens"],
          "norm": hf_params["model"]["norm"],
          "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers),
      },
      "lm_head": hf_params["lm_head"],
  }


def test_parameter_tree_matches_hf_names(config, hf_model):
  ours = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  mapped = to_ours(hf_model.params, config.num_layers)
  assert jax.tree.structure(ours) == jax.tree.structure(mapped)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(mapped)):
    assert a.shape == b.shape, path


def test_logits_equal_hf_flax_llama(config, hf_model):
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
  expected = hf_model(tokens, params=hf_model.params).logits
  ours = LlamaForCausalLM(config).apply({"params": to_ours(hf_model.params, config.num_layers)},
                                        tokens)
  np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=2e-5)
  assert float(jnp.std(expected)) > 1e-3  # a non-trivial comparison


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_nothing(config, hf_model, remat):
  params = to_ours(hf_model.params, config.num_layers)
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, config.vocab_size)

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  plain = jax.grad(loss)(params, LlamaForCausalLM(config))
  rematted = jax.grad(loss)(params, LlamaForCausalLM(LlamaConfig.tiny(
      dtype=jnp.float32, num_layers=config.num_layers, remat=remat)))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unrolled_layer_loop_changes_nothing(config, hf_model):
  params = to_ours(hf_model.params, config.num_layers)
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, config.vocab_size)
  rolled = LlamaForCausalLM(config).apply({"params": params}, tokens)
  unrolled = LlamaForCausalLM(LlamaConfig.tiny(dtype=jnp.float32, num_layers=config.num_layers,
                                               scan_unroll=config.num_layers))
  np.testing.assert_allclose(unrolled.apply({"params": params}, tokens), rolled, rtol=1e-6,
                             atol=1e-6)


def test_causal_mask(config, hf_model):
  params = to_ours(hf_model.params, config.num_layers)
  model = LlamaForCausalLM(config)
  tokens = jax.random.randint(jax.random.key(3), (1, 10), 0, config.vocab_size)
  changed = tokens.at[0, 6:].set((tokens[0, 6:] + 1) % config.vocab_size)
  before, after = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
  np.testing.assert_array_equal(before[:, :6], after[:, :6])
  assert float(jnp.max(jnp.abs(before[:, 6:] - after[:, 6:]))) > 1e-4


def test_bf16_compute_stays_close_to_float32(config, hf_model):
  params = to_ours(hf_model.params, config.num_layers)
  tokens = jax.random.randint(jax.random.key(4), (2, 12), 0, config.vocab_size)
  exact = LlamaForCausalLM(config).apply({"params": params}, tokens)
  bf16 = LlamaForCausalLM(LlamaConfig.tiny(num_layers=config.num_layers)).apply(
      {"params": params}, tokens)
  assert bf16.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(bf16.astype(jnp.float32) - exact) / jnp.linalg.norm(exact)
  assert float(rel) < 3e-2


def test_flop_count_matches_parameter_count():
  config = LlamaConfig.llama_1b()
  params = jax.eval_shape(LlamaForCausalLM(config).init, jax.random.key(0),
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
    LlamaConfig.tiny(remat="sometimes")
  with pytest.raises(ValueError, match="scan_unroll"):
    LlamaConfig.tiny(scan_unroll=3)
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig.tiny(num_heads=4, num_kv_heads=3)
