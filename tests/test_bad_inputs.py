"""Bad inputs, as a new user (often coming from PEFT and optax) would give them: each one is a clear
error naming the offending value and what was expected, and where files are involved, every file
on disk is byte-identical afterwards (``untouched`` hashes the directory before and after).

The cases of issue 17 (two writers on one checkpoint directory, a save dropped below the newest
step, export over an existing checkpoint or of a tree without adapters, LoRA-Pro on a tree without
pairs, dynamic rank not last, a scale tree with extra entries, ``target_rank=0``, non-finite
gradients, a PEFT config with the wrong base model / family / target_modules, ``all-linear`` on
tied heads, ``inject_hyperparams(lora_pro)``, dynamic-rank shape mistakes, a missing ``lora_c``)
are marked ``# issue 17``; the others cover configs, optimizers, dynamic rank, checkpoints and
PEFT import/export. Tiny arrays throughout; the one Hugging Face model is a 1-layer GPT-2.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from lorapro_jax import AdapterKeys, LoRAConfig, init_adapters, inject
from lorapro_jax.checkpoint import (CheckpointCorruptError, CheckpointLockedError,
                                    CheckpointMismatchError, TrainCheckpointer)
from lorapro_jax.dynamic_rank import (DynamicRankConfig, dem_penalty, dem_regularizer,
                                      dynamic_rank, norm_ratio_scores, rank_pattern, shrink)
from lorapro_jax.lora_pro import equivalent_gradient, lora_pro, lora_pro_adjust, lora_pro_full
from lorapro_jax.peft_format import export_merged, export_peft, import_peft
from lorapro_jax.train import TrainState
from lorapro_jax.trees import combine, merge, split

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
QUERY = ("encoder", "layer", "0", "attention", "self", "query")


def _digest(directory) -> dict:
  """``{relative path: (sha256, mode)}`` of every file and ``{path: None}`` of every directory."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory)] = None
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        out[os.path.relpath(path, directory)] = (hashlib.sha256(handle.read()).hexdigest(),
                                                 os.stat(path).st_mode)
  return out


@contextlib.contextmanager
def untouched(directory):
  """Asserts that nothing under ``directory`` was created, removed or changed in the block."""
  before = _digest(directory)
  yield
  assert _digest(directory) == before


def test_untouched_sees_every_change(tmp_path):
  (tmp_path / "weights").write_bytes(b"1")
  for change in (lambda: (tmp_path / "weights").write_bytes(b"2"),
                 lambda: os.chmod(tmp_path / "weights", 0o600),
                 lambda: (tmp_path / "new").mkdir(),
                 lambda: os.remove(tmp_path / "weights")):
    with pytest.raises(AssertionError):
      with untouched(tmp_path):
        change()


def _nest(path, leaf):
  for key in reversed(path):
    leaf = {key: leaf}
  return leaf


def _node(rank=2, n_in=6, n_out=5, gated=False, seed=0):
  rng = np.random.default_rng(seed)
  node = {"lora_a": rng.normal(size=(n_in, rank)).astype(np.float32),
          "lora_b": rng.normal(size=(rank, n_out)).astype(np.float32)}
  if gated:
    node["lora_c"] = np.ones(rank, np.float32)
  return node


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="out")(nn.relu(nn.Dense(3, name="hidden")(x)))


X = jnp.ones((2, 5))


# ------------------------------------------------------------------------------ LoRAConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(rslora="false"), r"LoRAConfig\.rslora must be True or False, got 'false'"),
    (dict(gated=1), r"LoRAConfig\.gated must be True or False, got 1"),
    (dict(rank=8.0), r"LoRAConfig\.rank must be a positive integer, got 8\.0"),
    (dict(alpha=float("inf")), r"LoRAConfig\.alpha must be a finite number > 0, got inf"),
    (dict(alpha=float("nan")), r"LoRAConfig\.alpha must be a finite number > 0, got nan"),
    (dict(dropout="0.1"), r"LoRAConfig\.dropout must be a number in \[0, 1\), got '0\.1'"),
    (dict(dropout=float("nan")), r"LoRAConfig\.dropout must be a number in \[0, 1\), got nan"),
    (dict(targets=5), r"LoRAConfig\.targets must be a pattern string or a sequence of them, "
                      r"got 5"),
    (dict(targets=["query", 3]), r"LoRAConfig\.targets entries must be non-empty strings, got 3"),
    (dict(modules_to_save=("",)),
     r"LoRAConfig\.modules_to_save entries must be non-empty strings, got ''"),
    (dict(exclude="all-linear"),
     r"LoRAConfig\.exclude: 'all-linear' is a value of targets only; name the layers"),
    (dict(transposed_kernels=("all-linear",)),
     r"LoRAConfig\.transposed_kernels: 'all-linear' is a value of targets only"),
    (dict(rank_pattern=[("query", 2)]),
     r"LoRAConfig\.rank_pattern must be a mapping \{pattern: value\}, got \[\('query', 2\)\]"),
    (dict(rank_pattern={"re:(": 2}), r"LoRAConfig\.rank_pattern: bad regex 're:\('"),
    (dict(alpha_pattern={"query": float("inf")}),
     r"LoRAConfig\.alpha_pattern\['query'\] must be a finite number > 0, got inf"),
    (dict(param_dtype=jnp.int32),
     r"LoRAConfig\.param_dtype must be a floating dtype \(float32, bfloat16, \.\.\.\), got .*int32"),
    (dict(param_dtype="floaty"), r"LoRAConfig\.param_dtype must be a floating dtype .*'floaty'"),
])
def test_bad_config_values(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoRAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=8, rank=8), r"LoRAConfig got both rank=8 and PEFT's r=8: they are one setting"),
    (dict(target_modules=["query"], targets=("query",)),
     r"LoRAConfig got both targets=\('query',\) and PEFT's target_modules=\['query'\]"),
    (dict(lora_rank=4), r"unknown keyword\(s\) \['lora_rank'\]; expected \['rank', 'alpha', .*"
                        r"or PEFT's \['r', 'lora_alpha'"),
])
def test_both_spellings_or_an_unknown_keyword(kwargs, message):
  with pytest.raises(TypeError, match=message):
    LoRAConfig(**kwargs)


