"""Experiments: every config runs end to end on a tiny random model with mock data (T5, RoBERTa,
Llama, ViT), every method runs somewhere, a pre-empted run resumes to exactly the uninterrupted
run, and the results writer aggregates seeds beside the papers' numbers."""
import dataclasses
import json
import math

import numpy as np
import pytest

from experiments.configs import all_configs, get_config
from experiments.results_table import collect, markdown_tables, mean_std
from experiments.run import dynamic_rank_for, lora_config_for, run_experiment
from lorapro_jax.methods import METHODS
from lorapro_jax.metrics import METRICS

TINY = dict(tiny=True, mock_data=True, batch_size=4, max_examples=8, progress=False)


@pytest.fixture(scope="module")
def gsm_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gsm")
  rng = np.random.default_rng(0)
  meta, gsm = [], []
  for _ in range(8):
    a, b = (int(v) for v in rng.integers(1, 50, 2))
    meta.append({"query": f"What is {a} plus {b}?", "response": f"{a} + {b} = {a + b}. "
                 f"The answer is: {a + b}"})
    gsm.append({"question": f"What is {a} plus {b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"})
  (folder / "meta.json").write_text(json.dumps(meta))
  (folder / "gsm.jsonl").write_text("\n".join(json.dumps(row) for row in gsm))
  return {"train_file": str(folder / "meta.json"), "eval_file": str(folder / "gsm.jsonl")}


def _config(name, gsm_files):
  config = get_config(name)
  return config.replace(**gsm_files) if config.family == "llama" else config


class _RobertaTask:  # what lora_config_for reads of a task
  lora_family, modules_to_save = "roberta", ("classifier",)


def test_configs_are_complete():
  configs = all_configs()
  assert {c.family for c in configs.values()} == {"t5", "roberta", "llama", "vit"}
  assert len([n for n in configs if n.startswith("lorapro_t5_glue/")]) == 5
  assert len([n for n in configs if n.startswith("dora_roberta_glue/")]) == 16
  for config in configs.values():
    assert config.methods == tuple(METHODS), config.name  # every method of the table
    assert set(config.metrics) <= set(METRICS), config.name
  table1 = get_config("lorapro_t5_glue/cola")
  assert (table1.rank, table1.alpha, table1.learning_rate, table1.batch_size, table1.epochs,
          table1.max_length, table1.schedule, table1.warmup_ratio, table1.seeds) == (
              8, 16.0, 1e-4, 32, 1.0, 128, "cosine", 0.03, (0, 1, 2))
  budget = get_config("dora_roberta_glue/rte_r2")
  method = METHODS["dynamic_rank"]
  lora = lora_config_for(budget, method, _RobertaTask, dynamic_rank_for(budget, method, 100))
  assert (budget.rank, lora.rank, lora.gated, lora.alpha) == (2, 3, True, 4.0)  # r = 2 from 3
  assert lora_config_for(budget, METHODS["full"], _RobertaTask) is None
  with pytest.raises(ValueError, match=r"methods \['qlora'\] of x: expected names of \['full'"):
    budget.replace(name="x", methods=("lora", "qlora"))
  llama = get_config("llama2_metamath/gsm8k")
  assert (llama.learning_rate, llama.max_length, llama.compute_dtype) == (2e-5, 1024, "bfloat16")
  with pytest.raises(ValueError, match="unknown experiment 'nope'"):
    get_config("nope")


# every config once (the persistent compilation cache shares the compiled steps of a family)
@pytest.mark.parametrize("name", sorted(all_configs()))
def test_every_config_trains_and_evaluates(name, gsm_files, tmp_path):
  config = _config(name, gsm_files)
  results = run_experiment(config, "lora", 0, out_dir=str(tmp_path), max_steps=2, **TINY)
  assert [h["step"] for h in results["history"]] == [1, 2]
  assert results["history"][0]["loss"] > 0  # something is learned (a response, a label)
  assert all(math.isfinite(h["loss"]) for h in results["history"])
  for metric in config.metrics:
    assert math.isfinite(results["final"][metric])
  written = json.loads((tmp_path / name / "lora" / "seed_0" / "results.json").read_text())
  assert written["final"] == results["final"] and written["total_steps"] == 2


