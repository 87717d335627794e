"""LoRA-Pro, Table 1: T5-base on five GLUE tasks, text-to-text (Wang et al., ICLR 2025).

r = 8, alpha = 16, lr 1e-4 (all methods), batch 32, 1 epoch, length 128, cosine schedule with
3% warm-up, 3 seeds; LoRA on every attention and MLP projection of encoder and decoder.
The paper's numbers are not entered: ``PAPER`` maps method -> task -> the paper's Table 1 value
(dev accuracy in %, mean of 3 seeds); fill it in from the paper itself, and the results writer
(``experiments/results_table.py``) prints them beside ours.
"""
from experiments.configs import ExperimentConfig

PAPER: dict[str, dict[str, float]] = {}  # method -> task -> Table 1 value (to be entered)
METRIC = {"mnli": "accuracy", "sst2": "accuracy", "cola": "accuracy", "qnli": "accuracy",
          "mrpc": "accuracy"}

CONFIGS = [
    ExperimentConfig(
        name=f"lorapro_t5_glue/{task}", family="t5", model="t5-base", task=task,
        metrics=(METRIC[task],), rank=8, alpha=16.0, learning_rate=1e-4, batch_size=32, epochs=1.0,
        max_length=128, schedule="cosine", warmup_ratio=0.03, seeds=(0, 1, 2),
        num_labels=3 if task == "mnli" else 2,
        paper={method: numbers[task] for method, numbers in PAPER.items() if task in numbers},
        paper_source="LoRA-Pro (arXiv 2407.18242) Table 1, T5-base, mean of 3 seeds")
    for task in ("mnli", "sst2", "cola", "qnli", "mrpc")
]