@pytest.mark.parametrize("source, error, message", [
    ({"r": 8}, ValueError, r"target_modules is null \(PEFT then picks defaults by model type\): "
                           r"name the modules or 'all-linear'"),
    ({"target_modules": ["q"], "use_dora": True}, ValueError,
     r"use_dora=True is not supported \(expected False\) \(PEFT's use_dora is weight-decomposed"),
    ({"target_modules": ["q"], "init_lora_weights": "pissa"}, ValueError,
     r"init_lora_weights='pissa' is not supported \(expected one of \[True, 'gaussian'\]\)"),
    ({"target_modules": ["q"], "bias": "all"}, ValueError,
     r"bias='all' is not supported \(expected 'none'\)"),
    ({"target_modules": ["q"], "layers_to_transform": [0]}, ValueError,
     r"layers_to_transform=\[0\] is not supported \(expected None\)"),
    ({"peft_type": "PREFIX_TUNING"}, ValueError,
     r"peft_type is 'PREFIX_TUNING', only 'LORA' is supported"),
    ({"target_modules": "all-linear", "fan_in_fan_out": True}, ValueError,
     r"fan_in_fan_out with target_modules 'all-linear': name the layers .* transposed_kernels="),
    ({"target_modules": ["q"], "r": "8"}, ValueError,
     r"LoRAConfig\.rank must be a positive integer, got '8'"),
    (["q", "v"], TypeError, r"from_peft reads a path \(adapter_config\.json or its directory\) or "
                            r"a dict of PEFT LoraConfig fields, got list"),
])
def test_bad_peft_configs(source, error, message):
  with pytest.raises(error, match=message):
    LoRAConfig.from_peft(source)


def test_from_peft_of_a_directory_without_a_config(tmp_path):
  with untouched(tmp_path), pytest.raises(FileNotFoundError,
                                          match=rf"no adapter_config\.json in "
                                                rf"'{re.escape(str(tmp_path))}'"):
    LoRAConfig.from_peft(tmp_path)


# ------------------------------------------------------------------- inject, trees, layers


def test_inject_needs_a_lora_config_and_a_module():
  with pytest.raises(TypeError, match=r"inject needs a LoRAConfig, got dict"):
    inject(MLP(), {"rank": 2})
  with pytest.raises(TypeError, match=r"inject needs a linen Module \(for HF models: "
                                      r"model\.module\), got dict"):
    inject({"params": {}}, LoRAConfig())


def test_targets_that_match_nothing_list_the_layers():
  model = inject(MLP(), LoRAConfig(rank=2, targets="query"))
  with pytest.raises(ValueError, match=r"LoRAConfig\.targets entry 'query' matches no linear "
                                       r"layer; linear layer paths:\n  hidden\n  out"):
    model.init(jax.random.key(0), X)


def test_rank_above_the_layer_size():
  model = inject(MLP(), LoRAConfig(rank=4, targets="hidden"))
  with pytest.raises(ValueError, match=r"LoRA rank 4 at hidden exceeds min\(n_in, n_out\) = "
                                       r"min\(5, 3\)"):
    model.init(jax.random.key(0), X)


def test_run_of_a_method_the_module_does_not_have():
  model = inject(MLP(), LoRAConfig(rank=2, targets="out"))
  params = model.init(jax.random.key(0), X)
  with pytest.raises(AttributeError, match=r"MLP has no method 'encode'; pass a method name of "
                                           r"the linen module or a function fn\(module"):
    model.apply(params, "encode", X, method="run")


def test_base_params_of_another_model():
  model = inject(MLP(), LoRAConfig(rank=2, targets="out"))
  other_base = {"out": MLP().init(jax.random.key(0), X)["params"]["out"]}
  with pytest.raises(ValueError, match=r"base_params has no entry 'hidden\.bias' that the model "
                                       r"creates: pass the params of this very model"):
    init_adapters(model, other_base, jax.random.key(1), X)


def test_merge_of_the_trainable_tree_alone():
  trainable = {"out": _node(2, 3, 4)}
  with pytest.raises(ValueError, match=r"adapter out has no kernel next to it \(keys \['lora_a', "
                                       r"'lora_b'\]\): pass the full params, combine\(base, "
                                       r"trainable\)"):
    merge(trainable, LoRAConfig(rank=2))


