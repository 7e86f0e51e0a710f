"""Throughput and peak memory of ChatGLM-shaped models with random weights (no checkpoint or tokenizer needed).

    python bench/bench_model.py --config small --dtype fp32            # all three benchmarks, well under a minute
    python bench/bench_model.py --config mid --train --steps 2         # LoRA training throughput only
    python bench/bench_model.py --config 6b --device cuda --json out.json
    python bench/bench_model.py --config mid --profile                 # where the time of one step goes

Benchmarks (none selected = all three):
  --train     LoRA (r=8, alpha=32, dropout 0.1 on query_key_value) forward+backward+AdamW step, tokens/s (median)
  --memory    peak memory of one training step at --memory_seq_len x batch 1, in a fresh subprocess
              (CPU: peak RSS of that process; CUDA: torch.cuda.max_memory_allocated; both include the weights)
  --generate  greedy generate() with KV cache: new tokens/s and time to first token (median of 3), at each --gen_batch_sizes
  --profile   torch.profiler's top --profile_rows ops by self time (CPU; CUDA: device) of one training step
              (--seq_len x --batch_size) and of one decode step (batch 1 after --prompt_len); prints tables only

--train also prints the step's model TFLOP/s and MFU, --generate the decode steps' GB/s and MBU (see roofline.py for
what is counted), against this device's measured matmul peak and read bandwidth, or --peak_tflops / --peak_gbps.

The loss of a training step is computed in chunks over the labelled positions (no full fp32 logits);
--full_logits measures the previous way (return_logits=True: full logits, one cross entropy) for comparison.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path


import torch

from _common import (
    generation_rows, peak_memory_bytes, report, report_memory, run_memory_child, sync)
from configuration_chatglm import ChatGLMConfig
from glm_tune.checkpoint import SMALL_SHAPE
from glm_tune.runtime import DTYPE_CHOICES, keep_freed_memory, parse_dtype
from modeling_chatglm import ChatGLMForConditionalGeneration
from roofline import decode_step_bytes, lora_train_flops, measured_matmul_flops, measured_read_bandwidth

PRESETS = {
    "small": dict(SMALL_SHAPE, vocab_size=4032),
    "mid": dict(hidden_size=512, num_layers=8, num_attention_heads=8, inner_hidden_size=2048, vocab_size=32000),
    "6b": dict(hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384, vocab_size=130528),
}
LORA = dict(rank=8, alpha=32, dropout=0.1, target="query_key_value")  # the adapters every benchmark trains
DIMS = ("hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size", "vocab_size")


def make_config(args):
    shape = {**PRESETS[args.config], **{d: getattr(args, d) for d in DIMS if getattr(args, d) is not None}}
    v = shape["vocab_size"]
    # The official v1.1 block layout ([MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>), moved to the end of the vocab.
    return ChatGLMConfig(**shape, mask_token_id=v - 8, gmask_token_id=v - 7, bos_token_id=v - 4, eos_token_id=v - 3,
                         pad_token_id=3, max_sequence_length=max(2048, args.seq_len, args.memory_seq_len))


def build_model(config, dtype, device):
    # Built directly in `dtype` on `device`: the 6B model must never exist as fp32 weights in CPU memory (~26 GB).
    if device.type == "cpu":
        keep_freed_memory()  # as glm_tune.loading.load_model does for the scripts' CPU runs
    with torch.device(device):
        model = ChatGLMForConditionalGeneration._from_config(config, dtype=dtype)
    return model


def random_text(config, batch, length, gen):
    # Ordinary tokens only: a stray [gMASK]/<sop> would move the prompt boundary.
    return torch.randint(10, config.vocab_size - 10, (batch, length), generator=gen)


def training_batch(config, batch, seq_len, device, gen):
    """Rows `prompt (40%) [gMASK] <sop> answer <eop>`, labels -100 up to <sop> (as the official P-Tuning script)."""
    prompt = int(seq_len * 0.4)
    answer = seq_len - prompt - 3
    marks = torch.tensor([[config.gmask_token_id, config.bos_token_id]] * batch)
    ids = torch.cat([random_text(config, batch, prompt, gen), marks, random_text(config, batch, answer, gen),
                     torch.full((batch, 1), config.eos_token_id)], dim=1)
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    return ids.to(device), labels.to(device)


def add_lora(model, gradient_checkpointing):
    from glm_tune.lora import add_lora as add_adapters  # what the training scripts use (PEFT + the fused forward)

    if gradient_checkpointing:
        # Non-reentrant: the reentrant variant drops LoRA gradients when a block's input (frozen embeddings) needs none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_adapters(model, **LORA)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_step(model, optimizer, ids, labels, full_logits=False, autocast=False):
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    with torch.autocast(ids.device.type, dtype=dtype, enabled=autocast and dtype != torch.float32):
        loss = model(input_ids=ids, labels=labels, return_logits=full_logits).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def bench_train(model, config, args, device):
    model, optimizer = add_lora(model, args.gradient_checkpointing)
    gen = torch.Generator().manual_seed(0)
    ids, labels = training_batch(config, args.batch_size, args.seq_len, device, gen)
    for _ in range(args.warmup):  # first steps allocate optimizer state and warm the allocator / kernels
        train_step(model, optimizer, ids, labels, args.full_logits, args.autocast)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, ids, labels, args.full_logits, args.autocast)
        sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    from glm_tune.lora import target_modules  # imported late, as add_lora does: peft stays out of the memory baseline

    labelled = int((labels[:, 1:] != -100).sum())
    flops = lora_train_flops(config, args.batch_size, args.seq_len, labelled, LORA["rank"],
                             target_modules(LORA["target"]))["total"]
    # All step times are kept: on shared CPUs one slow step shows up as spread, not as a wrong median.
    return {"train_step_s": step, "train_step_times_s": [round(t, 4) for t in times],
            "train_tokens_per_s": args.batch_size * args.seq_len / step, "train_model_tflops": flops / step / 1e12}


def memory_child(args):
    """Runs in the fresh subprocess: one LoRA training step at memory_seq_len x 1, then report the peak."""
    device, dtype = resolve(args)
    config = make_config(args)
    # What the interpreter, torch and transformers hold before any model exists (part of the CPU peak below).
    baseline = peak_memory_bytes(device) if device.type == "cpu" else 0
    model, optimizer = add_lora(build_model(config, dtype, device), args.gradient_checkpointing)
    ids, labels = training_batch(config, 1, args.memory_seq_len, device, torch.Generator().manual_seed(0))
    train_step(model, optimizer, ids, labels, args.full_logits, args.autocast)
    sync(device)
    report_memory({"peak_memory_gb": peak_memory_bytes(device) / 1e9, "baseline_rss_gb": baseline / 1e9})


def bench_memory(args):
    # A fresh interpreter: peak RSS / max_memory_allocated never go down, so measuring here would report earlier runs.
    argv = [*sys.argv[1:], "--_memory_child", "--threads", str(args.threads)]
    return run_memory_child(Path(__file__).resolve(), argv)


@torch.inference_mode()
def bench_generate(model, config, args, device):
    model.eval()
    if args.pack_weights:  # as inference.py, cli_chat.py, evaluate.py, the web pages and api.py load models
        from glm_tune.runtime import pack_linears_for_cpu_inference, packable_linears

        if packable_linears(model):  # a copy: training (LoRA on nn.Linear) may follow on `model`
            model = copy.deepcopy(model)
            pack_linears_for_cpu_inference(model)
    gen = torch.Generator().manual_seed(1)
    # Nothing may stop a row early (random weights can emit <eop>): min_new_tokens forces every new token.
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    results = {}
    for bs in args.gen_batch_sizes:
        prompt = torch.cat([random_text(config, bs, args.prompt_len - 2, gen),
                            torch.tensor([[config.gmask_token_id, config.bos_token_id]] * bs)], dim=1).to(device)
        mask = torch.ones_like(prompt)

        def timed(n):
            sync(device)
            start = time.perf_counter()
            out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)
            sync(device)
            assert out.shape[1] == prompt.shape[1] + n, out.shape
            return time.perf_counter() - start

        timed(args.new_tokens)  # warmup
        total = timed(args.new_tokens)
        first = statistics.median(timed(1) for _ in range(3))  # prefill + the first token: what a user waits for
        decode_steps_per_s = (args.new_tokens - 1) / max(total - first, 1e-9)
        step_bytes = decode_step_bytes(model, bs, args.prompt_len + args.new_tokens // 2)  # the average context
        results[bs] = {
            "gen_tokens_per_s": bs * args.new_tokens / total,
            "decode_tokens_per_s": bs * decode_steps_per_s,
            "ttft_s": first,
            "decode_gb_per_s": step_bytes * decode_steps_per_s / 1e9,
        }
    return results


def print_top_ops(title, fn, device, rows):
    """Run fn() once under torch.profiler and print its `rows` ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    print(f"\n{title}")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=rows))


