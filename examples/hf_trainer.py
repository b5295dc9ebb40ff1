"""SAM with the Hugging Face Trainer: a tiny GPT-2 (built from a config, no download) on synthetic
token sequences, trained with sharpfused.integrations.huggingface.SAMTrainer.

    python examples/hf_trainer.py            # SAM, LookSAM and XSAM, 200 steps each
    python examples/hf_trainer.py --quick    # a few steps (seconds)

The task: each sequence counts up modulo the vocabulary from a random start, so the next token is
predictable and the loss falls well below log(vocab_size).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import transformers

import sharpfused
from sharpfused.integrations.huggingface import SAMTrainer

VOCAB, LENGTH = 64, 16


def dataset(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in ids]


def model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def train(name: str, sam_class, sam_kwargs: dict, steps: int, out: str) -> float:
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # every SAM pass runs over both micro-batches: the step of 16
        learning_rate=3e-3,
        optim="adamw_torch",
        max_grad_norm=1.0,  # clips the update gradient, inside the optimizer's step
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    m = model()
    trainer = SAMTrainer(model=m, args=args, train_dataset=dataset(256), sam_class=sam_class, sam_kwargs=sam_kwargs)
    t0 = time.perf_counter()
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{name:8s} {steps} steps in {time.perf_counter() - t0:5.1f} s   logged loss {losses[0]:.3f} -> {losses[-1]:.3f}"
          f"   (log vocab = {math.log(VOCAB):.3f})")
    return result.training_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, SAM only (seconds)")
    parser.add_argument("--steps", type=int, default=200)
    a = parser.parse_args()
    steps = 4 if a.quick else a.steps
    runs = [("SAM", sharpfused.SAM, {"rho": 0.05})]
    if not a.quick:
        runs += [("LookSAM", sharpfused.LookSAM, {"rho": 0.05, "k": 5}), ("XSAM", sharpfused.XSAM, {"rho": 0.05, "steps": 2})]
    with tempfile.TemporaryDirectory() as out:
        for name, cls, kw in runs:
            loss = train(name, cls, kw, steps, out)
            assert math.isfinite(loss)


if __name__ == "__main__":
    main()
