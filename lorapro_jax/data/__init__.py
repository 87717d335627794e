"""Data pipelines: fixed-shape, deterministically shuffled, resumable batches (``batching``),
GLUE through tfds (``glue``), local instruction JSON (``instruct``), tfds images (``images``) and
the offline VADER word-sentiment task of the demo (``vader``)."""
from lorapro_jax.data.batching import (BatchIterator, eval_batches, host_shard, split_arrays,
                                       tokenize)
from lorapro_jax.data.vader import vader_sentiment
