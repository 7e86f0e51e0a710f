"""Generation throughput of the inference scripts' model path: new tokens/s and time to first token at batch 1, 8 and
32, in plain PyTorch and under DeepSpeed init_inference (random weights of a ChatGLM shape, greedy, KV cache).

    python bench/bench_inference.py                                        # small config: PyTorch, then DeepSpeed
    deepspeed --num_gpus 2 bench/bench_inference.py --engines deepspeed    # DeepSpeed tensor parallel over 2 ranks
    python bench/bench_inference.py --config 6b --dtype fp16 --json out.json

Each row generates exactly --new_tokens tokens after a --prompt_len prompt (the measurement of bench_model.py's
--generate, reused): "new tokens/s" counts every generated token over the whole generate() call, "decode" leaves the
prefill out, "time to first token" is a generate() of one token. Under the deepspeed launcher every rank builds the
same weights and rank 0 reports.
"""

import argparse
from types import SimpleNamespace


import torch

from _common import generation_rows, report
from bench_model import DIMS, PRESETS, bench_generate, build_model, make_config
from glm_tune.deepspeed_inference import (
    deepspeed_installed, init_inference, setup_distributed)
from glm_tune.runtime import DTYPE_CHOICES, finish_distributed, parse_dtype


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="small",
                   help="small = SMALL_SHAPE (vocab 4032); mid = 512 hidden, 8 layers, vocab 32000; 6b = official")
    for d in DIMS:
        p.add_argument(f"--{d}", type=int, help=f"override the preset's {d}")
    p.add_argument("--engines", nargs="+", choices=["torch", "deepspeed"], default=["torch", "deepspeed"],
                   help="what to measure (default: both; under the launcher with several ranks only deepspeed)")
    p.add_argument("--kernel_inject", choices=["auto", "on", "off"], default="auto",
                   help="DeepSpeed's fused CUDA kernels (none exist for ChatGLM-6B; see glm_tune/deepspeed_inference)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype; auto = fp32 on CPUs without fast bf16, bf16 on GPUs")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default; under the "
                                                          "launcher on CPU: the cores divided by the ranks)")
    p.add_argument("--gen_batch_sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    p.add_argument("--prompt_len", type=int, default=64, help="prompt tokens per row (ends with [gMASK] <sop>)")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per row (all forced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (the same on every rank)")
    p.add_argument("--json", help="also write the results to this file (atomically)")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = p.parse_args()
    if args.prompt_len < 3 or args.new_tokens < 2:
        p.error("--prompt_len must be >= 3 and --new_tokens >= 2")
    return args


def main():
    args = parse_args()
    rank, world = setup_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = ["deepspeed"] if world > 1 else args.engines
    if "deepspeed" in engines and not deepspeed_installed():
        print("DeepSpeed is not installed: measuring plain PyTorch only")
        engines = [e for e in engines if e != "deepspeed"]
    device = torch.device(f"cuda:{args.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype, device)
    # bench_model's builders take its own flags; seq_len sizes max_sequence_length, no memory step runs here.
    shape_args = SimpleNamespace(config=args.config, seq_len=args.prompt_len + args.new_tokens, memory_seq_len=0,
                                 **{d: getattr(args, d) for d in DIMS})
    config = make_config(shape_args)
    torch.manual_seed(args.seed)
    # DeepSpeed places the model itself (its shard, on this rank's device); plain PyTorch builds it on `device`.
    model = build_model(config, dtype, "cpu" if world > 1 else device).eval()
    res = {"config": args.config, "shape": {d: getattr(config, d) for d in DIMS}, "dtype": str(dtype).split(".")[-1],
           "device": str(device), "ranks": world, "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens}
    for engine in engines:  # torch first: DeepSpeed takes the model over
        if engine == "deepspeed":
            model = init_inference(model, args.kernel_inject)
        res[engine] = bench_generate(model, config, args, device)
        if rank == 0:
            print(f"{engine}: {res[engine]}", flush=True)
    if rank == 0:
        report_results(res, engines, args)
    finish_distributed()


def report_results(res, engines, args):
    rows = [(k, res[k]) for k in ("config", "dtype", "device", "ranks", "threads")]
    for engine in engines:
        rows += generation_rows(engine, res[engine])
    report(rows, res, args.json)


if __name__ == "__main__":
    main()
