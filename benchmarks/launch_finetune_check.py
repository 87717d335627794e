"""GPU check of the one-process-per-GPU road (issue 15): ``python -m lorapro_jax.launch`` running
``python -m lorapro_jax.finetune --mesh N,1`` as N processes gives the losses of one process
driving the same mesh and of one GPU.

A tiny Llama checkpoint with its tokenizer and GSM8K-style rows is written first
(``tests/tiny_llm.py``, head dim 64 so that the bf16 steps take cuDNN's attention on GPUs); then
the same LoRA fine-tuning runs three ways: one GPU, one process on an (N, 1) mesh, N launched
processes on that mesh. Prints the losses, writes ``OUT/launch_finetune_check.json`` and exits 1
when a run fails or when its first two losses (before and after the first update) differ from
the one-GPU run's, or the launched processes' from the one process's, by more than
``--tolerance``; later losses are printed (bf16 round-off, summed in another order on another
mesh, grows with training in every pair of runs alike).

Usage: NCCL_NVLS_ENABLE=0 python benchmarks/launch_finetune_check.py --out DIR [--processes 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))


def finetune_argv(files: dict[str, str], out: str, mesh: str | None) -> list[str]:
  argv = [sys.executable, "-m", "lorapro_jax.finetune", "--model", files["model"], "--train",
          files["data"], "--out", out, "--method", "lora", "--batch-size", "8",
          "--max-length", "64", "--epochs", "3", "--learning-rate", "1e-2",
          "--warmup-ratio", "0", "--save-every", "1000", "--no-progress"]
  return argv + (["--mesh", mesh] if mesh else [])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--tolerance", type=float, default=0.05,
                      help="largest difference of the first two losses between runs")
  args = parser.parse_args(argv)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
  # this process only writes the checkpoint: on the CPU, so that it holds no GPU memory (JAX
  # would reserve most of every GPU) while the runs train
  os.environ["JAX_PLATFORMS"] = "cpu"
  from tiny_llm import ROWS, write_tiny_llm
  os.makedirs(args.out, exist_ok=True)
  files = write_tiny_llm(os.path.join(args.out, "inputs"), rows=ROWS * 4, hidden_size=256)
  mesh = f"{args.processes},1"
  launched_env = env
  if env.get("JAX_PLATFORMS") == "cpu":  # a dry run on CPUs: one device per process, gloo
    launched_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                    "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  runs = {
      "one GPU": (finetune_argv(files, os.path.join(args.out, "one_gpu"), None),
                  {**env, "CUDA_VISIBLE_DEVICES": "0"}),
      f"one process, mesh {mesh}": (finetune_argv(files, os.path.join(args.out, "one"), mesh), env),
      f"{args.processes} processes, mesh {mesh}": (
          [sys.executable, "-m", "lorapro_jax.launch", "--processes", str(args.processes),
           "--log-dir", os.path.join(args.out, "launch_logs"), "--"]
          + finetune_argv(files, os.path.join(args.out, "launched"), mesh), launched_env)}
  report, failed = {}, False
  for name, (command, run_env) in runs.items():
    status = subprocess.run(command, env=run_env, cwd=REPO).returncode
    out = command[command.index("--out") + 1]
    losses = None
    if status == 0:
      with open(os.path.join(out, "results.json")) as handle:
        losses = [entry["loss"] for entry in json.load(handle)["history"]]
    report[name] = {"status": status, "losses": losses}
    failed |= status != 0
  one_gpu, one_process, launched = (run["losses"] for run in report.values())
  if not failed:
    # the first loss is the same parameters on the same batch, the second the same update of
    # them: round-off apart, equal in all three runs. Later bf16 steps at this learning rate
    # (the loss falls from 10 to 1.5 in six steps) amplify round-off in every pair of runs alike
    # (on 2 H200s the one-process mesh run ends 0.5 from the one-GPU run): printed, not checked.
    for run in report.values():
      run["first_losses_difference"] = max(abs(a - b) for a, b in zip(run["losses"][:2],
                                                                        one_gpu[:2]))
      run["difference_to_one_gpu"] = max(abs(a - b) for a, b in zip(run["losses"], one_gpu))
    report[list(report)[2]]["first_losses_difference_to_one_process"] = max(
        abs(a - b) for a, b in zip(launched[:2], one_process[:2]))
    failed = (max(run["first_losses_difference"] for run in report.values()) > args.tolerance
              or report[list(report)[2]]["first_losses_difference_to_one_process"]
              > args.tolerance)
  for name, run in report.items():
    losses = " ".join(f"{x:.4f}" for x in run["losses"] or [])
    print(f"{name:28s} status {run['status']}  losses {losses}  "
          f"first two |diff| {run.get('first_losses_difference', float('nan')):.4f}"
          + (f" (to one process {run['first_losses_difference_to_one_process']:.4f})"
             if "first_losses_difference_to_one_process" in run else "")
          + f"  all steps, to one GPU {run.get('difference_to_one_gpu', float('nan')):.4f}")
  with open(os.path.join(args.out, "launch_finetune_check.json"), "w") as handle:
    json.dump(report, handle, indent=1)
  print("FAILED" if failed else "ALL OK")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
