"""The LLM road end to end on the CPU: merged export of our decoder read back by transformers'
PyTorch classes, and ``lorapro_jax.finetune`` run with the experiments' LLaMA-2 MetaMathQA ->
GSM8K config on a tiny checkpoint (its own WordLevel tokenizer, local JSONL rows): training,
GSM8K-style scoring checked against PyTorch's greedy decoding of the exported model, the PEFT
adapter against the merged model, a pre-empted run that resumes to exactly the same run, and the
same run on a (data, fsdp) mesh."""
import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from hf_decoders import CASES, left_padded, our_config, torch_logits, torch_model
from tiny_llm import ROWS, write_tiny_llm
from safetensors.numpy import load_file

from experiments.configs import get_config
from experiments.run import llama_finetune_config
from lorapro_jax.data.instruct import PROMPT
from lorapro_jax.finetune import FinetuneConfig, _parser, encode_prompts, finetune, main
from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.models import (DecoderConfig, DecoderForCausalLM, load_pretrained, preset,
                                save_pretrained, to_hf_config)
from lorapro_jax.peft_format import export_merged
from lorapro_jax.trees import combine

peft = pytest.importorskip("peft")

# ------------------------------------------------------------------------------ merged export


def adapted_checkpoint(name, directory):
  """(PyTorch model, our injected model, LoRA config, params with non-zero adapters) of a tiny
  case saved by transformers and loaded by load_pretrained."""
  hf = torch_model(name)
  hf.save_pretrained(str(directory), safe_serialization=True)
  model, base = load_pretrained(directory)
  lora = preset(model.config.family, rank=4, alpha=8.0)
  adapted = inject(model, lora)
  trainable = init_adapters(adapted, base, jax.random.key(0), np.ones((1, 4), np.int32))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(trainable))))
  trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), trainable)
  return hf, adapted, lora, combine(base, trainable)


@pytest.mark.parametrize("name,with_source", [("llama3", True), ("qwen2", False),
                                              ("gemma", False)])
