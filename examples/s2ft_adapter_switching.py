"""Two S²FT adapters on one base: train each, switch between them (a scatter, no reload), and fuse them.

python examples/s2ft_adapter_switching.py --tiny --steps 3
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

import sparse_peft
from _common import blocks, model_and_tokenizer


def train(model, data, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(steps):
        batch = data[4 * step : 4 * step + 4]  # (4, T)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    model, tokenizer = model_and_tokenizer(args.tiny)
    data, probe = blocks(tokenizer, 64 if args.tiny else 256, n_train=8 * args.steps, n_eval=2)
    # Two adapters with different random selections (different seeds) train disjoint heads/channels.
    model = get_peft_model(model, sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.05, seed=0))
    train(model, data[: 4 * args.steps], args.steps)
    model.add_adapter("second", sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.05, seed=1))
    model.set_adapter("second")
    train(model, data[4 * args.steps :], args.steps)

    with torch.no_grad():
        outputs = {}
        for name in ("default", "second"):
            model.set_adapter(name)  # switching is a scatter of the stored slices, no reload
            outputs[name] = model(input_ids=probe).logits
    print("the two adapters give different outputs:", not torch.allclose(outputs["default"], outputs["second"]))
    try:
        sparse_peft.s2ft_fuse_adapters(model, ["default", "second"], "both")
        print("fused adapter 'both' = default + second (their selections are disjoint)")
    except ValueError as exc:  # random selections can overlap (e.g. a shared GQA kv head); fusion refuses then
        print(f"not fused: {exc}")


if __name__ == "__main__":
    main()
