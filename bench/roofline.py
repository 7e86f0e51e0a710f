"""How close a step runs to the machine: model FLOPs of a LoRA training step (for MFU, model FLOPs utilisation) and
bytes read per decode step (for MBU, memory-bandwidth utilisation), against peaks measured on this device or given.

Model FLOPs count the matrix products the step needs, as MFU is usually defined: no recomputation (gradient
checkpointing, the loss's recomputed logits, flash attention's recomputed scores) and nothing elementwise.
- linear layers of the blocks: forward 2·T·P and input gradient 2·T·P over their P weights (T tokens); frozen weights
  get no weight gradient. The first block's query_key_value needs no input gradient: nothing before it trains.
- LoRA: 2·T·r·(in + out) each for the forward, the input gradient (none in the first block, as above) and the two
  weight gradients together.
- attention: QKᵀ and PV forward, four products backward: 12·B·L²·hidden per layer (full L×L: flash kernels on CPU
  and GPU compute the masked blocks too, and it is the usual convention).
- LM head: forward and input gradient on the labelled positions only (the chunked loss skips the others).
"""

import time

import torch

LINEAR_SHAPES = {  # name -> (in, out) in units of (hidden, inner) sizes, the official block layout
    "query_key_value": lambda h, f: (h, 3 * h),
    "dense": lambda h, f: (h, h),
    "dense_h_to_4h": lambda h, f: (h, f),
    "dense_4h_to_h": lambda h, f: (f, h),
}


def lora_train_flops(config, batch, seq_len, labelled, rank=8, targets=("query_key_value",)):
    """Model FLOPs of one LoRA training step, by part ({part: flops}, plus "total"). `labelled`: positions that enter
    the loss (the shifted labels that are not -100)."""
    h, f, layers = config.hidden_size, config.inner_hidden_size, config.num_layers
    tokens = batch * seq_len
    shapes = {name: shape(h, f) for name, shape in LINEAR_SHAPES.items()}
    weights = sum(i * o for i, o in shapes.values())
    first_qkv = shapes["query_key_value"][0] * shapes["query_key_value"][1]
    parts = {"linears": 4 * tokens * weights * layers - 2 * tokens * first_qkv}
    lora = sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
    lora_first_input = rank * shapes["query_key_value"][0] if "query_key_value" in targets else 0
    parts["lora"] = 6 * tokens * lora * layers - 2 * tokens * lora_first_input
    parts["attention"] = 12 * batch * seq_len**2 * h * layers
    parts["lm_head"] = 4 * labelled * h * config.vocab_size
    parts["total"] = sum(parts.values())
    return parts


def decode_step_bytes(model, batch, context):
    """Bytes one decode step must read: every weight and buffer once (the input embedding table only for its `batch`
    rows, unless the LM head reads it as its weight) plus the keys and values of `context` cached tokens per row."""
    embedding = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    # parameters() and buffers() list a shared tensor once; packed (mkldnn) weights have no data pointer to compare
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
                  if t is not embedding or head is embedding)
    if head is not embedding:
        weights += batch * embedding.shape[1] * embedding.element_size()
    config = model.config
    kv = 2 * config.num_layers * batch * context * config.hidden_size * embedding.element_size()
    return weights + kv


def _best_time(fn, device, repeats):
    from _common import sync

    fn()  # warm-up: kernel choice, first-touch of the output
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_time(size, device, dtype, repeats):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty_like(a)
    return _best_time(lambda: torch.mm(a, b, out=out), device, repeats)


def measured_matmul_flops(device, dtype, size=None, repeats=3):
    """FLOP/s of the fastest of `repeats` square matmuls in `dtype` on `device`: the compute peak this machine
    actually reaches. Default size: doubled from 512 until one product takes 50 ms (up to 8192 on GPUs, 4096 on
    CPUs), so a dtype the CPU only emulates (bf16 without AMX / AVX512-BF16: about 100x slower) is not timed on
    minutes-long products."""
    if size is None:
        size, largest = 512, 8192 if device.type == "cuda" else 4096
        while size < largest and _matmul_time(size, device, dtype, 1) < 0.05:
            size *= 2
    return 2 * size**3 / _matmul_time(size, device, dtype, repeats)


def measured_read_bandwidth(device, megabytes=None, repeats=5):
    """Bytes/s of the fastest of `repeats` reductions over a buffer far larger than any cache (512 MB on CPUs, 2 GB on
    GPUs): what streaming weights from memory can reach here."""
    if megabytes is None:
        megabytes = 2048 if device.type == "cuda" else 512
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    return buffer.numel() * 4 / _best_time(lambda: buffer.sum(), device, repeats)
