"""LoRA fine-tuning of ChatGLM-6B on several processes: a plain Accelerate training loop (DDP, or DeepSpeed ZeRO-2/3
with or without CPU offload) over finetune.py's data pipeline, collator and flags.

    torchrun --nproc_per_node=2 multi_gpu_fintune_belle.py --dataset_path data/alpaca --lora_rank 8 \\
        --per_device_train_batch_size 1 --learning_rate 2e-5 --fp16 --num_train_epochs 2 --output_dir output \\
        --deepspeed ds_config_zero3.json
    accelerate launch --config_file accelerate_ds_zero3_cpu_offload_config.yaml multi_gpu_fintune_belle.py \\
        --dataset_path data/alpaca --lora_rank 8 --per_device_train_batch_size 2 --max_steps 10000 \\
        --learning_rate 2e-5 --fp16 --output_dir output
    deepspeed --num_gpus 2 multi_gpu_fintune_belle.py --deepspeed ds_config_zero3.json ...
    python multi_gpu_fintune_belle.py       # one process, the embedded demo (as `python finetune.py`)

--dataset_path is a folder from tokenize_dataset_rows_belle.py or a raw .json/.jsonl file (BELLE, Alpaca, ...),
tokenized on the fly. Every TrainingArguments flag parses; the loop honours the batch, accumulation, schedule
(--lr_scheduler_type, --warmup_steps/--warmup_ratio), --max_grad_norm, --max_steps/--num_train_epochs, logging, eval,
save (--save_steps, --save_total_limit), --resume_from_checkpoint (a folder or `latest`), --seed, --report_to,
--gradient_checkpointing, --ddp_timeout and precision flags.

The loss of each optimizer step is the mean over every labelled token of its accumulation window on every process,
so N processes with batch B follow the curve of one process with batch N*B. Checkpoints (output_dir/checkpoint-N)
hold the Accelerate/DeepSpeed state without the frozen base weights, the LoRA adapter (gathered under ZeRO-3) and
training_state.json (step, epoch, data position, log); a resumed run continues with the same batches. Only the main
process writes files and prints.
"""

import contextlib
import json
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, DummyOptim,
                              DummyScheduler, InitProcessGroupKwargs)
from safetensors.torch import load_file
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from glm_tune.arguments import parse_training_args
from glm_tune.atomic import write_json
from glm_tune.data import PrefixLMCollator, load_train_and_eval
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_model, load_tokenizer, resolve_model_path
from glm_tune.lora import SEED_FILE, add_lora, load_lora_pt, save_lora_pt
from glm_tune.memory import MemoryTracker
from glm_tune.plotting import plot_loss_curve
from configuration_chatglm import ChatGLMConfig

STATE_FILE = "training_state.json"


# -- setup ------------------------------------------------------------------------------------------------------------

def mixed_precision(args):
    """'fp16' | 'bf16' | 'no': the flags, else an `accelerate launch` config's mixed_precision; fp16 needs CUDA."""
    wanted = "fp16" if args.fp16 else "bf16" if args.bf16 else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if wanted == "fp16" and not torch.cuda.is_available():
        if int(os.environ.get("RANK", "0")) == 0:
            print("note: mixed_precision fp16 needs a CUDA GPU; training on this CPU in fp32", flush=True)
        return "no"
    return wanted


def deepspeed_plugin(args, precision):
    """The DeepSpeed plugin of --deepspeed (a config file, "auto" values filled from the flags by transformers) or of
    an `accelerate launch` DeepSpeed config; None without DeepSpeed."""
    plugin = args.deepspeed_plugin  # TrainingArguments builds it for either source
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    for key in ("fp16", "bf16"):  # what the run actually uses, whatever the file says (fp16 cannot run on a CPU)
        config.setdefault(key, {})["enabled"] = precision == key
    where = args.deepspeed or "the accelerate config's deepspeed_config"
    accumulation = config.get("gradient_accumulation_steps", "auto")
    if accumulation == "auto":
        config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    elif accumulation != args.gradient_accumulation_steps and args.gradient_accumulation_steps != 1:
        raise UserError(f"{where}: gradient_accumulation_steps is {accumulation} but --gradient_accumulation_steps "
                        f"is {args.gradient_accumulation_steps}; set one of them")
    plugin.gradient_accumulation_steps = config["gradient_accumulation_steps"]
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = args.max_grad_norm
    return plugin


