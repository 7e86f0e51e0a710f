"""Seconds per DreamBooth LoRA training step (train_lora_sd.py's own setup and optimizer step: VAE encode, text
encoder, UNet forward + backward, AdamW) on the embedded small Stable Diffusion pipeline, or on any SD folder.

    python bench/bench_lora_sd.py                                   # the configurations below, 1 thread
    python bench/bench_lora_sd.py --steps 20 --warmup 3 --threads 2 --json out.json
    python bench/bench_lora_sd.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --configs sd15 --mixed_precision fp16                     # on a GPU

Each configuration is the embedded demo's flags with a few changed; the median of --steps timed optimizer steps
after --warmup untimed ones is reported (and, on CUDA, peak memory).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import cpu_name, peak_memory_bytes, report, sync
from glm_tune.sd_lora import DEMO_ARGS, build_accelerator, optimizer_step, parse_args, setup
from glm_tune.training import windows

CONFIGS = {  # name -> flags after the demo's
    "demo": [],  # batch 4, 32x32, LoRA rank 8 on every UNet layer: `python train_lora_sd.py`
    "attention": ["--lora_layers", "attention", "--rank", "4"],  # diffusers' targets
    "text_encoder": ["--train_text_encoder"],
    "batch1": ["--train_batch_size", "1"],
    "checkpointing": ["--gradient_checkpointing"],
    "sd15": ["--resolution", "512", "--train_batch_size", "1", "--lora_layers", "attention", "--rank", "4"],
}
DEFAULT_CONFIGS = ["demo", "attention", "text_encoder", "batch1", "checkpointing"]


def time_config(name, extra, args_in, out_dir):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    flags = [*DEMO_ARGS, *CONFIGS[name], *extra, "--validation_steps", "0", "--checkpointing_steps", "100000",
             "--max_train_steps", str(args_in.warmup + args_in.steps), "--output_dir", str(out_dir / name)]
    if args_in.pretrained_model_name_or_path:
        flags += ["--pretrained_model_name_or_path", args_in.pretrained_model_name_or_path]
    if args_in.mixed_precision:
        flags += ["--mixed_precision", args_in.mixed_precision]
    args = parse_args(flags)
    accelerator = build_accelerator(args)
    run = setup(args, accelerator)
    device = accelerator.device
    for model in run.trained_models():
        model.train()
    times = []
    while len(times) < args_in.warmup + args_in.steps:
        run.dataset.epoch = run.epoch
        run.train_dl.set_epoch(run.epoch)
        for window in windows(run.train_dl, args.gradient_accumulation_steps):
            sync(device)
            started = time.perf_counter()
            optimizer_step(run, window)
            sync(device)
            times.append(time.perf_counter() - started)
            if len(times) >= args_in.warmup + args_in.steps:
                break
        run.epoch += 1
    timed = times[args_in.warmup:]
    return {"config": name, "flags": CONFIGS[name] + extra, "seconds_per_step": statistics.median(timed),
            "min_s": min(timed), "images_per_step": args.train_batch_size * accelerator.num_processes,
            "resolution": args.resolution, "precision": accelerator.mixed_precision, "device": str(device),
            "peak_memory_bytes": peak_memory_bytes(device) if device.type == "cuda" else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=DEFAULT_CONFIGS,
                        help="configurations to time (default: %(default)s)")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="pipeline folder or hub id (default: the embedded small pipeline)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="as train_lora_sd.py (default: no)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output_dir", default="/tmp/bench_lora_sd", help="scratch folder for the runs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [time_config(name, [], args, Path(args.output_dir)) for name in args.configs]
    rows = [(f"{r['config']} ({r['images_per_step']} x {r['resolution']}px, {r['precision']}, {r['device']}): "
             "s/step (median)", f"{r['seconds_per_step']:.4f}") for r in results]
    report(rows, {"threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__,
                  "results": results}, args.json)


if __name__ == "__main__":
    sys.exit(main())
