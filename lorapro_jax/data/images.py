"""Image classification through tensorflow-datasets, as ViT inputs.

``load_image_classification("cifar100", "train", image_size=224)`` returns ``pixel_values`` of
shape ``(N, image_size, image_size, 3)`` (channels last, as the linen module of Hugging Face's
``FlaxViTModel`` takes them; its wrapper transposes from channels first), float32, bilinearly
resized and normalised with ``(x/255 − mean)/std`` (ViT's mean = std = 0.5 by default), and
``labels`` (int32). Reads prepared tfds data (``download=False`` by default); tests use
``tfds.testing.mock_data``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def load_image_classification(name: str, split: str, *, image_size: int = 224,
                              mean: Sequence[float] = (0.5, 0.5, 0.5),
                              std: Sequence[float] = (0.5, 0.5, 0.5),
                              data_dir: str | None = None, download: bool = False,
                              max_examples: int | None = None, image_key: str = "image",
                              label_key: str = "label") -> dict[str, np.ndarray]:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  if image_size < 1:
    raise ValueError(f"image_size must be >= 1, got {image_size}")
  dataset = tfds.load(name, split=split, data_dir=data_dir, download=download,
                      shuffle_files=False)
  if max_examples is not None:
    dataset = dataset.take(max_examples)
  mean_, std_ = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  def prepare(example):
    image = tf.cast(example[image_key], tf.float32)
    if image.shape[-1] == 1:  # grey scale (MNIST-like): three equal channels
      image = tf.repeat(image, 3, axis=-1)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    return image, example[label_key]

  images, labels = [], []
  for image, label in tfds.as_numpy(dataset.map(prepare)):
    images.append((image / 255.0 - mean_) / std_)
    labels.append(label)
  if not images:
    raise ValueError(f"{name} split {split!r} is empty")
  pixels = np.stack(images).astype(np.float32)
  return {"pixel_values": pixels, "labels": np.asarray(labels, np.int32)}
