"""LoRA-Pro, math reasoning: LLaMA-2-7B fine-tuned on MetaMathQA (100k), evaluated on GSM8K.

r = 8, alpha = 16 on all linear layers, lr 2e-5, cosine with 3% warm-up, batch 32, length 1024,
bf16 compute, 1 epoch, 3 seeds; accuracy = exact match of the final number. The run goes through
:mod:`lorapro_jax.finetune` (our decoder, KV-cache GSM8K scoring, PEFT export). The model and
the data are local — nothing is downloaded: ``model`` is the checkpoint directory (e.g.
``huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir checkpoints/Llama-2-7b-hf``),
``train_file`` MetaMathQA rows ``{"query", "response"}``, ``eval_file`` GSM8K test rows
``{"question", "answer"}``.
"""
from experiments.configs import ExperimentConfig

CONFIGS = [
    ExperimentConfig(
        name="llama2_metamath/gsm8k", family="llama", model="checkpoints/Llama-2-7b-hf",
        task="gsm8k", metrics=("exact_match",), rank=8, alpha=16.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        learning_rate=2e-5, batch_size=32, epochs=1.0, max_length=1024, target_length=256,
        schedule="cosine", warmup_ratio=0.03, compute_dtype="bfloat16", seeds=(0, 1, 2),
        train_file="data/MetaMathQA-395K.json", eval_file="data/gsm8k_test.jsonl",
        max_train_examples=100_000,
        paper={},
        paper_source="LoRA-Pro (arXiv 2407.18242), GSM8K accuracy, mean of 3 seeds "
                     "(numbers not entered: fill in from the paper)"),
]
