"""The PyTorch peers of issue 9, one measurement per process.

Hugging Face ``LlamaForCausalLM`` (transformers 4.57, SDPA attention) with the shape of
``benchmarks/common.py``'s scale, trained on random tokens under ``torch.autocast(bfloat16)``:

* ``full``: full fine-tuning, float32 weights and fused ``torch.optim.AdamW`` (float32 moments);
* ``lora``: bfloat16 base weights, PEFT LoRA r=8 alpha=16 on all linear layers of the blocks
  (float32 adapters, PEFT's default), fused AdamW on the adapters;
* ``lora_pro`` / ``lora_pro_full``: the same adapters stepped by ``lora-pro-adamw``'s
  ``LoRAProAdamW`` (PyPI) in its two modes (``efficient`` / ``full``).

The modes are the names of ``lorapro_jax.methods.METHODS`` (not imported: this process loads no
jax). Usage: python benchmarks/torch_peers.py --scale 1b --mode lora [--steps 10] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NamedTuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

class Peer(NamedTuple):
  adapters: bool            # PEFT LoRA on a bf16 base (False: every weight trains, float32)
  lorapro_mode: str | None  # lora-pro-adamw's mode (None: torch's fused AdamW)


MODES = {"full": Peer(False, None), "lora": Peer(True, None),
         "lora_pro": Peer(True, "efficient"), "lora_pro_full": Peer(True, "full")}


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
  args = parser.parse_args(argv)

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  model, optimizer = build(args.scale, args.mode, device)
  model.train()
  batch, seq_len = common.SCALES[args.scale]["batch"], common.SCALES[args.scale]["seq_len"]
  gen = torch.Generator(device="cpu").manual_seed(0)
  tokens = torch.randint(0, common.SCALES[args.scale]["vocab_size"], (batch, seq_len),
                         generator=gen).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  losses = []
  for _ in range(args.warmup):
    losses.append(float(step().detach()))
  sync()
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - start)
  losses.append(float(loss.detach()))
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  import transformers
  result = common.summarize(
      times, scale=args.scale, train_base=not MODES[args.mode].adapters, device_name=name, peak_bytes=peak,
      framework="torch", mode=args.mode, trainable_params=trainable, losses=losses,
      versions=dict(torch=torch.__version__, transformers=transformers.__version__))
  if not all(map(lambda x: x == x and abs(x) < 1e4, losses)):
    raise FloatingPointError(f"non-finite loss in {args.mode}: {losses}")
  common.write_result(result, args.out)


if __name__ == "__main__":
  main()
