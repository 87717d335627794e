"""Word-level binary sentiment from the VADER lexicon (Hutto & Gilbert, ICWSM 2014), shipped offline.

The ``vaderSentiment`` package ships ``vader_lexicon.txt``: 7,517 tokens (words, slang,
emoticons), each with the mean of ten human ratings on a -4..+4 scale, their standard deviation and
the raw ratings. The task: label = 1 if the mean rating is > 0 (positive), else 0. Tokens whose
mean lies in (-margin, +margin) are near-neutral, their sign a coin toss between raters, and are
dropped (``margin=0.5`` keeps 6,803 tokens: 2,988 positive, 3,815 negative; on the dev split
always answering "negative" scores 54.3%). The dev split is a fixed seeded 20% of the kept tokens.

Example::

  train, dev = vader_sentiment()          # dicts of numpy arrays: "text", "label", "rating"
  print(len(train["text"]), dev["label"].mean())
"""
from __future__ import annotations

import os

import numpy as np

from lorapro_jax.data.batching import split_arrays


def vader_lexicon_path() -> str:
  """Path of ``vader_lexicon.txt`` inside the installed ``vaderSentiment`` package."""
  try:
    import vaderSentiment
  except ImportError as error:  # the "data" extra
    raise ImportError("the VADER task needs the vaderSentiment package: "
                      "pip install 'lorapro_jax[data]'") from error
  return os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")


def load_vader_lexicon(path: str | None = None) -> dict[str, np.ndarray]:
  """All distinct lexicon tokens: ``text`` (object array of str) and ``rating`` (mean, float32)."""
  words, ratings, seen = [], [], set()
  with open(path or vader_lexicon_path(), encoding="utf-8") as handle:
    for line_number, line in enumerate(handle, 1):
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 2:
        if line.strip():
          raise ValueError(f"{path}:{line_number}: expected 'token<TAB>mean<TAB>...', got {line!r}")
        continue
      if fields[0] in seen:  # a few tokens ("lol", "ok", ...) are listed twice: keep the first
        continue
      seen.add(fields[0])
      words.append(fields[0])
      ratings.append(float(fields[1]))
  return {"text": np.asarray(words, dtype=object), "rating": np.asarray(ratings, np.float32)}


VALIDATION_FRACTION, VALIDATION_SEED = 0.2, 1


def validation_split(rest: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                          dict[str, np.ndarray]]:
  """(train, validation): the fixed seeded 20% of the non-test rows on which learning rates are
  chosen (``experiments/compare.py``); the demo trains on the same train rows."""
  return split_arrays(rest, VALIDATION_FRACTION, VALIDATION_SEED)


def vader_sentiment(margin: float = 0.5, dev_fraction: float = 0.2, seed: int = 0,
                    path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train, dev) of the binary task; each a dict of ``text``, ``rating``, ``label`` (int32)."""
  if margin < 0:
    raise ValueError(f"margin must be >= 0, got {margin}")
  lexicon = load_vader_lexicon(path)
  keep = np.abs(lexicon["rating"]) >= margin if margin > 0 else lexicon["rating"] != 0
  rows = {k: v[keep] for k, v in lexicon.items()}
  rows["label"] = (rows["rating"] > 0).astype(np.int32)
  return split_arrays(rows, dev_fraction, seed)