def test_merged_export_loads_in_pytorch(tmp_path, name, with_source):
  """Sharded PyTorch-layout safetensors that transformers' AutoModelForCausalLM reads with our
  adapted logits (1e-4, float32); a tied head (Qwen2, Gemma) writes no lm_head.weight; with
  source= the checkpoint's own config.json (dtype updated) and side files travel along, without
  it config.json is written from our config."""
  hf, adapted, lora, params = adapted_checkpoint(name, tmp_path / "base")
  source = tmp_path / "base" if with_source else None
  written = export_merged(params, lora, tmp_path / "merged", hf_model=adapted, source=source,
                          max_shard_size="40KB")
  files = sorted(os.listdir(tmp_path / "merged"))
  with open(tmp_path / "merged" / "model.safetensors.index.json") as handle:
    weight_map = json.load(handle)["weight_map"]
  shards = sorted(set(weight_map.values()))
  assert len(shards) > 1 and set(shards) <= set(files)
  assert ("lm_head.weight" in weight_map) == (not hf.config.tie_word_embeddings)
  assert "model.layers.1.self_attn.q_proj.weight" in weight_map
  assert not any("lora" in tensor for tensor in weight_map)
  if with_source:
    assert "generation_config.json" in files
    with open(tmp_path / "base" / "config.json") as handle:
      assert written == {**json.load(handle), "torch_dtype": "float32", "dtype": "float32"}
  else:
    assert "generation_config.json" not in files and written["architectures"] == [
        type(hf).__name__]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    merged = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                    attn_implementation="eager").eval()
  ids, mask = left_padded((9, 4), 9, hf.config.vocab_size, seed=3)
  ours = np.asarray(jax.jit(adapted.apply)({"params": params}, ids, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(torch_logits(merged, ids, mask)[real], ours[real], atol=1e-4, rtol=0)
  # the adapters move the logits, so the comparison tests the folding
  assert np.max(np.abs(torch_logits(hf, ids, mask) - ours)[real]) > 1e-1


def test_merged_export_refuses_to_overwrite_and_replaces_cleanly(tmp_path):
  _, adapted, lora, params = adapted_checkpoint("mistral", tmp_path / "base")
  export_merged(params, lora, tmp_path / "merged", hf_model=adapted, source=tmp_path / "base",
                max_shard_size="40KB")
  before = {name: (tmp_path / "merged" / name).read_bytes()
            for name in os.listdir(tmp_path / "merged")}
  with pytest.raises(FileExistsError, match=r"already holds \['config.json', "
                                            r"'generation_config.json', 'model-00001-of-00006"):
    export_merged(params, lora, tmp_path / "merged", hf_model=adapted, source=tmp_path / "base")
  with pytest.raises(ValueError, match=r"params hold no adapter node"):
    export_merged(load_pretrained(tmp_path / "base")[1], lora, tmp_path / "merged",
                  hf_model=adapted, overwrite=True)
  assert {name: (tmp_path / "merged" / name).read_bytes()
          for name in os.listdir(tmp_path / "merged")} == before
  # one file now: the stale shards and their index go, nothing else is left behind
  export_merged(params, lora, tmp_path / "merged", hf_model=adapted, source=tmp_path / "base",
                overwrite=True)
  assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
  merged_model, merged = load_pretrained(tmp_path / "merged")
  ids = np.random.default_rng(2).integers(0, merged_model.config.vocab_size, (2, 7))
  np.testing.assert_allclose(merged_model.apply({"params": merged}, ids),
                             adapted.apply({"params": params}, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_config_round_trip(name):
  """to_hf_config inverts DecoderConfig.from_hf on every family's switches."""
  config = our_config(torch_model(name))
  runtime = {f: getattr(config, f) for f in ("dtype", "param_dtype", "remat", "attention",
                                             "scan_unroll", "copy_layer_weights")}
  assert DecoderConfig.from_hf(to_hf_config(config), **runtime) == config


@pytest.mark.parametrize("overrides,message", [
    (dict(biases=("q_proj",)), r"biases \('q_proj',\) cannot be written as a llama config.json"),
    (dict(family="qwen2"), r"biases \(\) cannot be written as a qwen2 config.json"),
    (dict(norm_unit_offset=True), r"norm_unit_offset=True, scale_embeddings=False cannot be "
                                  r"written as a llama config.json"),
    (dict(sliding_window=4), r"sliding_window=4 cannot be written as a llama config.json"),
])
def test_configs_transformers_cannot_express_are_refused(overrides, message):
  with pytest.raises(ValueError, match=message):
    to_hf_config(DecoderConfig.tiny(**overrides))


def test_save_pretrained_checks_the_tree(tmp_path):
  model = DecoderForCausalLM(DecoderConfig.tiny())
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  del params["lm_head"]  # the layout is checked before any array is read
  with pytest.raises(ValueError, match=r"params do not fit the llama model \(1 differences\): "
                                       r"lm_head.kernel: missing from the params"):
    save_pretrained(model, params, tmp_path)
  assert not os.listdir(tmp_path)


# -------------------------------------------------------------------------------- finetune

STEPS, STOP = 30, 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny Llama checkpoint as a user would have it on disk, and the JSONL rows it learns."""
  return write_tiny_llm(str(tmp_path_factory.mktemp("llm")))


def experiment_config(checkpoint, out):
  """The experiments' LLaMA-2 MetaMathQA -> GSM8K config on this road; then the tiny run's
  sizes, a learning rate that learns in 30 steps, and float32 to compare with PyTorch."""
  config = get_config("llama2_metamath/gsm8k").replace(train_file=checkpoint["data"],
                                                       eval_file=checkpoint["data"])
  paper = llama_finetune_config(config, "lora_pro", 0, str(out), checkpoint["model"])
  assert (paper.method, paper.rank, paper.alpha, paper.learning_rate, paper.schedule,
          paper.warmup_ratio, paper.batch_size, paper.max_length, paper.compute_dtype,
          paper.max_new_tokens, paper.max_train_examples) == (
              "lora_pro", 8, 16.0, 2e-5, "cosine", 0.03, 32, 1024, "bfloat16", 256, 100_000)
  assert paper.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj")
  return dataclasses.replace(paper, batch_size=4, epochs=float(STEPS), max_length=64,
                             max_new_tokens=12, learning_rate=1e-2, warmup_ratio=0.0,
                             compute_dtype="float32", base_dtype="float32", merged=True)


def to_argv(config: FinetuneConfig) -> list[str]:
  """The command line of ``config`` (every field given as a flag)."""
  argv = []
  for action in _parser()._actions:
    value = getattr(config, action.dest, None)
    if action.dest in ("help", "stop_after", "no_progress") or value is None:
      continue
    if isinstance(value, bool):
      argv += [action.option_strings[0]] if value else []
    else:
      text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
      argv += [action.option_strings[0], text]
  return argv


@pytest.fixture(scope="module")
def straight(checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("straight")
  config = experiment_config(checkpoint, out)
  return config, finetune(config, progress=False)


def test_finetune_trains_scores_and_exports(straight, checkpoint):
  config, results = straight
  losses = [h["loss"] for h in results["history"]]
  assert [h["step"] for h in results["history"]] == list(range(1, STEPS + 1))
  assert losses[-1] < 0.3 * losses[0]
  # r 8 on q, o (32 -> 32), k, v (32 -> 16: 2 KV heads), gate, up (32 -> 64), down, 2 layers
  assert results["trainable_params"] == 2 * 8 * (2 * 64 + 2 * 48 + 3 * 96)
  out = config.out
  with open(os.path.join(out, "eval", f"step_{STEPS}.jsonl")) as handle:
    scored = [json.loads(line) for line in handle]
  assert [row["answer"] for row in scored] == [str(a + b) for a, b in [(2, 3), (4, 1), (3, 3),
                                                                       (6, 2)]]
  correct = [row["predicted"] == row["answer"] for row in scored]
  assert results["final"]["exact_match"] == np.mean(correct) >= 0.5  # it learned the answers
  assert all("####" in row["generated"] for row in scored)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tb")))
  assert str(STEPS) in os.listdir(os.path.join(out, "checkpoints"))
  assert results["exports"] == {"adapter": os.path.join(out, "adapter"),
                                "merged": os.path.join(out, "merged")}

  # PyTorch decodes the merged export (with the tokenizer copied beside it) greedily into the
  # very texts that were scored
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    merged = T.AutoModelForCausalLM.from_pretrained(results["exports"]["merged"]).eval()
  tokenizer = T.AutoTokenizer.from_pretrained(results["exports"]["merged"])
  prompts = encode_prompts(tokenizer, [PROMPT.format(query=row["question"]) for row in ROWS], 64)
  with torch.no_grad():
    tokens = merged.generate(torch.as_tensor(prompts["input_ids"]),
                             attention_mask=torch.as_tensor(prompts["attention_mask"]),
                             max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
  texts = tokenizer.batch_decode(tokens[:, prompts["input_ids"].shape[1]:],
                                 skip_special_tokens=True)
  assert texts == [row["generated"] for row in scored]

  # the PEFT adapter on the original checkpoint is the merged model
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    base = T.AutoModelForCausalLM.from_pretrained(checkpoint["model"]).eval()
    adapted = peft.PeftModel.from_pretrained(base, results["exports"]["adapter"]).eval()
  ids = prompts["input_ids"][:, -20:]
  np.testing.assert_allclose(torch_logits(adapted, ids), torch_logits(merged, ids), atol=1e-4,
                             rtol=0)


def test_preempted_run_resumes_exactly_from_the_command_line(straight, tmp_path):
  """The same run from the command line, stopped at step 12 and started again: the second part
  resumes at 12 and repeats the uninterrupted run's losses, score and adapter bit for bit."""
  config, uninterrupted = straight
  resumed = dataclasses.replace(config, out=str(tmp_path / "run"))
  argv = to_argv(resumed)
  assert FinetuneConfig(**{k: v for k, v in vars(_parser().parse_args(argv)).items()
                           if k not in ("stop_after", "no_progress")}) == resumed
  first = main(argv + ["--stop-after", str(STOP), "--no-progress"])
  assert [h["step"] for h in first["history"]] == list(range(1, STOP + 1))
  assert "exports" not in first and not os.path.exists(tmp_path / "run" / "adapter")
  second = main(argv + ["--no-progress"])
  assert second["resumed_from"] == STOP
  assert [h["step"] for h in second["history"]] == list(range(STOP + 1, STEPS + 1))
  assert [h["loss"] for h in second["history"]] == [h["loss"] for h in
                                                    uninterrupted["history"][STOP:]]
  assert second["final"] == uninterrupted["final"]
  adapter = "adapter/adapter_model.safetensors"
  ours, theirs = load_file(str(tmp_path / "run" / adapter)), load_file(
      os.path.join(config.out, adapter))
  assert ours.keys() == theirs.keys()
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name])
  with pytest.raises(ValueError, match=r"holds a run with another configuration \(rank: 8 "
                                       r"recorded, 4 now\)"):
    finetune(dataclasses.replace(resumed, rank=4))


def test_mesh_run_matches_one_device(straight, tmp_path):
  """--mesh 2,4 on the 8 fake CPU devices (base and optimizer state split along fsdp, rows over
  both axes, GSM8K decoding on the sharded params) takes the one-device run's steps."""
  config, _ = straight
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 2))
  config = dataclasses.replace(config, train_file=str(data), batch_size=8, merged=False)
  runs = {mesh: finetune(dataclasses.replace(config, out=str(tmp_path / str(mesh)), mesh=mesh),
                         stop_after=2, progress=False)
          for mesh in (None, (2, 4))}
  np.testing.assert_allclose([h["loss"] for h in runs[(2, 4)]["history"]],
                             [h["loss"] for h in runs[None]["history"]], rtol=1e-6)
  assert runs[(2, 4)]["final"] == runs[None]["final"]


def test_runtime_flags_reach_the_model(checkpoint, tmp_path, monkeypatch):
  """--scan-layers and --no-layer-weight-copies become the loaded model's DecoderConfig fields."""
  import lorapro_jax.finetune as finetune_module
  seen = {}

  class Loaded(Exception):
    pass

  def load_and_stop(path, **kwargs):
    seen.update(kwargs["overrides"])
    raise Loaded

  monkeypatch.setattr(finetune_module, "load_pretrained", load_and_stop)
  required = ["--model", checkpoint["model"], "--train", checkpoint["data"], "--batch-size", "2",
              "--no-progress"]
  for flags, unroll, copies in (([], None, True), (["--scan-layers"], 1, True),
                                (["--no-layer-weight-copies"], None, False)):
    with pytest.raises(Loaded):
      main(required + ["--out", str(tmp_path / "_".join(flags or ["default"]))] + flags)
    assert (seen["scan_unroll"], seen["copy_layer_weights"]) == (unroll, copies), flags
