"""Multi-host training without TPUs: two processes on localhost, joined by
``jax.distributed.initialize`` (CPU backend, two fake devices each, gloo collectives), train on one
global mesh of four devices exactly as a TPU pod script does, checkpoint with Orbax into a shared
directory, restore, and must give the losses of the same script run as ONE process on four
devices.

The per-process script is ``tests/multihost_driver.py`` (its docstring says what each process
does). Two runs: ``lora`` on a (data=2, fsdp=2) mesh, whose data axis spans the processes
(gradients are reduced across them), and ``lora_pro_full`` on (data=1, fsdp=4), whose fsdp axis
spans them (frozen kernels and the full-rank moments are split across processes and gathered
over gloo; Orbax writes each process's shards). Each process feeds only its own rows of every
global batch (``sharding.mesh_batches``), so a process that fed the wrong rows (or a batch
assembled in the wrong place) would change the losses. The cluster also loads a Hugging Face
checkpoint onto its mesh with ``load_pretrained`` (each process reads on its own CPU).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lorapro_jax.adapters import dotted
from lorapro_jax.launch import launch
from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, load_pretrained, save_pretrained
from lorapro_jax.trees import named_leaves

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_driver.py")
REPO = os.path.dirname(os.path.dirname(DRIVER))
RUNS = "lora:2x2,lora_pro_full:1x4"
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 150
# Environment the driver must not inherit from this test process (8 fake devices, or a cluster
# that some outer job described).
INHERITED_CLUSTER = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                     "LORAPRO_DISTRIBUTED", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS")


def _driver_env(local_devices: int) -> dict[str, str]:
  env = {name: value for name, value in os.environ.items() if name not in INHERITED_CLUSTER}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
             PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  cache_dir = jax.config.jax_compilation_cache_dir  # the suite's (conftest.py): reruns compile less
  if cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  return env


def _driver(out: str, checkpoints: str, *extra: str) -> list[str]:
  return [sys.executable, DRIVER, "--out", out, "--checkpoints", checkpoints, "--runs", RUNS,
          *extra]


def _write_pretrained(directory) -> dict[str, float]:
  """A tiny decoder checkpoint for the cluster to load onto its mesh; the sum of every tensor
  as one process reads it."""
  model = DecoderForCausalLM(DecoderConfig.tiny())
  params = model.init(jax.random.key(5), np.zeros((1, 4), np.int32))["params"]
  save_pretrained(model, params, directory, dtype=np.float32)
  _, loaded = load_pretrained(directory)
  return {dotted(path): float(np.sum(np.asarray(leaf, np.float32)))
          for path, leaf in named_leaves(loaded)}


def _read(out: str, process_index: int) -> dict:
  with open(os.path.join(out, f"process_{process_index}.json"), encoding="utf-8") as handle:
    return json.load(handle)


def _run_all(workdir):
  """(one JSON per process of the 2-process cluster, the 1-process reference's JSON, the
  cluster's checkpoint root). The cluster is started by :func:`lorapro_jax.launch.launch`, as a
  user starts one process per GPU; its logs are ``<workdir>/process_<i>.log``."""
  cluster_out, single_out = str(workdir / "cluster"), str(workdir / "single")
  cluster_checkpoints = str(workdir / "cluster_checkpoints")
  single_log = workdir / "single_process.log"
  pretrained_sums = _write_pretrained(workdir / "pretrained")
  with open(single_log, "wb") as log:
    # The reference runs meanwhile: the cluster's processes often wait for each other.
    single = subprocess.Popen(_driver(single_out, str(workdir / "single_checkpoints")),
                              env=_driver_env(PROCESSES * DEVICES_PER_PROCESS), stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
    try:
      status = launch(_driver(cluster_out, cluster_checkpoints, "--pretrained",
                              str(workdir / "pretrained")), PROCESSES, devices_per_process=0,
                      env=_driver_env(DEVICES_PER_PROCESS), log_dir=workdir, timeout_s=TIMEOUT_S)
      single_status = single.wait(timeout=TIMEOUT_S)
    finally:
      if single.poll() is None:
        single.kill()
        single.wait()
  if status or single_status:
    logs = [workdir / f"process_{index}.log" for index in range(PROCESSES)] + [single_log]
    pytest.fail(f"multi-host driver: cluster status {status}, single process {single_status}\n"
                + "\n".join(f"----- {path.name} -----\n" + path.read_text(errors="replace")[-6000:]
                            for path in logs), pytrace=False)
  return ([_read(cluster_out, index) for index in range(PROCESSES)], _read(single_out, 0),
          cluster_checkpoints, pretrained_sums)


def _check_the_processes_form_one_cluster_with_a_global_mesh(results):
  cluster, single, _, _ = results
  for index, process in enumerate(cluster):
    assert (process["process_index"], process["process_count"]) == (index, PROCESSES)
    assert process["device_count"] == PROCESSES * DEVICES_PER_PROCESS
    assert process["local_device_count"] == DEVICES_PER_PROCESS
    for run in process["runs"]:
      # each mesh holds both processes' devices (process 0's first, so its rows come first)
      assert run["mesh_processes"] == [0, 0, 1, 1], run["method"]
  assert (single["process_count"], single["device_count"]) == (1, PROCESSES * DEVICES_PER_PROCESS)


def _check_both_processes_see_the_same_training(results):
  cluster, _, _, _ = results
  first, second = cluster
  for run_0, run_1 in zip(first["runs"], second["runs"], strict=True):
    # the loss is a replicated output and the adapters are gathered: identical on every process
    assert run_0["losses"] == run_1["losses"], run_0["method"]
    assert run_0["final_trainable"] == run_1["final_trainable"], run_0["method"]


def _check_two_processes_match_one_process(results):
  cluster, single, _, _ = results
  assert [run["method"] for run in cluster[0]["runs"]] == ["lora", "lora_pro_full"]
  for multi, alone in zip(cluster[0]["runs"], single["runs"], strict=True):
    method = multi["method"]
    assert (multi["method"], multi["mesh"]) == (alone["method"], alone["mesh"])
    assert len(multi["losses"]) == 5
    # the same global batches summed in another order and over gloo: float32 round-off only
    np.testing.assert_allclose(multi["losses"], alone["losses"], rtol=1e-5, err_msg=method)
    assert multi["final_trainable"].keys() == alone["final_trainable"].keys()
    for path, value in multi["final_trainable"].items():
      np.testing.assert_allclose(value, alone["final_trainable"][path], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{method} {path}")
  # The steps update: both methods start from the same adapters on the same first batch, then
  # their different updates (AdamW on the factors, LoRA-Pro's full-rank moments) part their ways.
  lora, lora_pro_full = cluster[0]["runs"]
  assert lora["losses"][0] == pytest.approx(lora_pro_full["losses"][0], rel=1e-6)  # other mesh
  assert max(abs(a - b) for a, b in zip(lora["losses"][1:], lora_pro_full["losses"][1:])) > 1e-2
  assert max(np.abs(np.subtract(value, lora_pro_full["final_trainable"][path])).max()
             for path, value in lora["final_trainable"].items()) > 1e-2


def _check_checkpoint_restored_on_every_process_resumes_exactly(results):
  cluster, _, checkpoints, _ = results
  for process in cluster:
    for run in process["runs"]:
      # the driver restored step 3 into a fresh state on each process and retrained steps 4-5;
      # it also checked the final adapters bit for bit
      assert run["saved_steps"] == [3, 5], run["method"]
      assert run["resumed_losses"] == run["losses"][3:], run["method"]
  for run in cluster[0]["runs"]:
    directory = os.path.join(checkpoints, "{}_{}x{}".format(run["method"], *run["mesh"]))
    assert {"3", "5"} <= set(os.listdir(directory)), directory


def _check_full_rank_moments_are_split_across_the_processes(results):
  cluster, _, _, _ = results
  for process in cluster:
    lora, lora_pro_full = process["runs"]
    assert lora["full_rank_moment_fractions"] == []  # AdamW on the factors: no full-rank moment
    # mu and nu of the three kernels: a quarter on each device of the 4-wide fsdp axis, which
    # spans both processes, so each process holds half of every moment and writes it to Orbax
    assert lora_pro_full["full_rank_moment_fractions"] == [0.25] * 6


def _check_each_process_loads_a_pretrained_checkpoint_onto_the_global_mesh(results):
  cluster, _, _, expected = results
  # each process read the file on its own CPU and placed its shards of the (1, 4) mesh: together
  # the distinct shards of every tensor add up to the file's tensor, and a shard that several
  # devices hold (a replicated tensor) holds the same values on each
  for name, total in expected.items():
    shard_sums = {}
    for process in cluster:
      assert process["pretrained_shards"].keys() == expected.keys()
      for index, shard_sum in process["pretrained_shards"][name]:
        assert shard_sums.setdefault(index, shard_sum) == shard_sum, (name, index)
    assert sum(shard_sums.values()) == pytest.approx(total, rel=1e-5, abs=1e-6), name


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
  """Two processes on one global mesh = one process on four devices, checkpoints included."""
  # One test, not five: the processes run once even when pytest-xdist spreads a module's tests
  # over workers (a module fixture would then run on each).
  results = _run_all(tmp_path)
  _check_the_processes_form_one_cluster_with_a_global_mesh(results)
  _check_both_processes_see_the_same_training(results)
  _check_two_processes_match_one_process(results)
  _check_checkpoint_restored_on_every_process_resumes_exactly(results)
  _check_full_rank_moments_are_split_across_the_processes(results)
  _check_each_process_loads_a_pretrained_checkpoint_onto_the_global_mesh(results)
