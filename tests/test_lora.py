"""LoRAConfig and the LoRA linen layers against the hand formula y = x@K0 + s*((x@A)*c)@B."""
import dataclasses
import json
import math

import chex
import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lorapro_jax.lora import (LoRAConfig, LoRADense, LoRADenseGeneral, LoRAEinsum, einsum_layout,
                              path_matches)

RTOL = 1e-5


def randomize(params, key, names=("lora_a", "lora_b", "lora_c")):
  """Replaces the adapter leaves by N(0, 1) draws (B = 0 at init would hide the adapter)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = [jax.random.normal(k, v.shape, v.dtype) if p[-1].key in names else v
         for (p, v), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, out)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank"), (dict(rank=-3), "rank"), (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"), (dict(alpha=0.0), "alpha"), (dict(alpha=-1), "alpha"),
    (dict(dropout=-0.1), "dropout"), (dict(dropout=1.0), "dropout"), (dict(init="xavier"), "init"),
    (dict(targets=()), "targets"), (dict(targets=("re:(",)), "regex"),
    (dict(targets=("",)), "targets"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(alpha_pattern={"q": -2.0}), "alpha_pattern"),
])
def test_bad_config_raises_naming_the_value(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoRAConfig(**kwargs)


def test_unknown_keyword_raises():
  with pytest.raises(TypeError, match="ranks"):
    LoRAConfig(ranks=4)


@pytest.mark.parametrize("pattern, path, expected", [
    ("query", ("encoder", "layer", "0", "attention", "self", "query"), True),
    ("self.query", ("encoder", "layer", "0", "attention", "self", "query"), True),
    ("attention/self/query", ("encoder", "layer", "0", "attention", "self", "query"), True),
    ("query", ("encoder", "layer", "0", "attention", "self", "myquery"), False),
    ("output.dense", ("encoder", "layer", "0", "attention", "output", "dense"), True),
    ("output.dense", ("encoder", "layer", "0", "intermediate", "dense"), False),
    ("re:.*layer\\.1\\..*query", ("encoder", "layer", "1", "attention", "self", "query"), True),
    ("re:.*layer\\.1\\..*query", ("encoder", "layer", "0", "attention", "self", "query"), False),
    ("re:query", ("encoder", "query"), False),  # a regex matches the whole path
])
def test_path_matching(pattern, path, expected):
  assert path_matches(pattern, path) is expected


def test_all_linear_excludes_heads_and_exclude_wins():
  config = LoRAConfig(exclude=("key",))
  assert config.is_target(("encoder", "layer", "0", "query"))
  assert not config.is_target(("encoder", "layer", "0", "key"))
  for head in ("classifier", "lm_head", "score", "qa_outputs", "cls"):
    assert not config.is_target((head, "dense"))


def test_scales_ranks_and_patterns():
  config = LoRAConfig(rank=8, alpha=16.0, rank_pattern={"value": 2, "re:.*key": 4},
                      alpha_pattern={"value": 3.0})
  assert config.scale_for(("l", "query")) == 2.0
  assert config.rank_for(("l", "value")) == 2 and config.scale_for(("l", "value")) == 1.5
  assert config.rank_for(("l", "key")) == 4 and config.scale_for(("l", "key")) == 4.0
  rs = dataclasses.replace(config, rslora=True)
  assert math.isclose(rs.scale_for(("l", "query")), 16.0 / math.sqrt(8))
  node = {"lora_a": jnp.zeros((3, 2)), "lora_b": jnp.zeros((2, 3))}
  trainable = {"l": {"query": dict(node, kernel=1), "value": node}, "head": {"kernel": jnp.ones(2)}}
  assert config.scales(trainable) == {"l": {"query": 2.0, "value": 1.5}}


def test_to_dict_round_trips_through_json():
  config = LoRAConfig(rank=4, alpha=8, targets="query", rank_pattern={"q": 2}, gated=True,
                      param_dtype=jnp.bfloat16, modules_to_save=("classifier",))
  data = json.loads(json.dumps(config.to_dict()))
  assert LoRAConfig.from_dict(data) == config
  assert hash(LoRAConfig.from_dict(data)) == hash(config)
  assert data["param_dtype"] == "bfloat16" and data["targets"] == ["query"]


# --------------------------------------------------------------------------- PEFT's words

PEFT_MODULES = ["bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.0.attention.self.value",
                "bert.encoder.layer.1.attention.self.query",
                "bert.encoder.layer.1.attention.self.value",
                "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense",
                "bert.pooler.dense", "classifier"]


def test_peft_keywords_are_our_fields():
  peft_words = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True,
                          target_modules=["query", "value"], modules_to_save=["classifier"])
  assert peft_words == LoRAConfig(rank=4, alpha=8.0, dropout=0.1, rslora=True,
                                  targets=("query", "value"), modules_to_save=("classifier",))
  assert [f.name for f in dataclasses.fields(LoRAConfig)] == list(peft_words.to_dict())
  assert LoRAConfig.from_dict(json.loads(json.dumps(peft_words.to_dict()))) == peft_words
  # one PEFT target_modules string is a regex over the whole path; "all-linear" is PEFT's too
  regex = LoRAConfig(target_modules=r".*layer\.1\..*query")
  assert [regex.is_target(tuple(m.split("."))) for m in PEFT_MODULES[:3]] == [False, False, True]
  assert LoRAConfig(target_modules="all-linear").targets == ("all-linear",)


@pytest.fixture(scope="module")
def peft():
  return pytest.importorskip("peft")


def test_from_peft_selects_ranks_and_scales_as_peft_does(peft, tmp_path):
  """PEFT's own rules (check_target_module_exists, get_pattern_key) against ours, module by
  module, for a config PEFT itself wrote."""
  from peft.tuners.tuners_utils import check_target_module_exists
  from peft.utils.other import get_pattern_key
  peft_config = peft.LoraConfig(
      r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05,
      target_modules=r".*\.(query|value|dense)", exclude_modules=["output.dense"],
      rank_pattern={"layer.1.attention.self.query": 2, r"layer\.0\..*": 6},
      alpha_pattern={"value": 3.0}, modules_to_save=["pooler"])
  peft_config.save_pretrained(tmp_path)
  ours = LoRAConfig.from_peft(tmp_path)
  assert (ours.rank, ours.alpha, ours.dropout, ours.rslora) == (4, 8.0, 0.05, True)
  assert ours.exclude == ("output.dense",) and ours.modules_to_save == ("pooler",)
  targeted = []
  for name in PEFT_MODULES:
    path = tuple(name.split("."))
    assert ours.is_target(path) == bool(check_target_module_exists(peft_config, name)), name
    if not ours.is_target(path):
      continue
    targeted.append(name)
    rank = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern, name),
                                        peft_config.r)
    alpha = peft_config.alpha_pattern.get(get_pattern_key(peft_config.alpha_pattern, name),
                                          peft_config.lora_alpha)
    assert (ours.rank_for(path), ours.alpha_for(path)) == (rank, alpha), name
    assert ours.scale_for(path) == alpha / math.sqrt(rank), name
  assert targeted == PEFT_MODULES[:4]  # the output denses are excluded, the pooler is saved
  assert LoRAConfig.from_peft(tmp_path / "adapter_config.json") == ours
  assert LoRAConfig.from_peft(peft_config.to_dict()) == ours


def test_print_trainable_parameters_prints_peft_line(peft, capsys):
  torch = pytest.importorskip("torch")
  from lorapro_jax.trees import print_trainable_parameters

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.hidden, self.out = torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)

  peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["hidden"])
                      ).print_trainable_parameters()
  theirs = capsys.readouterr().out
  base = {"hidden": {"kernel": np.zeros((5, 6)), "bias": np.zeros(6)},
          "out": {"kernel": np.zeros((6, 3)), "bias": np.zeros(3)}}
  trainable = {"hidden": {"lora_a": np.zeros((5, 2)), "lora_b": np.zeros((2, 6))}}
  assert print_trainable_parameters(trainable, base) == (22, 22 + 36 + 21)
  assert capsys.readouterr().out == theirs
  # the full params as base count each leaf once
  assert print_trainable_parameters(trainable, {**base, "hidden": {**base["hidden"],
                                                                   **trainable["hidden"]}}) == (
      22, 79)


# ------------------------------------------------------------------------------------ layers


def hand(x, kernel, a, b, s, c=None):
  """float64 reference of the flattened matrix form."""
  x, kernel, a, b = (np.asarray(v, np.float64) for v in (x, kernel, a, b))
  h = x @ a
  if c is not None:
    h = h * np.asarray(c, np.float64)
  return x @ kernel + s * h @ b


class DenseVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_dense_matches_hand_formula(self):
    config = LoRAConfig(rank=3, alpha=6.0)
    layer = LoRADense(features=7, use_bias=False, lora=config)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    params = layer.init(jax.random.key(1), x)["params"]
    assert params["lora_a"].shape == (5, 3) and params["lora_b"].shape == (3, 7)
    np.testing.assert_array_equal(params["lora_b"], 0.0)
    y0 = self.variant(lambda p: layer.apply({"params": p}, x))(params)
    np.testing.assert_array_equal(y0, x @ params["kernel"])  # B = 0: exactly the base layer
    params = randomize(params, jax.random.key(2))
    y = self.variant(lambda p: layer.apply({"params": p}, x))(params)
    np.testing.assert_allclose(y, hand(x, params["kernel"], params["lora_a"], params["lora_b"],
                                       2.0), rtol=RTOL, atol=1e-5)


@hypothesis.settings(max_examples=5, deadline=None)
@hypothesis.given(n_in=st.integers(1, 9), n_out=st.integers(1, 9), rank=st.integers(1, 9),
                  batch=st.integers(1, 3), gated=st.booleans(), rslora=st.booleans())
def test_dense_random_shapes(n_in, n_out, rank, batch, gated, rslora):
  config = LoRAConfig(rank=rank, alpha=3.0, gated=gated, rslora=rslora)
  layer = LoRADense(features=n_out, lora=config)
  x = jax.random.normal(jax.random.key(n_in), (batch, n_in))
  if rank > min(n_in, n_out):
    with pytest.raises(ValueError, match=f"rank {rank}.*min\\({n_in}, {n_out}\\)"):
      layer.init(jax.random.key(0), x)
    return
  params = randomize(layer.init(jax.random.key(0), x)["params"], jax.random.key(1))
  expected = hand(x, params["kernel"], params["lora_a"], params["lora_b"],
                  config.scale_for(()), params.get("lora_c")) + params["bias"]
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=RTOL, atol=1e-5)


def test_dense_general_multi_axis_flattens_inputs_then_outputs():
  config = LoRAConfig(rank=2, alpha=2.0, gated=True)
  layer = LoRADenseGeneral(features=(2, 3), axis=(-2, -1), lora=config)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  params = randomize(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
  assert params["kernel"].shape == (4, 5, 2, 3)
  assert params["lora_a"].shape == (20, 2) and params["lora_b"].shape == (2, 6)
  assert params["lora_c"].shape == (2,)
  expected = hand(x.reshape(6, 20), params["kernel"].reshape(20, 6), params["lora_a"],
                  params["lora_b"], 1.0, params["lora_c"]) + params["bias"].reshape(6)
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected.reshape(2, 3, 2, 3),
                             rtol=RTOL, atol=1e-5)


def test_dense_general_batch_dims_are_stack_axes():
  layer = LoRADenseGeneral(features=6, batch_dims=(0,), lora=LoRAConfig(rank=2, alpha=4.0))
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  params = randomize(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
  assert params["lora_a"].shape == (3, 5, 2) and params["lora_b"].shape == (3, 2, 6)
  expected = np.stack([hand(x[i], params["kernel"][i], params["lora_a"][i],
                            params["lora_b"][i], 2.0) + params["bias"][i] for i in range(3)])
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=RTOL, atol=1e-5)


def test_einsum_multi_axis_and_stacked():
  config = LoRAConfig(rank=2, alpha=4.0)
  layer = LoRAEinsum(shape=(5, 2, 3), einsum_str="bsd,dhk->bshk", use_bias=False, lora=config)
  x = jax.random.normal(jax.random.key(0), (2, 4, 5))
  params = randomize(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
  assert params["lora_a"].shape == (5, 2) and params["lora_b"].shape == (2, 6)
  expected = hand(x.reshape(8, 5), params["kernel"].reshape(5, 6), params["lora_a"],
                  params["lora_b"], 2.0)
  np.testing.assert_allclose(layer.apply({"params": params}, x), expected.reshape(2, 4, 2, 3),
                             rtol=RTOL, atol=1e-5)

  stacked = LoRAEinsum(shape=(3, 5, 4), einsum_str="lbd,ldh->lbh", use_bias=False, lora=config)
  x = jax.random.normal(jax.random.key(3), (3, 2, 5))
  params = randomize(stacked.init(jax.random.key(4), x)["params"], jax.random.key(5))
  assert params["lora_a"].shape == (3, 5, 2) and params["lora_b"].shape == (3, 2, 4)
  expected = np.stack([hand(x[i], params["kernel"][i], params["lora_a"][i], params["lora_b"][i],
                            2.0) for i in range(3)])
  np.testing.assert_allclose(stacked.apply({"params": params}, x), expected, rtol=RTOL, atol=1e-5)


def test_einsum_with_ellipsis():
  layer = LoRAEinsum(shape=(5, 3), einsum_str="...d,dk->...k", lora=LoRAConfig(rank=2, alpha=2.0))
  x = jax.random.normal(jax.random.key(0), (2, 4, 5))
  params = randomize(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
  expected = hand(x.reshape(8, 5), params["kernel"], params["lora_a"], params["lora_b"], 1.0)
  np.testing.assert_allclose(layer.apply({"params": params}, x),
                             expected.reshape(2, 4, 3) + params["bias"], rtol=RTOL, atol=1e-5)


def test_einsum_kernel_axes_out_of_order_rejected():
  with pytest.raises(ValueError, match="ordered"):
    einsum_layout("bd,hdk->bhk", (2, 5, 3), 2)


class Block(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(LoRADense(6, name="proj", lora=LoRAConfig(rank=2, alpha=2.0))(carry)), None


def test_scanned_layers_get_stacked_adapters():
  model = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
  x = jax.random.normal(jax.random.key(0), (2, 6))
  params = randomize(model.init(jax.random.key(1), x, None)["params"], jax.random.key(2))
  proj = params["proj"]
  assert proj["lora_a"].shape == (3, 6, 2) and proj["lora_b"].shape == (3, 2, 6)
  h = np.asarray(x, np.float64)
  for i in range(3):
    h = np.tanh(hand(h, proj["kernel"][i], proj["lora_a"][i], proj["lora_b"][i], 1.0)
                + proj["bias"][i])
  np.testing.assert_allclose(model.apply({"params": params}, x, None)[0], h, rtol=RTOL, atol=1e-5)


def test_init_distributions():
  x = jnp.ones((1, 400))
  standard = LoRADense(300, lora=LoRAConfig(rank=4)).init(jax.random.key(0), x)["params"]
  bound = 1 / math.sqrt(400)
  assert np.abs(standard["lora_a"]).max() <= bound
  assert np.abs(standard["lora_a"]).max() > 0.95 * bound  # uniform over the whole range
  np.testing.assert_array_equal(standard["lora_b"], 0.0)
  gated = LoRADense(300, lora=LoRAConfig(rank=4, gated=True)).init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(gated["lora_c"], 0.0)
  for name in ("lora_a", "lora_b"):
    assert abs(float(np.std(gated[name])) - 0.02) < 0.002
  gaussian = LoRADense(300, lora=LoRAConfig(rank=4, init="gaussian")).init(jax.random.key(0), x)
  assert abs(float(np.std(gaussian["params"]["lora_a"])) - 0.25) < 0.02
  np.testing.assert_array_equal(gaussian["params"]["lora_b"], 0.0)


def test_gated_at_init_equals_base():
  layer = LoRADense(5, lora=LoRAConfig(rank=2, gated=True))
  x = jax.random.normal(jax.random.key(0), (3, 4))
  params = layer.init(jax.random.key(1), x)["params"]
  assert np.abs(params["lora_b"]).max() > 0
  np.testing.assert_array_equal(layer.apply({"params": params}, x),
                                x @ params["kernel"] + params["bias"])


def test_dropout_off_without_rng_and_hand_formula_with_rng():
  rate, s = 0.5, 1.0
  layer = LoRADense(8, use_bias=False, lora=LoRAConfig(rank=4, alpha=4.0, dropout=rate))
  x = jax.random.normal(jax.random.key(0), (16, 4))
  params = randomize(layer.init(jax.random.key(1), x)["params"], jax.random.key(2))
  kernel, a, b = params["kernel"], params["lora_a"], params["lora_b"]
  # Off: no 'dropout' rng, even with dropout > 0.
  np.testing.assert_allclose(layer.apply({"params": params}, x), hand(x, kernel, a, b, s),
                             rtol=RTOL, atol=1e-5)
  # On: recover the mask with A = I, B = [I 0] (the update is then s * dropout(x)).
  run = lambda p, key: layer.apply({"params": p}, x, rngs={"dropout": key})  # noqa: E731
  probe = dict(params, lora_a=jnp.eye(4), lora_b=jnp.eye(4, 8))
  dropped = (run(probe, jax.random.key(7)) - x @ kernel)[:, :4] / s
  kept = np.abs(np.asarray(dropped)) > 1e-6
  np.testing.assert_allclose(np.where(kept, dropped, 0), np.where(kept, x / (1 - rate), 0),
                             rtol=RTOL, atol=1e-5)
  assert 0.3 < kept.mean() < 0.7
  expected = x @ kernel + s * ((np.where(kept, x / (1 - rate), 0) @ a) @ b)
  np.testing.assert_allclose(run(params, jax.random.key(7)), expected, rtol=RTOL, atol=1e-5)
  np.testing.assert_array_equal(run(params, jax.random.key(7)), run(params, jax.random.key(7)))
  assert np.abs(run(params, jax.random.key(8)) - run(params, jax.random.key(7))).max() > 1e-3
