"""load_pretrained on checkpoints written by transformers' PyTorch ``save_pretrained``: sharded and
single-file safetensors, float32 and bfloat16, one device and a (data, fsdp) mesh, and every way a
checkpoint can fail to fit."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_decoders import CASES, left_padded, to_ours, torch_logits, torch_model
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from lorapro_jax.models import load_pretrained
from lorapro_jax.sharding import make_mesh, param_shardings


def save(model, directory, **kwargs):
  model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
  return str(directory)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Every case saved as a sharded checkpoint (about 40 kB per file)."""
  out = {}
  for name in CASES:
    hf = torch_model(name)
    out[name] = hf, save(hf, tmp_path_factory.mktemp(name), max_shard_size="40KB")
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_float32_checkpoint_loads_exactly(saved, name):
  hf, directory = saved[name]
  assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 1
  model, params = load_pretrained(directory)
  assert model.config.family == hf.config.model_type and model.config.dtype == jnp.float32
  expected = to_ours(hf)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


def test_loaded_model_gives_pytorch_logits(saved):
  hf, directory = saved["llama3"]
  model, params = load_pretrained(directory)
  ids, mask = left_padded((10, 6), 10, hf.config.vocab_size, seed=4)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], torch_logits(hf, ids, mask)[real], atol=1e-4, rtol=0)


def test_bf16_checkpoint(tmp_path):
  """A bf16 checkpoint loads bit for bit and computes in bf16. Tolerance: our bf16 logits may
  stray from the float32 logits no more than twice as far as PyTorch's own bf16 logits do (both
  round every product and norm to 8 bits of mantissa, in different orders)."""
  hf = torch_model("qwen2")
  directory = save(hf.to(torch.bfloat16), tmp_path)
  bf16_weights = {**load_file(os.path.join(directory, "model.safetensors"))}
  model, params = load_pretrained(directory)
  assert model.config.dtype == model.config.param_dtype == jnp.bfloat16
  q_bias = params["model"]["layers"]["self_attn"]["q_proj"]["bias"]
  assert q_bias.dtype == jnp.bfloat16
  np.testing.assert_array_equal(q_bias[1], bf16_weights["model.layers.1.self_attn.q_proj.bias"])
  ids = np.random.default_rng(5).integers(0, hf.config.vocab_size, (2, 12))
  torch_bf16 = torch_logits(hf, ids)
  exact = torch_logits(hf.float(), ids)  # the bf16 weights, computed in float32
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids), np.float32)
  assert np.max(np.abs(ours - exact)) <= 2 * np.max(np.abs(torch_bf16 - exact))
  _, upcast = load_pretrained(directory, dtype=jnp.float32)  # bf16 values, exactly, in float32
  np.testing.assert_array_equal(upcast["model"]["layers"]["self_attn"]["q_proj"]["bias"],
                                np.asarray(q_bias, np.float32))


def test_load_onto_a_mesh(saved):
  """On 8 devices with a (data=2, fsdp=4) mesh, each leaf is placed with the fsdp rule as it is
  read; values and logits are those of the one-device load."""
  _, directory = saved["mistral"]
  model, single = load_pretrained(directory)
  mesh = make_mesh(data=2, fsdp=4)
  _, sharded = load_pretrained(directory, mesh=mesh)
  expected = param_shardings(single, mesh)
  kernel = sharded["model"]["layers"]["mlp"]["up_proj"]["kernel"]
  assert len(kernel.sharding.device_set) == 8 and "fsdp" in kernel.sharding.spec
  for got, want, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(single),
                                 jax.tree.leaves(expected)):
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
    np.testing.assert_array_equal(got, want)
  ids = np.random.default_rng(6).integers(0, model.config.vocab_size, (2, 9))
  np.testing.assert_allclose(jax.jit(model.apply)({"params": sharded}, ids),
                             jax.jit(model.apply)({"params": single}, ids), atol=1e-5, rtol=0)
  replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), single)  # shardings= wins
  _, placed = load_pretrained(directory, mesh=mesh, shardings=replicated)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed))
  with pytest.raises(ValueError, match=r"shardings do not have the structure of the params; "
                                       r"differing paths: lm_head.kernel"):
    load_pretrained(directory, shardings={"model": replicated["model"]})


def _rewrite(directory, change_tensors=None, change_config=None):
  """A single-file copy of ``directory``'s checkpoint with tensors / config entries changed."""
  tensors = {}
  for file in os.listdir(directory):
    if file.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(directory, file)))
  with open(os.path.join(directory, "config.json")) as handle:
    config = json.load(handle)
  for path in os.listdir(directory):
    os.remove(os.path.join(directory, path))
  change_tensors and change_tensors(tensors)
  config.update(change_config or {})
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as handle:
    json.dump(config, handle)
  return directory


@pytest.mark.parametrize("change_tensors,change_config,error,message", [
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), None, ValueError,
     r"lacks 1 tensor\(s\) the llama model needs: model.layers.1.mlp.down_proj.weight"),
    (lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}),
     dict(tie_word_embeddings=True), ValueError,
     r"holds 1 tensor\(s\) the llama model has no place for \(the config ties the head to the "
     r"embeddings\): lm_head.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}),
     None, None, None),  # a buffer old checkpoints carry: recomputed from the config, not an error
    (None, dict(head_dim=8), ValueError,
     r"tensor model.layers.0.self_attn.q_proj.weight in model.safetensors has shape \(64, 48\); "
     r"the config implies \(32, 48\)"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int8)}), None,
     ValueError, r"tensor model.norm.weight in model.safetensors has dtype I8; expected a float "
                 r"dtype"),
    (None, dict(model_type="gpt2"), ValueError, r"model_type 'gpt2' .* is not supported"),
])
def test_checkpoints_that_do_not_fit_are_refused(saved, tmp_path, change_tensors, change_config,
                                                 error, message):
  _, directory = saved["llama3"]
  for file in os.listdir(directory):
    with open(os.path.join(directory, file), "rb") as src, open(tmp_path / file, "wb") as dst:
      dst.write(src.read())
  broken = _rewrite(str(tmp_path), change_tensors, change_config)
  if error is None:
    load_pretrained(broken)
    return
  with pytest.raises(error, match=message):
    load_pretrained(broken)


def test_pickles_are_never_read(saved, tmp_path):
  with open(os.path.join(saved["llama3"][1], "config.json")) as handle:
    (tmp_path / "config.json").write_text(handle.read())
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
  with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin'\] are pickles, which are never "
                                              r"read"):
    load_pretrained(tmp_path)
