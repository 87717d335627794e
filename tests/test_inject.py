"""inject / init_adapters / split / combine / merge / unmerge / counting on a model with every
kind of linear layer (Dense, multi-axis DenseGeneral, Einsum, a scanned stack, a head)."""
import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lorapro_jax.adapters import adapter_paths
from lorapro_jax.inject import init_adapters, inject, linear_layer_paths
from lorapro_jax.trees import combine, count_params, merge, split, unmerge
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.models import hf_example_inputs, preset


class Block(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(6, name="proj")(carry)), None


class Mixed(nn.Module):
  """x (batch, seq, 6) -> (batch, seq, 3) through every layer kind."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="dense")(x)                                 # 6 -> 8
    h = nn.DenseGeneral((2, 4), name="general")(h)                   # 8 -> 2x4
    h = nn.DenseGeneral(5, axis=(-2, -1), name="fold")(jnp.tanh(h))  # 2x4 -> 5
    h = nn.Einsum((5, 3, 2), "bsd,dhk->bshk", name="einsum")(h)      # 5 -> 3x2
    h = h.reshape(h.shape[:2] + (6,))
    scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    h, _ = scan(name="stack")(h, None)                               # 2 x (6 -> 6)
    return nn.Dense(3, name="classifier")(h)


# (path, n_in, n_out, stack) of every layer "all-linear" adapts in Mixed.
LAYERS = [(("dense",), 6, 8, ()), (("general",), 8, 8, ()), (("fold",), 8, 5, ()),
          (("einsum",), 5, 6, ()), (("stack", "proj"), 6, 6, (2,))]
X = jax.random.normal(jax.random.key(0), (2, 3, 6))
CONFIG = LoRAConfig(rank=2, alpha=3.0)


@pytest.fixture(scope="module")
def base():
  return jax.jit(Mixed().init)(jax.random.key(1), X)["params"]


def randomize(trainable, key):
  leaves, tree = jax.tree.flatten(trainable)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, v.shape, v.dtype)
                                   for k, v in zip(keys, leaves)])


def forward(config):
  return jax.jit(lambda params, x: inject(Mixed(), config).apply({"params": params}, x))


def test_at_init_outputs_equal_base_exactly_and_layout(base):
  trainable = init_adapters(inject(Mixed(), CONFIG), base, jax.random.key(2), X)
  assert sorted(adapter_paths(trainable)) == sorted(path for path, *_ in LAYERS)  # no head
  for path, n_in, n_out, stack in LAYERS:
    node = trainable
    for key in path:
      node = node[key]
    assert set(node) == {"lora_a", "lora_b"}
    assert node["lora_a"].shape == stack + (n_in, 2) and node["lora_b"].shape == stack + (2, n_out)
  params = combine(base, trainable)
  assert set(params["dense"]) == {"kernel", "bias", "lora_a", "lora_b"}
  base_out = jax.jit(Mixed().apply)({"params": base}, X)
  np.testing.assert_array_equal(forward(CONFIG)(params, X), base_out)


def test_init_adapters_outputs_only_adapters_and_leaves_base_alone(base):
  before = jax.tree.map(np.array, base)
  trainable = init_adapters(inject(Mixed(), CONFIG), base, jax.random.key(2), X)
  names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  assert names == {"lora_a", "lora_b"}
  jax.tree.map(np.testing.assert_array_equal, base, before)
  again = init_adapters(inject(Mixed(), CONFIG), base, jax.random.key(2), X)
  jax.tree.map(np.testing.assert_array_equal, trainable, again)  # deterministic given the rng


def test_split_combine_round_trip_and_modules_to_save(base):
  config = dataclasses.replace(CONFIG, modules_to_save=("classifier",))
  trainable = init_adapters(inject(Mixed(), config), base, jax.random.key(2), X)
  np.testing.assert_array_equal(trainable["classifier"]["kernel"], base["classifier"]["kernel"])
  params = combine(base, trainable)
  frozen, again = split(params, config)
  assert "classifier" not in frozen
  assert jax.tree.structure(again) == jax.tree.structure(trainable)
  assert jax.tree.structure(frozen) == jax.tree.structure(split(base, config)[0])
  jax.tree.map(np.testing.assert_array_equal, combine(frozen, again), params)
  # A new head (absent from the pretrained base) is created, other missing params are an error.
  headless = {k: v for k, v in base.items() if k != "classifier"}
  created = init_adapters(inject(Mixed(), config), headless, jax.random.key(2), X)
  assert created["classifier"]["kernel"].shape == (6, 3)
  without_dense = {k: v for k, v in base.items() if k != "dense"}
  with pytest.raises(ValueError, match="dense"):
    init_adapters(inject(Mixed(), config), without_dense, jax.random.key(2), X)
  with pytest.raises(ValueError, match="modules_to_save.*'head'"):
    split(params, dataclasses.replace(CONFIG, modules_to_save=("head",)))


@pytest.mark.parametrize("config", [
    CONFIG,
    LoRAConfig(rank=2, alpha=3.0, gated=True, rslora=True, rank_pattern={"proj": 1},
               targets="all-linear", exclude=("fold",)),
])
def test_merge_matches_adapted_model_and_unmerge_recovers(base, config):
  trainable = randomize(init_adapters(inject(Mixed(), config), base, jax.random.key(2), X),
                        jax.random.key(3))
  params = combine(base, trainable)
  merged = merge(params, config)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, base)
  adapted = forward(config)(params, X)
  assert np.abs(adapted - Mixed().apply({"params": base}, X)).max() > 1e-2  # adapters matter
  np.testing.assert_allclose(Mixed().apply({"params": merged}, X), adapted, rtol=1e-5, atol=1e-5)
  frozen, recovered = split(unmerge(merged, trainable, config))
  jax.tree.map(np.testing.assert_array_equal, recovered, trainable)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), frozen, base)


def test_merge_folds_by_hand_and_keeps_dtype():
  kernel = jax.random.normal(jax.random.key(0), (4, 3)).astype(jnp.bfloat16)
  a = jax.random.normal(jax.random.key(1), (4, 2))
  b = jax.random.normal(jax.random.key(2), (2, 3))
  config = LoRAConfig(rank=2, alpha=1.0)
  merged = merge({"layer": {"kernel": kernel, "lora_a": a, "lora_b": b}}, config)
  assert set(merged["layer"]) == {"kernel"} and merged["layer"]["kernel"].dtype == jnp.bfloat16
  expected = (np.asarray(kernel, np.float32) + 0.5 * np.asarray(a) @ np.asarray(b))
  np.testing.assert_allclose(np.asarray(merged["layer"]["kernel"], np.float32),
                             np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32))
  transposed = dataclasses.replace(config, transposed_kernels=("layer",))
  square = {"layer": {"kernel": jnp.zeros((3, 3)), "lora_a": a[:3], "lora_b": b}}
  np.testing.assert_allclose(merge(square, transposed)["layer"]["kernel"],
                             0.5 * (np.asarray(a[:3]) @ np.asarray(b)).T, rtol=1e-6)
  with pytest.raises(ValueError, match="does not fold"):
    merge({"layer": {"kernel": jnp.zeros((5, 3)), "lora_a": a, "lora_b": b}}, config)


@pytest.mark.parametrize("gated", [False, True])
def test_trainable_count_is_sum_of_r_times_n_in_plus_n_out(base, gated):
  config = dataclasses.replace(CONFIG, gated=gated)
  trainable = init_adapters(inject(Mixed(), config), base, jax.random.key(2), X)
  r = config.rank
  expected = sum(int(np.prod(stack, dtype=int)) * (r * (n_in + n_out) + (r if gated else 0))
                 for _, n_in, n_out, stack in LAYERS)
  assert count_params(trainable) == expected == (168 if gated else 156)


def test_roberta_base_paper_targets_rank_8_count_1327104():
  hf_config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                         type_vocab_size=1)  # roberta-base's shapes
  module = transformers.FlaxRobertaModel.module_class(hf_config)
  args, _ = hf_example_inputs(hf_config, batch=1, seq_len=4)
  key = jax.random.key(0)
  base_shapes = jax.eval_shape(module.init, key, *args)["params"]
  model = inject(module, preset("roberta", rank=8))
  shapes = jax.eval_shape(lambda b, k: init_adapters(model, b, k, *args), base_shapes, key)
  assert len(adapter_paths(shapes)) == 12 * 6
  assert count_params(shapes) == 1_327_104


def test_gradients_reach_adapters_only_and_match_closed_form():
  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, use_bias=False, name="layer")(x)

  config = LoRAConfig(rank=2, alpha=4.0, targets="layer")
  x = jax.random.normal(jax.random.key(0), (3, 7))
  target = jax.random.normal(jax.random.key(1), (3, 5))
  base = One().init(jax.random.key(2), x)["params"]
  model = inject(One(), config)
  trainable = randomize(init_adapters(model, base, jax.random.key(3), x), jax.random.key(4))

  def loss(trainable, base):
    return jnp.sum(model.apply({"params": combine(base, trainable)}, x) * target)

  grads = jax.jit(jax.grad(loss))(trainable, base)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  a, b, s = trainable["layer"]["lora_a"], trainable["layer"]["lora_b"], 2.0
  g = np.asarray(x).T @ np.asarray(target)  # dL/dK
  np.testing.assert_allclose(grads["layer"]["lora_a"], s * g @ np.asarray(b).T, rtol=1e-5)
  np.testing.assert_allclose(grads["layer"]["lora_b"], s * np.asarray(a).T @ g, rtol=1e-5)
  # Neither K0 + s*A@B nor dL/dK0 is ever formed: no (7, 5) value is computed in the step.
  jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable, base)
  assert (7, 5) not in set(computed_shapes(jaxpr.jaxpr))

  def materialised(t, b):  # the negative control: a step that does form K0 + A@B
    return jnp.sum((x @ (b["layer"]["kernel"] + t["layer"]["lora_a"] @ t["layer"]["lora_b"]))
                   * target)

  negative = jax.make_jaxpr(jax.grad(materialised))(trainable, base)
  assert (7, 5) in set(computed_shapes(negative.jaxpr))


def computed_shapes(jaxpr):
  """Shapes of every value a jaxpr computes, nested jaxprs (pjit, custom_jvp, ...) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval.shape for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from computed_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from computed_shapes(sub)


