"""LoRA wiring: which layers get adapters, and saving / loading them in both the PEFT and the seed's format."""

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from glm_tune.atomic import atomic_path
from glm_tune.data import parse_json
from glm_tune.errors import UserError

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
    return skip_input_casts_under_autocast(get_peft_model(model, config))


def _dropout_is_identity(module):
    return not module.training or all(isinstance(d, torch.nn.Identity) or d.p == 0
                                      for d in module.lora_dropout.values())


def _autocast_aware(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        module.cast_input_dtype_enabled = not (torch.is_autocast_enabled(x.device.type)
                                               and _dropout_is_identity(module))


def skip_input_casts_under_autocast(model):
    """PEFT keeps adapters in fp32 on a bf16/fp16 base (right for the optimizer) and casts each LoRA layer's input to
    fp32 on every call. Under autocast, which both training scripts run in with --bf16/--fp16, the LoRA matmuls run in
    the half dtype anyway: that cast is a copy of the activations there and back, per layer, forward and backward, for
    bit-identical results. Each LoRA layer skips it while autocast is on and its dropout does nothing (p = 0, or
    eval). With dropout the cast stays: bf16 dropout rounds its 1/(1-p) scale to bf16, which would change the
    gradients by ~0.2%. Outside autocast PEFT casts as before."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "_glm_autocast_hook", False):
            module.register_forward_pre_hook(_autocast_aware)
            module._glm_autocast_hook = True
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
        return skip_input_casts_under_autocast(PeftModel.from_pretrained(model, str(path)))
    pt = path / SEED_FILE if path.is_dir() else path
    if not pt.is_file():
        raise UserError(f"--lora_path {lora_path}: no adapter there (expected adapter_config.json + "
                        f"adapter_model.safetensors, or {SEED_FILE})")
    state = torch.load(pt, map_location="cpu", weights_only=True)
    peft_model = add_lora(model, dropout=dropout, **_config_for_seed_file(state, pt.parent))
    load_lora_pt(peft_model, pt)
    return peft_model
