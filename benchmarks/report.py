"""Markdown table of ``results.jsonl`` (one JSON object per measured process), with the ratios that
issue 9's targets are stated in.

Usage: python benchmarks/report.py benchmarks/results/results.jsonl
"""
from __future__ import annotations

import json
import sys

# the method names of lorapro_jax.methods.METHODS (and jax_step.py's controls); results files of
# earlier runs (benchmarks/results/) used other names: their rows follow, in file order
ORDER = [("jax", m) for m in ("full", "lora", "rslora", "lora_pro", "lora_pro_full",
                              "dynamic_rank", "lora_pro_dynamic_rank", "lora_r12",
                              "lora_r12_gated")] + [
    ("torch", m) for m in ("full", "lora", "lora_pro", "lora_pro_full")]


def fmt(value, spec):
  return "—" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
  latest = {}
  for row in rows:  # a later measurement of the same (scale, framework, mode) replaces the earlier
    latest[(row["scale"], row["framework"], row["mode"])] = row
  # the JAX rows that were run with the layer loop scanned (not unrolled) say so
  for (_, framework, mode), row in latest.items():
    if row.get("scan_unroll") == 1:
      row["mode"] = mode + " (scanned)"
  lines = []
  for scale in ("1b", "base", "tiny"):
    present = [(f, m) for f, m in ORDER if (scale, f, m) in latest] + [
        (f, m) for s, f, m in latest if s == scale and (f, m) not in ORDER]
    if not present:
      continue
    first = latest[(scale,) + present[0]]
    lines += [f"\n**{scale}** (batch {first['batch']} x {first['seq_len']}, device "
              f"{first['device']}, MFU against {fmt(first['peak_flops_assumed'], '.3g')} FLOP/s)\n",
              "| framework | mode | ms/step | tokens/s | model TFLOP/s | MFU | peak GiB | "
              "x our LoRA step | x PEFT tokens/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ours = latest.get((scale, "jax", "lora"))
    peft = latest.get((scale, "torch", "lora"))
    for framework, mode in present:
      r = latest[(scale, framework, mode)]
      vs_ours = r["ms_per_step"] / ours["ms_per_step"] if ours else None
      vs_peft = r["tokens_per_s"] / peft["tokens_per_s"] if peft else None
      lines.append(
          f"| {framework} | {r['mode']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{r['model_tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.2f')} | "
          f"{fmt(vs_ours, '.3f')} | {fmt(vs_peft, '.2f')} |")
  return "\n".join(lines)


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    print(table([json.loads(line) for line in f if line.strip()]))
