"""Choices that depend on the machine: which dtype is fast here, and where to run."""

import collections
import ctypes
import os
import platform
import sys
from pathlib import Path

import torch

# "1" / "0" forces the fast-bf16 decision either way, so tests exercise both branches on any CPU (a tiny model trains
# through the bf16 branch even where bf16 is emulated).
FAST_BF16_ENV = "GLM_TUNE_FAST_BF16"


def cpu_has_fast_bf16():
    """True on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16), or as GLM_TUNE_FAST_BF16 says.

    Without them PyTorch emulates bf16/fp16 matmuls and they run ~100x slower than fp32 (measured on an AVX2-only
    EPYC: 0.9 GFLOP/s bf16 vs 86 GFLOP/s fp32), so fp32 is the right default there.
    """
    forced = os.environ.get(FAST_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_flags_have_bf16()


def _cpu_flags_have_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


KEEP_FREED_MEMORY_ENV = "GLM_TUNE_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc's malloc.h)
_kept_freed_memory = None


def keep_freed_memory():
    """Make glibc's malloc keep the memory of freed tensors for the next ones; once per process, True if it did.

    By default every allocation over 32 MB is its own mmap, returned to the kernel when freed. A training or decoding
    step on the CPU allocates and frees the same large activations, logits and gradients each time, so each of them
    starts on fresh pages that the kernel must fault in and zero: a bf16 LoRA step of the mid benchmark shape spent
    ~13% of its time there (fp32: ~8%), and a [1228, 32000] bf16 LM-head matmul took 53 ms instead of 33. With mmap
    off and the trim threshold at 1 GB, freed blocks stay in the heap and are reused. Peak memory does not grow (it is
    the most that is live at once, as before); memory freed after the peak is not given back to the system until the
    process ends. Not glibc (macOS, Windows, musl): nothing happens. GLM_TUNE_KEEP_FREED_MEMORY=0 turns it off."""
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip() != "0" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _kept_freed_memory = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
            except (OSError, AttributeError):
                pass
    return _kept_freed_memory


def default_dtype(device=None):
    """The fastest dtype that trains well on `device`: bf16 on CUDA (when supported) and on AMX CPUs, else fp32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]


def parse_dtype(name, device=None):
    """'auto' | fp32 | bf16 | fp16 (and the long names) -> torch.dtype."""
    if name in (None, "auto"):
        return default_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16") from None


def training_precision(fp16=False, bf16=False):
    """The mixed precision a training run uses: 'fp16', 'bf16' or 'no'.

    Asked for with --fp16 / --bf16, else by an `accelerate launch` config (ACCELERATE_MIXED_PRECISION). fp16 needs
    CUDA: on a CPU it becomes bf16 where the CPU has native bf16, else fp32 ('no'), with a note on stderr from the
    first process. Both training scripts decide here, so they train alike on every machine."""
    wanted = "fp16" if fp16 else "bf16" if bf16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if wanted != "fp16" or torch.cuda.is_available():
        return wanted
    fallback = "bf16" if cpu_has_fast_bf16() else "no"
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"note: fp16 needs a CUDA GPU; training on this CPU in {'bf16' if fallback == 'bf16' else 'fp32'} "
              "instead", file=sys.stderr, flush=True)
    return fallback


def finish_distributed():
    """Every rank waits for the others (rank 0 may still be writing), then the process group goes down on all of them
    together: a rank that leaves early can abort at exit, and the launcher then kills the rest."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_multiprocess_run():
    """End a process of a run that a launcher started with several processes, once its work is written: the ranks
    leave together (finish_distributed), then the process exits without the interpreter's teardown.

    Why: gloo's transport threads outlive destroy_process_group, and C++ destroys them during interpreter shutdown,
    which now and then aborts ("terminate called without an active exception", SIGABRT, seen about once in 30 ZeRO-3
    runs here) after a run that finished well; the launcher then reports a failure. Everything is written and closed
    by now (a wandb run that the Trainer leaves to wandb's exit hook is finished here), so nothing is lost by skipping
    that teardown. A single process returns normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    finish_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- CPU inference: linear layers with prepacked weights ---------------------------------------------------------------

# fp32 layers are packed from this many weight elements up (16 MB). Measured on a 2-core AMD EPYC (AVX2, MKL), one
# product at a time, prepacked oneDNN against F.linear, with 2 threads (1 thread): the 6B shape's layers (16.8M-134M
# elements) ran 1.1-1.3x (0.84-0.97x) as fast at one row and 1.8-3.5x (1.6-2.3x) at eight rows; layers of 3M-12M
# elements 1.07-1.7x (0.94-1.12x) and 1.35-4.5x (1.35-2.0x); layers of 1M elements or fewer 0.5-1.1x at one row
# (oneDNN's fixed cost per call) and 0.7-1.8x at eight. The line sits above the mixed results.
FP32_PACK_MIN_ELEMENTS = 4 * 2**20


class PackedLinear(torch.nn.Module):
    """An nn.Linear for inference on a CPU whose weight oneDNN has reordered once, at load time, into its blocked
    layout. bf16: plain F.linear runs the same oneDNN kernel but reorders the weight on every call; decoding (one
    token, weights read from memory each step) takes about half the time packed, with bit-identical results. fp32:
    F.linear runs MKL's kernels, whose one- and few-row products read large weights slowly; the packed kernel sums in
    another order, so results agree within fp32 rounding, not bit for bit. Inference only: no gradient flows
    through it."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                             persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self):
        dtype = str(self.packed_weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {dtype}"


def can_pack_linears(model):
    """True where PackedLinear applies: weights on the CPU with oneDNN, either bf16 on a CPU with native bf16 (AMX /
    AVX512-BF16) or fp32 (then only layers of FP32_PACK_MIN_ELEMENTS or more are packed)."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable_linears(model, fp32_min_elements=FP32_PACK_MIN_ELEMENTS):
    """(parent, name, layer) of each nn.Linear that pack_linears_for_cpu_inference would pack; [] where
    can_pack_linears(model) is false."""
    if not can_pack_linears(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    dtype = next(model.parameters()).dtype
    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    inside_adapters = {id(m) for layer in model.modules() if isinstance(layer, BaseTunerLayer) for m in layer.modules()}
    return [(parent, name, child)
            for parent in model.modules() if id(parent) not in inside_adapters  # adapter, base and lora_A/B layers
            for name, child in parent.named_children()
            if type(child) is torch.nn.Linear and child.weight.dtype == dtype and uses[id(child.weight)] == 1
            and (dtype != torch.float32 or child.weight.numel() >= fp32_min_elements)]


def pack_linears_for_cpu_inference(model, fp32_min_elements=FP32_PACK_MIN_ELEMENTS):
    """Every plain nn.Linear of an inference-only model becomes a PackedLinear where can_pack_linears(model) (fp32
    layers: those with at least `fp32_min_elements` weights), else nothing changes; returns how many were packed.
    Layers inside PEFT adapters (their base layer is read when merging) are left as they are, and so is a layer whose
    weight another module shares: ChatGLM's LM head is the word embedding table, and packing it would keep a second
    copy (1 GB for the 6B model in bf16) to gain about a tenth of the head's time at batch 8 and nothing at batch 1
    (measured on an AMX CPU). The model can no longer be trained, merged or saved afterwards."""
    targets = packable_linears(model, fp32_min_elements)
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
