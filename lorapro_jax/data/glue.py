"""GLUE through tensorflow-datasets: classification inputs (BERT/RoBERTa) or text-to-text (T5).

``tfds.load(f"glue/{task}")`` reads prepared data (``data_dir``; ``download=False`` by default, so
nothing is fetched unless asked). Two encodings:

* classification: ``input_ids``/``attention_mask`` (+ ``token_type_ids``) of the sentence (pair),
  ``labels`` the class index (a float for STS-B's regression);
* text-to-text, as T5 and the LoRA-Pro protocol (Raffel et al., 2020, appendix D): the input
  ``"{task} {key1}: {text1} {key2}: {text2}"`` and the target the label's *word*
  (``"entailment"``, ``"positive"``, ...; STS-B: the score rounded to 0.2, e.g. ``"3.8"``);
  ``decoder_input_ids`` are the target shifted right behind the decoder start token,
  ``decoder_attention_mask`` marks real target tokens. Evaluation scores every class word and
  takes the best (rank classification), so a prediction is always a valid label.

Example (mock data, no download)::

  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=8):
    rows = load_glue("sst2", "train")          # {"sentence": [...], "label": [...]}
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorapro_jax.data.batching import tokenize


@dataclass(frozen=True)
class GlueTask:
  """Column names, label words (T5 targets), metrics and the dev split of one GLUE task."""

  text_keys: tuple[str, ...]
  label_words: tuple[str, ...]  # empty for the regression task STS-B
  metrics: tuple[str, ...]
  dev_split: str = "validation"

  @property
  def num_labels(self) -> int:
    return len(self.label_words) or 1


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy")),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                     ("accuracy", "f1")),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": GlueTask(("sentence1", "sentence2"), (), ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                     ("accuracy",), "validation_matched"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}


def glue_task(name: str) -> GlueTask:
  if name not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; expected one of {sorted(GLUE_TASKS)}")
  return GLUE_TASKS[name]


def load_glue(task: str, split: str, *, data_dir: str | None = None, download: bool = False,
              max_examples: int | None = None) -> dict[str, np.ndarray]:
  """The task's columns as numpy arrays (texts as str, ``label`` int or float)."""
  import tensorflow_datasets as tfds
  spec = glue_task(task)
  split = spec.dev_split if split == "dev" else split
  dataset = tfds.load(f"glue/{task}", split=split, data_dir=data_dir, download=download,
                      shuffle_files=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  columns: dict[str, list] = {key: [] for key in (*spec.text_keys, "label")}
  for example in tfds.as_numpy(dataset):
    for key in spec.text_keys:
      columns[key].append(example[key].decode("utf-8"))
    columns["label"].append(example["label"])
  if not columns["label"]:
    raise ValueError(f"glue/{task} split {split!r} is empty")
  return {k: np.asarray(v, dtype=object if k != "label" else None) for k, v in columns.items()}


def encode_classification(task: str, rows: Mapping[str, np.ndarray], tokenizer: Any,
                          max_length: int) -> dict[str, np.ndarray]:
  """Token arrays of the sentence (pair) and ``labels`` (int32, or float32 for STS-B)."""
  spec = glue_task(task)
  texts = [list(map(str, rows[key])) for key in spec.text_keys]
  encoded = tokenize(tokenizer, texts[0], max_length, texts[1] if len(texts) > 1 else None)
  encoded["labels"] = np.asarray(rows["label"], np.float32 if not spec.label_words else np.int32)
  return encoded


def t5_input_text(task: str, rows: Mapping[str, np.ndarray]) -> list[str]:
  """``"{task} {key}: {text} ..."`` per example (T5's GLUE preprocessing)."""
  spec = glue_task(task)
  keys = spec.text_keys[::-1] if task == "mnli" else spec.text_keys  # T5: hypothesis first
  n = len(rows["label"])
  return [" ".join([task] + [f"{key}: {rows[key][i]}" for key in keys]) for i in range(n)]


def t5_target_text(task: str, labels: Sequence[Any]) -> list[str]:
  spec = glue_task(task)
  if not spec.label_words:
    return [f"{round(float(value) * 5) / 5:.1f}" for value in labels]
  return [spec.label_words[int(value)] for value in labels]


def encode_text_to_text(task: str, rows: Mapping[str, np.ndarray], tokenizer: Any,
                        max_length: int, target_length: int = 8,
                        decoder_start_token_id: int = 0) -> dict[str, np.ndarray]:
  """Encoder ``input_ids``/``attention_mask``, ``decoder_input_ids``, ``decoder_attention_mask``,
  ``target_ids`` (the target, padded) and ``labels`` (class index, for scoring)."""
  inputs = tokenize(tokenizer, t5_input_text(task, rows), max_length)
  targets = tokenize(tokenizer, t5_target_text(task, rows["label"]), target_length)
  return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
          **shift_right(targets["input_ids"], targets["attention_mask"], decoder_start_token_id),
          "labels": np.asarray(rows["label"], np.float32 if not glue_task(task).label_words
                               else np.int32)}


def shift_right(target_ids: np.ndarray, target_mask: np.ndarray,
                decoder_start_token_id: int) -> dict[str, np.ndarray]:
  """Teacher forcing: the decoder reads ``[start, t_0, ..., t_{n-2}]`` and predicts ``t``."""
  decoder_input_ids = np.concatenate(
      [np.full((len(target_ids), 1), decoder_start_token_id, target_ids.dtype),
       target_ids[:, :-1]], axis=1)
  return {"decoder_input_ids": decoder_input_ids, "target_ids": target_ids,
          "decoder_attention_mask": target_mask.astype(np.int32)}


def label_word_ids(task: str, tokenizer: Any, target_length: int = 8,
                   decoder_start_token_id: int = 0) -> dict[str, np.ndarray]:
  """Each class word encoded as a target (rows in class order), for rank classification."""
  spec = glue_task(task)
  if not spec.label_words:
    raise ValueError(f"glue/{task} is a regression task: it has no label words to rank")
  encoded = tokenize(tokenizer, list(spec.label_words), target_length)
  return shift_right(encoded["input_ids"], encoded["attention_mask"], decoder_start_token_id)