def test_bad_targets_raise_listing_paths(base):
  def run(**kwargs):
    init_adapters(inject(Mixed(), LoRAConfig(rank=2, **kwargs)), base, jax.random.key(0), X)

  with pytest.raises(ValueError, match=r"'querry' matches no linear layer(.|\n)*stack\.proj"):
    run(targets=("dense", "querry"))
  with pytest.raises(ValueError, match="exclude entry 'nothing'"):
    run(exclude=("nothing",))
  with pytest.raises(ValueError, match="rank_pattern entry 'classifier'"):
    run(targets="dense", rank_pattern={"classifier": 1})
  with pytest.raises(ValueError, match=r"rank 7 at dense exceeds min\(n_in, n_out\) = min\(6, 8\)"):
    run(targets="dense", rank_pattern={"dense": 7})
  with pytest.raises(ValueError, match="adapt no layer"):
    run(targets="all-linear", exclude=("dense", "general", "fold", "einsum", "proj"))
  with pytest.raises(TypeError, match="linen Module"):
    inject(transformers, CONFIG)


def test_regex_targets_and_layer_listing(base):
  assert linear_layer_paths(Mixed(), X) == [p for p, *_ in LAYERS] + [("classifier",)]
  config = LoRAConfig(rank=1, targets=("re:(dense|stack\\..*)", "classifier"))
  trainable = init_adapters(inject(Mixed(), config), base, jax.random.key(0), X)
  assert sorted(adapter_paths(trainable)) == [("classifier",), ("dense",), ("stack", "proj")]


