"""``lorapro_jax.launch``: each process gets its own cluster variables, a failure stops the rest,
nothing outlives the launcher. (The real job it starts, two processes training one mesh with
checkpoints, is tests/test_multihost.py.)"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from lorapro_jax.launch import launch, main, process_environment

# Each process writes what it was given, then behaves as BEHAVIOUR_<its id> says.
CHILD = """
import json, os, sys, time
i = os.environ["JAX_PROCESS_ID"]
names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
         "LORAPRO_DISTRIBUTED", "MY_SETTING")
with open(os.path.join(sys.argv[1], f"env_{i}.json"), "w") as f:
  json.dump({name: os.environ.get(name) for name in names}, f)
behaviour = os.environ.get(f"BEHAVIOUR_{i}", "ok")
if behaviour == "sleep":
  time.sleep(120)
  open(os.path.join(sys.argv[1], f"woke_{i}"), "w").close()
elif behaviour.startswith("exit"):
  sys.exit(int(behaviour[4:]))
elif behaviour == "abort":
  os.abort()
"""


def _env(**extra):
  return {**os.environ, "LORAPRO_DISTRIBUTED": "auto", "JAX_PROCESS_ID": "7", **extra}


def test_every_process_gets_the_cluster_and_its_own_gpus(tmp_path):
  status = launch([sys.executable, "-c", CHILD, str(tmp_path)], processes=3,
                  devices_per_process=2, port=12345, env=_env(MY_SETTING="kept"),
                  log_dir=tmp_path / "logs")
  assert status == 0
  seen = [json.loads((tmp_path / f"env_{i}.json").read_text()) for i in range(3)]
  assert seen == [{"JAX_COORDINATOR_ADDRESS": "localhost:12345", "JAX_NUM_PROCESSES": "3",
                   "JAX_PROCESS_ID": str(i), "JAX_LOCAL_DEVICE_IDS": ids,
                   "LORAPRO_DISTRIBUTED": None,  # another cluster's variable is dropped
                   "MY_SETTING": "kept"}
                  for i, ids in enumerate(["0,1", "2,3", "4,5"])]
  assert sorted(os.listdir(tmp_path / "logs")) == [f"process_{i}.log" for i in range(3)]


def test_a_failed_process_stops_the_others_and_gives_its_status(tmp_path):
  start = time.monotonic()
  status = launch([sys.executable, "-c", CHILD, str(tmp_path)], processes=2,
                  env=_env(BEHAVIOUR_0="sleep", BEHAVIOUR_1="exit3"), log_dir=tmp_path)
  assert status == 3
  assert time.monotonic() - start < 60  # not the sleeper's 120 s
  assert not (tmp_path / "woke_0").exists()


def test_a_process_killed_by_a_signal_gives_128_plus_the_signal(tmp_path):
  status = launch([sys.executable, "-c", CHILD, str(tmp_path)], processes=2,
                  env=_env(BEHAVIOUR_0="sleep", BEHAVIOUR_1="abort"), log_dir=tmp_path)
  assert status == 128 + signal.SIGABRT


def test_logs_are_appended_not_overwritten(tmp_path):
  (tmp_path / "process_0.log").write_text("an earlier run\n")
  assert launch([sys.executable, "-c", "print('this run')"], processes=1, env=_env(),
                log_dir=tmp_path) == 0
  assert (tmp_path / "process_0.log").read_text() == "an earlier run\nthis run\n"


def test_a_timeout_stops_every_process_and_returns_124(tmp_path):
  status = launch([sys.executable, "-c", CHILD, str(tmp_path)], processes=2, timeout_s=2,
                  env=_env(BEHAVIOUR_0="sleep", BEHAVIOUR_1="sleep"), log_dir=tmp_path)
  assert status == 124
  assert not any(name.startswith("woke") for name in os.listdir(tmp_path))


def test_without_devices_per_process_jax_chooses_the_devices():
  env = process_environment(1, 2, 999, devices_per_process=0,
                            env={"JAX_LOCAL_DEVICE_IDS": "5", "PATH": "/bin"})
  assert env == {"PATH": "/bin", "JAX_COORDINATOR_ADDRESS": "localhost:999",
                 "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(command=[], processes=2), "needs a command"),
    (dict(command=["true"], processes=0), "processes must be an integer >= 1, got 0"),
    (dict(command=["true"], processes=2, devices_per_process=-1),
     "devices_per_process must be an integer >= 0, got -1"),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    launch(**kwargs)


def test_the_command_line_needs_a_command_after_the_separator(capsys):
  with pytest.raises(SystemExit) as stop:
    main(["--processes", "2", "--"])
  assert stop.value.code == 2
  assert "give the command after --" in capsys.readouterr().err


def test_the_command_line_runs_the_command(tmp_path):
  assert main(["--processes", "2", "--devices-per-process", "0", "--log-dir", str(tmp_path),
               "--", sys.executable, "-c", CHILD, str(tmp_path)]) == 0
  assert [json.loads((tmp_path / f"env_{i}.json").read_text())["JAX_PROCESS_ID"]
          for i in range(2)] == ["0", "1"]
