"""Markdown tables of experiment results across seeds, beside the papers' numbers.

``python experiments/results_table.py runs/experiments`` reads every
``<out>/<table>/<task>/<method>/seed_<s>/results.json`` written by ``experiments/run.py`` and
prints, per table, one row per method and one column per task: ``mean ± std (n seeds)`` of the
final dev metric (in %, sample standard deviation, ddof = 1), and the paper's number in
parentheses where the config has one.

Example::

  rows = collect("runs/experiments")
  print(markdown_tables(rows))
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def collect(out_dir: str) -> list[dict[str, Any]]:
  """One record per finished run: table, task, method, seed, metric, value, paper."""
  records = []
  pattern = os.path.join(out_dir, "*", "*", "*", "seed_*", "results.json")
  for path in sorted(glob.glob(pattern)):
    with open(path, encoding="utf-8") as handle:
      results = json.load(handle)
    if not results.get("final"):
      continue
    table, task = results["config"].split("/", 1)
    metric = results["metric"]
    records.append({"table": table, "task": task, "method": results["method"],
                    "seed": results["seed"], "metric": metric,
                    "value": float(results["final"][metric]), "paper": results.get("paper")})
  return records


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
  values = list(values)
  if not values:
    raise ValueError("mean_std of no values")
  mean = sum(values) / len(values)
  if len(values) == 1:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_cell(values: list[float], paper: float | None) -> str:
  mean, std = mean_std(100.0 * v for v in values)
  cell = f"{mean:.2f} ± {std:.2f} ({len(values)})"
  return cell + (f" [paper {paper:.2f}]" if paper is not None else "")


def markdown_tables(records: Iterable[Mapping[str, Any]]) -> str:
  """One markdown table per paper table: methods × tasks."""
  grouped: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
  papers: dict[tuple[str, str, str], float | None] = {}
  metrics: dict[tuple[str, str], str] = {}
  for record in records:
    key = (record["method"], record["task"])
    grouped[record["table"]][key].append(record["value"])
    papers[(record["table"], *key)] = record.get("paper")
    metrics[(record["table"], record["task"])] = record["metric"]
  out = []
  for table, cells in sorted(grouped.items()):
    tasks = sorted({task for _, task in cells})
    methods = sorted({method for method, _ in cells})
    header = [f"{task} ({metrics[(table, task)]})" for task in tasks]
    out.append(f"### {table}\n")
    out.append("| method | " + " | ".join(header) + " |")
    out.append("|---" * (len(tasks) + 1) + "|")
    for method in methods:
      row = [format_cell(cells[(method, task)], papers.get((table, method, task)))
             if (method, task) in cells else "—" for task in tasks]
      out.append(f"| {method} | " + " | ".join(row) + " |")
    out.append("")
  return "\n".join(out)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out_dir", nargs="?", default="runs/experiments")
  parser.add_argument("--output", help="also write the markdown here")
  args = parser.parse_args(argv)
  records = collect(args.out_dir)
  if not records:
    raise SystemExit(f"no results.json under {args.out_dir}")
  text = markdown_tables(records)
  print(text)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as handle:
      handle.write(text)
  return text


if __name__ == "__main__":
  main()
