"""KV-cache generation against transformers' greedy ``generate`` on the tiny PyTorch models:
left-padded prompts of different lengths, EOS, token for token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_decoders import left_padded, our_config, to_ours, torch_model

from lorapro_jax.models import DecoderForCausalLM, generate

NEW = 10


def torch_greedy(model, ids, mask, eos: int | None) -> np.ndarray:
  """transformers' greedy continuation (new tokens only, pad id 0 after EOS)."""
  with torch.no_grad():
    out = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         eos_token_id=eos, min_new_tokens=0)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma"])
def test_greedy_equals_transformers(name):
  """Rows of 9, 5 and 2 prompt tokens; Mistral's window (5) is shorter than prompt + new tokens.
  Then an EOS that one row emits early: that row pads, the others go on."""
  hf = torch_model(name)
  model, params = DecoderForCausalLM(our_config(hf)), to_ours(hf)
  ids, mask = left_padded((9, 5, 2), 9, hf.config.vocab_size, seed=7)
  ours = np.asarray(generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW))
  np.testing.assert_array_equal(ours, torch_greedy(hf, ids, mask, eos=None))
  assert len(set(ours[:, 3])) > 1  # the rows do not all say the same thing
  eos = int(ours[1, 3])
  stopped = np.asarray(generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW,
                                eos_token_id=eos, bucket=16))
  expected = torch_greedy(hf, ids, mask, eos=eos)
  np.testing.assert_array_equal(stopped[:, :expected.shape[1]], expected)
  assert (stopped[:, expected.shape[1]:] == 0).all()
  first = list(stopped[1]).index(eos)
  assert first <= 3 and (stopped[1, first + 1:] == 0).all()


def test_sampling_follows_temperature_and_top_p():
  """Temperature 1e-3 samples the argmax; top_p that keeps one token is greedy too; a
  temperature of 1 with a fixed key is reproducible and differs from greedy somewhere."""
  hf = torch_model("qwen2")
  model, params = DecoderForCausalLM(our_config(hf)), to_ours(hf)
  ids, mask = left_padded((6, 4), 6, hf.config.vocab_size, seed=8)
  greedy = generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW)
  key = jax.random.key(3)
  for kwargs in (dict(temperature=1e-3), dict(temperature=1.0, top_p=1e-6)):
    np.testing.assert_array_equal(generate(model, params, ids, attention_mask=mask,
                                           max_new_tokens=NEW, key=key, **kwargs), greedy)
  hot = [generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, key=key,
                  temperature=1.0) for _ in range(2)]
  np.testing.assert_array_equal(hot[0], hot[1])
  assert bool(jnp.any(hot[0] != greedy))


def test_bad_arguments_are_rejected():
  hf = torch_model("qwen2")
  model, params = DecoderForCausalLM(our_config(hf)), to_ours(hf)
  ids = np.ones((1, 3), np.int32)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    generate(model, params, ids, max_new_tokens=2, temperature=0.7)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    generate(model, params, ids, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"attention_mask \(1, 2\) does not match"):
    generate(model, params, ids, attention_mask=np.ones((1, 2)), max_new_tokens=2)
  with pytest.raises(TypeError, match="not a DecoderForCausalLM"):
    generate(hf, params, ids, max_new_tokens=2)
