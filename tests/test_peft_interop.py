"""PEFT interop against PyTorch: our exported adapters loaded by ``peft`` give our outputs, PEFT's
adapters imported by us give PEFT's outputs, a dynamic-rank-shrunk adapter (per-module ranks via
rank_pattern / alpha_pattern) round-trips, merged exports load in transformers; plus the name
mapping, exact alphas and clear errors. Tiny random BERT, RoBERTa, Llama, GPT-2 and T5 configs with
non-square layers; bases go to PyTorch through transformers' own Flax -> PyTorch converter.

Needs the ``interop`` extra (``torch==2.13.0`` CPU, then ``peft==0.21.2``, ``accelerate``).
"""
import json
import math
import os
import warnings

os.environ.setdefault("USE_TF", "0")  # transformers must not import TensorFlow here

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from flax.traverse_util import unflatten_dict  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers.modeling_flax_pytorch_utils import (  # noqa: E402
    load_flax_checkpoint_in_pytorch_model)

from lorapro_jax.adapters import adapter_paths, map_adapters  # noqa: E402
from lorapro_jax.checkpoint import CheckpointCorruptError, CheckpointMismatchError  # noqa: E402
from lorapro_jax.dynamic_rank import shrink  # noqa: E402
from lorapro_jax.inject import init_adapters, inject  # noqa: E402
from lorapro_jax.trees import combine  # noqa: E402
from lorapro_jax.lora import LoRAConfig  # noqa: E402
from lorapro_jax.models import hf_example_inputs, preset  # noqa: E402
from lorapro_jax.models.families import Family as FamilyRecord, decoder_inputs  # noqa: E402
from lorapro_jax.peft_format import (_alpha_for_scale, export_merged, export_peft,  # noqa: E402
                                     import_peft, peft_pattern_key, torch_module_names)

ATOL = 1e-4
T = transformers
# family -> (config, Flax class, PyTorch class, PEFT target_modules, LoRAConfig overrides)
FAMILIES = {
    "bert": (lambda: T.BertConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=20,
                                  max_position_embeddings=16, num_labels=3),
             T.FlaxBertForSequenceClassification, T.BertForSequenceClassification,
             ["query", "key", "value", "attention.output.dense", "intermediate.dense",
              "output.dense"], dict(modules_to_save=("classifier",))),
    "roberta": (lambda: T.RobertaConfig(vocab_size=40, hidden_size=12, num_hidden_layers=2,
                                        num_attention_heads=3, intermediate_size=20,
                                        max_position_embeddings=16),
                T.FlaxRobertaModel, T.RobertaModel, ["query", "value", "intermediate.dense"],
                dict(targets=("query", "value", "intermediate.dense"))),
    "llama": (lambda: T.LlamaConfig(vocab_size=40, hidden_size=12, intermediate_size=20,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=16),
              T.FlaxLlamaForCausalLM, T.LlamaForCausalLM,
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
    "gpt2": (lambda: T.GPT2Config(vocab_size=40, n_embd=12, n_layer=2, n_head=2, n_inner=20,
                                  n_positions=16),
             T.FlaxGPT2LMHeadModel, T.GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"], {}),
    "t5": (lambda: T.T5Config(vocab_size=40, d_model=12, d_kv=8, num_heads=2, d_ff=20,
                              num_layers=2, num_decoder_layers=1,
                              relative_attention_num_buckets=8, decoder_start_token_id=0),
           T.FlaxT5ForConditionalGeneration, T.T5ForConditionalGeneration,
           ["q", "k", "v", "o", "wi", "wo"], {}),
}


class Family:
  """A tiny random model of one family in Flax and in PyTorch, with the same base weights."""

  def __init__(self, name, directory):
    make_config, flax_class, self.torch_class, self.peft_targets, overrides = FAMILIES[name]
    preset(name)  # the family's prepare (the module-scoped jnp.clip fix of HF's Flax T5)
    self.name, self.config = name, make_config()
    self.flax = flax_class(self.config, seed=0)
    self.flax.save_pretrained(directory)
    self.msgpack = os.path.join(directory, "flax_model.msgpack")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 40, (2, 7)).astype(np.int32)  # no pad / special ids
    self.args, self.kwargs = hf_example_inputs(self.config, batch=2, seq_len=7)
    if name == "t5":
      self.kwargs = {**self.kwargs, "input_ids": ids, "decoder_input_ids": ids[:, ::-1].copy()}
      self.torch_inputs = {k: torch.tensor(np.asarray(v), dtype=torch.long)
                           for k, v in self.kwargs.items()}
    else:
      self.args = (ids,) + tuple(self.args[1:])
      self.torch_inputs = {"input_ids": torch.tensor(ids, dtype=torch.long),
                           "attention_mask": torch.ones(ids.shape, dtype=torch.long)}
    self.overrides = overrides

  def lora_config(self, **fields):
    return preset(self.name, **{"rank": 4, "alpha": 8.0, **self.overrides, **fields})

  def adapters(self, config, seed):
    """Adapters from init_adapters with every factor (and head) randomised, B non-zero."""
    model = inject(self.flax.module, config)
    trainable = init_adapters(model, self.flax.params, jax.random.key(seed), *self.args,
                              **self.kwargs)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])

  def flax_output(self, config, trainable):
    model = inject(self.flax.module, config)
    out = model.apply({"params": combine(self.flax.params, trainable)}, *self.args, **self.kwargs)
    return np.asarray(out[0])

  def torch_model(self):
    """A fresh PyTorch model holding the Flax base (transformers' Flax -> PyTorch converter)."""
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      model = load_flax_checkpoint_in_pytorch_model(self.torch_class(self.config), self.msgpack)
    return model.eval()

  def torch_output(self, model):
    with torch.no_grad():
      return model(**self.torch_inputs)[0].numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  return Family(request.param, str(tmp_path_factory.mktemp(request.param)))


