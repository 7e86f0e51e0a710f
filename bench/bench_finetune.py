"""Training throughput of finetune.py's own path on real data: its data loading, PrefixLMCollator, model loading and
LoRA wiring, then forward + backward + AdamW steps over collator batches in the Trainer's (seeded, shuffled) order.

    python bench/bench_finetune.py                                  # embedded small model, demo data, 10 steps
    python bench/bench_finetune.py --steps 3 --warmup 1 --threads 1 --json out.json
    python bench/bench_finetune.py --model_name_or_path /models/chatglm-6b --dataset_path data/belle  # on a GPU

The same batches are timed twice: padded to the batch's longest row (what the collator does) and padded to
--max_seq_length, which shows what dynamic padding saves. Peak memory is one training step at the largest timed batch,
in a fresh subprocess (CPU: peak RSS of that process; CUDA: torch.cuda.max_memory_allocated).
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path


import torch
from torch.utils.data import BatchSampler, RandomSampler

from _common import (
    peak_memory_bytes, report, report_memory, run_memory_child, sync)
from glm_tune.arguments import DEMO_TRAIN, DataArguments, LoraArguments, ModelArguments
from glm_tune.data import PrefixLMCollator, load_training_data
from glm_tune.loading import load_model, load_tokenizer
from glm_tune.lora import add_lora

# Flags that finetune.py has too: their defaults and help come from its dataclasses.
SHARED = {"model_name_or_path": ModelArguments, "dtype": ModelArguments, "dataset_path": DataArguments,
          "max_seq_length": DataArguments, "pad_to_multiple_of": DataArguments, "lora_rank": LoraArguments,
          "lora_alpha": LoraArguments, "lora_target": LoraArguments}
DTYPES = ["auto", "fp32", "bf16", "fp16"]
DATA_HELP = "a folder from tokenize_dataset_rows_belle.py, or a .json/.jsonl file (tokenized now, as finetune.py does)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def setup_data(args):
    """finetune.py's tokenizer and training set, and the device the Trainer would pick."""
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model_name_or_path)
    dataset, summary = load_training_data(args.dataset_path, tokenizer, args.max_seq_length)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu"), tokenizer, dataset, summary


def setup_model(args, device):
    """finetune.py's LoRA model (+ activation checkpointing as the Trainer enables it) and the Trainer's optimizer."""
    model = load_model(args.model_name_or_path, args.dtype)
    model.config.use_cache = False
    torch.manual_seed(args.seed)  # as finetune.py: seeded before the adapters are created
    model = add_lora(model, args.lora_rank, args.lora_alpha, LoraArguments.lora_dropout, args.lora_target)
    if args.gradient_checkpointing:  # what Trainer(--gradient_checkpointing) calls: non-reentrant, input grads on
        model.activation_checkpointing_enable()
    model.to(device).train()
    # The Trainer's default optimizer on torch >= 2.8 (adamw_torch_fused) at its default lr and weight decay.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0,
                                  fused=True)
    return model, optimizer


def collate(collator, dataset, indices):
    return collator([dataset[int(i)] for i in indices])


def train_step(model, optimizer, batch, device):
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)  # max_grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(model, optimizer, batches, warmup, device):
    """{mode: batches} -> {mode: seconds of each step after the first `warmup`}. The modes take turns batch by
    batch, so that a background load that comes and goes slows them alike and their ratio stays fair."""
    times = {mode: [] for mode in batches}
    for i, step in enumerate(zip(*batches.values())):
        for mode, batch in zip(batches, step):
            sync(device)
            start = time.perf_counter()
            train_step(model, optimizer, batch, device)
            sync(device)
            if i >= warmup:
                times[mode].append(time.perf_counter() - start)
    return times


def stats(batches, times):
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    loss_bearing = sum(int((b["labels"] != -100).sum()) for b in batches)  # the collator's label_pad
    total = sum(times)
    return {"real_tokens_per_s": real / total, "padded_tokens_per_s": padded / total, "pad_fraction": 1 - real / padded,
            "loss_fraction_of_real": loss_bearing / real, "loss_fraction_of_all": loss_bearing / padded,
            "step_s": statistics.median(times), "step_times_s": [round(t, 4) for t in times], "total_s": total,
            "shapes": " ".join("x".join(map(str, t)) for t in sorted({tuple(b["input_ids"].shape) for b in batches}))}


