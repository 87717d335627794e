"""The PyTorch peers of issue 9, one measurement per process.

Hugging Face ``LlamaForCausalLM`` (transformers 4.57, SDPA attention) with the shape of
``benchmarks/common.py``'s scale, trained on random tokens under ``torch.autocast(bfloat16)``:

* ``full``: full fine-tuning, float32 weights and fused ``torch.optim.AdamW`` (float32 moments);
* ``lora``: bfloat16 base weights, PEFT LoRA r=8 alpha=16 on all linear layers of the blocks
  (float32 adapters, PEFT's default), fused AdamW on the adapters;
* ``lora_pro`` / ``lora_pro_full``: the same adapters stepped by ``lora-pro-adamw``'s
  ``LoRAProAdamW`` (PyPI) in its two modes (``efficient`` / ``full``).

The modes are the names of ``lorapro_jax.methods.METHODS`` (not imported: this process loads no
jax). ``--compile default`` (or ``max-autotune-no-cudagraphs``) wraps the model, PEFT LoRA and full
fine-tuning alike, in ``torch.compile(model, mode=...)`` (the optimizer step stays eager); the
issue's ``peft_lora_compiled`` / ``full_compiled`` peers are ``--mode lora --compile default`` /
``--mode full --compile default``. ``first_step_s`` is the time from the top of this script
(before torch is imported) to the first finished step, synchronized; ``first_call_s`` is that
first step alone, which under ``torch.compile`` holds Dynamo's tracing and the backend's compile
(``compile_cache_hits`` > 0: partly answered by Inductor's / AOTAutograd's on-disk caches, warm
from an earlier process on the same machine; ``graphs_in_steps``: graphs captured while timing,
i.e. recompiles, 0 expected).

Usage: python benchmarks/torch_peers.py --scale 1b --mode lora [--compile default] [--steps 10]
       [--out DIR]
"""
from __future__ import annotations

import time

# Taken before torch (or anything heavy) is imported: first_step_s counts the imports too.
PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

class Peer(NamedTuple):
  adapters: bool            # PEFT LoRA on a bf16 base (False: every weight trains, float32)
  lorapro_mode: str | None  # lora-pro-adamw's mode (None: torch's fused AdamW)


MODES = {"full": Peer(False, None), "lora": Peer(True, None),
         "lora_pro": Peer(True, "efficient"), "lora_pro_full": Peer(True, "full")}
# --compile: "none" runs eager; the others are torch.compile modes ("default" is mode=None)
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs")


def compile_model(model, compile_mode: str, backend: str = "inductor"):
  """``model`` under ``torch.compile`` (``compile_mode`` of :data:`COMPILE_MODES`), or itself.

  The optimizer keeps the uncompiled module: the compiled wrapper shares its parameters.
  ``mode`` only means something to inductor, so other backends (``aot_eager``, to check the
  tracing where no C++ compiler is installed) get none.
  """
  if compile_mode not in COMPILE_MODES:
    raise ValueError(f"unknown compile mode {compile_mode!r}; expected one of {COMPILE_MODES}")
  if compile_mode == "none":
    return model
  mode = None if compile_mode == "default" or backend != "inductor" else compile_mode
  return torch.compile(model, mode=mode, backend=backend)


def dynamo_counts() -> dict:
  """Dynamo's graphs captured so far and the compile-cache hits (Inductor's FX graph cache,
  AOTAutograd's cache), from ``torch._dynamo.utils.counters``: a warm cache makes a compiled
  peer's first step shorter than a fresh machine's, so the rows say which they had."""
  from torch._dynamo.utils import counters
  return dict(graphs=counters["stats"]["unique_graphs"],
              cache_hits=counters["inductor"]["fxgraph_cache_hit"]
              + counters["aot_autograd"]["autograd_cache_hit"])