def _peft_keys(family, **lora_fields):
  """The state-dict keys PEFT itself writes for these targets on this model."""
  model = peft.get_peft_model(family.torch_model(), peft.LoraConfig(
      target_modules=family.peft_targets, fan_in_fan_out=family.name == "gpt2", **lora_fields))
  return set(peft.get_peft_model_state_dict(model))


# ------------------------------------------------------------------------------ parity


def test_exported_adapter_gives_our_outputs_in_pytorch(family, tmp_path):
  config = family.lora_config()
  trainable = family.adapters(config, seed=1)
  ours = family.flax_output(config, trainable)
  written = export_peft(trainable, config, tmp_path, family=family.name,
                        base_model_name_or_path="tiny-" + family.name)
  saved = json.loads((tmp_path / "adapter_config.json").read_text())
  assert saved == written and saved["fan_in_fan_out"] == (family.name == "gpt2")
  keys = set(load_file(tmp_path / "adapter_model.safetensors"))
  expected = _peft_keys(family, modules_to_save=list(config.modules_to_save) or None)
  assert keys == expected  # PEFT's own names, heads included
  # the adapter alone must move the outputs, or the comparison below proves nothing
  assert np.abs(ours - family.torch_output(family.torch_model())).max() > 100 * ATOL
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loaded = peft.PeftModel.from_pretrained(family.torch_model(), str(tmp_path))
  np.testing.assert_allclose(family.torch_output(loaded), ours, atol=ATOL, rtol=0)


def test_adapter_saved_by_peft_imports_to_the_same_outputs(family, tmp_path):
  torch.manual_seed(0)
  first, second = family.peft_targets[0], family.peft_targets[-1]
  peft_model = peft.get_peft_model(family.torch_model(), peft.LoraConfig(
      r=3, lora_alpha=5, target_modules=family.peft_targets, use_rslora=family.name == "llama",
      rank_pattern={first: 2}, alpha_pattern={second: 7.0},
      fan_in_fan_out=family.name == "gpt2"))
  with torch.no_grad():
    for name, parameter in peft_model.named_parameters():
      if "lora_B" in name:
        parameter.normal_(0.0, 0.3)
  peft_model.eval()
  theirs = family.torch_output(peft_model)
  peft_model.save_pretrained(str(tmp_path))
  adapters, config = import_peft(tmp_path, family=family.name)
  assert config.rank == 3 and config.alpha == 5.0 and config.rslora == (family.name == "llama")
  ours = family.flax_output(config, adapters)
  assert np.abs(theirs - family.torch_output(family.torch_model())).max() > 100 * ATOL
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
  # every module's scale is PEFT's alpha_m / r_m (or / sqrt(r_m))
  for name, module in peft_model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      path = tuple(name.removeprefix("base_model.model.").split("."))
      assert config.scale_for(path) == module.scaling["default"], name


