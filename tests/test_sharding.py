"""Sharding on 8 fake CPU devices: a (data=2, fsdp=4) mesh trains LoRA-Pro (full mode, full-rank
moments sharded) with the same losses as one device, and each leaf gets the sharding it should."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.lora_pro import LoRAProFullState
from lorapro_jax.sharding import (ALL_GATHER_COMBINE_BYTES, DATA, FSDP, batch_sharding,
                                  check_hosts_can_feed, compiler_options, fsdp_spec,
                                  initialize_distributed, make_mesh, param_shardings, shard_batch,
                                  state_shardings, train_shardings)
from lorapro_jax.methods import METHODS
from lorapro_jax.train import TrainState, make_train_step

MIN_SHARD = 64  # small enough that the toy kernels are split


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = nn.gelu(nn.Dense(32, name="up")(x))
    return nn.Dense(4, name="down")(nn.Dense(16, name="mid")(hidden))


def _loss(model):
  def loss_fn(params, batch, rng):
    del rng
    logits = model.apply({"params": params}, batch["x"])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], 1)), logits
  return loss_fn


@pytest.fixture(scope="module")
def problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 16, 8)).astype(np.float32)
  batches = [{"x": xb, "y": (xb.sum(-1) > 0).astype(np.int32) + 2 * (xb[:, 0] > 0)} for xb in x]
  base = MLP().init(jax.random.key(0), x[0])["params"]
  config = LoRAConfig(rank=4, alpha=8.0, targets=("up", "mid", "down"), init="gaussian")
  model = inject(MLP(), config)
  trainable = init_adapters(model, base, jax.random.key(1), x[0])
  # B = 0 at init would make the first LoRA-Pro steps trivially equal; start from a generic point
  trainable = jax.tree.map(lambda t: t + 0.1 * jax.random.normal(jax.random.key(2), t.shape),
                           trainable)
  optimizer = METHODS["lora_pro_full"].optimizer(1e-2, scale=config.scales(trainable),
                                                 weight_decay=0.01)
  return model, base, trainable, optimizer, batches


def _run(problem, mesh=None):
  model, base, trainable, optimizer, batches = problem
  state = TrainState.create(trainable, optimizer, jax.random.key(0))
  if mesh is None:
    step = make_train_step(_loss(model), optimizer)
    return [float(step_out[1]["loss"]) for step_out in _steps(step, state, base, batches)], state
  shardings = state_shardings(state, base, mesh, min_shard_size=MIN_SHARD)
  base_shardings = param_shardings(base, mesh, MIN_SHARD)
  state, base = jax.device_put(state, shardings), jax.device_put(base, base_shardings)
  step = make_train_step(_loss(model), optimizer, state_sharding=shardings,
                         base_sharding=base_shardings, batch_sharding=batch_sharding(mesh))
  outs = list(_steps(step, state, base, [shard_batch(b, mesh) for b in batches]))
  return [float(o[1]["loss"]) for o in outs], outs[-1][0]


def _steps(step, state, base, batches):
  for batch in batches:
    state, metrics = step(state, base, batch)
    yield state, metrics


def test_sharded_lora_pro_full_matches_one_device(problem):
  assert jax.device_count() == 8
  single, _ = _run(problem)
  sharded, state = _run(problem, make_mesh(data=2, fsdp=4))
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  assert single[-1] < single[0]  # it trains
  # the full-rank moments (n_in x n_out per adapted kernel) are split along fsdp
  full_states = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, LoRAProFullState))
      if isinstance(s, LoRAProFullState)]
  moments = [leaf for leaf in jax.tree.leaves(full_states[0].inner) if leaf.ndim == 2]
  assert {m.shape for m in moments} == {(8, 32), (32, 16), (16, 4)}
  for moment in moments:
    assert FSDP in moment.sharding.spec, (moment.shape, moment.sharding.spec)
    assert len(moment.addressable_shards[0].data.ravel()) == moment.size // 4


def test_adapters_follow_their_base_kernel(problem):
  model, base, trainable, optimizer, _ = problem
  mesh = make_mesh(data=2, fsdp=4)
  shardings = state_shardings(TrainState.create(trainable, optimizer, jax.random.key(0)), base,
                              mesh, min_shard_size=MIN_SHARD)
  base_shardings = param_shardings(base, mesh, MIN_SHARD)
  # up: kernel (8, 32) split on its output axis -> lora_b (4, 32) split on n_out
  assert base_shardings["up"]["kernel"].spec == P(None, FSDP)
  assert shardings.trainable["up"]["lora_b"].spec == P(None, FSDP)
  assert shardings.trainable["up"]["lora_a"].spec == P()
  # mid: kernel (32, 16) split on its input axis -> lora_a (32, 4) split on n_in
  assert base_shardings["mid"]["kernel"].spec == P(FSDP, None)
  assert shardings.trainable["mid"]["lora_a"].spec == P(FSDP, None)
  assert shardings.trainable["mid"]["lora_b"].spec == P()
  assert shardings.step.spec == P()


def test_fsdp_spec_rules():
  assert fsdp_spec((1024, 4096), 4) == P(None, FSDP)   # the largest divisible axis
  assert fsdp_spec((1024, 4098), 4) == P(FSDP, None)   # 4098 does not divide by 4
  assert fsdp_spec((16,), 4) == P()                    # small leaves stay replicated
  assert fsdp_spec((4096,), 1) == P()
  with pytest.raises(ValueError, match="does not match the 8 devices"):
    make_mesh(data=3, fsdp=2)


@dataclasses.dataclass(frozen=True)
class _FakeGPU:  # as much of a jax.Device as a Mesh and compiler_options read
  id: int
  platform: str = "gpu"


def test_weight_gathers_are_combined_only_under_fsdp_on_gpus(monkeypatch):
  gpus = np.array([_FakeGPU(0), _FakeGPU(1)])
  fsdp = Mesh(gpus.reshape(1, 2), (DATA, FSDP))
  assert compiler_options(fsdp) == {
      "xla_gpu_all_gather_combine_threshold_bytes": ALL_GATHER_COMBINE_BYTES}
  assert compiler_options(Mesh(gpus.reshape(2, 1), (DATA, FSDP))) == {}  # data parallel
  assert compiler_options(make_mesh(data=2, fsdp=4)) == {}  # CPUs
  # the user's own value of the option in XLA_FLAGS is not overridden
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_all_gather_combine_threshold_bytes=1048576")
  assert compiler_options(fsdp) == {}


@pytest.mark.parametrize("sharded", [True, False])
def test_train_step_compiles_with_the_options_it_is_given(problem, sharded):
  # XLA refuses an option it does not know, so the error proves the options reach the compile
  model, base, trainable, optimizer, batches = problem
  state = TrainState.create(trainable, optimizer, jax.random.key(0))
  mesh = make_mesh(data=2, fsdp=4)
  shardings = train_shardings(state, base, mesh, min_shard_size=MIN_SHARD) if sharded else {}
  batch = shard_batch(batches[0], mesh) if sharded else batches[0]
  step = make_train_step(_loss(model), optimizer, compiler_options={"xla_no_such_option": 1},
                         **shardings)
  with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
    step.lower(state, base, batch).compile()
  with pytest.raises(ValueError, match="need jit=True"):
    make_train_step(_loss(model), optimizer, jit=False, compiler_options={"xla_option": 1})


def test_batches_split_over_all_devices_and_bad_sizes_are_named():
  mesh = make_mesh(data=2, fsdp=4)
  batch = shard_batch({"x": np.arange(16 * 3).reshape(16, 3)}, mesh)
  assert len({s.device for s in batch["x"].addressable_shards}) == 8
  assert batch["x"].addressable_shards[0].data.shape == (2, 3)
  with pytest.raises(ValueError, match="12 global rows"):
    shard_batch({"x": np.zeros((12, 3))}, mesh)


def test_several_hosts_need_a_mesh_and_a_batch_they_can_split(monkeypatch):
  check_hosts_can_feed(6, has_mesh=False)  # one process
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  check_hosts_can_feed(8, has_mesh=True)
  with pytest.raises(ValueError, match="batch size 6 does not split over 4 processes"):
    check_hosts_can_feed(6, has_mesh=True)
  with pytest.raises(ValueError, match="4 processes train one model: give the mesh"):
    check_hosts_can_feed(8, has_mesh=False)


def test_single_host_without_environment():
  assert initialize_distributed({}) == (0, 1)
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    initialize_distributed({"JAX_COORDINATOR_ADDRESS": "localhost:1234"})
  with pytest.raises(ValueError, match="LORAPRO_DISTRIBUTED='yes'"):
    initialize_distributed({"LORAPRO_DISTRIBUTED": "yes"})


def test_one_process_per_gpu_names_its_devices(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  cluster = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": "1"}
  initialize_distributed({**cluster, "JAX_LOCAL_DEVICE_IDS": "1"})
  initialize_distributed(cluster)
  assert calls == [dict(coordinator_address="localhost:1234", num_processes=2, process_id=1,
                        local_device_ids=ids) for ids in ([1], None)]
  with pytest.raises(ValueError, match="JAX_LOCAL_DEVICE_IDS='gpu1'"):
    initialize_distributed({**cluster, "JAX_LOCAL_DEVICE_IDS": "gpu1"})
