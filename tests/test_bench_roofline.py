"""bench/roofline.py's counts, which bench_model.py turns into MFU and MBU (issue 16): the model FLOPs of a LoRA
training step equal what torch's FlopCounterMode counts in a real step (less the recomputations it also sees), and the
bytes of a decode step equal the model's tensors and a real cache's keys and values."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_model  # noqa: E402
import roofline  # noqa: E402
from glm_tune.lora import add_lora, target_modules  # noqa: E402
from glm_tune.runtime import can_pack_linears, pack_linears_for_cpu_inference  # noqa: E402


def small_config(**overrides):
    args = type("Args", (), dict(config="small", seq_len=16, memory_seq_len=16, **dict.fromkeys(bench_model.DIMS)))
    for key, value in overrides.items():
        setattr(args, key, value)
    return bench_model.make_config(args)


@pytest.mark.parametrize("rank,target", [(8, "query_key_value"), (4, "all")])
def test_training_flops_equal_the_counted_matmuls_of_a_real_step(rank, target):
    config = small_config(num_layers=3)
    torch.manual_seed(0)
    model = add_lora(bench_model.build_model(config, torch.float32, torch.device("cpu")), rank=rank, alpha=16,
                     dropout=0.1, target=target)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids, labels = bench_model.training_batch(config, 2, 24, torch.device("cpu"), torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        bench_model.train_step(model, optimizer, ids, labels)
    labelled = int((labels[:, 1:] != -100).sum())
    assert 0 < labelled < ids.numel()
    parts = roofline.lora_train_flops(config, 2, 24, labelled, rank=rank, targets=target_modules(target))
    # FlopCounterMode sees the matmuls (not CPU flash attention) and the loss's logits recomputed in backward.
    recomputed_logits = 2 * labelled * config.hidden_size * config.vocab_size
    assert counter.get_total_flops() == parts["total"] - parts["attention"] + recomputed_logits
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_attention_flops_equal_the_matmuls_of_plain_attention():
    config = small_config(num_layers=2)
    batch, length, heads = 2, 20, config.num_attention_heads
    head_dim = config.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, length, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        for _ in range(config.num_layers):  # softmax(q kᵀ / √d) v, forward and backward, as autograd runs it
            out = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1) @ v
            out.sum().backward()
    parts = roofline.lora_train_flops(config, batch, length, labelled=0)
    assert counter.get_total_flops() == parts["attention"]


def test_decode_bytes_are_the_weights_and_a_real_caches_keys_and_values():
    config = small_config()
    model = bench_model.build_model(config, torch.bfloat16, torch.device("cpu")).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied: the head reads the whole table
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    batch, context = 3, 10
    ids = torch.randint(10, 1000, (batch, context))
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).cache
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert roofline.decode_step_bytes(model, batch, context) == weights + kv
    if can_pack_linears(model):  # packed as the inference scripts load it: the same bytes (the tied head stays)
        assert pack_linears_for_cpu_inference(model) > 0
        assert roofline.decode_step_bytes(model, batch, context) == weights + kv
    untied = bench_model.build_model(small_config(), torch.bfloat16, torch.device("cpu"))
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())  # its own table now
    table = untied.get_input_embeddings().weight.nbytes  # now read a row a token; the head reads its own copy
    rows = batch * config.hidden_size * 2
    head = untied.lm_head.weight.nbytes
    assert roofline.decode_step_bytes(untied, batch, context) == weights - table + rows + head + kv


def test_measured_peaks_are_positive_and_timed_on_real_work():
    assert roofline.measured_matmul_flops(torch.device("cpu"), torch.float32, size=128, repeats=2) > 1e6
    assert roofline.measured_read_bandwidth(torch.device("cpu"), megabytes=8, repeats=2) > 1e6


def bench(monkeypatch, tmp_path, *args):
    """bench_model.py's main() in this process (its imports are loaded already): (exit code, its JSON or None)."""
    out = tmp_path / "res.json"
    argv = ["bench_model.py", "--config", "small", "--dtype", "fp32", "--threads", "1", *args, "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        bench_model.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_bench_prints_mfu_and_mbu_against_given_peaks(monkeypatch, tmp_path, capsys):
    code, res = bench(monkeypatch, tmp_path, "--train", "--generate", "--steps", "1", "--warmup", "0", "--seq_len", "32",
                      "--batch_size", "2", "--prompt_len", "8", "--new_tokens", "4", "--gen_batch_sizes", "1", "2",
                      "--peak_tflops", "0.5", "--peak_gbps", "20")
    out = capsys.readouterr().out
    assert code == 0
    config = small_config()
    labelled = 2 * (32 - int(32 * 0.4) - 1)  # training_batch: labels from <sop> on, shifted by one
    flops = roofline.lora_train_flops(config, 2, 32, labelled)["total"]
    assert res["train_model_tflops"] == pytest.approx(flops / res["train_step_s"] / 1e12, rel=1e-9)
    assert res["mfu"] == pytest.approx(res["train_model_tflops"] / 0.5, rel=1e-9)
    assert res["peak_tflops_kind"] == "given" and res["peak_gbps_kind"] == "given"
    model = bench_model.build_model(config, torch.float32, torch.device("cpu"))
    for bs, gen in res["generate"].items():
        step_bytes = roofline.decode_step_bytes(model, int(bs), 8 + 4 // 2)  # the average context of the run
        assert gen["decode_gb_per_s"] == pytest.approx(step_bytes * gen["decode_tokens_per_s"] / int(bs) / 1e9)
        assert gen["mbu"] == pytest.approx(gen["decode_gb_per_s"] / 20, rel=1e-9)
    assert "train MFU (peak 0.50 TFLOP/s, given)" in out and "generate bs=2: MBU (peak 20.0 GB/s, given)" in out


def test_bench_rejects_a_non_positive_peak(monkeypatch, tmp_path, capsys):
    code, res = bench(monkeypatch, tmp_path, "--train", "--peak_tflops", "0")
    assert code == 2 and res is None
    assert "--peak_tflops and --peak_gbps must be positive" in capsys.readouterr().err