def test_dynamic_rank_shrunk_adapter_roundtrips(family, tmp_path):
  config = family.lora_config(gated=True, modules_to_save=())
  trainable = family.adapters(config, seed=2)
  generator = np.random.default_rng(3)

  def prune(path, node):
    live = np.zeros(node["lora_c"].shape, bool)
    live[..., :generator.integers(1, live.shape[-1] + 1)] = True
    generator.shuffle(live, axis=-1)
    return {**node, "lora_c": jnp.where(live, node["lora_c"], 0.0)}

  masks = {}
  trainable = map_adapters(prune, trainable)
  map_adapters(lambda path, node: masks.setdefault(path, np.asarray(node["lora_c"]) != 0),
               trainable)
  mask_tree = unflatten_dict(masks)
  ours = family.flax_output(config, trainable)
  shrunk = shrink(trainable, mask_tree)
  written = export_peft(shrunk, config, tmp_path, family=family.name)
  ranks = {p: int(m.sum()) for p, m in masks.items()}
  assert len(set(ranks.values())) > 1 and written["rank_pattern"]  # ranks really differ
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loaded = peft.PeftModel.from_pretrained(family.torch_model(), str(tmp_path))
  np.testing.assert_allclose(family.torch_output(loaded), ours, atol=ATOL, rtol=0)
  adapters, imported = import_peft(tmp_path, family=family.name)
  for path, rank in ranks.items():
    assert imported.rank_for(path) == rank
    assert imported.scale_for(path) == config.scale_for(path)  # exactly the trained scale
  np.testing.assert_allclose(family.flax_output(imported, adapters), ours, atol=ATOL, rtol=0)


def test_merged_export_loads_in_flax_and_pytorch(tmp_path):
  bert = Family("bert", str(tmp_path / "base"))
  config = bert.lora_config()
  trainable = bert.adapters(config, seed=4)
  ours = bert.flax_output(config, trainable)
  export_merged(combine(bert.flax.params, trainable), config, tmp_path / "merged",
                hf_model=bert.flax)
  flax_merged = T.FlaxBertForSequenceClassification.from_pretrained(tmp_path / "merged")
  out = flax_merged.module.apply({"params": flax_merged.params}, *bert.args)[0]
  np.testing.assert_allclose(np.asarray(out), ours, atol=1e-5, rtol=0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch_merged = load_flax_checkpoint_in_pytorch_model(
        T.BertForSequenceClassification(bert.config),
        str(tmp_path / "merged" / "flax_model.msgpack"))
  np.testing.assert_allclose(bert.torch_output(torch_merged.eval()), ours, atol=ATOL, rtol=0)

  # never silently replaced: a second export raises and leaves every file byte-identical
  before = _snapshot(tmp_path / "merged")
  params = combine(bert.flax.params, trainable)
  with pytest.raises(FileExistsError, match=r"already holds \['config.json', "
                                            r"'flax_model.msgpack'\]; pass overwrite=True"):
    export_merged(params, config, tmp_path / "merged", hf_model=bert.flax)
  with pytest.raises(ValueError, match=r"hold no adapter node .* not the base alone"):
    export_merged(bert.flax.params, config, tmp_path / "merged", hf_model=bert.flax,
                  overwrite=True)
  assert _snapshot(tmp_path / "merged") == before
  export_merged(params, config, tmp_path / "merged", hf_model=bert.flax, overwrite=True)
  # safetensors files get the umask's mode (0644 under 022), not safetensors' own 0600
  old = os.umask(0o022)
  try:
    export_merged(params, config, tmp_path / "safe", hf_model=bert.flax, safe_serialization=True)
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "safe" / "model.safetensors").st_mode & 0o777 == 0o644