# every method somewhere, on each family
@pytest.mark.parametrize("name,method", [
    ("lorapro_t5_glue/mnli", "full"),
    ("dora_roberta_glue/cola_r2", "dynamic_rank"),
    ("llama2_metamath/gsm8k", "lora_pro"),
    ("vit_images/cifar10", "rslora"),
])
def test_methods_run_on_each_family(name, method, gsm_files, tmp_path):
  # up to 4 steps: dynamic rank's schedule needs T >= 3 for a pruning event (K = int(0.35 T) >= 1)
  results = run_experiment(_config(name, gsm_files), method, 0, out_dir=str(tmp_path),
                           max_steps=4, **TINY)
  assert len(results["history"]) == results["total_steps"] >= 2
  assert all(math.isfinite(h["loss"]) for h in results["history"])
  # tiny models embed the 30,522-token vocabulary in 32 dims: ~1M parameters, adapters ~10k
  if not METHODS[method].adapters:
    assert results["trainable_params"] > 900_000
  else:
    assert results["trainable_params"] < 100_000


@pytest.mark.parametrize("name,method", [("dora_roberta_glue/stsb_r8", "lora_pro_dynamic_rank"),
                                         ("vit_images/cifar100", "lora_pro_full")])
def test_preempted_run_resumes_exactly(name, method, gsm_files, tmp_path):
  config = _config(name, gsm_files)
  straight = run_experiment(config, method, 0, out_dir=str(tmp_path / "straight"), max_steps=4,
                            **TINY)
  first = run_experiment(config, method, 0, out_dir=str(tmp_path / "resumed"), max_steps=4,
                         stop_after=2, **TINY)
  assert [h["step"] for h in first["history"]] == [1, 2]
  second = run_experiment(config, method, 0, out_dir=str(tmp_path / "resumed"), max_steps=4,
                          **TINY)
  assert second["resumed_from"] == 2
  assert [h["step"] for h in second["history"]] == [3, 4]
  np.testing.assert_allclose([h["loss"] for h in second["history"]],
                             [h["loss"] for h in straight["history"][2:]], rtol=1e-6)
  assert second["final"] == straight["final"]


def test_results_table_aggregates_seeds(tmp_path):
  values = {0: 0.80, 1: 0.82, 2: 0.87}
  for seed, value in values.items():
    folder = tmp_path / "lorapro_t5_glue" / "sst2" / "lora_pro" / f"seed_{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "config": "lorapro_t5_glue/sst2", "method": "lora_pro", "seed": seed,
        "metric": "accuracy", "final": {"accuracy": value}, "paper": 94.19}))
  records = collect(str(tmp_path))
  assert len(records) == 3
  mean, std = mean_std([100 * v for v in values.values()])
  assert mean == pytest.approx(83.0) and std == pytest.approx(np.std([80, 82, 87], ddof=1))
  table = markdown_tables(records)
  assert f"| lora_pro | {mean:.2f} ± {std:.2f} (3) [paper 94.19] |" in table
  assert "sst2 (accuracy)" in table


def test_mesh_run_matches_single_device(tmp_path):
  # 8 fake CPU devices (conftest): data 2 x fsdp 4, LoRA-Pro full mode on a tiny RoBERTa
  options = {**TINY, "batch_size": 8, "max_examples": 16}
  single = run_experiment("dora_roberta_glue/mrpc_r8", "lora_pro_full", 0,
                          out_dir=str(tmp_path / "one"), max_steps=2, **options)
  meshed = run_experiment("dora_roberta_glue/mrpc_r8", "lora_pro_full", 0,
                          out_dir=str(tmp_path / "mesh"), max_steps=2, mesh_shape=(2, 4),
                          **options)
  np.testing.assert_allclose([h["loss"] for h in meshed["history"]],
                             [h["loss"] for h in single["history"]], rtol=1e-5)
  assert meshed["final"] == single["final"]


