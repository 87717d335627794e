"""Orbax train-state checkpoints: SIGKILL-and-resume is bit-identical, keep-N / best-by-metric,
restore onto another mesh, one writer per directory (a second one, in this process or another,
gets a clear error; a crashed one's directory is taken over by resuming), no save dropped
silently, mismatched / corrupt checkpoints raise clear errors and change nothing on disk."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from lorapro_jax.adapters import dotted
from lorapro_jax.checkpoint import (LOCK_FILE, CheckpointCorruptError, CheckpointLockedError,
                                    CheckpointMismatchError, TrainCheckpointer)
from lorapro_jax.lora_pro import lora_pro_full
from lorapro_jax.train import TrainState
from lorapro_jax.trees import named_leaves

DRIVER = os.path.join(os.path.dirname(__file__), "resume_driver.py")
CONFIG = {"rank": 2, "alpha": 4.0}


def _host(tree):
  """Leaves as numpy, typed keys as their raw data, by leaf path."""
  return {dotted(path): np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
      leaf.dtype, jax.dtypes.prng_key) else leaf) for path, leaf in named_leaves(tree)}


def _assert_bitwise_equal(got, want):
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(np.atleast_1d(got[name]).view(np.uint8),
                                  np.atleast_1d(want[name]).view(np.uint8),
                                  err_msg=name)


def _tree_digest(directory):
  """Names and contents of every file under ``directory``."""
  digest = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        digest[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
  return digest


def _state(rank=2, n_in=8, n_out=4, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  trainable = {"dense": {"lora_a": jax.random.normal(keys[0], (n_in, rank)),
                         "lora_b": jax.random.normal(keys[1], (rank, n_out))},
               "head": {"kernel": jax.random.normal(keys[2], (n_out, 3))}}
  optimizer = lora_pro_full(1e-2, 2.0)
  state = TrainState.create(trainable, optimizer, jax.random.key(seed))
  grads = jax.tree.map(jnp.ones_like, trainable)
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  return state.replace(step=state.step + 1, trainable=optax.apply_updates(trainable, updates),
                       opt_state=opt_state)


# ------------------------------------------------------------------------- kill and resume


def _driver_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one device, as a plain training run
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
  return env


def _start_driver(workdir, *extra):
  command = [sys.executable, DRIVER, "--dir", os.path.join(workdir, "ckpt"),
             "--out", os.path.join(workdir, "final.safetensors"), *extra]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          env=_driver_env(), text=True)


def _run_driver(workdir, *extra, kill_after_line=None, delay=0.0):
  """Runs the driver; with ``kill_after_line`` SIGKILLs it ``delay`` s after that output line.
  Returns (return code, output lines)."""
  process = _start_driver(workdir, *extra)
  lines = []
  for line in process.stdout:
    lines.append(line.strip())
    if kill_after_line is not None and len(lines) == kill_after_line:
      time.sleep(delay)
      process.send_signal(signal.SIGKILL)
      break
  lines += [line.strip() for line in process.stdout]
  return process.wait(), lines


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, lines = _run_driver(workdir)
  assert code == 0 and lines[-1] == "done", lines
  return load_file(os.path.join(workdir, "final.safetensors"))


def test_sigkill_during_async_save_resumes_bit_identical(tmp_path, uninterrupted):
  workdir = str(tmp_path)
  code, lines = _run_driver(workdir, "--kill-after-save", "9")
  assert code == -signal.SIGKILL and lines[-1] == "save 9"
  checkpoint_dir = os.path.join(workdir, "ckpt")
  # step 9 was being written when the process died: a temporary directory, never a step
  leftovers = [name for name in os.listdir(checkpoint_dir) if name.startswith("9.")]
  assert leftovers and "9" not in os.listdir(checkpoint_dir), os.listdir(checkpoint_dir)
  assert TrainCheckpointer(checkpoint_dir, None).all_steps() == [3, 6]
  # a second kill, at a random point of the resumed run, then to the end
  code, lines = _run_driver(workdir, kill_after_line=5, delay=0.003)
  assert lines[0] == "resumed 6" and code == -signal.SIGKILL
  code, lines = _run_driver(workdir)
  assert code == 0 and lines[0].startswith("resumed") and lines[-1] == "done"
  _assert_bitwise_equal(load_file(os.path.join(workdir, "final.safetensors")), uninterrupted)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_points_resumes_bit_identical(tmp_path, uninterrupted, seed):
  workdir, chooser = str(tmp_path), random.Random(seed)
  kills = 0
  for _ in range(2):
    code, lines = _run_driver(workdir, kill_after_line=chooser.randint(2, 14),
                              delay=chooser.uniform(0.0, 0.01))
    if code == 0:
      break
    assert code == -signal.SIGKILL
    kills += 1
  assert kills >= 1
  if code != 0:
    code, lines = _run_driver(workdir)
  assert code == 0 and lines[0].startswith("resumed"), lines
  _assert_bitwise_equal(load_file(os.path.join(workdir, "final.safetensors")), uninterrupted)


def test_second_process_cannot_write_and_a_crashed_writer_is_taken_over(tmp_path, uninterrupted):
  workdir = str(tmp_path)
  directory = os.path.join(workdir, "ckpt")
  driver = _start_driver(workdir)
  for line in driver.stdout:
    if line.strip() == "save 6":
      break
  # the first writer, frozen (its background write of step 6 too) while it holds the directory
  driver.send_signal(signal.SIGSTOP)
  try:
    steps, before = TrainCheckpointer(directory, None).all_steps(), _tree_digest(directory)
    intruder = TrainCheckpointer(directory, CONFIG, async_save=False)
    with pytest.raises(CheckpointLockedError, match=rf"being written by another checkpointer "
                                                    rf".*\"pid\": {driver.pid}"):
      intruder.save(_state(), step=100)
    intruder.close()
    assert _tree_digest(directory) == before and steps[-1] in (3, 6)
  finally:
    driver.send_signal(signal.SIGKILL)  # the writer crashes: its lock dies with it
    driver.wait()
  code, lines = _run_driver(workdir)  # resuming takes the directory over
  assert code == 0 and lines[0].startswith("resumed"), lines
  _assert_bitwise_equal(load_file(os.path.join(workdir, "final.safetensors")), uninterrupted)


# --------------------------------------------------------------------- in-process behaviour


def test_roundtrip_keeps_the_whole_state(tmp_path):
  state = _state()
  with TrainCheckpointer(tmp_path, CONFIG, async_save=True) as checkpoints:
    checkpoints.save(state, data_position={"epoch": 2, "batch": 17})
    checkpoints.wait_until_finished()
    restored = checkpoints.restore(jax.tree.map(jnp.zeros_like, state))
  assert restored.step == 1 and restored.data_position == {"epoch": 2, "batch": 17}
  got, want = _host(restored.state), _host(state)
  _assert_bitwise_equal(got, want)
  assert "rng" in got and any(name.startswith("opt_state.") for name in got)
  assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
  stored = TrainCheckpointer(tmp_path, CONFIG).stored_layout(1)
  assert sorted(dotted(path) for path in stored) == sorted(want)


def test_keep_latest_and_best_by_metric(tmp_path):
  state = _state()
  accuracy = {1: 0.3, 2: 0.9, 3: 0.5, 4: 0.1, 5: 0.2, 6: 0.4}
  with TrainCheckpointer(tmp_path, CONFIG, keep=2, best_metric="accuracy", keep_best=1,
                         async_save=False) as checkpoints:
    for step, value in accuracy.items():
      checkpoints.save(state, step=step, metrics={"accuracy": value})
    assert checkpoints.all_steps() == [2, 5, 6]  # the best (2) and the newest two
    assert checkpoints.best_step() == 2
    assert checkpoints.restore(state, step=2).metrics == {"accuracy": 0.9}
  with TrainCheckpointer(tmp_path / "min", CONFIG, keep=1, best_metric="loss", best_mode="min",
                         async_save=False) as checkpoints:
    for step, value in {1: 3.0, 2: 1.0, 3: 2.0}.items():
      checkpoints.save(state, step=step, metrics={"loss": value})
    assert checkpoints.all_steps() == [2, 3] and checkpoints.best_step() == 2


def test_restore_onto_a_different_mesh(tmp_path):
  devices = np.array(jax.devices())
  assert devices.size == 8
  state = _state(n_in=8, n_out=8)
  row_mesh = jax.sharding.Mesh(devices.reshape(8), ("data",))
  saved = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
      row_mesh, P("data") if x.ndim == 2 and x.shape[0] == 8 else P())), state)
  with TrainCheckpointer(tmp_path, CONFIG) as checkpoints:
    checkpoints.save(saved)
  grid = jax.sharding.Mesh(devices.reshape(2, 4), ("x", "y"))

  def placement(x):
    spec = P(None, "y") if x.ndim == 2 and x.shape[-1] == 8 else P()
    return NamedSharding(grid, spec)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=placement(x)), state)
  restored = TrainCheckpointer(tmp_path, CONFIG).restore(abstract).state
  _assert_bitwise_equal(_host(restored), _host(state))
  for array in jax.tree.leaves(restored):
    assert array.sharding == placement(array), (array.shape, array.sharding)
  # the full-rank LoRA-Pro moments (8 x 8) are split over "y" now, over "data" when saved
  wide = [x for x in jax.tree.leaves(restored.opt_state) if x.shape == (8, 8)]
  assert len(wide) == 2 and all(x.sharding.spec == P(None, "y") for x in wide)
  # an explicit shardings tree overrides the target's own placement
  replicated = jax.tree.map(lambda _: NamedSharding(grid, P()), state)
  again = TrainCheckpointer(tmp_path, CONFIG).restore(state, shardings=replicated).state
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(again.opt_state))


@settings(max_examples=4, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.sampled_from(["float32",
                                                                                 "bfloat16"]))
def test_random_shapes_roundtrip(tmp_path_factory, rank, n_in, n_out, dtype):
  tree = {"step": jnp.int32(5),
          "trainable": {"q": {"lora_a": jnp.full((3, n_in, rank), 0.5, dtype),
                              "lora_b": jnp.arange(3 * rank * n_out, dtype=dtype).reshape(
                                  3, rank, n_out),
                              "lora_c": jnp.linspace(-1, 1, 3 * rank).reshape(3, rank)}},
          "mask": jnp.arange(rank) % 2 == 0, "position": np.int64(11)}
  directory = tmp_path_factory.mktemp("shapes")
  with TrainCheckpointer(directory, None, async_save=False) as checkpoints:
    checkpoints.save(tree)
    target = jax.tree.map(lambda x: np.zeros_like(x) if isinstance(x, np.generic) else
                          jnp.zeros_like(x), tree)
    restored = checkpoints.restore(target).state
  _assert_bitwise_equal(_host(restored), _host(tree))


# ------------------------------------------------------------- one writer, nothing dropped


def test_a_second_writer_gets_a_clear_error_and_writes_nothing(tmp_path):
  state = _state()
  first = TrainCheckpointer(tmp_path, CONFIG, async_save=False)
  first.save(state, step=1)
  before = _tree_digest(tmp_path)
  second = TrainCheckpointer(tmp_path, CONFIG, async_save=False)
  with pytest.raises(CheckpointLockedError, match=rf"{tmp_path} is being written by another "
                                                  rf"checkpointer \(.*\"pid\": {os.getpid()}"):
    second.save(state, step=2)
  assert _tree_digest(tmp_path) == before
  first.save(state, step=2)  # the first writer carries on
  first.close()  # ... and hands the directory over
  second.save(state, step=3)
  assert second.all_steps() == [1, 2, 3]
  second.close()


def test_a_checkpointer_opened_before_another_wrote_refuses_their_steps(tmp_path):
  early = TrainCheckpointer(tmp_path, CONFIG, async_save=False)
  assert early.latest_step() is None
  theirs = _state(seed=1)
  with TrainCheckpointer(tmp_path, CONFIG, keep=1, async_save=False) as other:
    other.save(theirs, step=1)  # removed again by keep=1
    other.save(theirs, step=2)
  before = _tree_digest(tmp_path)
  mine = _state(seed=2)
  with pytest.raises(FileExistsError, match=r"step 2 already exists"):
    early.save(mine, step=2)
  with pytest.raises(ValueError, match=r"step 1 is older than the newest step 2"):
    early.save(mine, step=1)
  assert _tree_digest(tmp_path) == before
  early.save(mine, step=3)
  early.close()
  _assert_bitwise_equal(_host(TrainCheckpointer(tmp_path, CONFIG).restore(mine, step=2).state),
                        _host(theirs))


def test_a_save_older_than_the_newest_step_raises(tmp_path):
  state = _state()
  with TrainCheckpointer(tmp_path, CONFIG, async_save=False, save_interval_steps=5) as checkpoints:
    assert checkpoints.save(state, step=5)
    assert not checkpoints.save(state, step=7)  # between intervals: skipped, as asked
    with pytest.raises(ValueError, match=r"step 3 is older than the newest step 5"):
      checkpoints.save(state, step=3)
    with pytest.raises(FileExistsError, match=r"step 5 already exists"):
      checkpoints.save(state, step=5, force=True)
  # a new run started in an old directory
  with pytest.raises(ValueError, match=r"step 1 is older than the newest step 5"):
    TrainCheckpointer(tmp_path, CONFIG, async_save=False).save(state, step=1)


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_files_get_the_umask_permissions(tmp_path, umask):
  previous = os.umask(umask)
  try:
    with TrainCheckpointer(tmp_path / "run", CONFIG, async_save=True) as checkpoints:
      checkpoints.save(_state())
  finally:
    os.umask(previous)
  modes = {}
  for root, dirs, files in os.walk(tmp_path / "run"):
    for name in dirs + files:
      path = os.path.join(root, name)
      modes[path] = (os.stat(path).st_mode & 0o777, 0o777 if name in dirs else 0o666)
  assert os.path.join(tmp_path, "run", LOCK_FILE) in modes
  assert all(mode == default & ~umask for mode, default in modes.values()), modes


def test_a_leftover_temporary_step_is_neither_listed_nor_removed_by_a_reader(tmp_path):
  state = _state()
  with TrainCheckpointer(tmp_path, CONFIG, async_save=False) as checkpoints:
    checkpoints.save(state, step=1)
  # what a writer leaves while it writes step 2 (or after a crash)
  partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
  partial.mkdir()
  (partial / "partial_file").write_bytes(b"half")
  before = _tree_digest(tmp_path)
  reader = TrainCheckpointer(tmp_path, CONFIG)
  assert reader.all_steps() == [1] and reader.restore(state).step == 1
  with pytest.raises(FileNotFoundError, match=r"no checkpoint step 2 .*committed steps: \[1\]"):
    reader.restore(state, step=2)
  reader.close()
  assert _tree_digest(tmp_path) == before  # another writer's work in progress is untouched
  with TrainCheckpointer(tmp_path, CONFIG, async_save=False) as writer:  # the directory's owner
    writer.save(state, step=3)
  assert not partial.exists()


# --------------------------------------------------------------- mismatch and corruption


def _saved(tmp_path, steps=(1, 2)):
  state = _state()
  with TrainCheckpointer(tmp_path, CONFIG, async_save=False) as checkpoints:
    for step in steps:
      checkpoints.save(state, step=step)
  return state


def test_mismatched_config_names_the_field_and_loads_nothing(tmp_path):
  state = _saved(tmp_path)
  before = _tree_digest(tmp_path)
  with pytest.raises(CheckpointMismatchError, match=r"rank: checkpoint 2 vs running 4"):
    TrainCheckpointer(tmp_path, {"rank": 4, "alpha": 4.0}).restore(state)
  with pytest.raises(CheckpointMismatchError, match=r"rslora: checkpoint '<absent>' vs running"):
    TrainCheckpointer(tmp_path, {**CONFIG, "rslora": True}).restore(state)
  assert _tree_digest(tmp_path) == before


def test_mismatched_shape_or_structure_names_the_leaf(tmp_path):
  _saved(tmp_path)
  before = _tree_digest(tmp_path)
  wider = _state(rank=3)
  with pytest.raises(CheckpointMismatchError,
                     match=r"trainable.dense.lora_a: checkpoint \(8, 2\) float32 vs target "
                           r"\(8, 3\) float32"):
    TrainCheckpointer(tmp_path, CONFIG).restore(wider)
  plain = _state()
  plain = plain.replace(trainable={**plain.trainable, "extra": jnp.zeros(2)})
  with pytest.raises(CheckpointMismatchError,
                     match=r"trainable.extra: missing from the checkpoint"):
    TrainCheckpointer(tmp_path, CONFIG).restore(plain)
  assert _tree_digest(tmp_path) == before


def test_truncated_array_file_is_a_clear_error(tmp_path):
  state = _saved(tmp_path)
  data_files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "2" / "state")
                for name in names if os.path.basename(root) == "d"]
  assert data_files
  for path in data_files:
    with open(path, "r+b") as handle:
      handle.truncate(max(os.path.getsize(path) // 3, 1))
  before = _tree_digest(tmp_path)
  with pytest.raises(CheckpointCorruptError,
                     match=r"cannot read the array(s| metadata) of checkpoint step 2"):
    TrainCheckpointer(tmp_path, CONFIG).restore(state)
  assert _tree_digest(tmp_path) == before
  assert TrainCheckpointer(tmp_path, CONFIG).restore(state, step=1).step == 1


def test_truncated_metadata_is_a_clear_error(tmp_path):
  state = _saved(tmp_path)
  meta_file = tmp_path / "2" / "meta" / "metadata"
  meta_file.write_bytes(meta_file.read_bytes()[:10])
  with pytest.raises(CheckpointCorruptError,
                     match=r"cannot read the metadata of checkpoint step 2"):
    TrainCheckpointer(tmp_path, CONFIG).restore(state)


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"best_mode must be 'max' or 'min', got 'up'"):
    TrainCheckpointer(tmp_path, CONFIG, best_mode="up")
  with pytest.raises(ValueError, match=r"keep must be an int >= 1, got 0"):
    TrainCheckpointer(tmp_path, CONFIG, keep=0)
  checkpoints = TrainCheckpointer(tmp_path, CONFIG, best_metric="accuracy", async_save=False)
  with pytest.raises(KeyError, match=r"best_metric 'accuracy' is not among the metrics \['f1'\]"):
    checkpoints.save(_state(), metrics={"f1": 0.5})
  with pytest.raises(FileNotFoundError, match=r"no committed checkpoint"):
    checkpoints.restore(_state())