def _snapshot(directory):
  return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_all_linear_with_tied_heads_trains_and_exports(name, tmp_path):
  """The tied LM heads of GPT-2 and T5 are skipped by all-linear (they were a crash); the
  adapters of every other linear layer train and load in PEFT with our logits."""
  family = Family(name, str(tmp_path / "base"))
  config = family.lora_config(targets="all-linear")
  trainable = family.adapters(config, seed=8)
  model = inject(family.flax.module, config)

  def loss(trainable):
    out = model.apply({"params": combine(family.flax.params, trainable)}, *family.args,
                      **family.kwargs)[0]
    return jnp.mean(out ** 2)

  before, grads = jax.value_and_grad(loss)(trainable)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  trainable = jax.tree.map(lambda t, g: t - 0.1 * g, trainable, grads)  # one SGD step
  assert float(loss(trainable)) < float(before)
  assert not any("lm_head" in path for path in adapter_paths(trainable))
  ours = family.flax_output(config, trainable)
  export_peft(trainable, config, tmp_path / "adapter", family=name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    loaded = peft.PeftModel.from_pretrained(family.torch_model(), str(tmp_path / "adapter"))
  assert np.abs(ours - family.torch_output(family.torch_model())).max() > 100 * ATOL
  np.testing.assert_allclose(family.torch_output(loaded), ours, atol=ATOL, rtol=0)


# ------------------------------------------------------------------- names, alphas, errors


def test_module_names_per_family():
  path = ("encoder", "layer", "0", "attention", "self", "query")
  assert torch_module_names(path, "bert", prefix="bert.") == [
      "bert.encoder.layer.0.attention.self.query"]
  stacked = ("model", "layers", "self_attn", "q_proj")  # nn.scan: layer axis first
  assert torch_module_names(stacked, "llama", 2) == ["model.layers.0.self_attn.q_proj",
                                                     "model.layers.1.self_attn.q_proj"]
  assert torch_module_names(("transformer", "h", "attn", "c_attn"), "gpt2", 1) == [
      "transformer.h.0.attn.c_attn"]
  with pytest.raises(ValueError, match=r"no 'block' component"):
    torch_module_names(("encoder", "layer", "q"), "t5", 2)
  with pytest.raises(ValueError, match=r"unknown model family 'bart'"):
    torch_module_names(path, "bart")
  mine = FamilyRecord("mine", ("proj",), decoder_inputs, stack_container="blocks")
  assert torch_module_names(("net", "blocks", "proj"), mine, 2) == ["net.blocks.0.proj",
                                                                    "net.blocks.1.proj"]
  with pytest.raises(ValueError, match=r"prefix must be empty or end with '\.'"):
    torch_module_names(path, "bert", prefix="bert")
  assert peft_pattern_key(["layer.1.query", "query"], "enc.layer.1.query") == "layer.1.query"
  assert peft_pattern_key(["layer.1.query"], "enc.layer.11.query") is None


def test_stacked_adapters_export_one_module_per_layer(tmp_path):
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4, 5))
  b[1, 2:] = 0.0  # layer 1 has live rank 2 (shrink's zero padding)
  tree = {"model": {"layers": {"mlp": {"up_proj": {"lora_a": a.astype(np.float32),
                                                   "lora_b": b.astype(np.float32)}}}}}
  config = LoRAConfig(rank=4, alpha=2.0, targets=("up_proj",))
  written = export_peft(tree, config, tmp_path, family="llama",
                        ranks={"model.layers.mlp.up_proj": [4, 2, 4]})
  assert written["r"] == 4 and written["rank_pattern"] == {"model.layers.1.mlp.up_proj": 2}
  assert written["alpha_pattern"] == {"model.layers.1.mlp.up_proj": 1.0}  # s = 0.5 kept
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  for layer, rank in enumerate([4, 2, 4]):
    name = f"base_model.model.model.layers.{layer}.mlp.up_proj"
    np.testing.assert_array_equal(tensors[name + ".lora_A.weight"], a[layer, :, :rank].T
                                  .astype(np.float32))
    np.testing.assert_array_equal(tensors[name + ".lora_B.weight"], b[layer, :rank].T
                                  .astype(np.float32))
  adapters, imported = import_peft(tmp_path, family="llama")
  assert imported.rank_for(("model", "layers", "1", "mlp", "up_proj")) == 2
  assert imported.scale_for(("model", "layers", "1", "mlp", "up_proj")) == 0.5
  with pytest.raises(ValueError, match=r"non-zero components beyond its rank 2"):
    export_peft(tree, config, tmp_path / "bad", family="llama",
                ranks={"model.layers.mlp.up_proj": [2, 2, 2]})


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 1e3), st.integers(1, 512), st.booleans())
def test_alpha_reproduces_the_scale(scale, rank, rslora):
  divisor = math.sqrt(rank) if rslora else rank
  alpha = _alpha_for_scale(scale, rank, rslora)
  error = abs(alpha / divisor - scale)
  assert error <= math.ulp(scale)
  # no float64 alpha within a few ulps does better: the nearest PEFT scale there is
  for step in (-2, -1, 1, 2):
    other = alpha
    for _ in range(abs(step)):
      other = math.nextafter(other, math.copysign(math.inf, step))
    assert abs(other / divisor - scale) >= error