def test_split_with_a_head_that_is_not_there():
  with pytest.raises(ValueError, match=r"modules_to_save \['classifier'\] match no param subtree; "
                                       r"top-level entries: \['out'\]"):
    split({"out": {"kernel": np.zeros((3, 4))}}, LoRAConfig(modules_to_save="classifier"))


@pytest.fixture(scope="module")
def gpt2():
  transformers = pytest.importorskip("transformers")
  config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2)
  return transformers.FlaxGPT2LMHeadModel(config, seed=0, _do_init=False)


def test_all_linear_on_a_tied_head(gpt2):  # issue 17
  from lorapro_jax.inject import linear_layer_paths
  from lorapro_jax.models import hf_example_inputs, preset
  args, _ = hf_example_inputs(gpt2.config, batch=1, seq_len=4)
  paths = linear_layer_paths(gpt2.module, *args)
  assert () not in paths and not any("lm_head" in path for path in paths)
  model = inject(gpt2.module, preset("gpt2", targets=("lm_head",)))
  with pytest.raises(ValueError, match=r"LoRAConfig\.targets entry 'lm_head' matches no linear "
                                       r"layer; linear layer paths:\n  transformer\.h\.0\.attn\."
                                       r"c_attn"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), *args))


# ------------------------------------------------------------------------------ LoRA-Pro

PARAMS = {"dense": {"lora_a": jnp.ones((4, 2)) / 2, "lora_b": jnp.arange(6.0).reshape(2, 3)}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)


@pytest.mark.parametrize("make, error, message", [
    (lambda: lora_pro(-1e-3, 2.0), ValueError,
     r"learning_rate must be a number >= 0 or an optax schedule, got -0\.001"),
    (lambda: lora_pro("1e-3", 2.0), ValueError,
     r"learning_rate must be a number >= 0 or an optax schedule, got '1e-3'"),
    (lambda: lora_pro(1e-3, 2.0, b1=1.0), ValueError, r"b1 must be in \[0, 1\), got 1\.0"),
    (lambda: lora_pro(1e-3, 2.0, b2=-0.1), ValueError, r"b2 must be in \[0, 1\), got -0\.1"),
    (lambda: lora_pro(1e-3, 2.0, eps=-1e-8), ValueError,
     r"eps must be a finite number >= 0, got -1e-08"),
    (lambda: lora_pro_full(1e-3, 2.0, weight_decay=-0.01), ValueError,
     r"weight_decay must be a finite number >= 0, got -0\.01"),
    (lambda: lora_pro(1e-3, 2.0, y="full"), ValueError,
     r"y must be one of \('sylvester', 'zero'\), got 'full'"),
    (lambda: lora_pro(1e-3, 2.0, ridge=-1.0), ValueError, r"ridge must be a number >= 0, got -1\.0"),
    (lambda: lora_pro(1e-3, 2.0, keys=("a", "b")), TypeError,
     r"keys must be an AdapterKeys \(e\.g\. AdapterKeys\(a='lora_A', b='lora_B'\)\), "
     r"got \('a', 'b'\)"),
    (lambda: lora_pro_full(1e-3, 2.0, inner="adam"), TypeError,
     r"inner must be an optax GradientTransformation \(e\.g\. optax\.scale_by_adam\(\)\), "
     r"got 'adam'"),
])
def test_bad_optimizer_arguments(make, error, message):
  with pytest.raises(error, match=message):
    make()


@pytest.mark.parametrize("scale, message", [
    (0.0, r"LoRA scale must be a finite number > 0, got 0\.0 for dense"),
    (float("nan"), r"LoRA scale must be a finite number > 0, got nan for dense"),
    ("2", r"LoRA scale must be a finite number > 0, got '2' for dense"),
    ({"other": 2.0}, r"scale tree has no entry for the adapter pair dense: it needs one number "
                     r"per pair \(LoRAConfig\.scales\(trainable\)\)"),
    ({"dense": 2.0, "extra": 1.0},  # issue 17: a scale tree with extra entries
     r"scale tree has entries that are no adapter pair of the tree: \['extra'\]; the pairs are "
     r"\['dense'\]"),
])
def test_bad_scales(scale, message):
  with pytest.raises(ValueError, match=message):
    lora_pro(1e-3, scale).init(PARAMS)


@pytest.mark.parametrize("tree, keys, message", [  # issue 17: LoRA-Pro without pairs
    ({"dense": {"lora_A": jnp.ones((2, 4)), "lora_B": jnp.ones((3, 2))}}, AdapterKeys(),
     r"no LoRA pair in the tree \(no mapping holds both 'lora_a' and 'lora_b'\); without pairs "
     r"LoRA-Pro would silently be its inner optimizer; leaves named like adapters: dense\.lora_A, "
     r"dense\.lora_B .* keys=AdapterKeys"),
    (PARAMS, AdapterKeys(a="kernel_lora_a", b="kernel_lora_b"),
     r"no mapping holds both 'kernel_lora_a' and 'kernel_lora_b'"),
])
def test_lora_pro_on_a_tree_without_pairs(tree, keys, message):
  with pytest.raises(ValueError, match=message):
    lora_pro(1e-3, 2.0, keys=keys).init(tree)