def trackers(report_to):
    names = [name for name in (report_to or []) if name != "none"]
    return "all" if "all" in names else names or None


def build_accelerator(args):
    precision = mixed_precision(args)
    plugin = deepspeed_plugin(args, precision)
    return Accelerator(
        mixed_precision=precision,
        deepspeed_plugin=plugin,
        # what backward() divides the loss by; the windows themselves are cut by train_window's caller
        gradient_accumulation_steps=plugin.gradient_accumulation_steps if plugin else args.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # stepped once per optimizer step, below
        log_with=trackers(args.report_to),
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.data_seed or args.seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
                         DistributedDataParallelKwargs(find_unused_parameters=bool(args.ddp_find_unused_parameters))],
    )


def load_lora_model(model_args, lora_args, args, accelerator):
    model = load_model(model_args.model_name_or_path, model_args.dtype)  # under ZeRO-3: partitioned while loading
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(args.seed)  # before the adapters are made: their initial values repeat
    model = add_lora(model, lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target)
    if lora_args.is_resume:
        accelerator.print(f"loaded {load_lora_pt(model, lora_args.resume_path)} LoRA tensors from "
                          f"{lora_args.resume_path}")
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    return model


def optimizer_and_schedule(model, args, ds_config, total_steps):
    """AdamW + warmup/decay, or DeepSpeed's own when its config has "optimizer" / "scheduler" sections."""
    params = [p for p in model.parameters() if p.requires_grad]
    warmup = args.get_warmup_steps(total_steps)
    if "optimizer" in ds_config:
        optimizer = DummyOptim(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, weight_decay=args.weight_decay)
    if "scheduler" in ds_config:
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps, warmup_num_steps=warmup)
    else:
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps)
    return optimizer, scheduler


# -- saving -----------------------------------------------------------------------------------------------------------

def trainable_state(model, accelerator):
    """The LoRA tensors on the CPU, whole on every process: under ZeRO-3 each is gathered from its partitions."""
    model = accelerator.unwrap_model(model)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gather:
        return {name: p.detach().to("cpu").clone() for name, p in named}


def save_adapter(model, accelerator, folder):
    """adapter_config.json + adapter_model.safetensors + chatglm-lora.pt into `folder` (collective; main writes)."""
    state = trainable_state(model, accelerator)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state)
        save_lora_pt(None, Path(folder) / SEED_FILE, state_dict=state)


def drop_frozen_weights(models, weights, output_dir):
    """save_state hook: checkpoints keep the trainable tensors only, not a copy of the frozen base model."""
    for i, model in enumerate(models):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in trainable}


