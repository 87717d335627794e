"""Instruction data from local JSON (MetaMathQA, GSM8K) for causal LMs, and GSM8K answer matching.

MetaMathQA rows are ``{"query": ..., "response": ...}`` (response ending in
``"The answer is: 18"``); GSM8K rows are ``{"question": ..., "answer": ...}`` (answer ending in
``"#### 18"``). Both are read from a local ``.json`` (a list) or ``.jsonl`` file, put in the
Alpaca prompt that MetaMath trains and evaluates with, and tokenised to fixed-length rows whose
``loss_mask`` is 1 only on response tokens (the prompt is not learned), as in the LoRA-Pro
protocol.

Example::

  rows = load_instruction_json("MetaMathQA-395K.json")
  arrays = encode_causal(tokenizer, rows["prompt"], rows["response"], max_length=1024)
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{query}\n\n### Response:")
FORMATS = {"metamathqa": ("query", "response"), "gsm8k": ("question", "answer")}


def load_instruction_json(path: str, fmt: str | None = None,
                          max_examples: int | None = None) -> dict[str, np.ndarray]:
  """``prompt``, ``response`` and ``answer`` (the final number, as text) of every row."""
  with open(path, encoding="utf-8") as handle:
    if path.endswith(".jsonl"):
      rows = [json.loads(line) for line in handle if line.strip()]
    else:
      rows = json.load(handle)
  if not isinstance(rows, list) or not rows:
    raise ValueError(f"{path}: expected a non-empty list of objects")
  rows = rows[:max_examples]
  if fmt is None:
    fmt = next((name for name, (q, r) in FORMATS.items() if q in rows[0] and r in rows[0]), None)
  if fmt not in FORMATS:
    raise ValueError(f"{path}: rows have keys {sorted(rows[0])}; expected those of one of "
                     f"{ {k: v for k, v in FORMATS.items()} } (or pass fmt=)")
  query_key, response_key = FORMATS[fmt]
  prompts = [PROMPT.format(query=row[query_key]) for row in rows]
  responses = [" " + row[response_key].strip() for row in rows]
  answers = [extract_answer(row[response_key]) for row in rows]
  return {"prompt": np.asarray(prompts, object), "response": np.asarray(responses, object),
          "answer": np.asarray(answers, object)}


def extract_answer(text: str) -> str:
  """The final answer: the first number after ``####`` (GSM8K) or ``The answer is`` (MetaMath),
  else the last number in the text; thousands commas and a trailing period removed; '' when the
  text has no number."""
  text = str(text)
  marked = False
  for marker in ("####", "The answer is"):
    if marker in text:
      text, marked = text.rsplit(marker, 1)[1], True
      break
  numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
  if not numbers:
    return ""
  return (numbers[0] if marked else numbers[-1]).replace(",", "").rstrip(".")


def encode_causal(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                  max_length: int) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask`` and ``loss_mask`` (response tokens, shifted to the
  positions that predict them: ``loss_mask[t] = 1`` when token t+1 is a response token)."""
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
  ids = np.full((len(prompts), max_length), pad_id, np.int32)
  attention = np.zeros((len(prompts), max_length), np.int32)
  loss_mask = np.zeros((len(prompts), max_length), np.float32)
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    tokens = (prompt_ids + response_ids)[:max_length]
    ids[row, :len(tokens)] = tokens
    attention[row, :len(tokens)] = 1
    start = min(len(prompt_ids), len(tokens))
    loss_mask[row, max(start - 1, 0):len(tokens) - 1] = 1.0
  if not loss_mask.any():
    raise ValueError(f"max_length={max_length} truncates every response away: no token to learn "
                     "(the prompts alone are longer)")
  return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