def test_dropout_through_inject_needs_the_rng(base):
  config = LoRAConfig(rank=2, alpha=3.0, dropout=0.5, targets="dense")
  trainable = randomize(init_adapters(inject(Mixed(), config), base, jax.random.key(2), X),
                        jax.random.key(3))
  params = combine(base, trainable)
  model = inject(Mixed(), config)
  plain = model.apply({"params": params}, X)
  no_dropout = inject(Mixed(), dataclasses.replace(config, dropout=0.0))
  no_dropout = no_dropout.apply({"params": params}, X)
  np.testing.assert_array_equal(plain, no_dropout)
  one = model.apply({"params": params}, X, rngs={"dropout": jax.random.key(5)})
  two = model.apply({"params": params}, X, rngs={"dropout": jax.random.key(5)})
  np.testing.assert_array_equal(one, two)
  assert np.abs(one - plain).max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_all_linear_skips_tied_output_heads(name):
  """GPT-2's and T5's heads run as ``lm_head.apply({"params": {"kernel": embedding.T}}, x)``:
  their params are not in the model's tree, so all-linear must neither list nor adapt them."""
  if name == "gpt2":
    hf_config = transformers.GPT2Config(vocab_size=40, n_embd=12, n_layer=1, n_head=2,
                                        n_inner=20, n_positions=16)
    hf_class, targets = transformers.FlaxGPT2LMHeadModel, 4
  else:
    hf_config = transformers.T5Config(vocab_size=40, d_model=12, d_kv=8, num_heads=2, d_ff=20,
                                      num_layers=1, num_decoder_layers=1,
                                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    hf_class, targets = transformers.FlaxT5ForConditionalGeneration, 16
  config = preset(name, rank=2, targets="all-linear")
  module = hf_class.module_class(hf_config)
  args, kwargs = hf_example_inputs(hf_config, batch=1, seq_len=4)
  key = jax.random.key(0)
  base = jax.eval_shape(lambda k: module.init(k, *args, **kwargs), key)["params"]
  paths = linear_layer_paths(module, *args, **kwargs)
  assert () not in paths and len(paths) == targets  # q, k, v, o, FFN per block; no head

  def adapters(config):
    return jax.eval_shape(lambda b, k: init_adapters(inject(module, config), b, k, *args,
                                                     **kwargs), base, key)

  assert sorted(adapter_paths(adapters(config))) == sorted(paths)
  with pytest.raises(ValueError, match="'lm_head' matches no linear layer"):
    adapters(preset(name, rank=2, targets="lm_head"))
