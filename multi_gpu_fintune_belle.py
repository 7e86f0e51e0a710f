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
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, DummyOptim, DummyScheduler,
                              InitProcessGroupKwargs)
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from configuration_chatglm import ChatGLMConfig
from glm_tune.accelerate_checkpoint import (STATE_FILE, drop_frozen_weights, is_deepspeed, load_checkpoint,
                                            save_adapter, save_checkpoint)
from glm_tune.arguments import parse_training_args
from glm_tune.atomic import write_json
from glm_tune.data import PrefixLMCollator, load_train_and_eval
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_tokenizer, resolve_model_path
from glm_tune.locking import hold_output_lock
from glm_tune.memory import MemoryTracker
from glm_tune.runtime import exit_multiprocess_run
from glm_tune.training import load_trainable_model, windows, write_run_outputs


# -- setup ------------------------------------------------------------------------------------------------------------

def deepspeed_plugin(args):
    """The DeepSpeed plugin of --deepspeed (a config file, "auto" values filled from the flags by transformers) or of
    an `accelerate launch` DeepSpeed config; None without DeepSpeed."""
    plugin = args.deepspeed_plugin  # TrainingArguments builds it for either source
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    for key in ("fp16", "bf16"):  # what the run actually uses, whatever the file says (fp16 cannot run on a CPU)
        config.setdefault(key, {})["enabled"] = args.mixed_precision == key
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
    """The Accelerator of the run; args.mixed_precision is already what this machine can do (parse_training_args)."""
    plugin = deepspeed_plugin(args)
    return Accelerator(
        mixed_precision=args.mixed_precision,
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


@dataclass
class Run:
    """Everything the loop works with, and where it stands (what a checkpoint's training_state.json records)."""

    args: object
    accelerator: Accelerator
    model: object
    optimizer: object
    scheduler: object
    train_dl: DataLoader
    eval_dl: DataLoader | None
    train_rows: int
    batches_per_process: int
    total_steps: int
    epochs: int
    own_schedule: bool  # False when a DeepSpeed config's scheduler steps inside DeepSpeed
    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    log_history: list = field(default_factory=list)

    def training_state(self):
        return {"global_step": self.step, "epoch": self.epoch, "batches_done": self.batches_done,
                "train_rows": self.train_rows, "total_steps": self.total_steps, "log_history": self.log_history}

    def log(self, entry):
        entry = {**entry, "step": self.step,
                 "epoch": round(self.epoch + self.batches_done / max(self.batches_per_process, 1), 4)}
        self.log_history.append(entry)
        self.accelerator.log({k: v for k, v in entry.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))


def setup(model_args, data_args, lora_args, args, accelerator, tokenizer, ptuning_args):
    """Data, model with adapters (or P-Tuning prefix), optimizer and schedule, all prepared; resumed when asked."""
    with accelerator.main_process_first():  # one process tokenizes first; with a saved dataset the rest reuse it
        train_set, eval_set = load_train_and_eval(data_args, tokenizer,
                                                  log=print if accelerator.is_main_process else None)
    collator = PrefixLMCollator(tokenizer, pad_to_multiple_of=data_args.pad_to_multiple_of)
    train_dl = DataLoader(train_set, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collator,
                          num_workers=args.dataloader_num_workers, drop_last=args.dataloader_drop_last)
    eval_dl = eval_set and DataLoader(eval_set, batch_size=args.per_device_eval_batch_size, collate_fn=collator)

    # steps from the per-process batch count (what accelerator.prepare will shard to)
    ds = is_deepspeed(accelerator)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config if ds else {}
    accumulation = accelerator.gradient_accumulation_steps
    batches_per_process = math.ceil(len(train_dl) / accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_process / accumulation)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * updates_per_epoch)
    epochs = math.ceil(total_steps / updates_per_epoch)
    if args.deepspeed:  # fill the config's remaining "auto" values (bucket sizes, schedule length), as Trainer does
        folder = resolve_model_path(model_args.model_name_or_path, model_args.revision)
        config = ChatGLMConfig.from_pretrained(str(folder))
        args.hf_deepspeed_config.trainer_config_finalize(args, SimpleNamespace(config=config), total_steps)

    model = load_trainable_model(model_args, lora_args, ptuning_args, args,
                                 log=accelerator.print if accelerator.is_main_process else None)
    optimizer, scheduler = optimizer_and_schedule(model, args, ds_config, total_steps)
    prepared = accelerator.prepare(model, optimizer, train_dl, scheduler, *([eval_dl] if eval_dl else []))
    model, optimizer, train_dl, scheduler = prepared[:4]
    assert len(train_dl) == batches_per_process, (len(train_dl), batches_per_process)
    if not ds:
        accelerator.register_save_state_pre_hook(drop_frozen_weights)
    run = Run(args, accelerator, model, optimizer, scheduler, train_dl, prepared[4] if eval_dl else None,
              len(train_set), batches_per_process, total_steps, epochs, own_schedule="scheduler" not in ds_config)

    if args.resume_from_checkpoint:
        state = load_checkpoint(model, accelerator, args.resume_from_checkpoint, len(train_set))
        run.step, run.epoch, run.batches_done, run.log_history = (state["global_step"], state["epoch"],
                                                                  state["batches_done"], state["log_history"])
        accelerator.print(f"resumed from {args.resume_from_checkpoint}: step {run.step}, epoch {run.epoch}, "
                          f"{run.batches_done} batches into it")
    hparams = {k: v for k, v in {**vars(model_args), **vars(data_args), **vars(lora_args), **vars(ptuning_args),
                                 **args.to_sanitized_dict()}.items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers("glm-tune", config=hparams)  # the trackers live on the main process
    accelerator.print(f"{len(train_set)} rows, {accelerator.num_processes} process(es) x batch "
                      f"{args.per_device_train_batch_size} x accumulation {accumulation}: {updates_per_epoch} steps "
                      f"an epoch, {total_steps} steps, {epochs} epoch(s)"
                      + (f", DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if ds else ""))
    return run


# -- the loop ---------------------------------------------------------------------------------------------------------

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


def run_eval(run):
    if run.eval_dl is not None:
        loss = evaluate(run.model, run.eval_dl, run.accelerator)
        run.log({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})


def optimizer_step(run, window, trainable):
    """One optimizer step over a window of micro-batches: (mean token loss, labelled tokens, real tokens, grad norm)."""
    args = run.args
    loss, tokens, real = train_window(run.model, window, run.accelerator)
    grad_norm = run.accelerator.clip_grad_norm_(trainable, args.max_grad_norm) if args.max_grad_norm else None
    run.optimizer.step()
    if run.own_schedule:
        run.scheduler.step()
    run.optimizer.zero_grad()
    run.step, run.batches_done = run.step + 1, run.batches_done + len(window)
    return loss, tokens, real, grad_norm


def without_global_rng(batches):
    """`batches`, whose loader starts without drawing from the global random state. A loader draws its base seed from
    it when its iteration starts: the uninterrupted run did so at the epoch's start, before the checkpoint's random
    state was saved, so a resumed epoch must not draw again, or every random op after it (dropout, the P-Tuning
    prefix's included) would differ from the uninterrupted run."""
    iterator = iter(batches)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        first = next(iterator, None)
    if first is not None:
        yield first
        yield from iterator


def train(run):
    """Epochs of optimizer steps, with logging, evaluation and checkpoints as the flags ask."""
    args, accelerator = run.args, run.accelerator
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.step, desc="training",
               disable=not accelerator.is_main_process or args.disable_tqdm)
    logged_loss, logged_tokens, logged_real, busy = 0.0, 0, 0, 0.0  # since the last log; busy: seconds training
    while run.step < run.total_steps and run.epoch < run.epochs:
        run.train_dl.set_epoch(run.epoch)
        batches = (without_global_rng(accelerator.skip_first_batches(run.train_dl, run.batches_done))
                   if run.batches_done else run.train_dl)
        epoch_loss, epoch_tokens = 0.0, 0
        with MemoryTracker() as memory:
            for window in windows(batches, accelerator.gradient_accumulation_steps):
                started = time.perf_counter()
                loss, tokens, real, grad_norm = optimizer_step(run, window, trainable)
                busy += time.perf_counter() - started
                logged_loss, logged_tokens, logged_real = (logged_loss + loss * tokens, logged_tokens + tokens,
                                                           logged_real + real)
                epoch_loss, epoch_tokens = epoch_loss + loss * tokens, epoch_tokens + tokens
                bar.update(1)
                if run.step % args.logging_steps == 0 or run.step == run.total_steps:
                    mean = logged_loss / max(logged_tokens, 1)
                    entry = {"loss": mean, "perplexity": math.exp(min(mean, 50)),
                             "learning_rate": run.scheduler.get_last_lr()[0], "tokens_per_second": logged_real / busy}
                    if grad_norm is not None:
                        entry["grad_norm"] = float(grad_norm)
                    run.log(entry)
                    logged_loss, logged_tokens, logged_real, busy = 0.0, 0, 0, 0.0
                if args.eval_strategy == "steps" and args.eval_steps and run.step % int(args.eval_steps) == 0:
                    run_eval(run)
                if args.save_strategy != "no" and args.save_steps and run.step % int(args.save_steps) == 0 \
                        and run.step < run.total_steps:
                    save_checkpoint(run.model, accelerator, args.output_dir, run.step, run.training_state(),
                                    args.save_total_limit)
                if run.step >= run.total_steps:
                    break
        if epoch_tokens and accelerator.is_main_process:
            mean = epoch_loss / epoch_tokens
            tqdm.write(f"epoch {run.epoch}: train loss {mean:.4f}, perplexity {math.exp(min(mean, 50)):.4g} | "
                       f"{memory.report()}")
        if args.eval_strategy == "epoch":
            run_eval(run)
        if run.batches_done >= run.batches_per_process:
            run.epoch, run.batches_done = run.epoch + 1, 0
    bar.close()
    if args.eval_strategy == "no" and run.eval_dl is not None:
        run_eval(run)


def finish(run, tokenizer, model_args, ptuning=False):
    """The last checkpoint, the adapter in output_dir and the run's outputs; then the ranks end together."""
    args, accelerator = run.args, run.accelerator
    if args.save_strategy != "no":
        save_checkpoint(run.model, accelerator, args.output_dir, run.step, run.training_state(), args.save_total_limit)
    lora_state = save_adapter(run.model, accelerator, args.output_dir, with_seed_file=False)
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / STATE_FILE, run.training_state())
        write_run_outputs(args.output_dir, lora_state, tokenizer, run.log_history, model_args, ptuning=ptuning)
    accelerator.wait_for_everyone()  # tear the process group down together: a rank leaving early can abort at exit
    accelerator.end_training()


@record
@exit_on_user_error
def main(argv=None):
    model_args, data_args, lora_args, args, ptuning_args = parse_training_args(argv, __doc__.split("\n\n")[0])
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.revision)
    accelerator = build_accelerator(args)
    # One run per output_dir: a second launch on it stops on every rank, naming this one (rank 0 holds the lock).
    with hold_output_lock(args.output_dir, "--output_dir"):
        run = setup(model_args, data_args, lora_args, args, accelerator, tokenizer, ptuning_args)
        train(run)
        finish(run, tokenizer, model_args, ptuning=ptuning_args.ptuning)
    exit_multiprocess_run()


if __name__ == "__main__":
    main()
