"""Image classification with a ViT-B/16 (as LoRA-Pro's Section 3.3 does with CLIP-ViT-B/16).

Supervised fine-tuning of ``google/vit-base-patch16-224-in21k`` on tfds image datasets, LoRA on
query/value and the MLP, classification head trained in every method; the paper's setting.
"""
from experiments.configs import ExperimentConfig

DATASETS = {"cifar10": 10, "cifar100": 100, "stanford_dogs": 120, "oxford_iiit_pet": 37}

CONFIGS = [
    ExperimentConfig(
        name=f"vit_images/{name}", family="vit", model="google/vit-base-patch16-224-in21k",
        task=name, metrics=("accuracy",), rank=8, alpha=16.0,
        learning_rate=1e-4, batch_size=128, epochs=5.0, schedule="cosine", warmup_ratio=0.03,
        seeds=(0, 1, 2), num_labels=classes, image_size=224, dev_split="test",
        paper={}, paper_source="LoRA-Pro (arXiv 2407.18242) Section 3.3 (CLIP-ViT-B/16): not "
                               "the same backbone, numbers not entered")
    for name, classes in DATASETS.items()
]
