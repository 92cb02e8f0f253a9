"""Prune SmolLM2 with Wanda, recover it with SparseLoRA through TRL's SFTTrainer, merge, verify, evaluate.

python examples/prune_and_recover.py                 # the real SmolLM2-135M, ~5 min on 2 CPU cores
python examples/prune_and_recover.py --tiny --steps 2   # a smoke test on a tiny random model
"""

from __future__ import annotations

import argparse

import datasets
from trl import SFTConfig, SFTTrainer

import sparse_peft
from _common import blocks, model_and_tokenizer
from sparse_peft.evaluation import perplexity
from sparse_peft.pruning import calibration_from_texts, prune
from sparse_peft.embedded import wiki_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pattern", default=None, help="e.g. 2:4 instead of 50%% unstructured")
    ap.add_argument("--out", default="prune_and_recover_out")
    args = ap.parse_args()

    model, tokenizer = model_and_tokenizer(args.tiny)
    seq_len = 64 if args.tiny else 256
    train, held_out = blocks(tokenizer, seq_len, n_train=8 * args.steps, n_eval=4 if args.tiny else 32)
    print(f"dense perplexity   {perplexity(model, held_out, progress=False):8.2f}")

    calibration = calibration_from_texts(
        tokenizer, wiki_split()[0][:2000], nsamples=8 if args.tiny else 64, seq_len=seq_len
    )
    report = prune(model, "wanda", None if args.pattern else 0.5, args.pattern, calibration)
    print(f"pruned perplexity  {perplexity(model, held_out, progress=False):8.2f}  ({report.sparsity:.1%} zeros)")

    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"input_ids": train.tolist()}),
        args=SFTConfig(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            gradient_checkpointing=False,
            logging_steps=10,
            report_to=[],
            save_strategy="no",
            bf16=False,
        ),
        peft_config=sparse_peft.SparseLoraConfig(r=16, lora_alpha=32),
    )
    trainer.train()
    merged = trainer.model.merge_and_unload()
    after = sparse_peft.sparsity_report(merged, nm_pattern=args.pattern)
    assert after.zeros >= report.zeros, "a pruned weight came back"
    print(
        f"recovered (merged) {perplexity(merged, held_out, progress=False):8.2f}  ({after.sparsity:.1%} zeros"
        + (f", {args.pattern} valid: {after.nm_valid}" if args.pattern else "")
        + ")"
    )
    merged.save_pretrained(f"{args.out}/merged")


if __name__ == "__main__":
    main()
