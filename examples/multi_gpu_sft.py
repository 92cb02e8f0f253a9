"""Sparse fine-tuning of a pruned model on several GPUs (or CPU processes) with accelerate: DDP or FSDP2,
checkpoints, and an exact resume. See docs/tutorials/multi_gpu.md.

    accelerate launch --config_file examples/accelerate/ddp.yaml examples/multi_gpu_sft.py --tuner spiel
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/multi_gpu_sft.py --tuner spiel
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/multi_gpu_sft.py --tuner spiel --resume last
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/multi_gpu_sft.py --tiny --cpu  # on CPUs
    python examples/multi_gpu_sft.py --tiny --steps 2                                                   # one process

The model is the embedded SmolLM2-135M (or ``--model``, any causal LM folder), pruned to 50% by magnitude on load
(the same on every rank) to stand in for your pruned model; ``--tiny`` uses a 2-layer random Llama and random tokens.
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers
from peft import get_peft_model
from transformers.trainer_utils import get_last_checkpoint

import sparse_peft
from sparse_peft.pruning import prune
from sparse_peft.training import SpielCallback


def tuner_config(tuner: str, steps: int, r: int):
    if tuner == "sparse_lora":
        return sparse_peft.SparseLoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM")
    if tuner == "s2ft":
        return sparse_peft.S2FTConfig(heads_ratio=0.25, channels_ratio=0.05, task_type="CAUSAL_LM")
    every = max(2, steps // 10)
    return sparse_peft.SpielConfig(
        r=r, reselection_steps=every, accumulation_steps=max(1, every // 4), task_type="CAUSAL_LM"
    )


def model_and_data(args):
    """The model to fine-tune and its training blocks ``(n, seq_len)``: the same on every rank."""
    if args.tiny:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
        blocks = torch.randint(0, 256, (8 * args.steps, 32), generator=torch.Generator().manual_seed(0))
        return model, blocks
    from sparse_peft.embedded import load_smollm2, token_blocks, wiki_split

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = load_smollm2()
    n = args.batch * args.steps * int(os.environ.get("WORLD_SIZE", "1"))
    return model, token_blocks(tokenizer, wiki_split()[0][: 40 * n], args.seq_len, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuner", choices=["sparse_lora", "spiel", "s2ft"], default="spiel")
    ap.add_argument("--model", default=None, help="a causal LM folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and random tokens (smoke tests)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--save-steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4, help="sequences per device and step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--output-dir", default="multi_gpu_out")
    ap.add_argument("--resume", default=None, help="a checkpoint folder, or 'last' for the newest in --output-dir")
    ap.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo), e.g. to rehearse on a laptop")
    args = ap.parse_args()

    model, blocks = model_and_data(args)
    prune(model, "magnitude", 0.5, progress=False)
    model = get_peft_model(model, tuner_config(args.tuner, args.steps, r=2 if args.tiny else 16))
    train = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            save_steps=args.save_steps,
            logging_steps=max(1, args.steps // 10),
            seed=0,
            report_to=[],
            disable_tqdm=True,
            use_cpu=args.cpu,
            dataloader_pin_memory=not args.cpu and torch.cuda.is_available(),
        ),
        train_dataset=train,
        callbacks=[SpielCallback()] if args.tuner == "spiel" else None,  # the run's length for the regrow decay
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        print("note: accelerate runs FSDP on GPUs only; this run on CPU processes is DDP")
    resume = get_last_checkpoint(args.output_dir) if args.resume == "last" else args.resume
    trainer.train(resume_from_checkpoint=resume)
    state = trainer.accelerator.get_state_dict(trainer.model)  # whole tensors (gathered under FSDP)
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():  # the small adapter to share: no optimizer or drop-and-grow state in it
        peft_model.save_pretrained(os.path.join(args.output_dir, "adapter"), state_dict=state)
        tuner = peft_model.base_model
        stats = tuner.spiel_stats() if hasattr(tuner, "spiel_stats") else {}
        world = trainer.args.world_size
        print(f"done: {trainer.state.global_step} steps on {world} process(es); adapter in {args.output_dir}/adapter")
        print(f"spiel_stats: {stats}" if stats else f"tuner: {args.tuner}")


if __name__ == "__main__":
    main()