def memory_child(args):
    baseline = peak_memory_bytes(torch.device("cpu"))  # interpreter + torch + transformers, before any data or model
    device, tokenizer, dataset, _ = setup_data(args)
    batch = collate(PrefixLMCollator(tokenizer, args.pad_to_multiple_of), dataset, args._memory_rows.split(","))
    train_step(*setup_model(args, device), batch, device)
    sync(device)
    report_memory({"peak_memory_gb": peak_memory_bytes(device) / 1e9,
                   "baseline_rss_gb": baseline / 1e9 if device.type == "cpu" else 0})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for name, source in SHARED.items():
        f = next(f for f in dataclasses.fields(source) if f.name == name)
        help = DATA_HELP if name == "dataset_path" else f.metadata["help"]
        p.add_argument(f"--{name}", type=str if f.type is str else int, default=f.default,
                       choices=DTYPES if name == "dtype" else None, help=help)
    p.set_defaults(dataset_path=str(DEMO_TRAIN))
    p.add_argument("--per_device_train_batch_size", type=int, default=8, help="rows per batch")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per padding mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (per mode, on the same batches)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward, as finetune.py --gradient_checkpointing")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default); use 1 when "
                   "other work shares the cores: oversubscribed threads can make steps 10-30x slower")
    p.add_argument("--seed", type=int, default=42, help="seed of the shuffled order (the Trainer's --seed default)")
    p.add_argument("--json", help="also write the results to this file (atomically)")
    p.add_argument("--_memory_rows", help=argparse.SUPPRESS)  # the child: one step on these rows
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args._memory_rows:
        return memory_child(args)

    device, tokenizer, dataset, summary = setup_data(args)
    print(f"{args.dataset_path}:\n{summary.format()}", flush=True)
    bs, n = args.per_device_train_batch_size, args.warmup + args.steps
    # The Trainer's order: a seeded RandomSampler (num_samples past the end continues with the next epochs' orders).
    sampler = RandomSampler(dataset, num_samples=n * bs, generator=torch.Generator().manual_seed(args.seed))
    index_batches = list(BatchSampler(sampler, bs, drop_last=False))
    collators = {"dynamic": PrefixLMCollator(tokenizer, args.pad_to_multiple_of),  # pad to the batch's longest
                 "max_length": PrefixLMCollator(tokenizer, args.max_seq_length)}  # to max_seq_length (or 2x, 3x..
    # ..for the longer rows a saved folder may hold: its rows are not cut to --max_seq_length)
    batches = {mode: [collate(c, dataset, idx) for idx in index_batches] for mode, c in collators.items()}
    res = {"model": args.model_name_or_path or "embedded small", "dataset": args.dataset_path, "device": str(device),
           "threads": torch.get_num_threads(), "batch_size": bs, "max_seq_length": args.max_seq_length,
           "gradient_checkpointing": args.gradient_checkpointing}

    # Memory first, so that on a GPU the child never shares the device with this process's model.
    largest = max(range(args.warmup, n), key=lambda i: batches["dynamic"][i]["input_ids"].numel())
    res["memory_batch"] = "x".join(map(str, batches["dynamic"][largest]["input_ids"].shape))
    row_ids = ",".join(map(str, index_batches[largest]))
    argv = [*sys.argv[1:], "--threads", str(res["threads"]), "--_memory_rows", row_ids]
    res.update(run_memory_child(Path(__file__).resolve(), argv))
    print(f"peak memory: {res['peak_memory_gb']:.2f} GB", flush=True)

    model, optimizer = setup_model(args, device)
    res["dtype"] = str(next(model.parameters()).dtype).split(".")[-1]
    for mode, times in time_steps(model, optimizer, batches, args.warmup, device).items():
        res[mode] = stats(batches[mode][args.warmup:], times)
    res["dynamic_padding_speedup"] = res["max_length"]["total_s"] / res["dynamic"]["total_s"]

    d, m = res["dynamic"], res["max_length"]
    rows = [(k, res[k]) for k in ("model", "device", "dtype", "threads", "batch_size")]
    rows += [("loss-bearing tokens (labels != -100)", f"{d['loss_fraction_of_real']:.3f} of real tokens, "
              f"{d['loss_fraction_of_all']:.3f} | {m['loss_fraction_of_all']:.3f} of all")]
    rows += [(f"{name} (longest | pad to {args.max_seq_length})", f"{fmt.format(d[key])} | {fmt.format(m[key])}")
             for name, key, fmt in (("real tokens/s", "real_tokens_per_s", "{:.1f}"),
                                    ("padded tokens/s", "padded_tokens_per_s", "{:.1f}"),
                                    ("padding fraction", "pad_fraction", "{:.3f}"),
                                    ("s/step (median)", "step_s", "{:.3f}"), ("batch shapes", "shapes", "{}"))]
    kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
    before = f" (process before loading: {res['baseline_rss_gb']:.2f})" if res["baseline_rss_gb"] else ""
    rows += [("dynamic padding speed-up", f"{res['dynamic_padding_speedup']:.2f}x"),
             (f"peak memory GB ({res['memory_batch']}, {kind})", f"{res['peak_memory_gb']:.2f}{before}")]
    report(rows, res, args.json)


if __name__ == "__main__":
    main()
