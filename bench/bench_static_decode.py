"""Does a static KV cache plus torch.compile make greedy decoding faster on this machine? (Issue 16, deliverable 3.)

    python bench/bench_static_decode.py --config mid --dtype bf16 --threads 2
    python bench/bench_static_decode.py --config mid --dtype bf16 --threads 2 --compile default max-autotune --freeze
    python bench/bench_static_decode.py --config 6b --device cuda --compile reduce-overhead

Variants, each timed per new token after the same prefill (random weights, --prompt_len tokens ending in
[gMASK] <sop>, no padding):
  generate   model.generate() with the model's growing cache (what the scripts run; bf16 weights prepacked on CPUs with
             native bf16, as the scripts load them)
  static     a decode step through the model's own blocks (GLMBlock.forward) with a fixed-size cache written in place
             and a boolean mask over its slots: the same shapes at every step, in eager mode
  compile:M  that step under torch.compile(mode=M, fullgraph=True, dynamic=False); the first call's compile time is
             reported, not counted

Every variant's greedy tokens are compared with generate()'s; in fp32 they must be identical (exit 1 otherwise), in
bf16 the share of identical tokens is printed (random weights leave near-ties that a different kernel can flip).
"""

import argparse
import copy
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from _common import print_rows, sync
from bench_model import PRESETS, build_model, make_config, random_text, resolve
from glm_tune.runtime import DTYPE_CHOICES, pack_linears_for_cpu_inference
from modeling_chatglm import continue_positions


class StaticKV:
    """The part of a cache SelfAttention uses (update(k, v, layer) -> every key and value so far), with fixed shapes:
    per layer a [batch, heads, slots, head_dim] buffer; a step writes its token at slot `pos` ([1] tensor)."""

    def __init__(self, config, batch, slots, dtype, device):
        shape = (config.num_layers, batch, config.num_attention_heads, slots, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.pos = None

    def update(self, k, v, layer_idx):
        self.keys[layer_idx].index_copy_(2, self.pos, k)
        self.values[layer_idx].index_copy_(2, self.pos, v)
        return self.keys[layer_idx], self.values[layer_idx]


def decode_step(model, ids, position_ids, cache, pos):
    """One greedy token for ids [batch, 1] at slot `pos` of `cache`: keys at slots <= pos are visible."""
    cache.pos = pos
    transformer = model.transformer
    x = transformer.word_embeddings(ids)
    rope = transformer.rotary_emb(position_ids, x.dtype)
    mask = (torch.arange(cache.keys.shape[-2], device=ids.device) <= pos)[None, None, None]
    for layer in transformer.layers:
        x = layer(x, rope, mask, None, None, cache=cache)
    return model.lm_head(transformer.final_layernorm(x)[:, -1]).argmax(-1)


def static_greedy(step, model, prompt, new_tokens):
    """Prefill as generate() does (eager, growing cache), copy the cache into a StaticKV, then `new_tokens - 1`
    static steps; returns (tokens [batch, new_tokens], seconds per decode step)."""
    config = model.config
    batch, length = prompt.shape
    out = model(input_ids=prompt, cache=DynamicCache(config=config), use_cache=True)
    weight = model.lm_head.weight if hasattr(model.lm_head, "weight") else next(model.parameters())
    cache = StaticKV(config, batch, length + new_tokens, weight.dtype, prompt.device)
    for i, layer in enumerate(out.cache.layers):
        cache.keys[i, :, :, :length] = layer.keys
        cache.values[i, :, :, :length] = layer.values
    state = out.cache.glm_positions
    token = out.logits[:, -1].argmax(-1)
    tokens, times = [token], []
    for t in range(new_tokens - 1):
        sync(prompt.device)
        start = time.perf_counter()
        positions, state = continue_positions(token[:, None], config, None, state)
        token = step(model, token[:, None], positions, cache, torch.tensor([length + t], device=prompt.device))
        sync(prompt.device)
        times.append(time.perf_counter() - start)
        tokens.append(token)
    return torch.stack(tokens, dim=1), statistics.median(times)


def generate_greedy(model, prompt, new_tokens):
    config = model.config
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
                  attention_mask=torch.ones_like(prompt))
    sync(prompt.device)
    start = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
    sync(prompt.device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync(prompt.device)
    return out[:, prompt.shape[1]:], (time.perf_counter() - start - first) / (new_tokens - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(PRESETS), default="mid", help="model shape (see bench_model.py)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="weights dtype (auto: as bench_model.py)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    p.add_argument("--compile", nargs="*", default=["default"], metavar="MODE",
                   help="torch.compile modes to time (default, max-autotune, reduce-overhead, ...; none: eager only)")
    p.add_argument("--freeze", action="store_true",
                   help="torch._inductor.config.freezing: weights become constants (prepacked for oneDNN on CPUs)")
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
    if args.freeze:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True

    variants = {"generate": lambda prompt: generate_greedy(packed, prompt, args.new_tokens),
                "static": lambda prompt: static_greedy(decode_step, packed, prompt, args.new_tokens)}
    compile_s = {}
    for mode in args.compile:
        compiled = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
        variants[f"compile:{mode}"] = lambda prompt, c=compiled: static_greedy(c, model, prompt, args.new_tokens)

    rows = [("config", args.config), ("dtype", str(dtype).split(".")[-1]), ("device", str(device)),
            ("threads", torch.get_num_threads()), ("freeze", args.freeze)]
    mismatch = False
    for bs in args.batch_sizes:
        gen = torch.Generator().manual_seed(1)
        prompt = torch.cat([random_text(config, bs, args.prompt_len - 2, gen),
                            torch.tensor([[config.gmask_token_id, config.bos_token_id]] * bs)], dim=1).to(device)
        with torch.no_grad():
            reference, _ = variants["generate"](prompt)
            times, same = {}, {}
            for name, run in variants.items():  # first call: warm-up, compilation, the token check
                start = time.perf_counter()
                tokens, _ = run(prompt)
                if name.startswith("compile"):
                    compile_s[(name, bs)] = time.perf_counter() - start
                same[name] = (tokens == reference).float().mean().item()
            for _ in range(args.rounds):
                for name, run in variants.items():
                    times.setdefault(name, []).append(run(prompt)[1])
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
