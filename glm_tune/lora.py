"""LoRA wiring: which layers get adapters, and saving / loading them in both the PEFT and the seed's format."""

import types
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from glm_tune.atomic import atomic_path
from glm_tune.data import parse_json
from glm_tune.errors import UserError
from modeling_chatglm import local_weight

ALL_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
SEED_FILE = "chatglm-lora.pt"  # the seed's file: the trainable LoRA tensors only, keyed by PEFT parameter names


def target_modules(target):
    """'all' -> every linear layer of the blocks; otherwise a comma-separated list of module names."""
    names = ALL_LINEAR if target == "all" else [t.strip() for t in target.split(",") if t.strip()]
    unknown = sorted(set(names) - set(ALL_LINEAR))
    if unknown or not names:
        raise UserError(f"--lora_target {target}: unknown module(s) {unknown}; choose from {ALL_LINEAR} or 'all'")
    return names


def add_lora(model, rank=8, alpha=32, dropout=0.1, target="query_key_value"):
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules(target))
    return fuse_lora_layers(get_peft_model(model, config))


# ----------------------------------------------------------------------------------------------------------------------
# The LoRA layer's forward, fused
#
# PEFT keeps adapters in fp32 on a bf16/fp16 base (right for the optimizer) and, at every call, casts the layer's input
# to fp32, draws a Bernoulli dropout mask, runs both adapter matmuls in fp32, scales and adds an fp32 [tokens, out]
# delta, then casts the sum back: per layer, forward and backward, several full-size fp32 copies. fuse_lora_layers
# replaces that, for the plain case, with one autograd function working in the base output's dtype:
#     out = base(x) + (scale / (1 - p)) * ((x * keep) @ A.T) @ B.T
# - the matmuls run in the dtype of base(x): bf16 under autocast, as autocast runs them; fp32 on an fp32 base, where
#   the result equals PEFT's within fp32 rounding. Fp32 adapters on a bf16 base outside autocast keep PEFT's fp32
#   adapter math: running them in bf16 there made the bf16 demo (python finetune.py on an AMX CPU) plateau longer
#   and miss its held-out accuracy; so, less clearly, did PEFT's fp32 math fused with another dropout draw (mean
#   56/60 over five seeds, one run 49, against 57.8 and 57-59 for PEFT's forward). The rank-r product is scaled in
#   fp32 and the delta is accumulated into base(x) by one addmm, so it is rounded once;
# - the dropout mask multiplies exactly (0/1) and its 1/(1-p) joins the scale on the rank-r product, so bf16 never
#   rounds it; the mask takes 16 random bits per element (p is rounded to a multiple of 1/65536) from one 64-bit draw
#   per four elements of the torch generator: a quarter of the draws of bernoulli_, which is most of its cost on CPU;
# - the LoRA gradients come from the same matmuls in that dtype and are returned in the adapters' dtype (fp32).
# Anything else (merged or disabled adapters, several active adapters, DoRA and other variants, per-row adapter
# names, ZeRO-3 partitioned or Accelerate-offloaded weights, non-Linear bases, fp32 adapters on a half-precision base
# outside autocast) runs PEFT's own forward.

DROPOUT_BITS = 16


def dropout_keep(x, p):
    """Boolean keep-mask shaped like x: True with probability 1 - p', p' = p rounded to a multiple of 2**-16. Returns
    (mask, p'). Four 16-bit fields of each 64-bit random number make four decisions."""
    levels = 2**DROPOUT_BITS
    drop = round(p * levels)
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
    fields = bits.view(torch.int16)[:n].view(x.shape)
    return fields >= drop - levels // 2, drop / levels


class LoraDelta(torch.autograd.Function):
    """base_out + scale * ((x * keep) @ A.T) @ B.T in base_out's dtype; see the section comment above."""

    @staticmethod
    def forward(ctx, base_out, x, weight_a, weight_b, scale, keep):
        dtype = base_out.dtype
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        xm = x.to(dtype).reshape(-1, x.shape[-1])
        if keep is not None:
            xm = xm * keep.reshape(xm.shape)
        z = ((xm @ a.t()).float() * scale).to(dtype)
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), z, b.t())
        ctx.save_for_backward(xm, z, a, b, keep)
        ctx.scale, ctx.x_meta = scale, (x.shape, x.dtype)
        ctx.param_dtypes = weight_a.dtype, weight_b.dtype
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        xm, z, a, b, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(z.dtype)
        grad_z = ((g @ b).float() * ctx.scale).to(z.dtype)
        grad_a = (grad_z.t() @ xm).to(ctx.param_dtypes[0]) if ctx.needs_input_grad[2] else None
        grad_b = (g.t() @ z).to(ctx.param_dtypes[1]) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            shape, dtype = ctx.x_meta
            grad_x = grad_z @ a
            if keep is not None:
                grad_x = grad_x * keep.reshape(grad_x.shape)
            grad_x = grad_x.view(shape).to(dtype)
        return grad, grad_x, grad_a, grad_b, None, None