# ------------------------------------------------------------------- the comparison protocol


class _FakeTrainer:
  """A stand-in for a method's trainer: validation accuracy peaks at ``best_lr`` (log scale);
  the test metric is deliberately anti-correlated with it, so using it to choose would show.
  Every call is logged in ``calls``: ("fit", method, settings) and ("test", method, settings)."""

  def __init__(self, method, calls, best_lr):
    self.method, self.calls, self.best_lr = method, calls, best_lr

  def distance(self, lr):
    return math.log10(lr / self.best_lr)

  def fit(self, settings):
    from experiments.compare import Run
    self.calls.append(("fit", self.method, list(settings)))
    group = object()
    return [Run({"lr": lr, "seed": seed, "loss": [1.0, 0.5 + 0.01 * seed], "trainable_params": 7,
                 "validation": {"accuracy": 0.9 - 0.1 * self.distance(lr) ** 2 + 0.001 * seed}},
                group, i) for i, (lr, seed) in enumerate(settings)]

  def test(self, runs):
    self.calls.append(("test", self.method, [(r.record["lr"], r.record["seed"]) for r in runs]))
    return [{"accuracy": 0.5 + 0.1 * self.distance(r.record["lr"]) + 0.01 * r.record["seed"]}
            for r in runs]


def _fake_trainers(calls, best_lr):
  return lambda method: _FakeTrainer(method, calls, best_lr[method])