def _tiny_adapter(tmp_path):
  tree = {"dense": {"lora_a": np.ones((6, 2), np.float32), "lora_b": np.ones((2, 3), np.float32)}}
  export_peft(tree, LoRAConfig(rank=2, alpha=4.0, targets=("dense",)), tmp_path, family="bert")
  return tree


def test_adapter_file_has_the_umask_mode(tmp_path):
  old = os.umask(0o022)
  try:
    _tiny_adapter(tmp_path)
  finally:
    os.umask(old)
  for name in ("adapter_model.safetensors", "adapter_config.json"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def test_import_refuses_a_config_that_disagrees_with_the_tensors(tmp_path):
  pair = {"lora_a": np.ones((6, 2), np.float32), "lora_b": np.ones((2, 3), np.float32)}
  tree = {"encoder": {"layer": {"0": {"attention": {"self": {"query": pair, "value": pair}}}}}}
  export_peft(tree, LoRAConfig(rank=2, alpha=4.0, targets=("query", "value")), tmp_path,
              family="bert", base_model_name_or_path="bert-tiny")
  assert import_peft(tmp_path, family="bert", base_model_name_or_path="bert-tiny")[1].rank == 2
  with pytest.raises(ValueError, match=r"trained on base_model_name_or_path 'bert-tiny', not the "
                                       r"expected 'gpt2'"):
    import_peft(tmp_path, base_model_name_or_path="gpt2")
  with pytest.raises(ValueError, match=r"fan_in_fan_out=False, but family 'gpt2' stores its "
                                       r"kernels \(n_out, n_in\)"):
    import_peft(tmp_path, family="gpt2")
  with pytest.raises(ValueError, match=r"module 'encoder.layer.0.attention.self.query' numbers "
                                       r"its layers after 'layer', but family 't5' keeps them "
                                       r"under 'block'"):
    import_peft(tmp_path, family="t5")
  config_path = tmp_path / "adapter_config.json"
  good = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**good, "target_modules": ["query"]}))
  with pytest.raises(ValueError, match=r"target_modules \['query'\] .* do not select the module "
                                       r"'encoder.layer.0.attention.self.value'"):
    import_peft(tmp_path)
  config_path.write_text(json.dumps({**good, "target_modules": ["query", "value", "key"]}))
  with pytest.raises(ValueError, match=r"target_modules entries \['key'\] match none of the 2 "
                                       r"modules"):
    import_peft(tmp_path)
  config_path.write_text(json.dumps({**good, "target_modules": r".*\.query"}))
  with pytest.raises(ValueError, match=r"do not select the module .*self.value"):
    import_peft(tmp_path)
  config_path.write_text(json.dumps({**good, "exclude_modules": ["value"]}))
  with pytest.raises(ValueError, match=r"do not select the module .*self.value"):
    import_peft(tmp_path)