def profile_steps(model, config, args, device):
    """Top ops of one decode step (KV cache, batch 1) and then of one LoRA training step, each after a warm-up."""
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.cat([random_text(config, 1, args.prompt_len - 2, gen),
                        torch.tensor([[config.gmask_token_id, config.bos_token_id]])], dim=1).to(device)
    with torch.inference_mode():
        rows = prompt
        out = model(input_ids=prompt, use_cache=True)

        def decode():
            nonlocal rows, out
            rows = torch.cat([rows, out.logits[:, -1:].argmax(-1)], dim=1)
            # as generate() calls it: positions continue from the state the model keeps on the cache
            out = model(input_ids=rows[:, -1:], cache=out.cache, use_cache=True)

        decode()  # warm-up
        print_top_ops(f"decode step (batch 1, {rows.shape[1]} tokens in the cache)", decode, device,
                      args.profile_rows)

    model, optimizer = add_lora(model, args.gradient_checkpointing)
    ids, labels = training_batch(config, args.batch_size, args.seq_len, device, torch.Generator().manual_seed(0))
    step = lambda: train_step(model, optimizer, ids, labels, args.full_logits, args.autocast)  # noqa: E731
    step()  # warm-up: optimizer state, allocator
    print_top_ops(f"training step ({args.seq_len}x{args.batch_size}, LoRA, forward+backward+AdamW)",
                  step, device, args.profile_rows)