def test_lora_pro_on_a_pair_of_mismatched_shapes():
  tree = {"dense": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((3, 3))}}
  with pytest.raises(ValueError, match=r"dense: expected lora_a \(\*stack, n_in, r\) and lora_b "
                                       r"\(\*stack, r, n_out\), got shapes \(4, 2\) and \(3, 3\)"):
    lora_pro(1e-3, 2.0).init(tree)


@pytest.mark.parametrize("grads, params, message", [
    (GRADS, None, r"lora_pro_project needs the current parameters: call update\(grads, state, "
                  r"params\)"),
    ({"dense": {"lora_a": jnp.ones((4, 3)), "lora_b": jnp.ones((2, 3))}}, PARAMS,
     r"dense: gradients of shapes \(4, 3\), \(2, 3\) do not match the factors' shapes \(4, 2\), "
     r"\(2, 3\)"),
    ({"other": GRADS["dense"]}, PARAMS,
     r"the updates have no entry for the adapter pair dense: they must mirror the params"),
])
def test_bad_update_calls(grads, params, message):
  optimizer = lora_pro(1e-3, 2.0)
  with pytest.raises(ValueError, match=message):
    optimizer.update(grads, optimizer.init(PARAMS), params)


@pytest.mark.parametrize("function", [lora_pro_adjust, equivalent_gradient])
def test_one_pair_functions_check_the_scale(function):
  a, b = PARAMS["dense"]["lora_a"], PARAMS["dense"]["lora_b"]
  with pytest.raises(ValueError, match=r"LoRA scale must be a finite number > 0, got -1\.0"):
    function(a, b, jnp.ones_like(a), jnp.ones_like(b), -1.0)


def test_inject_hyperparams_scales_the_step():  # issue 17: it failed on ridge
  optimizer = optax.inject_hyperparams(lora_pro, static_args=("y", "keys"))(
      learning_rate=1e-3, scale=2.0, ridge=1e-8)
  state = optimizer.init(PARAMS)
  once, _ = optimizer.update(GRADS, state, PARAMS)
  state.hyperparams["learning_rate"] = jnp.asarray(2e-3)
  twice, _ = jax.jit(optimizer.update)(GRADS, state, PARAMS)
  for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
    np.testing.assert_allclose(b, 2 * a, rtol=1e-6)
  assert float(jnp.abs(once["dense"]["lora_b"]).max()) > 0


def test_non_finite_gradients_are_skipped_and_counted():  # issue 17
  optimizer = optax.apply_if_finite(lora_pro(1e-3, 2.0), max_consecutive_errors=3)
  state = optimizer.init(PARAMS)
  bad = {"dense": {"lora_a": GRADS["dense"]["lora_a"].at[0, 0].set(jnp.nan),
                   "lora_b": GRADS["dense"]["lora_b"]}}
  updates, new_state = optimizer.update(bad, state, PARAMS)
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(updates))
  assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
  for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------------------- dynamic rank

DR = DynamicRankConfig(20, 1, interval=1)  # r' = 2; events at steps 4..10


def _dr_params(rank=2, gated=True):
  return {"q": jax.tree.map(jnp.asarray, _node(rank, 4, 5, gated, seed=1)),
          "v": jax.tree.map(jnp.asarray, _node(rank, 4, 5, gated, seed=2))}


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_rank=0),  # issue 17
     r"target_rank must be an int >= 1 or a non-empty mapping of dotted adapter paths to ints "
     r">= 1, got 0"),
    (dict(target_rank={"q": 0}), r"target_rank must be an int >= 1 .*got \{'q': 0\}"),
    (dict(total_steps=0), r"total_steps must be an int >= 1, got 0"),
    (dict(interval=0), r"interval must be an int >= 1, got 0"),
    (dict(beta=1.0), r"beta must be in \[0, 1\), got 1\.0"),
    (dict(initial_rank_factor=0.5), r"initial_rank_factor must be a number >= 1 .*got 0\.5"),
    (dict(warmup_frac=0.6, final_frac=0.5),
     r"need warmup_frac >= 0, final_frac >= 0 and warmup_frac \+ final_frac < 1, got 0\.6 and 0\.5"),
    (dict(score="magnitude"), r"score must be one of \('norm_ratio', 'sensitivity'\), got "
                              r"'magnitude'"),
    (dict(hard="yes"), r"hard must be True or False, got 'yes'"),
])
def test_bad_dynamic_rank_configs(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DynamicRankConfig(**{"total_steps": 100, "target_rank": 2, **kwargs})


def test_dynamic_rank_takes_its_config_only():
  with pytest.raises(TypeError, match=r"dynamic_rank takes a DynamicRankConfig, got LoRAConfig"):
    dynamic_rank(LoRAConfig())
  with pytest.raises(TypeError, match=r"dem_regularizer takes a DynamicRankConfig, got dict"):
    dem_regularizer({"dem_weight": 0.1})


@pytest.mark.parametrize("params, message", [
    ({"q": _node(2, 4, 5, gated=False), "v": _node(2, 4, 5, gated=True)},  # issue 17: no lora_c
     r"adapter 'q' has no gates 'lora_c', but DynamicRankConfig\(gated=True\) expects them: "
     r"build the LoRAConfig with DynamicRankConfig\.lora_config\(base\)"),
    ({"q": {**_node(2, 4, 5), "lora_c": np.ones(3, np.float32)}},
     r"adapter 'q': expected lora_c of shape \(\*stack, r\) = \(2,\), got \(3,\)"),
    ({"q": _node(3, 4, 5, gated=True)},
     r"adapter 'q' has rank 3, expected r' = ceil\(1\.5·1\) = 2 for target rank 1"),
])
def test_dynamic_rank_init_on_the_wrong_adapters(params, message):
  with pytest.raises(ValueError, match=message):
    dynamic_rank(DR).init(params)


@pytest.mark.parametrize("edit, message", [  # issue 17: shape mistakes, a missing lora_c
    (lambda g: {"q": {k: v for k, v in g["q"].items() if k != "lora_c"}, "v": g["v"]},
     r"the update of q\.lora_c has shape \(missing\), expected \(2,\) \(the params'\): the updates "
     r"must mirror the params"),
    (lambda g: {"q": {**g["q"], "lora_a": jnp.zeros((4, 3))}, "v": g["v"]},
     r"the update of q\.lora_a has shape \(4, 3\), expected \(4, 2\)"),
    (lambda g: {"q": g["q"]}, r"the updates have no entry for adapter 'v'; they must mirror the "
                              r"params"),
])
def test_dynamic_rank_updates_that_do_not_mirror_the_params(edit, message):
  params = _dr_params()
  transform = dynamic_rank(DR)
  grads = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=message):
    transform.update(edit(grads), transform.init(params), params)


