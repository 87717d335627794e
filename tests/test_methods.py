"""The table of fine-tuning methods: each method's trainable set on a tiny model (counted by hand),
its LoRA config, its optimizer chain (against the same chain written out with the library's
transforms), dynamic rank last iff it prunes, and clear errors."""
import dataclasses
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lorapro_jax.dynamic_rank import DynamicRankConfig, DynamicRankState, dem_penalty, dynamic_rank
from lorapro_jax.lora import LoRAConfig
from lorapro_jax.lora_pro import lora_pro, lora_pro_full
from lorapro_jax.methods import METHODS
from lorapro_jax.trees import combine, count_params

N_IN, HIDDEN, N_OUT, RANK, ALPHA, STEPS = 5, 16, 4, 2, 4.0, 20
NAMES = ["full", "lora", "rslora", "lora_pro", "lora_pro_full", "dynamic_rank",
         "lora_pro_dynamic_rank"]


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(N_OUT, name="head")(nn.tanh(nn.Dense(HIDDEN, name="hidden")(x)))


BASE_LORA = LoRAConfig(rank=RANK, alpha=ALPHA, targets="hidden", modules_to_save="head")
DYNAMIC = DynamicRankConfig(total_steps=STEPS, target_rank=RANK, interval=2, dem_weight=0.1)


def _dynamic(method):
  return DYNAMIC if method.prunes else None


@pytest.fixture(scope="module")
def problem():
  x = jax.random.normal(jax.random.key(0), (8, N_IN))
  return x, Net().init(jax.random.key(1), x)["params"]


@pytest.fixture(scope="module")
def prepared(problem):
  """name -> (lora config, model, base, trainable) for every method of the table."""
  x, params = problem
  out = {}
  for name in NAMES:
    method = METHODS[name]
    lora = method.lora_config(BASE_LORA, _dynamic(method))
    out[name] = (lora, *method.prepare(Net(), params, lora, jax.random.key(2), x))
  return out


def test_the_table_has_the_seven_methods_and_unknown_names_list_them():
  assert list(METHODS) == NAMES
  assert all(METHODS[name].name == name for name in NAMES)
  with pytest.raises(KeyError, match=r"unknown method 'qlora'; expected one of \['full', 'lora'"):
    METHODS["qlora"]  # pylint: disable=pointless-statement


def test_trainable_sets_counted_by_hand(prepared, problem):
  _, params = problem
  head = HIDDEN * N_OUT + N_OUT                # modules_to_save: trained in every method
  hidden = N_IN * HIDDEN + HIDDEN
  initial = math.ceil(1.5 * RANK)              # dynamic rank starts at ceil(1.5 r) = 3
  expected = {"full": hidden + head,
              "lora": N_IN * RANK + RANK * HIDDEN + head,
              "dynamic_rank": N_IN * initial + initial * HIDDEN + initial + head}  # + gates c
  for name in NAMES:
    lora, _, base, trainable = prepared[name]
    method = METHODS[name]
    if not method.adapters:
      assert lora is None and base is None and trainable is params
    else:
      # the frozen base is the adapted layer's kernel and bias; the head trains in full
      assert sorted(base) == ["hidden"] and sorted(base["hidden"]) == ["bias", "kernel"]
      assert sorted(trainable["hidden"]) == (["lora_a", "lora_b", "lora_c"] if method.prunes
                                             else ["lora_a", "lora_b"])
      chex.assert_trees_all_equal(trainable["head"], params["head"])
    key = "full" if not method.adapters else ("dynamic_rank" if method.prunes else "lora")
    assert count_params(trainable) == expected[key], name


def test_lora_configs_carry_rslora_gates_and_the_initial_rank(prepared):
  scales = {}
  for name in NAMES[1:]:
    lora = prepared[name][0]
    method = METHODS[name]
    assert (lora.rslora, lora.gated) == (method.rslora, method.prunes), name
    assert lora.rank == (3 if method.prunes else RANK), name
    assert (lora.targets, lora.modules_to_save, lora.alpha) == (("hidden",), ("head",), ALPHA)
    scales[name] = lora.scale_for(("hidden",))
  assert scales["lora"] == scales["lora_pro"] == ALPHA / RANK
  assert scales["rslora"] == pytest.approx(ALPHA / math.sqrt(RANK))
  assert scales["dynamic_rank"] == pytest.approx(ALPHA / 3)
  plain = dataclasses.replace(DYNAMIC, gated=False)  # pruning plain adapters: the config decides
  assert not METHODS["lora_pro_dynamic_rank"].lora_config(BASE_LORA, plain).gated
  assert [n for n in NAMES if METHODS[n].rslora] == ["rslora"]
  assert [n for n in NAMES if METHODS[n].prunes] == ["dynamic_rank", "lora_pro_dynamic_rank"]


def _reference_chain(name, lr, scale, clip, weight_decay):
  """The chain each method should be, written out with the library's transforms."""
  adamw = lambda: optax.adamw(lr, weight_decay=weight_decay)
  pro = lambda: lora_pro(lr, scale, weight_decay=weight_decay)
  written = {"full": [adamw()], "lora": [adamw()], "rslora": [adamw()], "lora_pro": [pro()],
             "lora_pro_full": [lora_pro_full(lr, scale, weight_decay=weight_decay)],
             "dynamic_rank": [adamw(), dynamic_rank(DYNAMIC)],
             "lora_pro_dynamic_rank": [pro(), dynamic_rank(DYNAMIC)]}[name]
  return optax.chain(optax.clip_by_global_norm(clip), *written)