def test_import_errors_are_clear_and_load_nothing(tmp_path):
  tree = _tiny_adapter(tmp_path)
  wrong = {"dense": {"lora_a": np.ones((6, 3)), "lora_b": np.ones((3, 3))}}
  with pytest.raises(CheckpointMismatchError, match=r"dense\.lora_a: adapter \(6, 2\) vs like= "
                                                    r"tree \(6, 3\)"):
    import_peft(tmp_path, family="bert", like=wrong)
  assert import_peft(tmp_path, family="bert", like=tree)[1].rank == 2
  with pytest.raises(FileExistsError, match=r"pass overwrite=True"):
    _tiny_adapter(tmp_path)
  config_path = tmp_path / "adapter_config.json"
  good = json.loads(config_path.read_text())
  config_path.write_text(json.dumps({**good, "use_dora": True}))
  with pytest.raises(ValueError, match=r"use_dora=True is not supported .*weight-decomposed"):
    import_peft(tmp_path)
  config_path.write_text(json.dumps({**good, "rank_pattern": {"dense": 3}}))
  with pytest.raises(CheckpointMismatchError, match=r"module dense has rank 2 .* but 3 by its "
                                                    r"config"):
    import_peft(tmp_path)
  config_path.write_text(config_path.read_text()[:20])
  with pytest.raises(CheckpointCorruptError, match=r"adapter_config.json is not valid JSON"):
    import_peft(tmp_path)
  config_path.write_text(json.dumps(good))
  weights = tmp_path / "adapter_model.safetensors"
  weights.write_bytes(weights.read_bytes()[:30])
  with pytest.raises(CheckpointCorruptError, match=r"cannot read .*adapter_model.safetensors"):
    import_peft(tmp_path)
  os.remove(weights)
  (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")
  with pytest.raises(FileNotFoundError, match=r"adapter_model.bin is a pickle; it is never read"):
    import_peft(tmp_path)


def test_export_errors_name_the_problem(tmp_path):
  config = LoRAConfig(rank=2, alpha=4.0, targets=("dense",))
  stray = {"dense": {"lora_a": np.ones((6, 2)), "lora_b": np.ones((2, 3))}, "head": np.ones(3)}
  with pytest.raises(ValueError, match=r"trainable leaf head is neither in an adapter node nor "
                                       r"under LoRAConfig.modules_to_save"):
    export_peft(stray, config, tmp_path, family="bert")
  with pytest.raises(ValueError, match=r"holds no adapter node"):
    export_peft({}, config, tmp_path, family="bert")
  assert not os.listdir(tmp_path)  # nothing half-written


def test_scanned_llama_exports_one_module_per_layer(tmp_path):
  """lorapro_jax.models.decoder scans its layers (adapters stacked on a layer axis): the export
  unstacks them into PEFT's model.layers.{i} modules, also after a per-layer rank shrink."""
  from lorapro_jax.dynamic_rank import rank_pattern
  from lorapro_jax.models.decoder import DecoderConfig, DecoderForCausalLM
  hf = Family("llama", str(tmp_path / "base"))
  params = jax.tree.map(np.asarray, hf.flax.params)
  layers = [params["model"]["layers"][str(i)] for i in range(hf.config.num_hidden_layers)]
  base = {"model": {"embed_tokens": params["model"]["embed_tokens"],
                    "norm": params["model"]["norm"],
                    "layers": jax.tree.map(lambda *xs: np.stack(xs), *layers)},
          "lm_head": params["lm_head"]}
  scanned = DecoderForCausalLM(DecoderConfig(
      vocab_size=40, hidden_size=12, intermediate_size=20, num_layers=2, num_heads=2,
      num_kv_heads=1, rms_norm_eps=hf.config.rms_norm_eps, dtype=jnp.float32))
  ids = hf.args[0]
  for gated in (False, True):
    config = preset("llama", rank=4, alpha=8.0, gated=gated)
    model = inject(scanned, config)
    trainable = init_adapters(model, base, jax.random.key(6), ids)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    trainable = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                             for k, x in zip(keys, leaves)])
    assert trainable["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 12, 4)
    ranks = None
    if gated:  # layer-wise live ranks differ; shrink pads each stacked node to its largest
      masks = map_adapters(lambda path, node: np.arange(4) < np.array([[1], [3]]), trainable)
      trainable = map_adapters(lambda path, node: {**node, "lora_c": jnp.where(
          np.arange(4) < np.array([[1], [3]]), node["lora_c"], 0.0)}, trainable)
      ranks = rank_pattern(masks)
    ours = np.asarray(model.apply({"params": combine(base, trainable)}, ids))
    exported = shrink(trainable, masks) if gated else trainable
    written = export_peft(exported, config, tmp_path / f"adapter{gated}", family="llama",
                          ranks=ranks)
    if gated:  # a tie of 7 modules each: the first seen rank (layer 0's) becomes r
      assert written["r"] == 1 and written["rank_pattern"] == {f"model.layers.1.{m}": 3 for m in (
          "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      loaded = peft.PeftModel.from_pretrained(hf.torch_model(), str(tmp_path / f"adapter{gated}"))
    np.testing.assert_allclose(hf.torch_output(loaded), ours, atol=ATOL, rtol=0)
    # and back into the scanned layout: per-layer modules stacked and zero-padded again
    adapters, imported = import_peft(tmp_path / f"adapter{gated}", family="llama", like=exported)
    for path in adapter_paths(exported):
      assert imported.rank_for(path) == exported[path[0]][path[1]][path[2]][path[3]][
          "lora_a"].shape[-1]
      assert imported.scale_for(path) == config.scale_for(path)
    again = np.asarray(inject(scanned, imported).apply({"params": combine(base, adapters)}, ids))
    np.testing.assert_allclose(again, ours, atol=ATOL, rtol=0)