def _fused_forward(module, x, *args, **kwargs):
    """PEFT's Linear.forward for one plain active adapter, through LoraDelta; PEFT's own forward otherwise."""
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    adapter = adapters[0] if len(adapters) == 1 else None
    dropout = module.lora_dropout[adapter] if adapter is not None else None
    if (args or kwargs or module.disable_adapters or module.merged or adapter is None
            or adapter in getattr(module, "lora_variant", {}) or type(module.base_layer) is not torch.nn.Linear
            or not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)) or not x.is_floating_point()
            or not all(local_weight(m) for m in (module.base_layer, module.lora_A[adapter], module.lora_B[adapter]))
            or (module.lora_A[adapter].weight.dtype != module.base_layer.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))):
        return module._peft_forward(x, *args, **kwargs)
    base_out = module.base_layer(x)
    scale, keep = module.scaling[adapter], None
    if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        keep, p = dropout_keep(x, dropout.p)
        scale = scale / (1 - p)
    return LoraDelta.apply(base_out, x, module.lora_A[adapter].weight, module.lora_B[adapter].weight, scale, keep)


def fuse_lora_layers(model):
    """Route every PEFT LoRA Linear of `model` through _fused_forward (idempotent). Returns the model."""
    from peft.tuners.lora import Linear

    for module in model.modules():
        if type(module) is Linear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
    return model


def lora_state_dict(model):
    return {name: p.detach().to("cpu").clone() for name, p in model.named_parameters() if p.requires_grad}


def save_lora_pt(model, path, state_dict=None):
    """The seed's chatglm-lora.pt, written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state_dict if state_dict is not None else lora_state_dict(model), tmp)


def load_lora_pt(peft_model, path):
    """Load a chatglm-lora.pt into a PEFT model; every tensor must find its parameter (no silent no-op loads)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(peft_model.named_parameters())
    unknown = sorted(k for k in state if k not in params)
    if not state or unknown:
        raise UserError(f"{path}: {len(unknown)} of {len(state)} tensors match no LoRA parameter of this model "
                        f"(e.g. {unknown[:1]}); was it trained with another --lora_target or --lora_rank?")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                f"{tuple(params[name].shape)} (different --lora_rank?)")
            params[name].copy_(tensor)
    return len(state)


def _config_for_seed_file(state, folder):
    """LoRA settings for a bare chatglm-lora.pt: from an adapter_config.json beside it, else from the tensors."""
    if (folder / "adapter_config.json").exists():
        path = folder / "adapter_config.json"
        try:
            saved = parse_json(path.read_text())
            return dict(rank=int(saved["r"]), alpha=saved["lora_alpha"], target=",".join(saved["target_modules"]))
        except ValueError as err:
            raise UserError(f"{path}:{getattr(err, 'lineno', 1)}: not valid JSON ({err})") from None
        except (KeyError, TypeError) as err:
            raise UserError(f"{path}: needs r, lora_alpha and target_modules (a PEFT LoRA config); {err!r} is "
                            "missing or wrong") from None
    ranks = {t.shape[0] for k, t in state.items() if "lora_A" in k}
    targets = sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in state if "lora_A" in k})
    if len(ranks) != 1 or not targets:
        raise UserError(f"{folder}: cannot tell the LoRA rank/targets of this chatglm-lora.pt")
    return dict(rank=ranks.pop(), alpha=32, target=",".join(targets))  # alpha 32: the seed's fixed value


def apply_adapter(model, lora_path, dropout=0.0):
    """`lora_path`: a PEFT adapter folder, a folder holding chatglm-lora.pt, or that .pt file itself."""
    path = Path(lora_path)
    if path.is_dir() and (path / "adapter_config.json").exists() and any(path.glob("adapter_model.*")):
        return fuse_lora_layers(PeftModel.from_pretrained(model, str(path)))
    pt = path / SEED_FILE if path.is_dir() else path
    if not pt.is_file():
        raise UserError(f"--lora_path {lora_path}: no adapter there (expected adapter_config.json + "
                        f"adapter_model.safetensors, or {SEED_FILE})")
    state = torch.load(pt, map_location="cpu", weights_only=True)
    peft_model = add_lora(model, dropout=dropout, **_config_for_seed_file(state, pt.parent))
    load_lora_pt(peft_model, pt)
    return peft_model
