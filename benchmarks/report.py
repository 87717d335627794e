"""Markdown table of ``results.jsonl`` (one JSON object per measured process), with the ratios that
issue 9's targets are stated in and the start-up times of issue 16.

Each row's mode is labelled with how it ran where that is not the default: ``(scanned)`` for JAX
rows whose layer loop was scanned rather than unrolled, ``(torch.compile MODE)`` for PyTorch rows
under ``torch.compile`` (e.g. ``lora (torch.compile default)``), so that a compiled peer and its
eager twin are two rows. Columns "first step s" (process start to the first finished step) and
"XLA compile s" (the train step's XLA compile alone, JAX only) are "—" for results that predate
them, and say "(warm cache)" where a compilation cache (jax's persistent cache; Inductor's or
AOTAutograd's) answered part of the compile.

Usage: python benchmarks/report.py benchmarks/results/results.jsonl
"""
from __future__ import annotations

import json
import sys

# the method names of lorapro_jax.methods.METHODS (and jax_step.py's controls); results files of
# earlier runs (benchmarks/results/) used other names: their rows follow, in file order. A mode's
# labelled variants (scanned, torch.compile) follow its plain row.
ORDER = [("jax", m) for m in ("full", "lora", "rslora", "lora_pro", "lora_pro_full",
                              "dynamic_rank", "lora_pro_dynamic_rank", "lora_r12",
                              "lora_r12_gated", "norms_only")] + [
    ("torch", m) for m in ("full", "lora", "lora_pro", "lora_pro_full")]


def fmt(value, spec):
  return "—" if value is None else format(value, spec)


def label(row: dict) -> str:
  """The mode as the table shows it: the method name plus how it ran, when not the default
  (layer loop scanned, no layer weight copies, torch.compile, a device mesh, XLA options)."""
  notes = []
  if row.get("scan_unroll") == 1:  # JAX rows run with the layer loop scanned, not unrolled
    notes.append("scanned")
  if row.get("copy_layer_weights") is False:  # DecoderConfig's default is on
    notes.append("no layer weight copies")
  compile_mode = row.get("compile")
  if compile_mode not in (None, "none"):
    backend = row.get("compile_backend")
    suffix = "" if backend in (None, "inductor") else f", {backend}"
    notes.append(f"torch.compile {compile_mode}{suffix}")
  if row.get("mesh"):
    notes.append(", ".join(f"{axis} {size}" for axis, size in row["mesh"].items()))
  if row.get("processes"):
    notes.append(f"{row['processes']} processes")
  if row.get("xla_flags"):
    notes.append(row["xla_flags"])
  return row["mode"] + "".join(f" ({note})" for note in notes)


def startup(row: dict, key: str) -> str:
  """A start-up time, marked when a compilation cache answered (warm: shorter than cold)."""
  cached = row.get("compile_cache_hit") or row.get("compile_cache_hits")
  return fmt(row.get(key), ".1f") + (" (warm cache)" if cached and key in row else "")


def table(rows: list[dict]) -> str:
  latest = {}
  for row in rows:  # a later measurement of the same (scale, framework, label) replaces the earlier
    latest[(row["scale"], row["framework"], label(row))] = row
  lines = []
  for scale in ("1b", "base", "7b", "tiny"):
    keys = [key for key in latest if key[0] == scale]  # file order of first appearance
    if not keys:
      continue

    def rank(key):  # ORDER's place of the row's plain mode, its plain row before its variants
      row = latest[key]
      place = ORDER.index((key[1], row["mode"])) if (key[1], row["mode"]) in ORDER else len(ORDER)
      return (place, key[2] != row["mode"])
    present = sorted(keys, key=rank)  # stable: ties keep file order
    first = latest[present[0]]
    lines += [f"\n**{scale}** (batch {first['batch']} x {first['seq_len']}, device "
              f"{first['device']}, MFU against {fmt(first['peak_flops_assumed'], '.3g')} FLOP/s)\n",
              "| framework | mode | ms/step | tokens/s | model TFLOP/s | MFU | peak GiB | "
              "x our LoRA step | x PEFT tokens/s | first step s | XLA compile s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ours = latest.get((scale, "jax", "lora"))
    peft = latest.get((scale, "torch", "lora"))  # eager PEFT, the issue's reference peer
    for key in present:
      r = latest[key]
      vs_ours = r["ms_per_step"] / ours["ms_per_step"] if ours else None
      vs_peft = r["tokens_per_s"] / peft["tokens_per_s"] if peft else None
      lines.append(
          f"| {r['framework']} | {key[2]} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
          f"{r['model_tflops']:.1f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_gib'], '.2f')} | "
          f"{fmt(vs_ours, '.3f')} | {fmt(vs_peft, '.2f')} | {startup(r, 'first_step_s')} | "
          f"{startup(r, 'compile_s')} |")
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(f"usage: python {sys.argv[0]} RESULTS.jsonl (got {len(sys.argv) - 1} arguments)")
  with open(sys.argv[1]) as f:
    print(table([json.loads(line) for line in f if line.strip()]))
