"""Benchmarks (issue 16): start-up times of the JAX step and the PyTorch peers, the torch.compile
peers, and the report's rows for them. Tiny shapes on the CPU; the numbers themselves come from
the GPU (benchmarks/README.md)."""
import concurrent.futures
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from lorapro_jax.launch import launch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import jax_step  # noqa: E402
import lora_vs_full_cpu  # noqa: E402
import report  # noqa: E402


def test_compile_counter_sees_a_fresh_compile_and_none_for_an_aot_executable():
  counter = jax_step.CompileCounter()
  try:
    # a shape no other test compiles, under the persistent cache's 0.5 s threshold: a real compile
    jitted = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)
    x = jnp.ones((3, 7, 11))
    counter.active = True
    compiled = jitted.lower(x).compile()
    assert counter.compiles + counter.cache_hits == 1
    assert counter.compile_seconds >= 0.0
    counter.reset()
    for _ in range(3):
      compiled(x)
    assert counter.compiles + counter.cache_hits == 0
    jax.jit(lambda x: jnp.cos(x) - 2.0)(x)  # another function: compiled now, and counted
    assert counter.compiles + counter.cache_hits >= 1
  finally:
    counter.close()


def test_jax_step_reports_compile_and_first_step_and_never_recompiles(tmp_path):
  result = jax_step.main(["--scale", "tiny", "--mode", "lora", "--steps", "2", "--warmup", "1",
                          "--out", str(tmp_path)])
  since_start = time.perf_counter() - jax_step.PROCESS_START
  assert result["compiles_in_steps"] == 0
  # first_step_s spans the trace, the compile and a step, and ended before main returned
  assert 0 < result["lower_s"] + result["compile_s"] < result["first_step_s"] <= since_start
  # jax's own timing of the XLA compile lies inside the timed .compile() (0 if cached)
  assert 0 <= result["backend_compile_s"] <= result["compile_s"]
  if not result["compile_cache_hit"]:
    assert result["backend_compile_s"] > 0
  assert (tmp_path / "results.jsonl").read_text().count("\n") == 1
  assert len(result["losses"]) == 2  # the warm-up step and the last timed step


def test_norms_only_control_is_the_lora_step_without_adapters():
  """The floor row: the LoRA step's frozen bf16 base and its backward through every layer, with
  only the RMSNorm scales trained (no adapter leaf anywhere)."""
  from lorapro_jax.train import combine_params
  from lorapro_jax.trees import named_leaves
  setup = jax_step.build("tiny", "norms_only", "none", jnp.bfloat16)
  trainable = dict(named_leaves(setup.trainable))
  assert sorted(trainable) == [("model", "layers", "input_layernorm", "weight"),
                               ("model", "layers", "post_attention_layernorm", "weight"),
                               ("model", "norm", "weight")]
  assert all(leaf.dtype == jnp.float32 for leaf in trainable.values())
  # the same frozen base as the LoRA row: every kernel and the embedding, in bf16
  base = dict(named_leaves(setup.base))
  kernels = {("model", "layers", block, name, "kernel") for block, names in
             (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
              ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names}
  assert set(base) == kernels | {("model", "embed_tokens", "embedding"), ("lm_head", "kernel")}
  assert all(leaf.dtype == jnp.bfloat16 for leaf in base.values())
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, setup.config.vocab_size)
  batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
  loss_fn = jax_step.next_token_loss(setup.model)
  grads = jax.grad(lambda t: loss_fn(combine_params(setup.base, t), batch, None)[0])(
      setup.trainable)
  # the backward reaches the first layer: its norm scale gets a gradient
  first_layer = grads["model"]["layers"]["input_layernorm"]["weight"][0]
  assert float(jnp.abs(first_layer).max()) > 0


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--warmup", "0"]])
def test_jax_step_refuses_no_steps(argv, capsys):
  with pytest.raises(SystemExit):
    jax_step.main(["--scale", "tiny", "--mode", "lora"] + argv)
  assert "must be >= 1" in capsys.readouterr().err


def test_torch_peer_under_torch_compile_matches_eager():
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  import torch_peers
  with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
    torch_peers.compile_model(torch.nn.Linear(2, 2), "fast")
  common = ["--scale", "tiny", "--mode", "lora", "--steps", "1", "--warmup", "2"]
  eager = torch_peers.main(common)
  # aot_eager traces through Dynamo and AOTAutograd like inductor but runs the captured graphs
  # eagerly: the compiled module's wiring is checked without a C++ build in the test
  torch._dynamo.reset()
  torch._dynamo.utils.counters.clear()
  compiled = torch_peers.main(common + ["--compile", "default", "--compile-backend", "aot_eager"])
  assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # Dynamo did capture it
  assert compiled["compiled_graphs"] >= 1 and compiled["graphs_in_steps"] == 0
  assert "compiled_graphs" not in eager
  torch._dynamo.reset()
  assert (eager["compile"], compiled["compile"]) == ("none", "default")
  assert (eager["compile_backend"], compiled["compile_backend"]) == (None, "aot_eager")
  # the same training: losses of the same three steps (bf16 autocast rounding apart)
  assert compiled["losses"] == pytest.approx(eager["losses"], abs=2e-3)
  assert eager["losses"][-1] < eager["losses"][0]
  for result in (eager, compiled):
    assert 0 < result["first_call_s"] < result["first_step_s"]
  assert compiled["trainable_params"] == eager["trainable_params"]


