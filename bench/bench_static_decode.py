"""Does a static KV cache plus torch.compile make greedy decoding faster on this machine? (Issue 16, deliverable 3;
glm_tune/static_decode.py, --compile_decoding in cli_chat.py and inference.py.)

    python bench/bench_static_decode.py --config mid --dtype bf16 --threads 2
    python bench/bench_static_decode.py --config mid --dtype bf16 --threads 2 --compile default max-autotune
    python bench/bench_static_decode.py --config 6b --device cuda --compile default max-autotune

Variants, each timed per new token (a 1-token call, prefill and first token, subtracted from a full one) on the same
prompts (random weights, --prompt_len tokens ending in [gMASK] <sop>, no padding), in alternating rounds:
  generate   GenerationMixin.generate() with the model's growing cache (what the scripts run by default; bf16 weights
             prepacked on CPUs with native bf16, as the scripts load them)
  static     StaticDecoder(model, "eager"): the model's own blocks with a fixed-size cache written in place and a
             boolean mask over its slots, the same shapes at every step; not compiled
  compile:M  StaticDecoder(model, M): that step under torch.compile(mode M, fullgraph=True, dynamic=False), with frozen
             weights unless --no-freeze; the first call's time (compilation included) is reported, not counted

Every variant's greedy tokens are compared with generate()'s; in fp32 they must be identical (exit 1 otherwise), in
bf16 the share of identical tokens is printed (random weights leave near-ties that a different kernel can flip).
"""

import argparse
import copy
import statistics
import sys
import time

import torch

from _common import print_rows, sync
from bench_model import PRESETS, build_model, make_config, random_text, resolve
from glm_tune.runtime import DTYPE_CHOICES, pack_linears_for_cpu_inference
from glm_tune.static_decode import COMPILE_MODES, StaticDecoder


def seconds_per_token(generate, prompt, new_tokens):
    """(tokens [batch, new_tokens], seconds per new token after the first): a 1-token call (prefill and the first
    token) subtracted from a full one, as bench_model.py's --generate measures."""
    device = prompt.device
    sync(device)
    start = time.perf_counter()
    generate(prompt, 1)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(prompt, new_tokens)
    sync(device)
    return out[:, prompt.shape[1]:], (time.perf_counter() - start - first) / (new_tokens - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="mid", help="model shape (see bench_model.py)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as bench_model.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--compile", nargs="*", default=["default"], metavar="MODE", choices=COMPILE_MODES[2:],
                   help="torch.compile modes to time: default, max-autotune (none given: no compiled variant)")
    p.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="compile with frozen weights (constants, prepacked for oneDNN on CPUs), as --compile_decoding "
                        "does (default: %(default)s)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8], help="decoding batch sizes")
    p.add_argument("--prompt_len", type=int, default=64, help="prompt tokens (ending with [gMASK] <sop>)")
    p.add_argument("--new_tokens", type=int, default=64, help="greedy tokens per row")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (median of the rounds' medians)")
    args = p.parse_args()
    if args.prompt_len < 3 or args.new_tokens < 2 or args.rounds < 1:
        p.error("--prompt_len must be >= 3, --new_tokens >= 2 and --rounds >= 1")
    # bench_model's config / model helpers read these
    args.hidden_size = args.num_layers = args.num_attention_heads = args.inner_hidden_size = args.vocab_size = None
    args.seq_len, args.memory_seq_len = 8, 8
    device, dtype = resolve(args)
    torch.manual_seed(0)
    config = make_config(args)
    model = build_model(config, dtype, device).eval()
    packed = copy.deepcopy(model)
    if not pack_linears_for_cpu_inference(packed):
        packed = model

    def caller(call):
        kwargs = dict(do_sample=False, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
        return lambda prompt, n: call(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, **kwargs)

    variants = {"generate": caller(packed.generate),  # no decoder set on it: GenerationMixin.generate
                "static": caller(StaticDecoder(packed, "eager").generate)}
    for mode in args.compile:
        variants[f"compile:{mode}"] = caller(StaticDecoder(model, mode, freeze=args.freeze).generate)
    compile_s = {}
    rows = [("config", args.config), ("dtype", str(dtype).split(".")[-1]), ("device", str(device)),
            ("threads", torch.get_num_threads()), ("freeze", args.freeze)]
    mismatch = False
    for bs in args.batch_sizes:
        gen = torch.Generator().manual_seed(1)
        prompt = torch.cat([random_text(config, bs, args.prompt_len - 2, gen),
                            torch.tensor([[config.gmask_token_id, config.bos_token_id]] * bs)], dim=1).to(device)
        with torch.no_grad():
            times, same, reference = {}, {}, None
            for name, run in variants.items():  # first call: warm-up, compilation, the token check
                start = time.perf_counter()
                tokens = run(prompt, args.new_tokens)[:, prompt.shape[1]:]
                if name.startswith("compile"):
                    compile_s[(name, bs)] = time.perf_counter() - start
                reference = tokens if name == "generate" else reference
                same[name] = (tokens == reference).float().mean().item()
            for _ in range(args.rounds):
                for name, run in variants.items():
                    times.setdefault(name, []).append(seconds_per_token(run, prompt, args.new_tokens)[1])
        base = statistics.median(times["generate"])
        for name in variants:
            step = statistics.median(times[name])
            note = f", compiled in {compile_s[(name, bs)]:.0f} s" if (name, bs) in compile_s else ""
            rows.append((f"bs={bs} {name}: ms per token", f"{step * 1e3:.2f} ({base / step:.2f}x generate; "
                         f"{bs / step:.0f} tokens/s; tokens as generate: {same[name]:.0%}{note})"))
            mismatch |= dtype == torch.float32 and same[name] < 1
    print_rows(rows)
    if mismatch:
        sys.exit("bench_static_decode.py: in fp32 a variant's greedy tokens differ from generate()'s")


if __name__ == "__main__":
    main()
