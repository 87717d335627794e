"""LoRA on a loaded checkpoint: inject the family's preset, train a few LoRA-Pro steps, export to
PEFT, and load the adapter with peft on the PyTorch model: same logits, same greedy tokens."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from hf_decoders import left_padded, torch_logits, torch_model

from lorapro_jax.inject import init_adapters, inject
from lorapro_jax.lora_pro import lora_pro
from lorapro_jax.models import generate, load_pretrained, preset
from lorapro_jax.peft_format import export_peft
from lorapro_jax.trees import combine

peft = pytest.importorskip("peft")


def trained_adapters(model, base, config, ids):
  """Three LoRA-Pro steps on next-token cross-entropy (B leaves zero, so the adapter acts)."""
  trainable = init_adapters(model, base, jax.random.key(0), ids[:, :-1])
  optimizer = lora_pro(5e-2, config.scales(trainable))
  state = optimizer.init(trainable)

  def loss(trainable):
    logits = model.apply({"params": combine(base, trainable)}, ids[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

  @jax.jit
  def step(trainable, state):
    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = optimizer.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value

  losses = []
  for _ in range(3):
    trainable, state, value = step(trainable, state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  return trainable


@pytest.mark.parametrize("name", ["llama3", "gemma"])
def test_peft_export_of_a_lora_pro_adapter_matches_pytorch(tmp_path, name):
  hf = torch_model(name)
  hf.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
  base_model, base = load_pretrained(tmp_path / "base")
  config = preset(base_model.config.family, rank=4, alpha=8.0)
  model = inject(base_model, config)
  ids = np.random.default_rng(9).integers(1, hf.config.vocab_size, (4, 12))
  trainable = trained_adapters(model, base, config, ids)
  assert trainable["model"]["layers"]["mlp"]["down_proj"]["lora_a"].shape == (2, 80, 4)
  written = export_peft(trainable, config, tmp_path / "adapter", family=base_model.config.family)
  assert written["target_modules"] == list(config.targets)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    adapted = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  params = combine(base, trainable)
  prompt, mask = left_padded((8, 3), 8, hf.config.vocab_size, seed=10)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, prompt, mask))
  expected = torch_logits(adapted, prompt, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)
  with adapted.disable_adapter():  # the adapter moves the logits: the comparison means something
    assert np.max(np.abs(expected - torch_logits(adapted, prompt, mask))[real]) > 1e-2
  if name == "llama3":  # greedy decoding with the adapter injected, against PEFT's generate
    tokens = np.asarray(generate(model, params, prompt, attention_mask=mask, max_new_tokens=8))
    with torch.no_grad():
      torch_tokens = adapted.generate(input_ids=torch.as_tensor(prompt),
                                      attention_mask=torch.as_tensor(mask), max_new_tokens=8,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(tokens, torch_tokens[:, prompt.shape[1]:].numpy())