def _train(optimizer, trainable, grad_fn, steps):
  update = jax.jit(optimizer.update)
  state = optimizer.init(trainable)
  for step in range(steps):
    updates, state = update(grad_fn(trainable, step), state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  return trainable, state


def test_each_chain_equals_its_written_out_chain_and_ends_in_dynamic_rank_iff_it_prunes(
    prepared, problem):
  x, _ = problem
  target = jax.random.normal(jax.random.key(3), (8, N_OUT))
  finals = {}
  for name in NAMES:
    lora, model, base, trainable = prepared[name]
    method = METHODS[name]
    scale = None if lora is None else lora.scales(trainable)
    optimizer = method.optimizer(3e-2, scale=scale, clip_norm=0.5, weight_decay=0.01,
                                 dynamic=_dynamic(method))
    params = (lambda t: t) if base is None else (lambda t, base=base: combine(base, t))
    loss = lambda t, model=model, params=params: jnp.mean(
        (model.apply({"params": params(t)}, x) - target) ** 2)
    grad_fn = jax.jit(lambda t, step, loss=loss: jax.grad(loss)(t))
    got, state = _train(optimizer, trainable, grad_fn, STEPS)
    want, _ = _train(_reference_chain(name, 3e-2, scale, 0.5, 0.01), trainable, grad_fn, STEPS)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert isinstance(state[-1], DynamicRankState) == method.prunes, name
    assert not any(isinstance(s, DynamicRankState) for s in state[:-1]), name
    finals[name] = got
  # the updates differ where the table says they do (LoRA-Pro is not AdamW, full is not efficient)
  for a, b in [("lora", "lora_pro"), ("lora_pro", "lora_pro_full"), ("lora", "rslora")]:
    assert not np.allclose(finals[a]["hidden"]["lora_a"], finals[b]["hidden"]["lora_a"]), (a, b)
  # pruning reached its target: 3 components, 2 of them live after the last event
  assert int(np.sum(np.asarray(finals["dynamic_rank"]["hidden"]["lora_c"]) != 0)) == RANK


def test_every_chain_takes_its_learning_rate_from_inject_hyperparams(prepared, problem):
  """experiments/compare.py compiles one step per method: the peak rate lives in the optimizer
  state. The injected chain must update exactly as the chain built with the number."""
  x, _ = problem
  for name in NAMES:
    lora, _, _, trainable = prepared[name]
    method = METHODS[name]
    scale = None if lora is None else lora.scales(trainable)

    def chain(peak, method=method, scale=scale):
      return method.optimizer(optax.linear_schedule(0.0, peak, 5), scale=scale,
                              dynamic=_dynamic(method))

    grad_fn = lambda t, step: jax.tree.map(lambda leaf: jnp.cos(leaf + step), t)
    injected = optax.inject_hyperparams(chain)
    got, state = _train(optax.GradientTransformationExtraArgs(
        injected(peak=3e-2).init, injected(peak=1.0).update), trainable, grad_fn, STEPS)
    want, _ = _train(chain(3e-2), trainable, grad_fn, STEPS)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert float(state.hyperparams["peak"]) == pytest.approx(3e-2)


def test_clipping_is_optional_and_comes_first():
  params = {"w": jnp.ones(3)}
  assert len(METHODS["lora"].optimizer(1e-3, clip_norm=None).init(params)) == 1
  # AdamW is invariant to one gradient's scale, not to the ratio of two steps' gradients: a huge
  # first gradient clipped to norm 1 before AdamW moves the second step like its clipped version
  grads = [{"w": jnp.array([3e4, 4e4, 0.0])}, {"w": jnp.array([0.0, 0.3, 0.4])}]
  clipped = [{"w": jnp.array([0.6, 0.8, 0.0])}, grads[1]]
  got, _ = _train(METHODS["full"].optimizer(1e-3, clip_norm=1.0), params,
                  lambda t, step: grads[step], 2)
  want, _ = _train(optax.adamw(1e-3, weight_decay=0.0), params, lambda t, step: clipped[step], 2)
  unclipped, _ = _train(optax.adamw(1e-3, weight_decay=0.0), params, lambda t, step: grads[step], 2)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert not np.allclose(got["w"], unclipped["w"], rtol=1e-6, atol=0)


def test_regularizer_is_the_weighted_dem_penalty_of_pruning_methods_only(prepared):
  trainable = prepared["dynamic_rank"][3]
  for name in NAMES:
    method = METHODS[name]
    regularizer = method.regularizer(_dynamic(method))
    if not method.prunes:
      assert regularizer is None, name
      continue
    np.testing.assert_allclose(regularizer(trainable, jnp.asarray(0)),
                               0.1 * dem_penalty(trainable), rtol=1e-6)
    assert float(regularizer(trainable, jnp.asarray(STEPS - 1))) == 0.0  # pruning is over


def test_errors_name_the_method_and_what_is_expected(problem):
  x, params = problem
  with pytest.raises(ValueError, match="'dynamic_rank' prunes: pass dynamic=DynamicRankConfig"):
    METHODS["dynamic_rank"].optimizer(1e-3)
  with pytest.raises(ValueError, match="'lora' does not prune: got a DynamicRankConfig"):
    METHODS["lora"].lora_config(BASE_LORA, DYNAMIC)
  with pytest.raises(ValueError, match="LoRA-Pro needs the LoRA scale"):
    METHODS["lora_pro"].optimizer(1e-3)
  with pytest.raises(ValueError, match="'full' trains every parameter: pass lora=None"):
    METHODS["full"].prepare(Net(), params, BASE_LORA, jax.random.key(0), x)
  with pytest.raises(ValueError, match="'lora' needs its LoRAConfig"):
    METHODS["lora"].prepare(Net(), params, None, jax.random.key(0), x)