def test_dynamic_rank_step_on_other_params_than_init():
  params = _dr_params()
  transform = dynamic_rank(DR)
  state = transform.init(params)
  more = {**params, "k": params["q"]}
  with pytest.raises(ValueError, match=r"adapter 'k' has components of shape \(2,\) \(\*stack, "
                                       r"r'\), but init did not see it"):
    transform.update(jax.tree.map(jnp.zeros_like, more), state, more)
  fewer = {"q": params["q"]}
  with pytest.raises(ValueError, match=r"the params lack the adapters \['v'\] that init saw"):
    transform.update(jax.tree.map(jnp.zeros_like, fewer), state, fewer)


def test_dynamic_rank_not_last_in_the_chain():  # issue 17
  params = _dr_params()
  optimizer = optax.chain(dynamic_rank(DR), optax.sgd(0.1))  # wrong order
  state = optimizer.init(params)
  step = jax.jit(optimizer.update)
  for _ in range(DR.last_event + 1):
    updates, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
  with pytest.raises(ValueError, match=r"dynamic_rank is not the last transform of the optimizer "
                                       r"chain: .* put it last, optax\.chain\(optimizer, "
                                       r"dynamic_rank\(config\)\)"):
    rank_pattern(state)
  with pytest.raises(ValueError, match=r"dynamic_rank is not the last transform"):
    shrink(params, state)


