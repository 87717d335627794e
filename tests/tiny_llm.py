"""A tiny Llama checkpoint as a user would have it on disk (save_pretrained weights, a WordLevel
tokenizer: tokenizer.json + tokenizer_config.json) and the GSM8K-style JSONL rows it learns:
shared by tests/test_finetune.py and benchmarks/launch_finetune_check.py (the same road on GPUs)."""
import json
import os

import jax
import jax.numpy as jnp
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from lorapro_jax.data.instruct import PROMPT
from lorapro_jax.models import DecoderConfig, DecoderForCausalLM, save_pretrained

ROWS = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b} #### {a + b}"}
        for a, b in [(2, 3), (4, 1), (3, 3), (6, 2)]]


def write_tiny_llm(root: str, rows=ROWS, hidden_size: int = 32, num_heads: int = 4
                   ) -> dict[str, str]:
  """Writes ``root/gsm8k.jsonl`` and ``root/checkpoint`` (2 layers of ``hidden_size``, 2 key/value
  heads); returns their paths as ``{"model": ..., "data": ...}``."""
  os.makedirs(root, exist_ok=True)
  data = os.path.join(root, "gsm8k.jsonl")
  with open(data, "w") as handle:
    handle.write("".join(json.dumps(row) + "\n" for row in rows))
  directory = os.path.join(root, "checkpoint")
  os.makedirs(directory)
  tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  texts = [PROMPT.format(query=row["question"]) + " " + row["answer"] for row in rows]
  tokenizer.train_from_iterator(texts + [" ".join(map(str, range(11)))], trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
  tokenizer.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as handle:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "model_input_names": ["input_ids", "attention_mask"]}, handle)
  # a head of 0.3-scale weights can express confident predictions after a few LoRA steps
  model = DecoderForCausalLM(DecoderConfig(
      vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
      intermediate_size=2 * hidden_size, num_layers=2, num_heads=num_heads, num_kv_heads=2,
      initializer_range=0.3))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  save_pretrained(model, params, directory, dtype=jnp.float32)
  return {"model": directory, "data": data}