def resolve(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, parse_dtype(args.dtype, device)


def add_utilisation(res, args, device, dtype):
    """MFU of the training step and MBU of the decode steps, against given or measured peaks."""
    if "train_model_tflops" in res:
        given = args.peak_tflops is not None
        res["peak_tflops"] = args.peak_tflops if given else measured_matmul_flops(device, dtype) / 1e12
        res["peak_tflops_kind"] = "given" if given else f"measured, {str(dtype).split('.')[-1]} matmul"
        res["mfu"] = res["train_model_tflops"] / res["peak_tflops"]
    if res.get("generate"):
        given = args.peak_gbps is not None
        res["peak_gbps"] = args.peak_gbps if given else measured_read_bandwidth(device) / 1e9
        res["peak_gbps_kind"] = "given" if given else "measured, read"
        for gen in res["generate"].values():
            gen["mbu"] = gen["decode_gb_per_s"] / res["peak_gbps"]


def table_rows(res):
    shape = "h{hidden_size} L{num_layers} heads{num_attention_heads} ffn{inner_hidden_size} V{vocab_size}"
    rows = [(k, res[k]) for k in ("config", "dtype", "device", "threads", "loss")]
    rows.append(("shape", shape.format(**res["shape"])))
    if "train_tokens_per_s" in res:
        rows += [(f"train tokens/s ({res['train_batch']})", f"{res['train_tokens_per_s']:.1f}"),
                 ("train step s (median)", f"{res['train_step_s']:.3f}")]
    if "mfu" in res:
        rows += [("train model TFLOP/s", f"{res['train_model_tflops']:.3f}"),
                 (f"train MFU (peak {res['peak_tflops']:.2f} TFLOP/s, {res['peak_tflops_kind']})",
                  f"{100 * res['mfu']:.1f}%")]
    if "peak_memory_gb" in res:
        note = f" (process before the model: {res['baseline_rss_gb']:.2f})" if res["baseline_rss_gb"] else ""
        label = f"peak memory GB ({res['memory_batch']}, {res['memory_kind']})"
        rows.append((label, f"{res['peak_memory_gb']:.2f}{note}"))
    rows += generation_rows("generate", res.get("generate", {}))
    for bs, gen in res.get("generate", {}).items():
        if "mbu" in gen:
            rows += [(f"generate bs={bs}: decode GB/s (weights + cache)", f"{gen['decode_gb_per_s']:.2f}"),
                     (f"generate bs={bs}: MBU (peak {res['peak_gbps']:.1f} GB/s, {res['peak_gbps_kind']})",
                      f"{100 * gen['mbu']:.1f}%")]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="small",
                   help="small = SMALL_SHAPE (vocab 4032); mid = 512 hidden, 8 layers, vocab 32000; "
                        "6b = the official shape")
    for d in DIMS:
        p.add_argument(f"--{d}", type=int, help=f"override the preset's {d}")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights dtype; auto = glm_tune.runtime.default_dtype() (fp32 on CPUs without fast bf16)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0 = torch's default); compare with 1 on small VMs, where "
                        "thread synchronisation can cost more than the second core brings")
    p.add_argument("--train", action="store_true", help="benchmark LoRA training throughput")
    p.add_argument("--memory", action="store_true", help="measure peak memory of one training step (subprocess)")
    p.add_argument("--generate", action="store_true", help="benchmark greedy generation with KV cache")
    p.add_argument("--profile", action="store_true",
                   help="print the top ops of one training step and one decode step (torch.profiler)")
    p.add_argument("--profile_rows", type=int, default=15, help="ops listed per --profile table")
    p.add_argument("--full_logits", action="store_true",
                   help="training loss from full fp32 logits (the pre-chunking way), for comparison")
    p.add_argument("--autocast", action="store_true",
                   help="run the training forward under torch.autocast in the weights' dtype, as finetune.py and "
                        "multi_gpu_fintune_belle.py do with --bf16/--fp16 (default: plain bf16 weights, PEFT's fp32 "
                        "adapters; the pre-issue-16 benchmark)")
    p.add_argument("--pack_weights", action=argparse.BooleanOptionalAction, default=True,
                   help="--generate: prepacked bf16 linear weights on CPUs with native bf16, as the inference scripts "
                        "load models (--no-pack_weights: plain nn.Linear) (default: %(default)s)")
    p.add_argument("--seq_len", type=int, default=512, help="training sequence length")
    p.add_argument("--batch_size", type=int, default=4, help="training batch size")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--memory_seq_len", type=int, default=2048, help="sequence length of the memory step (batch 1)")
    p.add_argument("--prompt_len", type=int, default=64, help="generation prompt length (ends with [gMASK] <sop>)")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per row (all forced)")
    p.add_argument("--gen_batch_sizes", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    p.add_argument("--peak_tflops", type=float,
                   help="the device's peak TFLOP/s in --dtype for MFU (e.g. a GPU's data-sheet figure); default: "
                        "measured here with a large matmul")
    p.add_argument("--peak_gbps", type=float,
                   help="the device's memory bandwidth in GB/s for MBU; default: measured here by reading a buffer "
                        "larger than the caches")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json", help="also write the results to this file (atomically)")
    p.add_argument("--_memory_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prompt_len < 3 or args.seq_len < 8 or args.memory_seq_len < 8:
        p.error("--prompt_len must be >= 3 and --seq_len / --memory_seq_len >= 8")
    if any(v is not None and v <= 0 for v in (args.peak_tflops, args.peak_gbps)):
        p.error("--peak_tflops and --peak_gbps must be positive")
    if not (args.train or args.memory or args.generate or args.profile):
        args.train = args.memory = args.generate = True
    torch.manual_seed(args.seed)
    if args._memory_child:
        return memory_child(args)

    device, dtype = resolve(args)
    args.threads = torch.get_num_threads()
    config = make_config(args)
    if args.profile:
        return profile_steps(build_model(config, dtype, device), config, args, device)
    res = {"config": args.config, "shape": {d: getattr(config, d) for d in DIMS}, "dtype": str(dtype).split(".")[-1],
           "device": str(device), "threads": args.threads, "gradient_checkpointing": args.gradient_checkpointing,
           "loss": "full logits" if args.full_logits else "chunked"}
    if args.memory:  # first, so the child never shares the GPU with this process's model
        res.update(bench_memory(args), memory_batch=f"{args.memory_seq_len}x1",
                   memory_kind="max_memory_allocated" if device.type == "cuda" else "peak RSS")
        print(f"peak memory: {res['peak_memory_gb']:.2f} GB", flush=True)
    if args.train or args.generate:
        model = build_model(config, dtype, device)
        if args.generate:  # before training: LoRA is injected into the model in place
            res["generate"] = bench_generate(model, config, args, device)
            print(f"generate: {json.dumps(res['generate'])}", flush=True)
        if args.train:
            res.update(bench_train(model, config, args, device), train_batch=f"{args.seq_len}x{args.batch_size}")
            print(f"train: {res['train_tokens_per_s']:.1f} tokens/s", flush=True)
        del model
        add_utilisation(res, args, device, dtype)
    report(table_rows(res), res, args.json)


if __name__ == "__main__":
    main()
