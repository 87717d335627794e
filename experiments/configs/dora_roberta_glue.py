"""DoRA dynamic rank, Table 2: RoBERTa-base on GLUE (Mao et al., ACL 2024).

Two budgets: final rank r = 8 from an initial 12, and r = 2 from 3 (initial ceil(1.5 r)). Per-task
learning rate, epochs and batch size follow the AdaLoRA-style GLUE recipe that the dynamic-rank
reference scripts use (entered by hand: check them and the paper's numbers against the paper and
its scripts before quoting). Classification head trained in every method (modules_to_save).
"""
from experiments.configs import ExperimentConfig

# task: (learning rate, epochs, batch size, max length, metric)
HYPER = {
    "mnli": (5e-4, 7, 32, 256, "accuracy"),
    "sst2": (8e-4, 24, 32, 128, "accuracy"),
    "cola": (5e-4, 25, 32, 64, "mcc"),
    "qqp": (5e-4, 5, 32, 320, "accuracy"),
    "qnli": (5e-4, 5, 32, 512, "accuracy"),
    "rte": (1.2e-3, 50, 32, 320, "accuracy"),
    "mrpc": (1e-3, 30, 32, 320, "accuracy"),
    "stsb": (2.2e-3, 25, 32, 128, "pearson"),
}

CONFIGS = [
    ExperimentConfig(
        name=f"dora_roberta_glue/{task}_r{rank}", family="roberta", model="roberta-base",
        task=task, metrics=(metric,) + (("spearman",) if task == "stsb" else ()) + (
            ("f1",) if task in ("mrpc", "qqp") else ()),
        rank=rank, alpha=2.0 * rank, learning_rate=lr,
        full_learning_rate=2e-5, batch_size=batch, epochs=float(epochs), max_length=length,
        schedule="linear", warmup_ratio=0.06, weight_decay=0.01, seeds=(0, 1, 2),
        dem_weight=0.1, num_labels=1 if task == "stsb" else (3 if task == "mnli" else 2),
        paper={}, paper_source="DoRA dynamic rank (arXiv 2405.17357) Table 2, RoBERTa-base "
                               "(numbers not entered: fill in from the paper)")
    for task, (lr, epochs, batch, length, metric) in HYPER.items()
    for rank in (8, 2)
]
