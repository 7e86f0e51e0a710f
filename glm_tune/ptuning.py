"""P-Tuning v2 (THUDM's ptuning/): the base model frozen, trainable per-layer key/value prefixes
(`transformer.prefix_encoder`). Setting it up for training, and its checkpoint folder in the official layout:

    pytorch_model.bin   the prefix encoder's tensors alone, keyed `transformer.prefix_encoder.*`
    config.json         the base model's config with pre_seq_len and prefix_projection set

(what the official trainer's `_save` with save_prefixencoder writes, and what its README loads). Reading also takes a
`model.safetensors` with the same tensors, and keys already stripped of `transformer.prefix_encoder.`.
"""

import json
from pathlib import Path

import torch
from transformers import Trainer

from glm_tune.atomic import atomic_path, write_bytes
from glm_tune.errors import UserError

PREFIX = "transformer.prefix_encoder."
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def ptuning_overrides(pre_seq_len, prefix_projection=False):
    """from_pretrained keyword arguments that give the model a prefix encoder (they override config.json's fields)."""
    return {"pre_seq_len": int(pre_seq_len), "prefix_projection": bool(prefix_projection)}


def setup_ptuning(model):
    """Freeze everything but the prefix encoder, and keep the prefix encoder in fp32 whatever the base's dtype (as the
    official ptuning/main.py does). Returns the model."""
    if not getattr(model.config, "pre_seq_len", None):
        raise ValueError("the model has no prefix encoder: load it with pre_seq_len set")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(PREFIX))
    model.transformer.prefix_encoder.float()
    return model


def is_ptuning(model):
    return bool(getattr(getattr(model, "config", None), "pre_seq_len", None))


def prefix_state_dict(model, state_dict=None):
    """The prefix encoder's tensors, keyed `transformer.prefix_encoder.*`, on the CPU: from `state_dict` when given
    (e.g. DeepSpeed's gathered one), else from the model's parameters."""
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {name: tensor.detach().to("cpu").clone() for name, tensor in source.items() if name.startswith(PREFIX)}


def describe_trainable(model):
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"P-Tuning v2: trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def save_prefix_checkpoint(folder, state, config):
    """pytorch_model.bin (the prefix tensors alone) and config.json (with pre_seq_len / prefix_projection) into
    `folder`, each written atomically."""
    folder = Path(folder)
    state = {name: tensor for name, tensor in state.items() if name.startswith(PREFIX)}
    if not state:
        raise ValueError("no transformer.prefix_encoder.* tensors to save")
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        torch.save(state, tmp)
    write_bytes(folder / CONFIG_NAME, config.to_json_string(use_diff=False).encode("utf-8"))


def read_ptuning_config(folder):
    """{pre_seq_len, prefix_projection} from a P-Tuning checkpoint's config.json; one-line UserError when it has none."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise UserError(f"--ptuning_checkpoint {folder}: no such folder")
    if not path.is_file():
        raise UserError(f"{path}: no such file (a P-Tuning checkpoint folder holds config.json with pre_seq_len and "
                        f"{WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}:{getattr(err, 'lineno', 1)}: not valid JSON ({err})") from None
    pre_seq_len = config.get("pre_seq_len") if isinstance(config, dict) else None
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len < 1:
        raise UserError(f"{path}: needs pre_seq_len (a positive integer, the prefix length it was trained with); "
                        f"got {pre_seq_len!r}")
    return ptuning_overrides(pre_seq_len, config.get("prefix_projection", False))


def read_prefix_state(folder):
    """The prefix tensors of a checkpoint folder (pytorch_model.bin, else model.safetensors), keyed
    `transformer.prefix_encoder.*` (stripped keys get the prefix back) -> (state, the file read)."""
    folder = Path(folder)
    bin_path, safe_path = folder / WEIGHTS_NAME, folder / SAFE_WEIGHTS_NAME
    if bin_path.is_file():
        path = bin_path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle with code in it, a torn file, ...
            raise UserError(f"{path}: cannot be read as tensors ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    elif safe_path.is_file():
        from safetensors.torch import load_file

        path = safe_path
        try:
            state = load_file(path)
        except Exception as err:
            raise UserError(f"{path}: not a safetensors file ({type(err).__name__})") from None
    else:
        raise UserError(f"--ptuning_checkpoint {folder}: no {WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME} there")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return {(name if name.startswith(PREFIX) else PREFIX + name): t for name, t in state.items()}, path


def load_prefix_checkpoint(model, folder):
    """Load a checkpoint's prefix tensors into `model.transformer.prefix_encoder`: every tensor must match a
    prefix-encoder parameter by name and shape, and every parameter must be given. Returns the tensor count."""
    state, path = read_prefix_state(folder)
    params = {PREFIX + name: p for name, p in model.transformer.prefix_encoder.named_parameters()}
    for name, tensor in state.items():
        if name not in params:
            raise UserError(f"{path}: {name} is not a parameter of the prefix encoder (expected "
                            f"{sorted(params)}; a full model, or another prefix_projection?)")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(params[name].shape)} (another base model, pre_seq_len or prefix_projection?)")
    missing = sorted(set(params) - set(state))
    if missing:
        raise UserError(f"{path}: lacks {missing[0]} (of {len(params)} prefix-encoder tensors)")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return len(state)


class PtuningTrainer(Trainer):
    """transformers' Trainer, with checkpoints that hold the prefix encoder alone (official layout) and resume from
    them; the frozen base is neither saved nor reloaded."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save_prefix_checkpoint(output_dir, prefix_state_dict(model, state_dict), model.config)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        with atomic_path(Path(output_dir) / "training_args.bin") as tmp:
            torch.save(self.args, tmp)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_prefix_checkpoint(model, resume_from_checkpoint)

    def _load_best_model(self):
        load_prefix_checkpoint(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
