"""SpIEL in a plain PyTorch loop: drop-and-grow driven explicitly with ``sparse_peft.spiel_step``.

With Trainer / SFTTrainer nothing needs calling (SpIEL hooks the optimizer itself); in a custom loop you may either
rely on that hook too or, as here, turn it off (``auto_reselection=False``) and call ``spiel_step`` after each step.

    python examples/spiel_custom_loop.py --tiny --steps 6
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

import sparse_peft
from _common import blocks, model_and_tokenizer
from sparse_peft.evaluation import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()

    model, tokenizer = model_and_tokenizer(args.tiny)
    seq_len = 64 if args.tiny else 256
    train, held_out = blocks(tokenizer, seq_len, n_train=4 * args.steps, n_eval=4 if args.tiny else 16)
    config = sparse_peft.SpielConfig(
        r=16,
        reselection_steps=max(2, args.steps // 5),
        accumulation_steps=1,
        total_steps=args.steps,
        auto_reselection=False,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        batch = train[4 * step : 4 * step + 4]  # (4, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        stats = sparse_peft.spiel_step(model, optimizer)  # drop-and-grow when due, optimizer slots reset
        optimizer.zero_grad()
        if stats:
            print(f"step {step + 1}: loss {loss.item():.3f}  {stats}")
    merged = model.merge_and_unload()
    print(f"held-out perplexity after {args.steps} steps: {perplexity(merged, held_out, progress=False):.2f}")


if __name__ == "__main__":
    main()