def build(scale: str, mode: str, device: str):
  from transformers import LlamaConfig, LlamaForCausalLM
  shape = common.model_shape(scale)
  config = LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
      max_position_embeddings=2048, tie_word_embeddings=False, attn_implementation="sdpa")
  torch.manual_seed(0)
  with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the host
    model = LlamaForCausalLM(config)
  if not MODES[mode].adapters:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    return model, optimizer
  from peft import LoraConfig, get_peft_model
  model = model.to(device=device, dtype=torch.bfloat16)
  lora = LoraConfig(r=common.LORA_RANK, lora_alpha=common.LORA_ALPHA, lora_dropout=0.0,
                    target_modules=list(common.TARGETS), bias="none")
  model = get_peft_model(model, lora)  # adapters in float32 (autocast_adapter_dtype)
  with torch.no_grad():  # B = 0 at init would make LoRA-Pro's first steps degenerate
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 1e-3)
  trainable = [p for p in model.parameters() if p.requires_grad]
  if MODES[mode].lorapro_mode is None:
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")
  else:
    from lora_pro import LoRAProAdamW
    optimizer = LoRAProAdamW(model, lr=1e-4, weight_decay=0.0,
                             lorapro_mode=MODES[mode].lorapro_mode)
  return model, optimizer


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", default="1b", choices=sorted(common.SCALES))
  parser.add_argument("--mode", required=True, choices=list(MODES))
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--compile", default="none", choices=COMPILE_MODES,
                      help="torch.compile the model in this mode (none: eager)")
  parser.add_argument("--compile-backend", default="inductor",
                      help="torch.compile backend (inductor; aot_eager checks the tracing alone)")
  args = parser.parse_args(argv)
  # the first warm-up step is the one first_step_s ends with; the median needs a timed step
  if args.warmup < 1:
    parser.error(f"--warmup must be >= 1 (the first step is a warm-up step), got {args.warmup}")
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  model, optimizer = build(args.scale, args.mode, device)
  model.train()
  forward = compile_model(model, args.compile, args.compile_backend)
  batch, seq_len = common.SCALES[args.scale]["batch"], common.SCALES[args.scale]["seq_len"]
  gen = torch.Generator(device="cpu").manual_seed(0)
  tokens = torch.randint(0, common.SCALES[args.scale]["vocab_size"], (batch, seq_len),
                         generator=gen).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  # the first step alone: under torch.compile it traces and compiles the forward and backward
  start = time.perf_counter()
  losses = [float(step().detach())]  # reading the loss waits for the step
  sync()
  first_step_s = time.perf_counter() - PROCESS_START
  first_call_s = time.perf_counter() - start
  for _ in range(args.warmup - 1):
    losses.append(float(step().detach()))
  sync()
  compiled = args.compile != "none"
  after_warmup = dynamo_counts() if compiled else None
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  losses.append(float(loss.detach()))
  extra = {}
  if compiled:  # graphs captured while timing would mean recompiles inside the median
    end = dynamo_counts()
    extra = dict(compiled_graphs=end["graphs"],
                 graphs_in_steps=end["graphs"] - after_warmup["graphs"],
                 compile_cache_hits=end["cache_hits"])
    if extra["graphs_in_steps"]:
      print(f"WARNING: torch.compile captured {extra['graphs_in_steps']} graph(s) during the timed "
            "steps (recompiles); expected none after the warm-up", flush=True)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  import transformers
  result = common.summarize(
      times, scale=args.scale, train_base=not MODES[args.mode].adapters, device_name=name,
      peak_bytes=peak,
      framework="torch", mode=args.mode, trainable_params=trainable, losses=losses,
      compile=args.compile,
      compile_backend=args.compile_backend if args.compile != "none" else None,
      first_step_s=first_step_s, first_call_s=first_call_s,
      versions=dict(torch=torch.__version__, transformers=transformers.__version__), **extra)
  if not all(map(lambda x: x == x and abs(x) < 1e4, losses)):
    raise FloatingPointError(f"non-finite loss in {args.mode}: {losses}")
  common.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()
