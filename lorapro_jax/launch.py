"""One process per GPU on this host, as a cluster runs them: ``python -m lorapro_jax.launch``.

JAX has no ``torchrun``. A job of several processes on one host needs each process started with
the coordinator's address, the number of processes, its own index and the GPUs it drives; the
library reads them in :func:`lorapro_jax.sharding.initialize_distributed` (``finetune``,
``experiments/run.py`` and the benchmarks call it). :func:`launch` starts the processes with
those variables set and waits for all of them. When one fails, it stops the others (a process
whose peer died would otherwise wait in a collective until its own timeout) and returns the
failed process's exit status; Ctrl-C stops them all.

Why one process per GPU: on 2 H200s the 1.1B LoRA step, data parallel, keeps 97.5-98.1% of one
GPU's speed as two processes against 95.8-96.0% as one process driving both GPUs, whose single
host thread launches both GPUs' programs (two calls, ``benchmarks/README.md``, issue 15). Each
process sees every GPU (``JAX_LOCAL_DEVICE_IDS`` names its own; ``CUDA_VISIBLE_DEVICES`` would
hide the others from it and from NCCL's peer-to-peer links).

Command line (everything after ``--`` is the command each process runs)::

  python -m lorapro_jax.launch --processes 2 -- \\
      python -m lorapro_jax.finetune --model ./llama --mesh 2,1 ...

Example (two CPU processes, two devices each, one mesh of four; ``devices_per_process=0`` leaves
the device choice to JAX, as on CPUs):

>>> import os, sys
>>> script = ("from lorapro_jax.sharding import initialize_distributed; "
...           "import jax; i, n = initialize_distributed(); "
...           "assert (n, jax.device_count(), jax.local_device_count()) == (2, 4, 2)")
>>> launch([sys.executable, "-c", script], processes=2, devices_per_process=0,
...        env={**os.environ, "JAX_PLATFORMS": "cpu",
...             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
0
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

# Variables that describe another job's cluster: a launched process must see only ours.
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                     "JAX_LOCAL_DEVICE_IDS", "LORAPRO_DISTRIBUTED")
STOP_GRACE_S = 10.0  # after SIGTERM, how long a process may take to exit before SIGKILL


def free_port() -> int:
  """A TCP port of localhost that nothing listens on now (for the coordinator)."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def process_environment(process_id: int, processes: int, port: int, devices_per_process: int,
                        env: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of process ``process_id``: ``env`` (default ``os.environ``) without any
  other cluster's variables, plus ours; with ``devices_per_process = k > 0`` it drives the GPUs
  ``k * process_id, ..., k * process_id + k - 1`` (``JAX_LOCAL_DEVICE_IDS``)."""
  env = os.environ if env is None else env
  out = {name: value for name, value in env.items() if name not in CLUSTER_VARIABLES}
  out.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(process_id))
  if devices_per_process:
    first = devices_per_process * process_id
    out["JAX_LOCAL_DEVICE_IDS"] = ",".join(
        str(device) for device in range(first, first + devices_per_process))
  return out


def _stop(running: Sequence[subprocess.Popen]) -> None:
  for process in running:
    if process.poll() is None:
      process.terminate()
  deadline = time.monotonic() + STOP_GRACE_S
  for process in running:
    try:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def launch(command: Sequence[str], processes: int, devices_per_process: int = 1,
           port: int | None = None, env: Mapping[str, str] | None = None,
           log_dir: str | os.PathLike | None = None, timeout_s: float | None = None) -> int:
  """Runs ``command`` as ``processes`` processes of one JAX job on this host; returns 0 when all
  succeed, else the exit status of the first that failed (the others are stopped; a process
  killed by signal ``n`` counts as ``128 + n``, as in a shell).

  ``devices_per_process``: GPUs each process drives (``0``: leave it to JAX, e.g. on CPUs);
  ``port``: the coordinator's port (default: a free one); ``env``: every process's environment
  (default ``os.environ``; ``launch`` sets the cluster's variables in it); ``log_dir``: each
  process's output is appended to ``<log_dir>/process_<i>.log`` (default: this terminal);
  ``timeout_s``: stop them all after this long and return 124, as ``timeout`` does.
  """
  command = list(command)
  if not command:
    raise ValueError("launch needs a command to run, e.g. ['python', '-m', "
                     "'lorapro_jax.finetune', ...]")
  if not isinstance(processes, int) or processes < 1:
    raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
  if not isinstance(devices_per_process, int) or devices_per_process < 0:
    raise ValueError(f"devices_per_process must be an integer >= 0, got {devices_per_process!r}")
  port = free_port() if port is None else port
  logs = []
  if log_dir is not None:
    os.makedirs(log_dir, exist_ok=True)
  running: list[subprocess.Popen] = []
  try:
    for process_id in range(processes):
      output = None
      if log_dir is not None:
        output = open(os.path.join(log_dir, f"process_{process_id}.log"), "ab")
        logs.append(output)
      running.append(subprocess.Popen(
          command, stdout=output, stderr=subprocess.STDOUT if output else None,
          env=process_environment(process_id, processes, port, devices_per_process, env)))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
      codes = [process.poll() for process in running]
      failed = [code for code in codes if code not in (None, 0)]
      if failed:
        return failed[0] if failed[0] > 0 else 128 - failed[0]
      if all(code == 0 for code in codes):
        return 0
      if deadline is not None and time.monotonic() > deadline:
        return 124
      time.sleep(0.1)
  finally:
    _stop(running)  # nothing is left running, whatever ended the wait (Ctrl-C included)
    for log in logs:
      log.close()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lorapro_jax.launch",
      description="Run a command as N processes of one JAX job on this host (one per GPU).",
      epilog="example: python -m lorapro_jax.launch --processes 2 -- python -m "
             "lorapro_jax.finetune --mesh 2,1 ...")
  parser.add_argument("--processes", type=int, required=True, help="how many processes")
  parser.add_argument("--devices-per-process", type=int, default=1,
                      help="GPUs each process drives (default 1; 0: let JAX choose, e.g. CPUs)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--log-dir", default=None,
                      help="append each process's output to LOG_DIR/process_<i>.log")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before all are stopped")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after --, e.g. -- python -m lorapro_jax.finetune ...")
  try:
    return launch(command, args.processes, args.devices_per_process, args.port,
                  log_dir=args.log_dir, timeout_s=args.timeout)
  except ValueError as error:
    parser.error(str(error))


if __name__ == "__main__":
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the processes on SIGTERM too
  sys.exit(main())
