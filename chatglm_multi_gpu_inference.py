"""Batch generation with the model split by layer over the GPUs, and CPU / disk offload when memory is short.

    python chatglm_multi_gpu_inference.py                     # the demo (data/demo/copywriting.csv) on what is here
    python chatglm_multi_gpu_inference.py --model_name_or_path /models/chatglm-6b --max_memory 0=8GiB,1=8GiB
    python chatglm_multi_gpu_inference.py --model_name_or_path /models/chatglm-6b --max_memory 0=4GiB,cpu=6GiB \\
        --offload_folder offload                              # low VRAM: what fits on neither goes to disk

The same batch job as chatglm_deepspeed_inference.py (input, template, resumable output), in one process. Accelerate
plans where each layer goes: the embeddings on the first device, then whole GLMBlocks in order, filling each device
up to its --max_memory (GPUs 0, 1, ..., then "cpu", then disk); the plan is printed. The split model computes the
same tokens as the unsplit one.
"""

import argparse
import re
import tempfile
from contextlib import nullcontext

import torch

from glm_tune.batch_inference import BatchJob, add_job_arguments
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.locking import hold_output_lock


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, default_output="output/copywriting_multi_gpu.csv")
    parser.add_argument("--max_memory", default=None,
                        help="memory each device may hold, e.g. 0=8GiB,1=8GiB,cpu=16GiB (GPU index or cpu = size in "
                             "bytes or with KiB/MiB/GiB/KB/MB/GB); layers that fit nowhere go to disk. Default: "
                             "accelerate's estimate of what is free; without GPUs and without this flag the model "
                             "runs whole on the CPU")
    parser.add_argument("--offload_folder", default=None,
                        help="where layers offloaded to disk are kept (default: a temporary folder, removed after)")
    return parser.parse_args(argv)


def parse_max_memory(value):
    """'0=8GiB,cpu=16GiB' -> {0: '8GiB', 'cpu': '16GiB'} (the form accelerate takes)."""
    if not value:
        return None
    plan = {}
    for item in value.split(","):
        device, _, size = item.strip().partition("=")
        device, size = device.strip().lower(), size.strip()
        if not (device == "cpu" or device.isdigit()) or not re.fullmatch(r"\d+(\.\d+)?\s*([KMG]i?B)?", size, re.I):
            raise UserError(f"--max_memory {value}: '{item}' is not DEVICE=SIZE (like 0=8GiB or cpu=16GiB)")
        if device.isdigit() and int(device) >= torch.cuda.device_count():
            raise UserError(f"--max_memory {value}: no GPU {device} here ({torch.cuda.device_count()} found)")
        plan["cpu" if device == "cpu" else int(device)] = int(size) if size.isdigit() else size
    return plan


def describe_device_map(device_map):
    """'cuda:0: transformer.word_embeddings, layers 0-13 | disk: layers 14-27, ...' from accelerate's plan."""
    groups = {}
    for name, device in device_map.items():
        device = f"cuda:{device}" if isinstance(device, int) else str(device)
        layer = re.fullmatch(r"transformer\.layers\.(\d+)", name)
        groups.setdefault(device, []).append(int(layer.group(1)) if layer else name or "the whole model")
    parts = []
    for device, names in groups.items():
        layers = [n for n in names if isinstance(n, int)]
        others = [n for n in names if not isinstance(n, int)]
        span = [f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"] if layers else []
        parts.append(f"{device}: {', '.join(others + span)}")
    return " | ".join(parts)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    job = BatchJob.from_args(args)  # a bad input file stops here, before any model is loaded
    max_memory = parse_max_memory(args.max_memory)
    split = torch.cuda.device_count() > 0 or max_memory is not None
    offload = tempfile.TemporaryDirectory(prefix="glm-offload-") if split and not args.offload_folder else nullcontext()
    # A second run on this --output stops here, naming this one, instead of generating the same rows again.
    with hold_output_lock(args.output), offload as temporary_folder:
        done = job.results.finished_ids(job.rows)
        model, tokenizer = load_model_and_tokenizer(
            args.model_name_or_path, args.lora_path, args.dtype, device_map="auto" if split else None,
            max_memory=max_memory, offload_folder=args.offload_folder or temporary_folder, revision=args.revision,
            ptuning_checkpoint=args.ptuning_checkpoint)
        if split:
            print(f"device map: {describe_device_map(model.hf_device_map)}")
        else:
            print("no GPU here: the whole model runs on the CPU (--max_memory cpu=SIZE keeps only SIZE of it in "
                  "memory and offloads the other layers to disk)")
        summary = job.run(model, tokenizer, done)
    print(summary)


if __name__ == "__main__":
    main()
