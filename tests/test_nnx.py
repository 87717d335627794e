"""flax.nnx: our optax transforms inside nnx.Optimizer (flax's nnx.LoRALinear, qwix's names, our
LoRALayer), checked step for step against the same math on plain pytrees through the linen path;
inject / merge / scales / adapters on a model with every kind of NNX linear layer."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lorapro_jax import nnx as lnnx
from lorapro_jax.adapters import AdapterKeys
from lorapro_jax.dynamic_rank import DynamicRankConfig, dynamic_rank
from lorapro_jax.inject import inject
from lorapro_jax.lora import LoRAConfig, LoRADense
from lorapro_jax.lora_pro import lora_pro, lora_pro_full
from lorapro_jax.trees import combine, count_params, split

STEPS = 10
X = jax.random.normal(jax.random.key(0), (8, 4))
Y = jax.random.normal(jax.random.key(1), (8, 3))


def nnx_train(model, tx, x=X, y=Y, steps=STEPS):
  """``steps`` of the issue's snippet: nnx.Optimizer(wrt=LoRAParam), update inside nnx.jit."""
  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, opt)
  return opt


def linen_train(apply, base, trainable, tx, x=X, y=Y, steps=STEPS):
  """The same math on plain pytrees: jax.grad of the adapters, tx.update, optax.apply_updates."""

  @jax.jit
  def step(trainable, state):
    grads = jax.grad(lambda t: jnp.mean((apply(combine(base, t), x) - y) ** 2))(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state

  state = tx.init(trainable)
  for _ in range(steps):
    trainable, state = step(trainable, state)
  return trainable


def assert_trees_close(got, expected, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert g.dtype == e.dtype == jnp.float32
    np.testing.assert_allclose(g, e, rtol=0, atol=atol)


# ------------------------------------------------------------- flax's own nnx.LoRALinear (s = 1)


class FlaxLoRAMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs)
    self.l2 = nnx.LoRALinear(6, 3, lora_rank=2, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class LinenMLP(nn.Module):
  """FlaxLoRAMLP on the linen side: LoRADense with s = alpha / r = 1."""
  config: LoRAConfig

  @nn.compact
  def __call__(self, x):
    return LoRADense(3, lora=self.config, name="l2")(
        jnp.tanh(LoRADense(6, lora=self.config, name="l1")(x)))


def flax_model():
  model = FlaxLoRAMLP(nnx.Rngs(0))
  for layer, key in ((model.l1, 2), (model.l2, 3)):  # B != 0: Y and the projector matter
    layer.lora.lora_b[...] = 0.5 * jax.random.normal(jax.random.key(key), layer.lora.lora_b.shape)
  return model


def as_linen_params(model):
  """FlaxLoRAMLP's values in the linen layout: lora_a / lora_b next to kernel."""
  return {name: {"kernel": layer.kernel[...], "bias": layer.bias[...],
                 "lora_a": layer.lora.lora_a[...], "lora_b": layer.lora.lora_b[...]}
          for name, layer in (("l1", model.l1), ("l2", model.l2))}


OPTIMIZERS = {
    "lora_pro": lambda scale, keys: lora_pro(1e-2, scale, keys=keys),
    "lora_pro_full": lambda scale, keys: lora_pro_full(1e-2, scale, keys=keys),
    "lora_pro+dynamic_rank": lambda scale, keys: optax.chain(
        lora_pro(1e-2, scale, keys=keys),
        dynamic_rank(DynamicRankConfig(STEPS, 1, interval=1, gated=False, keys=keys))),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_flax_lora_linear_in_nnx_optimizer_matches_linen_path(name):
  model = flax_model()
  config = LoRAConfig(rank=2, alpha=2.0)  # s = 1, as nnx.LoRA computes x @ A @ B
  base, trainable = split(as_linen_params(model), config)
  expected = linen_train(lambda p, x: LinenMLP(config).apply({"params": p}, x), base, trainable,
                         OPTIMIZERS[name](1.0, AdapterKeys()))
  nnx_train(model, OPTIMIZERS[name](lnnx.scales(model), AdapterKeys()))
  got = split(as_linen_params(model), config)[1]
  assert_trees_close(got, expected)
  assert lnnx.scales(model) == {"l1": {"lora": 1.0}, "l2": {"lora": 1.0}}
  if "dynamic_rank" in name:  # pruning happened (target 1 of 2 components on average)
    dead = [int(jnp.sum(jnp.all(got[k]["lora_a"] == 0, axis=0))) for k in got]
    assert sum(dead) == 2


# ------------------------------------------------------------------ qwix's names (kernel_lora_a)


class QwixLinear(nnx.Module):
  """The layout qwix.apply_lora_to_model gives an nnx.Linear: nnx.LoRAParam ``kernel_lora_a``
  (n_in, r) / ``kernel_lora_b`` (r, n_out) next to ``kernel``, output scaled by alpha / rank."""

  def __init__(self, n_in, n_out, rank, alpha, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.kernel = nnx.Param(jax.random.normal(k1, (n_in, n_out)) / math.sqrt(n_in))
    self.kernel_lora_a = nnx.LoRAParam(jax.random.normal(k2, (n_in, rank)) / math.sqrt(n_in))
    self.kernel_lora_b = nnx.LoRAParam(0.5 * jax.random.normal(k3, (rank, n_out)))
    self.scale = alpha / rank

  def __call__(self, x):
    return x @ self.kernel[...] + (x @ self.kernel_lora_a[...] @ self.kernel_lora_b[...]) * self.scale


class QwixMLP(nnx.Module):
  def __init__(self):
    self.linear1 = QwixLinear(4, 6, rank=2, alpha=4.0, key=jax.random.key(5))
    self.linear2 = QwixLinear(6, 3, rank=2, alpha=4.0, key=jax.random.key(6))

  def __call__(self, x):
    return self.linear2(jnp.tanh(self.linear1(x)))


class LinenNoBias(nn.Module):
  config: LoRAConfig

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: LoRADense(n, lora=self.config, use_bias=False, name=name)  # noqa: E731
    return dense(3, "linear2")(jnp.tanh(dense(6, "linear1")(x)))


@pytest.mark.parametrize("name", ["lora_pro", "lora_pro+dynamic_rank"])
def test_qwix_names_through_adapter_keys_match_linen_path(name):
  model, keys = QwixMLP(), lnnx.QWIX_KEYS
  config = LoRAConfig(rank=2, alpha=4.0)  # s = alpha / rank = 2, qwix's rule
  ours = {layer: {"kernel": m.kernel[...], "lora_a": m.kernel_lora_a[...],
                  "lora_b": m.kernel_lora_b[...]}
          for layer, m in (("linear1", model.linear1), ("linear2", model.linear2))}
  base, trainable = split(ours, config)
  expected = linen_train(lambda p, x: LinenNoBias(config).apply({"params": p}, x), base,
                         trainable, OPTIMIZERS[name](2.0, AdapterKeys()))
  nnx_train(model, OPTIMIZERS[name](2.0, keys))
  got = {layer: {"lora_a": m.kernel_lora_a[...], "lora_b": m.kernel_lora_b[...]}
         for layer, m in (("linear1", model.linear1), ("linear2", model.linear2))}
  assert_trees_close(got, expected)
  with pytest.raises(ValueError, match="no LoRA pair|found no adapter"):  # default keys see nothing
    nnx.Optimizer(QwixMLP(), OPTIMIZERS[name](2.0, AdapterKeys()), wrt=nnx.LoRAParam)


# --------------------------------------------- our adapters, injected into every NNX layer kind


class Block(nnx.Module):
  def __init__(self, rngs):
    self.proj = nnx.Linear(6, 6, rngs=rngs)


class Mixed(nnx.Module):
  """x (batch, seq, 6) -> (batch, seq, 3) through every layer kind; tests/test_inject.py's linen
  Mixed in NNX, with the same module names and kernel layouts."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(6, 8, rngs=rngs)                                  # 6 -> 8
    self.general = nnx.LinearGeneral(8, (2, 4), rngs=rngs)                    # 8 -> 2x4
    self.fold = nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=rngs)       # 2x4 -> 5
    self.einsum = nnx.Einsum("bsd,dhk->bshk", (5, 3, 2), rngs=rngs)          # 5 -> 3x2

    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked(rngs):
      return Block(rngs)

    self.stack = stacked(rngs)                                                # 2 x (6 -> 6)
    self.classifier = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.einsum(self.fold(jnp.tanh(self.general(self.dense(x)))))
    h = h.reshape(h.shape[:2] + (6,))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(h, block):
      return jnp.tanh(block.proj(h))

    return self.classifier(run(h, self.stack))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return jnp.tanh(nn.Dense(6, name="proj")(carry)), None


class LinenMixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 4), name="general")(nn.Dense(8, name="dense")(x))
    h = nn.DenseGeneral(5, axis=(-2, -1), name="fold")(jnp.tanh(h))
    h = nn.Einsum((5, 3, 2), "bsd,dhk->bshk", use_bias=False, name="einsum")(h)
    h = h.reshape(h.shape[:2] + (6,))
    scan = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    h, _ = scan(name="stack")(h, None)
    return nn.Dense(3, name="classifier")(h)


# (path, n_in, n_out, stack) of every layer "all-linear" adapts in Mixed (not the head).
LAYERS = [(("dense",), 6, 8, ()), (("general",), 8, 8, ()), (("fold",), 8, 5, ()),
          (("einsum",), 5, 6, ()), (("stack", "proj"), 6, 6, (2,))]
XM = jax.random.normal(jax.random.key(7), (2, 3, 6))
YM = jax.random.normal(jax.random.key(8), (2, 3, 3))
CONFIG = LoRAConfig(rank=2, alpha=3.0)


@pytest.fixture(scope="module")
def base_model():
  return Mixed(nnx.Rngs(0))


def linen_params(model):
  """An injected Mixed's values as the linen LoRA params (the ``base`` level lifted)."""

  def lift(node):
    if not isinstance(node, dict):
      return node
    node = {str(k): lift(v) for k, v in node.items()}
    return {**node.pop("base"), **node} if "base" in node else node

  return lift(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def randomize(model, key):
  """Random adapter factors (B != 0, c != 0) so that the adapters change the outputs."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(key, len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [0.3 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)]))


@pytest.mark.parametrize("gated", [False, True])
def test_inject_at_init_equals_base_then_matches_linen_inject(base_model, gated):
  config = dataclasses.replace(CONFIG, gated=gated, dropout=0.25)
  model = lnnx.inject(base_model, config, rngs=nnx.Rngs(1))
  # at init (B = 0, or c = 0 when gated) the outputs are the base's, bit for bit, dropout or not
  np.testing.assert_array_equal(model(XM), base_model(XM))
  shapes = jax.tree.map(jnp.shape, lnnx.adapters(model))
  for path, n_in, n_out, stack in LAYERS:
    node = shapes
    for key in path:
      node = node[key]
    expected = {"lora_a": stack + (n_in, 2), "lora_b": stack + (2, n_out)}
    assert node == (expected | {"lora_c": stack + (2,)} if gated else expected)
  assert "classifier" not in shapes and isinstance(model.classifier, nnx.Linear)
  per_layer = [math.prod(stack) * 2 * (n_in + n_out + gated) for _, n_in, n_out, stack in LAYERS]
  assert count_params(lnnx.adapters(model)) == sum(per_layer) == 156 + 12 * gated
  # with random factors: the linen injection's outputs on the same numbers (eval: no dropout)
  randomize(model, jax.random.key(2))
  model.eval()
  expected = inject(LinenMixed(), config).apply({"params": linen_params(model)}, XM)
  np.testing.assert_allclose(model(XM), expected, rtol=0, atol=2e-6)
  assert float(jnp.max(jnp.abs(model(XM) - base_model(XM)))) > 0.1
  model.train()  # adapter dropout: a fresh mask per call, on the adapter input only
  first, second = model(XM), model(XM)
  assert float(jnp.max(jnp.abs(first - second))) > 1e-3
  assert float(jnp.max(jnp.abs(first - expected))) > 1e-3


def test_gradients_reach_only_adapters_and_base_stays_frozen(base_model):
  model = lnnx.inject(base_model, CONFIG, rngs=nnx.Rngs(1))
  randomize(model, jax.random.key(3))
  frozen = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))))
  grads = nnx.grad(lambda m: jnp.mean((m(XM) - YM) ** 2),
                   argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
  adapter_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert grad_paths == adapter_paths and len(adapter_paths) == 10
  assert all(p[-1] in ("lora_a", "lora_b") for p in grad_paths)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
  nnx_train(model, lora_pro(1e-2, lnnx.scales(model)), XM, YM, steps=2)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  jax.tree.map(np.testing.assert_array_equal, after, frozen)


def test_scale_comes_from_the_module_with_patterns_and_rslora(base_model):
  config = LoRAConfig(rank=2, alpha=3.0, rslora=True, rank_pattern={"stack.proj": 3},
                      alpha_pattern={"einsum": 5.0}, targets=("dense", "einsum", "proj"))
  model = lnnx.inject(base_model, config, rngs=nnx.Rngs(1))
  root2 = math.sqrt(2)
  assert lnnx.scales(model) == {"dense": 3 / root2, "einsum": 5 / root2,
                                "stack": {"proj": 3 / math.sqrt(3)}}
  assert model.stack.proj.lora_a.shape == (2, 6, 3)
  assert isinstance(model.general, nnx.LinearGeneral) and not isinstance(model.general,
                                                                         lnnx.LoRALayer)
  randomize(model, jax.random.key(4))
  expected = inject(LinenMixed(), config).apply({"params": linen_params(model)}, XM)
  np.testing.assert_allclose(model(XM), expected, rtol=0, atol=2e-6)


def test_lora_pro_dynamic_rank_on_injected_model_matches_linen_path(base_model):
  """LoRA-Pro + gated dynamic rank, scales read from the modules, stacked layers included."""
  dynamic = DynamicRankConfig(STEPS, 1, interval=1)
  config = dynamic.lora_config(LoRAConfig(alpha=3.0))  # rank 2, gated
  model = lnnx.inject(base_model, config, rngs=nnx.Rngs(1))
  randomize(model, jax.random.key(5))
  base, trainable = split(linen_params(model), config)
  tx = lambda scale: optax.chain(lora_pro(1e-2, scale), dynamic_rank(dynamic))  # noqa: E731
  linen_model = inject(LinenMixed(), config)
  expected = linen_train(lambda p, x: linen_model.apply({"params": p}, x), base, trainable,
                         tx(config.scales(trainable)), XM, YM)
  nnx_train(model, tx(lnnx.scales(model)), XM, YM)
  got = lnnx.adapters(model)
  assert_trees_close(got, expected, atol=2e-6)
  # the global budget pruned 6 of the 12 gates (2 per kernel, the stacked one counting twice)
  gates = [node["lora_c"] for node in (got["dense"], got["general"], got["fold"], got["einsum"],
                                       got["stack"]["proj"])]
  assert sum(int(jnp.sum(c == 0)) for c in gates) == 6


def test_merge_gives_the_original_structure_and_outputs(base_model):
  model = lnnx.inject(base_model, dataclasses.replace(CONFIG, gated=True), rngs=nnx.Rngs(1))
  randomize(model, jax.random.key(6))
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
  merged = lnnx.merge(model)
  assert type(merged.general) is nnx.LinearGeneral and type(merged.stack.proj) is nnx.Linear
  # its state loads into a fresh Mixed: the structure from before the injection
  fresh = Mixed(nnx.Rngs(9))
  nnx.update(fresh, nnx.state(merged))
  np.testing.assert_allclose(fresh(XM), model(XM), rtol=0, atol=2e-5)
  # the merged kernel is K0 + s·A·diag(c)·B, reshaped to the kernel's own axes
  node = before["general"]
  delta = CONFIG.scale_for(("general",)) * (node["lora_a"] * node["lora_c"]) @ node["lora_b"]
  np.testing.assert_allclose(merged.general.kernel[...],
                             node["base"]["kernel"] + delta.reshape(8, 2, 4), rtol=0, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)


def test_inject_errors_name_the_problem(base_model):
  with pytest.raises(ValueError, match="(?s)'attention' matches no linear layer.*stack.proj"):
    lnnx.inject(base_model, LoRAConfig(rank=2, targets=("dense", "attention")), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank_pattern entry 'classifier' matches no adapted"):
    lnnx.inject(base_model, LoRAConfig(rank=2, rank_pattern={"classifier": 1}),
                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"rank 6 at einsum exceeds min\(n_in, n_out\) = min\(5, 6\)"):
    lnnx.inject(base_model, LoRAConfig(rank=6, targets="einsum"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="modules_to_save"):
    lnnx.inject(base_model, LoRAConfig(rank=2, modules_to_save="classifier"), rngs=nnx.Rngs(0))
  model = lnnx.inject(base_model, LoRAConfig(rank=1, targets="dense"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already holds LoRALayers \\(at dense\\)"):
    lnnx.inject(model, LoRAConfig(rank=1, targets="fold"), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="got Conv at conv"):
    lnnx.LoRALayer(nnx.Conv(2, 2, (3,), rngs=nnx.Rngs(0)), path=("conv",), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="holds no LoRALayer or nnx.LoRA"):
    lnnx.scales(base_model)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_orbax_checkpoint_of_nnx_training_state_resumes_bit_identically(tmp_path):
  from lorapro_jax.checkpoint import TrainCheckpointer
  dynamic = DynamicRankConfig(STEPS, 1, interval=1)
  config = dynamic.lora_config(LoRAConfig(alpha=3.0, dropout=0.1))
  trained = nnx.Any(nnx.LoRAParam, nnx.Not(nnx.Param))  # all but the frozen base: rng streams too
  base = MLP(nnx.Rngs(0))

  def fresh():
    model = lnnx.inject(base, config, rngs=nnx.Rngs(1))
    tx = optax.chain(lora_pro(1e-2, lnnx.scales(model)), dynamic_rank(dynamic))
    return model, nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.mean((m(X) - Y) ** 2),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)

  def values(*nodes):
    return [np.asarray(jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                       else leaf) for leaf in jax.tree.leaves(nnx.state(nodes))]

  model, opt = fresh()
  for _ in range(4):
    step(model, opt)
  with TrainCheckpointer(tmp_path, config) as checkpoints:
    checkpoints.save((nnx.state(model, trained), nnx.state(opt)), step=int(opt.step[...]))
  for _ in range(4):  # through the last pruning events (steps 5..8 of 10)
    step(model, opt)

  resumed, resumed_opt = fresh()
  with TrainCheckpointer(tmp_path, config) as checkpoints:
    restored = checkpoints.restore((nnx.state(resumed, trained), nnx.state(resumed_opt)))
  assert restored.step == 4
  nnx.update(resumed, restored.state[0])
  nnx.update(resumed_opt, restored.state[1])
  for _ in range(4):
    step(resumed, resumed_opt)
  got, expected = values(resumed, resumed_opt), values(model, opt)
  assert len(got) == len(expected) > 10
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(g, e)
  assert int(resumed_opt.step[...]) == 8 and int(jnp.sum(resumed.hidden.lora_c[...] == 0)) >= 1


# ------------------------------------------- PEFT export of an NNX model with Hugging Face names


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q_proj, self.v_proj = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)


class Feedforward(nnx.Module):
  def __init__(self, rngs):
    self.up_proj, self.down_proj = nnx.Linear(8, 12, rngs=rngs), nnx.Linear(12, 8, rngs=rngs)


class Layer(nnx.Module):
  def __init__(self, rngs):
    self.self_attn, self.mlp = Attention(rngs), Feedforward(rngs)

  def __call__(self, h):
    h = h + self.self_attn.q_proj(h) * jax.nn.sigmoid(self.self_attn.v_proj(h))
    return h + self.mlp.down_proj(jnp.tanh(self.mlp.up_proj(h)))


class Inner(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([Layer(rngs) for _ in range(2)])


class TinyDecoder(nnx.Module):
  """Module names as Hugging Face's Llama: model.layers.{i}.self_attn.q_proj, ..., lm_head."""

  def __init__(self, rngs):
    self.model, self.lm_head = Inner(rngs), nnx.Linear(8, 5, rngs=rngs)

  def __call__(self, h):
    for layer in self.model.layers:
      h = layer(h)
    return self.lm_head(h)


def torch_decoder(model):
  """TinyDecoder in PyTorch, same module names, weights copied (Linear weight = kernelᵀ)."""
  import torch

  class TorchLayer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn = torch.nn.Module()
      self.self_attn.q_proj, self.self_attn.v_proj = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
      self.mlp = torch.nn.Module()
      self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)

    def forward(self, h):
      h = h + self.self_attn.q_proj(h) * torch.sigmoid(self.self_attn.v_proj(h))
      return h + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(h)))

  class TorchDecoder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.model = torch.nn.Module()
      self.model.layers = torch.nn.ModuleList([TorchLayer(), TorchLayer()])
      self.lm_head = torch.nn.Linear(8, 5)

    def forward(self, h):
      for layer in self.model.layers:
        h = layer(h)
      return self.lm_head(h)

  torch_model = TorchDecoder()
  weights = {}
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(str(part) for part in path)
    value = torch.tensor(np.asarray(leaf[...]))
    weights[name.replace(".kernel", ".weight")] = value.T if name.endswith("kernel") else value
  torch_model.load_state_dict(weights)
  return torch_model.eval()


def test_dynamic_rank_trained_nnx_model_exports_to_peft_with_pytorch_outputs(tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from lorapro_jax.dynamic_rank import rank_pattern, shrink
  from lorapro_jax.peft_format import export_peft

  base = TinyDecoder(nnx.Rngs(0))
  dynamic = DynamicRankConfig(STEPS, 2, interval=1)
  config = dynamic.lora_config(LoRAConfig(alpha=6.0, targets=("q_proj", "v_proj", "up_proj",
                                                                "down_proj")))
  model = lnnx.inject(base, config, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(9), (4, 8))
  y = jax.random.normal(jax.random.key(10), (4, 5))
  tx = optax.chain(lora_pro(5e-2, lnnx.scales(model)), dynamic_rank(dynamic))
  opt = nnx_train(model, tx, x, y)
  ours = np.asarray(model(x))
  opt_state = nnx.as_pure(opt.opt_state)
  ranks = rank_pattern(opt_state)
  assert set(ranks) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
      "self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")}
  assert sum(ranks.values()) == 8 * 2 and len(set(ranks.values())) > 1  # pruned unevenly
  export_peft(shrink(lnnx.adapters(model), opt_state), config, tmp_path, family="llama",
              ranks=ranks)
  torch_model = torch_decoder(base)
  with torch.no_grad():
    before = torch_model(torch.tensor(np.asarray(x))).numpy()
    assert np.abs(before - ours).max() > 1e-2  # the adapters move the outputs
    loaded = peft.PeftModel.from_pretrained(torch_model, str(tmp_path))
    np.testing.assert_allclose(loaded(torch.tensor(np.asarray(x))).numpy(), ours, rtol=0,
                               atol=1e-5)
  # ... and back: the PEFT directory imported into a fresh NNX model gives the same outputs.
  from lorapro_jax.peft_format import import_peft
  imported, imported_config = import_peft(tmp_path, family="llama")
  fresh = lnnx.inject(TinyDecoder(nnx.Rngs(0)), imported_config, rngs=nnx.Rngs(5))
  assert not np.allclose(np.asarray(fresh(x)), ours, atol=1e-3)  # B = 0: not loaded yet
  lnnx.load_adapters(fresh, imported)
  np.testing.assert_allclose(np.asarray(fresh(x)), ours, rtol=0, atol=1e-5)
  wrong = jax.tree.map(lambda a: a[..., :1] if a.ndim == 2 else a, imported)
  with pytest.raises(ValueError, match="do not fit the model"):
    lnnx.load_adapters(fresh, wrong)