def _row(framework, mode, ms, **extra):
  return dict(scale="1b", batch=8, seq_len=1024, device="GPU", peak_flops_assumed=989e12,
              framework=framework, mode=mode, ms_per_step=ms, tokens_per_s=8192 / (ms / 1e3),
              model_tflops=1.0, mfu=0.1, peak_gib=1.0, **extra)


def test_jax_step_over_two_processes_trains_like_one_process(tmp_path):
  """Two processes of 4 devices each (gloo on the CPU; on a GPU host, one process per GPU) give
  the losses of this process driving all 8 on the same (data 8) mesh; only process 0 writes."""
  argv = ["--scale", "tiny", "--mode", "lora", "--fsdp", "1", "--steps", "1", "--warmup", "1"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  script = os.path.join(os.path.dirname(jax_step.__file__), "jax_step.py")
  with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the two processes run meanwhile
    status = pool.submit(launch, [sys.executable, script, *argv, "--out", str(tmp_path)],
                         processes=2, devices_per_process=0, env=env, log_dir=tmp_path / "logs",
                         timeout_s=600)
    alone = jax_step.main(argv)
  assert status.result() == 0, "\n".join(
      (tmp_path / "logs" / f"process_{i}.log").read_text()[-3000:] for i in range(2))
  with open(tmp_path / "results.jsonl") as handle:
    (two,) = [json.loads(line) for line in handle]
  assert two["processes"] == 2 and "processes" not in alone
  assert two["devices"] == alone["devices"] == 8
  assert two["losses"] == pytest.approx(alone["losses"], rel=1e-5)


def test_a_lora_step_does_less_work_than_a_full_step():
  """XLA's own FLOP count: the kernel gradients x^T dy are gone, the rank-8 products are thin."""
  result = lora_vs_full_cpu.main(["--hidden", "64", "--layers", "1", "--batch", "2",
                                  "--seq-len", "16", "--steps", "1", "--warmup", "1"])
  assert result["flops"]["lora"] < 0.8 * result["flops"]["full"]


def test_report_names_compiled_peers_and_shows_startup_columns():
  rows = [_row("torch", "lora", 200.0, compile="none", first_step_s=30.0),
          _row("torch", "lora", 150.0, compile="default", compile_backend="inductor",
               first_step_s=95.31),
          _row("torch", "full", 190.0, compile="max-autotune-no-cudagraphs",
               compile_backend="inductor", first_step_s=400.0),
          _row("jax", "lora", 100.0, first_step_s=250.0, compile_s=201.37),
          _row("jax", "full", 120.0),  # an older result without the start-up fields
          _row("jax", "lora_pro", 101.0, first_step_s=60.0, compile_s=0.5,
               compile_cache_hit=True),
          _row("jax", "lora", 102.0, copy_layer_weights=False)]  # a variant, not "our LoRA"
  lines = report.table(rows).splitlines()
  header = next(line for line in lines if line.startswith("| framework"))
  assert header.endswith("| first step s | XLA compile s |")
  body = [line.split(" | ") for line in lines if line.startswith("| jax") or
          line.startswith("| torch")]
  by_label = {cells[1]: cells for cells in body}
  assert [cells[1] for cells in body] == [
      "full", "lora", "lora (no layer weight copies)", "lora_pro",
      "full (torch.compile max-autotune-no-cudagraphs)", "lora", "lora (torch.compile default)"]
  compiled = by_label["lora (torch.compile default)"]
  assert compiled[0] == "| torch"
  assert compiled[-2:] == ["95.3", "— |"]  # first step; no XLA compile for torch
  # x PEFT tokens/s is against the eager PEFT row: 200 ms / 150 ms
  assert compiled[8] == f"{200.0 / 150.0:.2f}"
  jax_lora = next(cells for cells in body if cells[0] == "| jax" and cells[1] == "lora")
  assert jax_lora[-2:] == ["250.0", "201.4 |"]
  jax_full = next(cells for cells in body if cells[0] == "| jax" and cells[1] == "full")
  assert jax_full[-2:] == ["—", "— |"]
  assert by_label["lora_pro"][-2:] == ["60.0 (warm cache)", "0.5 (warm cache) |"]
  assert by_label["lora (no layer weight copies)"][7] == f"{102.0 / 100.0:.3f}"