def save_checkpoint(model, accelerator, args, step, training_state):
    """output_dir/checkpoint-<step>, complete or absent: written as checkpoint-<step>.partial, then renamed."""
    out = Path(args.output_dir)
    final, partial = out / f"checkpoint-{step}", out / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(partial, exclude_frozen_parameters=True)
    else:
        accelerator.save_state(partial)
    save_adapter(model, accelerator, partial)
    if accelerator.is_main_process:
        write_json(partial / STATE_FILE, training_state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        rotate_checkpoints(out, args.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(out, limit):
    if not limit:
        return
    done = sorted((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit())
    for _, folder in done[:-limit]:
        shutil.rmtree(folder)


def load_checkpoint(model, accelerator, folder, rows):
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"--resume_from_checkpoint {folder}: no {STATE_FILE} there (not a checkpoint of this script)")
    state = json.loads((folder / STATE_FILE).read_text())
    if state["train_rows"] != rows:
        raise UserError(f"{folder}/{STATE_FILE}: the run had {state['train_rows']} training rows, this data has "
                        f"{rows}; resume with the same --dataset_path")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(folder, load_module_strict=False)
    else:
        accelerator.load_state(folder, strict=False)
    # the adapter written beside the state must be what was restored (a wrong folder fails here, not silently)
    restored = {name.replace(".default", ""): t for name, t in trainable_state(model, accelerator).items()}
    for name, tensor in load_file(folder / "adapter_model.safetensors").items():
        if name not in restored or not torch.equal(restored[name].to(tensor.dtype), tensor):
            raise UserError(f"{folder}: restored LoRA tensor {name} differs from the checkpoint's adapter (another "
                            "--lora_rank / --lora_target?)")
    return state


# -- the loop ---------------------------------------------------------------------------------------------------------

def windows(batches, size):
    """The micro-batches of each optimizer step, as lists (the last one of an epoch may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def labelled(batch):
    return batch["labels"][:, 1:].ne(-100).sum()


def train_window(model, window, accelerator):
    """The backward passes of one optimizer step. Each micro-batch's loss is its token-loss sum divided by the labelled
    tokens of the whole window on all processes; backward() divides by the accumulation steps and DDP/DeepSpeed average
    over processes, so `scale` makes the step's gradient exactly the window's mean token gradient (a partial window at
    an epoch's end included). Returns the window's mean token loss, labelled tokens and real tokens, over all
    processes.

    The accumulation switches are accelerator.accumulate()'s own (no_sync on the way, sync_gradients on the window's
    last micro-batch), set per window as transformers' Trainer does: accumulate() finds boundaries by a step counter
    and the loader's end flag, which read-ahead (needed to count the window's tokens first) would put off."""
    counts = torch.stack([sum(labelled(b) for b in window), sum(b["attention_mask"].sum() for b in window)])
    n_items, n_real = accelerator.reduce(counts.to(accelerator.device), "sum")
    scale = accelerator.num_processes * accelerator.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        accelerator.gradient_state._set_sync_gradients(last)  # as Trainer does: the window, not a step counter
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = model(**batch, num_items_in_batch=n_items).loss
            accelerator.backward(loss * scale)
        loss_sum += loss.detach()
    return accelerator.reduce(loss_sum, "sum").item(), n_items.item(), n_real.item()


@torch.no_grad()
def evaluate(model, dataloader, accelerator):
    """Mean token loss over the eval set (each row once, though processes get equal batch counts)."""
    model.eval()
    sums, counts = [], []
    for batch in dataloader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        row_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                   reduction="none").sum(1)
        row_sum, row_count = accelerator.gather_for_metrics((row_loss, labels.ne(-100).sum(1)))
        sums.append(row_sum.sum())
        counts.append(row_count.sum())
    model.train()
    return (torch.stack(sums).sum() / torch.stack(counts).sum()).item()


@record
@exit_on_user_error
def main(argv=None):
    model_args, data_args, lora_args, args = parse_training_args(argv, __doc__.split("\n\n")[0])
    accelerator = build_accelerator(args)
    is_main = accelerator.is_main_process
    out = Path(args.output_dir)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    with accelerator.main_process_first():  # one process tokenizes first; with a saved dataset the rest reuse it
        train_set, eval_set = load_train_and_eval(data_args, tokenizer, log=print if is_main else None)
    collator = PrefixLMCollator(tokenizer, pad_to_multiple_of=data_args.pad_to_multiple_of)
    train_dl = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
                          num_workers=args.dataloader_num_workers, drop_last=args.dataloader_drop_last)
    eval_dl = eval_set and DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collator)

    # steps from the per-process batch count (what accelerator.prepare will shard to)
    ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config if ds else {}
    accumulation = accelerator.gradient_accumulation_steps
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_process / accumulation)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    epochs = math.ceil(total_steps / updates_per_epoch)
    if args.deepspeed:  # fill the config's remaining "auto" values (bucket sizes, schedule length), as Trainer does
        config = ChatGLMConfig.from_pretrained(str(resolve_model_path(model_args.model_name_or_path)))
        args.hf_deepspeed_config.trainer_config_finalize(args, SimpleNamespace(config=config), total_steps)

    model = load_lora_model(model_args, lora_args, args, accelerator)
    optimizer, scheduler = optimizer_and_schedule(model, args, ds_config, total_steps)
    prepared = accelerator.prepare(model, optimizer, train_dl, scheduler, *([eval_dl] if eval_dl else []))
    model, optimizer, train_dl, scheduler = prepared[:4]
    eval_dl = prepared[4] if eval_dl else None
    assert len(train_dl) == batches_per_process, (len(train_dl), batches_per_process)
    if not ds:
        accelerator.register_save_state_pre_hook(drop_frozen_weights)
    trainable = [p for p in model.parameters() if p.requires_grad]

    step, epoch, batches_done, log_history = 0, 0, 0, []
    if args.resume_from_checkpoint:
        state = load_checkpoint(model, accelerator, args.resume_from_checkpoint, len(train_set))
        step, epoch, batches_done, log_history = (state["global_step"], state["epoch"], state["batches_done"],
                                                  state["log_history"])
        accelerator.print(f"resumed from {args.resume_from_checkpoint}: step {step}, epoch {epoch}, "
                          f"{batches_done} batches into it")
    hparams = {k: v for k, v in {**vars(model_args), **vars(data_args), **vars(lora_args),
                                 **args.to_sanitized_dict()}.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("glm-tune", config=hparams)  # the trackers live on the main process
    accelerator.print(f"{len(train_set)} rows, {accelerator.num_processes} process(es) x batch "
                      f"{args.per_device_train_batch_size} x accumulation {accumulation}: {updates_per_epoch} steps "
                      f"an epoch, {total_steps} steps, {epochs} epoch(s)"
                      + (f", DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if ds else ""))

    def training_state():
        return {"global_step": step, "epoch": epoch, "batches_done": batches_done, "train_rows": len(train_set),
                "total_steps": total_steps, "log_history": log_history}

    def log(entry):
        entry = {**entry, "step": step, "epoch": round(epoch + batches_done / max(batches_per_process, 1), 4)}
        log_history.append(entry)
        accelerator.log({k: v for k, v in entry.items() if k not in ("step",)}, step=step)
        if is_main:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))

    def run_eval():
        if eval_dl is not None:
            loss = evaluate(model, eval_dl, accelerator)
            log({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="training", disable=not is_main or args.disable_tqdm)
    logged_loss, logged_tokens, logged_real, busy = 0.0, 0, 0, 0.0  # since the last log; busy: seconds training
    while step < total_steps and epoch < epochs:
        train_dl.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
        epoch_loss, epoch_tokens = 0.0, 0
        with MemoryTracker() as memory:
            for window in windows(batches, accumulation):
                started = time.perf_counter()
                loss, tokens, real = train_window(model, window, accelerator)
                grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm) if args.max_grad_norm else None
                optimizer.step()
                if "scheduler" not in ds_config:  # a DeepSpeed config's own schedule steps inside DeepSpeed
                    scheduler.step()
                optimizer.zero_grad()
                busy += time.perf_counter() - started
                step, batches_done = step + 1, batches_done + len(window)
                logged_loss, logged_tokens, logged_real = logged_loss + loss * tokens, logged_tokens + tokens, \
                    logged_real + real
                epoch_loss, epoch_tokens = epoch_loss + loss * tokens, epoch_tokens + tokens
                bar.update(1)
                if step % args.logging_steps == 0 or step == total_steps:
                    mean = logged_loss / max(logged_tokens, 1)
                    entry = {"loss": mean, "perplexity": math.exp(min(mean, 50)),
                             "learning_rate": scheduler.get_last_lr()[0], "tokens_per_second": logged_real / busy}
                    if grad_norm is not None:
                        entry["grad_norm"] = float(grad_norm)
                    log(entry)
                    logged_loss, logged_tokens, logged_real, busy = 0.0, 0, 0, 0.0
                if args.eval_strategy == "steps" and args.eval_steps and step % int(args.eval_steps) == 0:
                    run_eval()
                if args.save_strategy != "no" and args.save_steps and step % int(args.save_steps) == 0 \
                        and step < total_steps:
                    save_checkpoint(model, accelerator, args, step, training_state())
                if step >= total_steps:
                    break
        if epoch_tokens and is_main:
            mean = epoch_loss / epoch_tokens
            tqdm.write(f"epoch {epoch}: train loss {mean:.4f}, perplexity {math.exp(min(mean, 50)):.4g} | "
                       f"{memory.report()}")
        if args.eval_strategy == "epoch":
            run_eval()
        if batches_done >= batches_per_process:
            epoch, batches_done = epoch + 1, 0
    bar.close()
    if args.eval_strategy == "no" and eval_dl is not None:
        run_eval()

    if args.save_strategy != "no":
        save_checkpoint(model, accelerator, args, step, training_state())
    save_adapter(model, accelerator, out)
    if is_main:
        tokenizer.save_pretrained(out)
        write_json(out / STATE_FILE, training_state())
        plot = plot_loss_curve(log_history, out / "loss_curve.png")
        base = f" --model_name_or_path {model_args.model_name_or_path}" if model_args.model_name_or_path else ""
        print(f"saved the adapter to {out}/ (loss curve: {plot})")
        print(f"try it: python inference.py --lora_path {out}{base}")
    accelerator.wait_for_everyone()  # tear the process group down together: a rank leaving early can abort at exit
    accelerator.end_training()


if __name__ == "__main__":
    main()
