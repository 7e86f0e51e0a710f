"""Checkpoints of the Accelerate training loop (multi_gpu_fintune_belle.py): save, rotate, load.

output_dir/checkpoint-N holds the Accelerate / DeepSpeed state without the frozen base weights, the LoRA adapter
(gathered from its partitions under ZeRO-3) or, for P-Tuning v2, the prefix checkpoint (pytorch_model.bin +
config.json, the official layout) and training_state.json (step, epoch, data position, log). A checkpoint
is complete or absent: it is written as checkpoint-N.partial and renamed when whole.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from glm_tune.atomic import write_json
from glm_tune.errors import UserError
from glm_tune.lora import SEED_FILE, save_lora_pt
from glm_tune.ptuning import PREFIX, is_ptuning, read_prefix_state, save_prefix_checkpoint

STATE_FILE = "training_state.json"


def is_deepspeed(accelerator):
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def trainable_state(model, accelerator):
    """The trainable tensors (LoRA, or the P-Tuning prefix encoder) on the CPU, whole on every process: under ZeRO-3
    each is gathered from its partitions."""
    model = accelerator.unwrap_model(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gather:
        return {name: p.detach().to("cpu").clone() for name, p in named}


def save_adapter(model, accelerator, folder, with_seed_file=True):
    """adapter_config.json + adapter_model.safetensors (+ chatglm-lora.pt) into `folder`, or for a P-Tuning model the
    prefix checkpoint (pytorch_model.bin + config.json); collective, the main process writes. Returns the trainable
    tensors."""
    state = trainable_state(model, accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process and is_ptuning(unwrapped):
        save_prefix_checkpoint(folder, state, unwrapped.config)
    elif accelerator.is_main_process:
        unwrapped.save_pretrained(folder, state_dict=state)
        if with_seed_file:
            save_lora_pt(None, Path(folder) / SEED_FILE, state_dict=state)
    return state


def drop_frozen_weights(models, weights, output_dir):
    """save_state hook: checkpoints keep the trainable tensors only, not a copy of the frozen base model."""
    for i, model in enumerate(models):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def save_checkpoint(model, accelerator, output_dir, step, training_state, save_total_limit=None):
    """output_dir/checkpoint-<step>, complete or absent; the oldest beyond `save_total_limit` are removed."""
    out = Path(output_dir)
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    if is_deepspeed(accelerator):
        accelerator.save_state(partial, exclude_frozen_parameters=True)
    else:
        accelerator.save_state(partial)
    save_adapter(model, accelerator, partial)
    # every process writes into the folder (its random_states_<rank>.pkl, its ZeRO partition): all must be done
    # before the main process renames it, or a slower rank finds its folder gone
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(partial / STATE_FILE, training_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        rotate_checkpoints(out, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(out, limit):
    if not limit:
        return
    done = sorted((int(p.name.split("-")[1]), p) for p in Path(out).glob("checkpoint-*")
                  if p.name.split("-")[1].isdigit())
    for _, folder in done[:-limit]:
        shutil.rmtree(folder)


def load_checkpoint(model, accelerator, folder, rows):
    """Restore a checkpoint into the prepared model / optimizer / scheduler; returns its training_state.json."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {folder}: no {STATE_FILE} there (not a checkpoint of this script)")
    state = json.loads((folder / STATE_FILE).read_text())
    if state["train_rows"] != rows:
        raise UserError(f"{folder}/{STATE_FILE}: the run had {state['train_rows']} training rows, this data has "
                        f"{rows}; resume with the same --dataset_path")
    if is_deepspeed(accelerator):
        accelerator.load_state(folder, load_module_strict=False)
    else:
        accelerator.load_state(folder, strict=False)
    # the adapter written beside the state must be what was restored (a wrong folder fails here, not silently)
    restored = {name.replace(".default", ""): t for name, t in trainable_state(model, accelerator).items()}
    if is_ptuning(accelerator.unwrap_model(model)):
        saved, what = read_prefix_state(folder)[0], "P-Tuning prefix tensor"
        if set(saved) != {name for name in restored if name.startswith(PREFIX)}:
            raise UserError(f"{folder}: its prefix tensors {sorted(saved)} are not this model's (a LoRA checkpoint, "
                            "or another --prefix_projection?)")
    else:
        saved, what = load_file(folder / "adapter_model.safetensors"), "LoRA tensor"
    for name, tensor in saved.items():
        if name not in restored or not torch.equal(restored[name].to(tensor.dtype), tensor):
            raise UserError(f"{folder}: restored {what} {name} differs from the checkpoint's (another "
                            "--lora_rank / --lora_target / --pre_seq_len?)")
    return state