def test_protocol_selects_on_validation_and_touches_test_once_per_seed(tmp_path):
  from experiments.compare import LR_CENTRES, Protocol, run_protocol
  protocol = Protocol(points=5, span=2.0, select_seeds=(0, 1), test_seeds=(0, 1, 2, 3, 4))
  best = {"full": 1.6e-5, "lora": 1e-2, "lora_pro": 1e-3}   # an edge, an inner point, the centre
  calls = []
  results = run_protocol(_fake_trainers(calls, best), list(best), protocol, "accuracy",
                         str(tmp_path))
  for method in best:
    grid = protocol.grid(method)
    assert len(grid) == 5 and grid[2] == pytest.approx(LR_CENTRES[method])
    np.testing.assert_allclose(np.diff(np.log10(grid)), 0.5)          # 2 decades, log-spaced
    # the choice, recomputed: the best mean validation accuracy over the selection seeds
    means = {lr: np.mean([0.9 - 0.1 * math.log10(lr / best[method]) ** 2 + 0.001 * s
                          for s in (0, 1)]) for lr in grid}
    chosen = max(means, key=means.get)
    assert results["selection"][method]["lr"] == chosen
    mine = [c for c in calls if c[1] == method]
    # the grid (extended past its top edge where the choice sat on it: lora's best is 1e-2, the
    # grid's last rate), then only the test seeds not already trained at the chosen rate, then
    # the test split once per test seed, all at the chosen rate
    extension = [("fit", method, [(pytest.approx(grid[-1] * 10 ** 0.5), s) for s in (0, 1)])]
    assert mine == [("fit", method, [(lr, s) for lr in grid for s in (0, 1)]),
                    *(extension if method == "lora" else []),
                    ("fit", method, [(chosen, s) for s in (2, 3, 4)]),
                    ("test", method, [(chosen, s) for s in range(5)])]
    row = results["results"][method]
    values = [0.5 + 0.1 * math.log10(chosen / best[method]) + 0.01 * s for s in range(5)]
    assert row["test_accuracy"]["values"] == pytest.approx(values)
    assert row["test_accuracy"]["mean"] == pytest.approx(np.mean(values))
    assert row["test_accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
  # every method is a file: a second call trains nothing and returns the same results
  again = run_protocol(lambda method: pytest.fail(f"retrained {method}"), list(best), protocol,
                       "accuracy", str(tmp_path))
  assert again == json.loads(json.dumps(results))
  # a spent budget starts nothing and reports the run as incomplete
  assert run_protocol(_fake_trainers([], best), ["lora"], protocol, "accuracy",
                      str(tmp_path / "other"), budget_seconds=0.0) is None
  assert not (tmp_path / "other").exists()


def test_protocol_extends_the_grid_past_an_edge_choice_at_most_twice(tmp_path):
  """A choice on the grid's edge may hide a better rate beyond it: the grid grows one step at a
  time past that edge (2 at most), also for a method read back from an earlier call's file."""
  from experiments.compare import LR_CENTRES, Protocol, run_protocol
  protocol = Protocol(points=5, span=2.0, select_seeds=(0, 1), test_seeds=(0, 1, 2))
  centre, step = LR_CENTRES["lora"], 10 ** 0.5
  calls = []
  far = run_protocol(_fake_trainers(calls, {"lora": centre * 1e3}), ["lora"], protocol,
                     "accuracy", str(tmp_path / "far"))
  fits = [c[2] for c in calls if c[0] == "fit"]
  assert [lr for lr, _ in fits[1]] + [lr for lr, _ in fits[2]] == pytest.approx(
      [centre * 10 * step] * 2 + [centre * 100] * 2)       # two steps up, then it stops
  assert far["selection"]["lora"]["lr"] == pytest.approx(centre * 100)
  assert len(far["grid"]) == 2 * 7
  # an earlier call's file whose choice sits on the lower edge: extended on reading; the best
  # rate is inside the first extension, so the choice moves and the test seeds train there
  calls.clear()
  low = str(tmp_path / "low")
  run_protocol(_fake_trainers([], {"lora": centre / 10}), ["lora"],
               dataclasses.replace(protocol, extend=0), "accuracy", low)
  again = run_protocol(_fake_trainers(calls, {"lora": centre / 10 / step}), ["lora"], protocol,
                       "accuracy", low)
  assert again["selection"]["lora"]["lr"] == pytest.approx(centre / 10 / step)
  assert [c[0] for c in calls] == ["fit", "fit", "fit", "test"]   # 2 extensions, 1 new seed
  assert [lr for lr, _ in calls[1][2]] == pytest.approx([centre / 100] * 2)


def test_protocol_ties_and_divergence_pick_the_smaller_or_finite_rate(tmp_path):
  from experiments.compare import Protocol, Run, run_protocol
  protocol = Protocol(points=3, select_seeds=(0,), test_seeds=(0, 1))

  class Flat:
    def fit(self, settings):
      return [Run({"lr": lr, "seed": seed, "loss": [1.0], "trainable_params": 1, "validation": {
          "accuracy": float("nan") if lr == protocol.grid("lora")[0] else 0.7}}, None, i)
              for i, (lr, seed) in enumerate(settings)]

    def test(self, runs):
      return [{"accuracy": 0.7} for _ in runs]
  results = run_protocol(lambda method: Flat(), ["lora"], protocol, "accuracy", str(tmp_path))
  assert results["selection"]["lora"]["lr"] == protocol.grid("lora")[1]


def test_runs_trained_side_by_side_equal_the_library_step_run_alone():
  """MethodTrainer.fit vmaps the library's train step over settings; each setting must train
  exactly as the plain jitted step trains it alone (its own batches, seed and rate)."""
  import jax
  from transformers import AutoTokenizer

  from experiments.compare import QUICK, MethodTrainer, load_encoder, load_task
  from lorapro_jax.data.batching import BatchIterator
  from lorapro_jax.demo import minilm_path
  from lorapro_jax.train import TrainState, make_train_step
  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  task = load_task("vader_sentiment", tokenizer, QUICK)
  trainer = MethodTrainer("lora_pro", task, load_encoder(True, tokenizer), QUICK)
  runs = trainer.fit([(3e-3, 0), (1e-2, 1)])
  # alone, with the library's own jitted (unvmapped) step and the same loss
  lr, seed = 1e-2, 1
  setup = trainer._build(seed)
  step = make_train_step(trainer.loss_fn, trainer.optimizer(peak=1.0),
                         regularizer=setup.method.regularizer(setup.dynamic))
  state = TrainState.create(setup.trainable, trainer.optimizer(peak=lr), jax.random.key(seed))
  stream, losses = BatchIterator(task.splits["train"], QUICK.batch_size, seed=seed), []
  for _ in range(QUICK.steps):
    state, metrics = step(state, setup.base, next(stream))
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(runs[1].record["loss"], losses, rtol=2e-5)
  assert runs[0].record["loss"] != runs[1].record["loss"]
  alone = trainer.fit([(lr, seed)])[0]
  np.testing.assert_allclose(alone.record["loss"], losses, rtol=2e-5)
  assert alone.record["validation"] == pytest.approx(runs[1].record["validation"], rel=1e-6)
  assert trainer.test([alone]) == [pytest.approx(s, rel=1e-6) for s in trainer.test([runs[1]])]


@pytest.mark.parametrize("task,methods", [("vader_sentiment", ["lora_pro"]),
                                          ("vader_rating", ["lora", "--points", "2"])])
def test_compare_quick_runs_end_to_end(task, methods, tmp_path, monkeypatch):
  from experiments.compare import QUICK, MethodTrainer, main
  scored = []   # (split, learning rates and seeds of the runs scored): the protocol on a tiny model
  original_score, original_test = MethodTrainer._score, MethodTrainer.test
  testing = []

  def test(self, runs):
    testing.append([(r.record["lr"], r.record["seed"]) for r in runs])
    return original_test(self, runs)

  def score(self, stacked, split):
    scored.append((split, int(stacked.step.shape[0]), bool(testing)))
    return original_score(self, stacked, split)
  monkeypatch.setattr(MethodTrainer, "test", test)
  monkeypatch.setattr(MethodTrainer, "_score", score)
  payload = main(["--task", task, "--quick", "--tiny", "--out", str(tmp_path), "--methods",
                  *methods])[task]
  # the test split is read once, inside test(), for exactly the test seeds at the chosen rate
  chosen = payload["selection"][methods[0]]["lr"]
  assert testing == [[(chosen, seed) for seed in QUICK.test_seeds]]
  test_reads = [s for s in scored if s[0] == "test"]
  assert sum(n for _, n, _ in test_reads) == len(QUICK.test_seeds)
  assert all(after_choice for _, _, after_choice in test_reads)
  assert all(split in ("validation", "test") for split, _, _ in scored)
  method = methods[0]
  folder = tmp_path / task
  for name in ("compare.json", "compare.md", "lr_sweep.png", "loss_curves.png"):
    assert (folder / name).stat().st_size > 0
  written = json.loads((folder / "compare.json").read_text())
  points = 2 if "--points" in methods else QUICK.points
  assert len(written["grid"]) == points * len(QUICK.select_seeds)
  assert payload["selection"][method]["lr"] in {r["lr"] for r in written["grid"]}
  row = written["results"][method]
  assert len(row[f"test_{written['metric']}"]["values"]) == len(QUICK.test_seeds)
  assert all(math.isfinite(v) for v in row[f"test_{written['metric']}"]["values"])
  assert len(json.loads((folder / "runs" / f"{method}.json").read_text())["test"]) == len(
      QUICK.test_seeds)
  assert f"| {method} |" in (folder / "compare.md").read_text()


def test_minilm_dir_override_loads_float16_weights_as_float32(tmp_path, monkeypatch):
  """compare_gpu.sh carries a float16 copy of MiniLM-L6 named by $LORAPRO_MINILM_DIR: the
  loader must read it from there and hand back float32 params equal to the stored values."""
  import jax
  from transformers import BertConfig, FlaxBertModel

  from lorapro_jax.demo import MINILM_DIR_ENV, load_minilm, minilm_path
  monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    minilm_path()
  small = FlaxBertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=16), seed=0)
  stored = small.to_fp16(small.params)
  small.save_pretrained(tmp_path, params=stored)
  assert minilm_path() == str(tmp_path)
  loaded = load_minilm()
  for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(stored), strict=True):
    assert got.dtype == np.float32 and want.dtype == np.float16
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))