@pytest.mark.parametrize("call, message", [
    (lambda: norm_ratio_scores(jnp.ones((4, 3)), jnp.ones((2, 5))),
     r"norm_ratio_scores: expected lora_a \(\*stack, n_in, r\) and lora_b \(\*stack, r, n_out\), "
     r"got shapes \(4, 3\) and \(2, 5\)"),
    (lambda: norm_ratio_scores(jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.ones(2)),
     r"norm_ratio_scores: expected lora_c of shape \(\*stack, r\) = \(3,\), got \(2,\)"),
    (lambda: shrink(_dr_params(), {"q": np.ones(3, bool), "v": np.ones(2, bool)}),
     r"mask of shape \(3,\) does not fit adapter 'q' with lora_a \(4, 2\)"),
    (lambda: shrink({"k": _node()}, {"q": np.ones(2, bool)}),
     r"no mask for adapter 'k'; masks cover \['q'\]"),
    (lambda: rank_pattern(optax.adamw(1e-3).init(PARAMS)),
     r"expected an optimizer state holding a DynamicRankState \(dynamic_rank in the chain\) or a "
     r"tree of boolean masks; found neither \(non-boolean leaves: \['0\.count \(int32\)'"),
    (lambda: DR.lora_config(LoRAConfig(rank_pattern={"q": 2})),
     r"the base LoRAConfig has rank_pattern \{'q': 2\}: with dynamic rank the ranks come from "
     r"DynamicRankConfig\.target_rank"),
    (lambda: dem_penalty({"q": _node(2, 1, 5)}),
     r"DEM needs n_in, n_out >= 2 for an unbiased variance, got \(1, 2\) and \(2, 5\) at 'q'"),
])
def test_bad_dynamic_rank_calls(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ---------------------------------------------------------------------------- checkpoints

CONFIG = LoRAConfig(rank=2, alpha=4.0, targets="dense")


def _train_state(rank=2, seed=0):
  node = jax.tree.map(jnp.asarray, _node(rank, 4, 3, seed=seed))
  return TrainState.create({"dense": node}, optax.adam(1e-3), jax.random.key(seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint directory with steps 2 and 3, closed (read-only for the tests)."""
  directory = tmp_path_factory.mktemp("saved")
  with TrainCheckpointer(directory, CONFIG, async_save=False) as checkpoints:
    checkpoints.save(_train_state(), step=2)
    checkpoints.save(_train_state(), step=3)
  return directory


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(keep=0), ValueError, r"keep must be an int >= 1, got 0 \(the newest step is needed"),
    (dict(keep="3"), ValueError, r"keep must be an int >= 1, got '3'"),
    (dict(keep_best=1.5), ValueError, r"keep_best must be an int >= 1, got 1\.5"),
    (dict(save_interval_steps=0), ValueError, r"save_interval_steps must be an int >= 1, got 0"),
    (dict(best_mode="best"), ValueError, r"best_mode must be 'max' or 'min', got 'best'"),
    (dict(config=[2, 4.0]), TypeError,
     r"config must be a LoRAConfig \(with \.to_dict\(\)\), a dict or None, got list"),
])
def test_bad_checkpointer_arguments(tmp_path, kwargs, error, message):
  kwargs = {"config": CONFIG, **kwargs}
  with untouched(tmp_path), pytest.raises(error, match=message):
    TrainCheckpointer(tmp_path / "run", **kwargs)


def test_a_checkpoint_directory_that_is_a_file(tmp_path):
  (tmp_path / "run").write_text("not a directory")
  with untouched(tmp_path), pytest.raises(NotADirectoryError,
                                          match=rf"checkpoint directory "
                                                rf"{re.escape(str(tmp_path))}/run is a file"):
    TrainCheckpointer(tmp_path / "run", CONFIG)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(step=-1), ValueError, r"step must be an int >= 0, got -1"),
    (dict(step=4, data_position=np.arange(3)), ValueError,
     r"data_position must be JSON data \(numbers, strings, lists, dicts\), got array\(\[0, 1, 2\]\)"),
    (dict(step=4, metrics={"accuracy": "high"}), ValueError,
     r"metrics must map names to numbers, got \{'accuracy': 'high'\}"),
    (dict(step=4, metrics={"loss": 0.5}), KeyError,
     r"best_metric 'accuracy' is not among the metrics \['loss'\]"),
    (dict(step=3), FileExistsError,
     r"step 3 already exists in .*; refusing to overwrite a saved checkpoint"),
    (dict(step=1), ValueError,  # issue 17: a save that would be dropped
     r"step 1 is older than the newest step 3 in .*: it would never be resumed from"),
])
def test_bad_saves_write_nothing(tmp_path, saved, kwargs, error, message):
  directory = tmp_path / "run"
  shutil.copytree(saved, directory)
  checkpoints = TrainCheckpointer(directory, CONFIG, async_save=False, best_metric="accuracy")
  try:
    with untouched(tmp_path), pytest.raises(error, match=message):
      checkpoints.save(_train_state(), **kwargs)
  finally:
    checkpoints.close()


def test_two_writers_on_one_directory(tmp_path, saved):  # issue 17
  directory = tmp_path / "run"
  shutil.copytree(saved, directory)
  first = TrainCheckpointer(directory, CONFIG, async_save=False)
  opened_early = TrainCheckpointer(directory, CONFIG, async_save=False)
  try:
    first.save(_train_state(), step=4)
    with untouched(tmp_path), pytest.raises(
        CheckpointLockedError, match=rf"{re.escape(str(directory))} is being written by another checkpointer "
                                     rf"\(.*\"pid\": {os.getpid()}.*\); nothing was written"):
      opened_early.save(_train_state(), step=5)
  finally:
    first.close()
    opened_early.close()


@pytest.mark.parametrize("target, error, message", [
    (lambda: _train_state(rank=3), CheckpointMismatchError,
     r"does not fit the restore target; nothing was loaded .*trainable\.dense\.lora_a: checkpoint "
     r"\(4, 2\) float32 vs target \(4, 3\) float32"),
    (lambda: jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x,
                          _train_state()), CheckpointMismatchError,
     r"trainable\.dense\.lora_a: checkpoint \(4, 2\) float32 vs target \(4, 2\) bfloat16"),
    (lambda: {"dense": _node(2, 4, 3)}, CheckpointMismatchError,
     r"dense\.lora_a: missing from the checkpoint"),
])
def test_restore_into_the_wrong_target(saved, target, error, message):
  checkpoints = TrainCheckpointer(saved, CONFIG)
  with untouched(saved), pytest.raises(error, match=message):
    checkpoints.restore(target())
  checkpoints.close()


def test_restore_with_another_lora_config(saved):
  checkpoints = TrainCheckpointer(saved, LoRAConfig(rank=2, alpha=8.0, targets="dense"))
  with untouched(saved), pytest.raises(
      CheckpointMismatchError, match=r"was written with a different LoRA config; nothing was "
                                     r"loaded\. Differences: alpha: checkpoint 4\.0 vs running 8\.0"):
    checkpoints.restore(_train_state())
  checkpoints.close()


def test_restore_of_a_step_or_directory_without_checkpoints(tmp_path, saved):
  checkpoints = TrainCheckpointer(saved, CONFIG)
  with untouched(saved), pytest.raises(
      FileNotFoundError, match=rf"no checkpoint step 7 in {re.escape(str(saved))} \(committed steps: \[2, 3\]\)"):
    checkpoints.restore(_train_state(), step=7)
  checkpoints.close()
  empty = TrainCheckpointer(tmp_path, CONFIG)
  with untouched(tmp_path), pytest.raises(FileNotFoundError,
                                          match=rf"no committed checkpoint in "
                                                rf"{re.escape(str(tmp_path))}"):
    empty.restore(_train_state())
  empty.close()


def test_restore_with_shardings_that_do_not_mirror_the_target(saved):
  checkpoints = TrainCheckpointer(saved, CONFIG)
  with untouched(saved), pytest.raises(ValueError, match=r"shardings must mirror the target"):
    checkpoints.restore(_train_state(), shardings={"dense": None})
  checkpoints.close()


# ----------------------------------------------------------------------- PEFT export/import

TRAINABLE = _nest(QUERY, _node(2, 6, 6))
PEFT_CONFIG = LoRAConfig(rank=2, alpha=4.0, targets=("query",))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
  """A PEFT adapter directory exported once (copied before any test edits it)."""
  directory = tmp_path_factory.mktemp("adapter")
  export_peft(TRAINABLE, PEFT_CONFIG, directory, family="bert", overwrite=True,
              base_model_name_or_path="bert-base-uncased")
  return directory


def _copy(adapter, tmp_path, config_edit=None, tensors_edit=None):
  directory = tmp_path / "adapter"
  shutil.copytree(adapter, directory)
  if config_edit is not None:
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config_edit(config)))
  if tensors_edit is not None:
    save_file(tensors_edit(load_file(str(directory / ADAPTER_WEIGHTS))),
              str(directory / ADAPTER_WEIGHTS))
  return directory


def test_export_over_an_existing_adapter(adapter, tmp_path):
  directory = _copy(adapter, tmp_path)
  with untouched(tmp_path), pytest.raises(
      FileExistsError, match=rf"{re.escape(str(directory))}/adapter_model\.safetensors exists; pass "
                             rf"overwrite=True"):
    export_peft(TRAINABLE, PEFT_CONFIG, directory, family="bert")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(config={"rank": 2}), TypeError,
     r"export_peft needs the LoRAConfig the adapters were trained with, got dict"),
    (dict(family="bertt"), ValueError,
     r"unknown model family 'bertt'; expected one of \['bert', .*\]"),
    (dict(prefix="bert"), ValueError, r"prefix must be empty or end with '\.', got 'bert'"),
    (dict(ranks={"encoder.layer.0.attention.self.query": 3}), ValueError,
     r"rank 3 for encoder\.layer\.0\.attention\.self\.query \(slice 0\) is not in 0\.\.2"),
    (dict(adapters={"classifier": {"kernel": np.ones((6, 2))}, **TRAINABLE}), ValueError,
     r"trainable leaf classifier\.kernel is neither in an adapter node nor under "
     r"LoRAConfig\.modules_to_save \[\]"),
    (dict(adapters={"encoder": {"kernel": np.ones((6, 6))}}), ValueError,  # issue 17
     r"export_peft: the tree holds no adapter node \(lora_a / lora_b\) of rank >= 1"),
    (dict(adapters=_nest(QUERY, {"lora_a": np.ones((6, 2)), "lora_b": np.ones((3, 6))})),
     ValueError, r"expected lora_a \(\*stack, n_in, r\) and lora_b \(\*stack, r, n_out\), got "
                 r"shapes \(6, 2\) and \(3, 6\)"),
])
def test_bad_exports_write_nothing(tmp_path, kwargs, error, message):
  kwargs = {"adapters": TRAINABLE, "config": PEFT_CONFIG, "family": "bert", **kwargs}
  with untouched(tmp_path), pytest.raises(error, match=message):
    export_peft(kwargs.pop("adapters"), kwargs.pop("config"), tmp_path / "out", **kwargs)


def _pickle_only(directory):
  os.remove(directory / ADAPTER_WEIGHTS)
  (directory / "adapter_model.bin").write_bytes(b"\x80\x04pickle")


def _truncate(directory):
  data = (directory / ADAPTER_WEIGHTS).read_bytes()
  (directory / ADAPTER_WEIGHTS).write_bytes(data[:len(data) // 2])


Q = "base_model.model.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("config_edit, tensors_edit, directory_edit, kwargs, error, message", [
    (lambda c: {**c, "base_model_name_or_path": "roberta-base"}, None, None,  # issue 17
     dict(base_model_name_or_path="bert-base-uncased"), ValueError,
     r"the adapter was trained on base_model_name_or_path 'roberta-base', not the expected "
     r"'bert-base-uncased'"),
    (None, None, None, dict(family="gpt2"), ValueError,  # issue 17: the wrong family
     r"fan_in_fan_out=False, but family 'gpt2' stores its kernels \(n_out, n_in\) "
     r"\(fan_in_fan_out=true\): wrong family\?"),
    (None, None, None, dict(family="t5"), ValueError,  # issue 17: the wrong family
     r"module 'encoder\.layer\.0\.attention\.self\.query' numbers its layers after 'layer', but "
     r"family 't5' keeps them under 'block': wrong family\?"),
    (lambda c: {**c, "target_modules": ["value"]}, None, None, {}, ValueError,  # issue 17
     r"target_modules \['value'\] \(exclude_modules \[\]\) do not select the module "
     r"'encoder\.layer\.0\.attention\.self\.query' that adapter_model\.safetensors adapts"),
    (lambda c: {**c, "target_modules": ["query", "value"]}, None, None, {}, ValueError,
     r"target_modules entries \['value'\] match none of the 1 modules with tensors"),
    (lambda c: {**c, "r": 4}, None, None, {}, CheckpointMismatchError,
     r"module encoder\.layer\.0\.attention\.self\.query has rank 2 in adapter_model\.safetensors "
     r"but 4 by its config \(r / rank_pattern\)"),
    (lambda c: {**c, "peft_type": "IA3"}, None, None, {}, ValueError,
     r"peft_type is 'IA3', only 'LORA' is supported"),
    (lambda c: {**c, "use_dora": True}, None, None, {}, ValueError,
     r"use_dora=True is not supported \(expected False\)"),
    (lambda c: {**c, "bias": "lora_only"}, None, None, {}, ValueError,
     r"bias='lora_only' is not supported \(expected 'none'\)"),
    (lambda c: [c], None, None, {}, ValueError,
     r"expected a JSON object of PEFT LoraConfig fields, got list"),
    (None, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}, None, {},
     CheckpointCorruptError, r"module encoder\.layer\.0\.attention\.self\.query: only lora_A "
                             r"present"),
    (None, lambda t: {**t, f"{Q}.lora_embedding_A": np.ones((2, 6), np.float32)}, None, {},
     ValueError, rf"unsupported LoRA tensor '{re.escape(Q)}\.lora_embedding_A' \(only lora_A / "
                 r"lora_B of linear layers\)"),
    (None, lambda t: {f"model.{k}": v for k, v in t.items()}, None, {}, ValueError,
     rf"key 'model\.{re.escape(Q)}\.lora_A\.weight' does not start with 'base_model\.model\.'"),
    (None, lambda t: {**t, f"{Q}.lora_B.weight": np.ones((6, 3), np.float32)}, None, {},
     CheckpointCorruptError, r"expected lora_a .* got shapes \(6, 2\) and \(3, 6\)"),
    (None, None, _pickle_only, {}, FileNotFoundError,
     r"no adapter_model\.safetensors in .* \(adapter_model\.bin is a pickle; it is never read: "
     r"convert it to safetensors\)"),
    (None, None, _truncate, {}, CheckpointCorruptError,
     r"cannot read .*adapter_model\.safetensors"),
    (None, None, lambda d: (d / ADAPTER_CONFIG).write_text("{not json"), {},
     CheckpointCorruptError, r"adapter_config\.json is not valid JSON"),
    (None, None, lambda d: os.remove(d / ADAPTER_CONFIG), {}, FileNotFoundError,
     r"no adapter_config\.json in '.*adapter' \(a PEFT adapter directory holds "
     r"adapter_config\.json and adapter_model\.safetensors\)"),
    (None, None, None, dict(prefix="bert."), ValueError,
     r"module 'encoder\.layer\.0\.attention\.self\.query' does not start with prefix 'bert\.'"),
    (None, None, None, dict(prefix="bert"), ValueError,
     r"prefix must be empty or end with '\.', got 'bert'"),
    (None, None, None, dict(like=_nest(QUERY, _node(3, 6, 6))), CheckpointMismatchError,
     r"does not fit the expected layout; nothing was loaded \(2 differences\): "
     r"encoder\.layer\.0\.attention\.self\.query\.lora_a: adapter \(6, 2\) vs like= tree \(6, 3\)"),
])
def test_bad_peft_imports_leave_the_adapter_alone(adapter, tmp_path, config_edit, tensors_edit,
                                                  directory_edit, kwargs, error, message):
  directory = _copy(adapter, tmp_path, config_edit, tensors_edit)
  if directory_edit is not None:
    directory_edit(directory)
  with untouched(tmp_path), pytest.raises(error, match=message):
    import_peft(directory, **kwargs)


def test_export_merged_over_an_existing_checkpoint(tmp_path):  # issue 17
  (tmp_path / "flax_model.msgpack").write_bytes(b"weights of another model")
  (tmp_path / "config.json").write_text("{}")
  params = combine({"out": {"kernel": np.zeros((3, 4), np.float32)}}, {"out": _node(2, 3, 4)})
  hf_model = object()  # refused before the model is looked at
  with untouched(tmp_path), pytest.raises(
      FileExistsError, match=rf"{re.escape(str(tmp_path))} already holds \['config\.json', "
                             rf"'flax_model\.msgpack'\]; pass overwrite=True to replace them"):
    export_merged(params, LoRAConfig(rank=2, targets="out"), tmp_path, hf_model=hf_model)


def test_export_merged_of_params_without_adapters(tmp_path):  # issue 17
  with untouched(tmp_path), pytest.raises(
      ValueError, match=r"export_merged: params hold no adapter node \(lora_a / lora_b\); pass "
                        r"combine\(base, trainable\), not the base alone"):
    export_merged({"out": {"kernel": np.zeros((3, 4))}}, LoRAConfig(rank=2), tmp_path / "merged",
                  hf_model=object())
