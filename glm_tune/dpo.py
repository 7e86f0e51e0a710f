"""DPO (direct preference optimization) of a LoRA adapter with TRL's DPOTrainer, on preference pairs such as the web
UI's preferences.jsonl.

Rows (JSONL or a JSON array; extra fields are ignored):

    {"prompt", "chosen", "rejected"}                      the prompt is used as it is (the web UI stores it rendered)
    {"instruction", "input" (optional), "chosen", "rejected"}   the prompt is rendered as finetune.py renders Alpaca rows

Tokenized as the project tokenizes training rows (glm_tune.data): prompt ids + [gMASK] <sop>, then the answer +
<eop>; the prompt is cut first (fit_to_length) so that prompt + the longer answer fit --max_seq_length. DPOTrainer
gets the ids (prompt_ids / chosen_ids / rejected_ids) and pads on the right; the model derives GLM's 2D positions and
the prefix-LM mask from input_ids and the attention mask itself.

The policy is the trainable adapter ("default"), the reference the same model with a frozen copy of the starting
adapter ("ref"; TRL's ref_adapter_name mechanism): with --lora_path the SFT adapter, without it a fresh LoRA, whose
zero B makes the reference the base model. Only the policy adapter is saved, so `inference.py --lora_path OUT` runs
it on the base alone.
"""

import dataclasses
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, Features, List, Value
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from glm_tune.arguments import (LORA_HELP, REPO_ROOT, LoraArguments, ModelArguments, TrainingArguments,
                                check_deepspeed_file, launch_changes)
from glm_tune.data import DataError, fit_to_length, json_type, parse_rows, render_example, text_field
from glm_tune.errors import UserError, first_line

DPO_TRAIN = REPO_ROOT / "data" / "dpo" / "train.jsonl"
DPO_TEST = REPO_ROOT / "data" / "dpo" / "test.jsonl"
DEFAULT_OUTPUT = "output-dpo"
# The embedded default (no --dataset): the synthetic preference set on the embedded random model. A random small base
# needs a large learning rate and adapters on every linear layer; these settings lift the held-out implicit-reward
# accuracy from 50% to about 90% in well under a minute on one CPU thread.
DPO_DEMO_ARGS = [
    "--dataset_path", str(DPO_TRAIN), "--eval_dataset_path", str(DPO_TEST), "--lora_target", "all",
    "--learning_rate", "2e-3", "--per_device_train_batch_size", "16", "--max_steps", "60", "--beta", "0.1",
    "--warmup_steps", "5", "--lr_scheduler_type", "linear", "--logging_steps", "10", "--save_steps", "30",
    "--max_seq_length", "64",
]
POLICY, REFERENCE = "default", "ref"  # adapter names: the one trained and saved, the frozen copy TRL makes of it
# TRL's DPOConfig.loss_type values (trl 1.x); checked here so that a typo is an argparse error, not a traceback later.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
PREFERENCE_FIELDS = "{prompt, chosen, rejected} or {instruction, input (optional), chosen, rejected}"


# -- flags ------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceArguments:
    dataset_path: str = field(default=None, metadata={
        "aliases": ["--dataset"],
        "help": f"preference pairs: a .jsonl / .json file of {PREFERENCE_FIELDS} rows, e.g. the web UI's "
                "data/feedback/preferences.jsonl as it is. Default: the shipped synthetic set data/dpo/train.jsonl "
                "with the demo settings (see glm_tune/dpo.py)"})
    eval_dataset_path: str = field(default=None, metadata={
        "aliases": ["--eval_dataset"],
        "help": "held-out pairs, same formats: their implicit-reward preference accuracy is reported before and "
                "after training, and evaluated per --eval_strategy"})
    lora_path: str = field(default=None, metadata={
        "help": f"start from this adapter ({LORA_HELP}): the policy trains a copy of it, the reference is the base "
                "plus it, frozen. --lora_rank/--lora_alpha/--lora_target are then the adapter's own. Default: a "
                "fresh LoRA, the reference being the base model"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip unusable rows instead of stopping"})


def _inherited(name, **changes):
    """TrainingArguments' field `name` with a new default (its help kept unless given)."""
    base = transformers_field(name)
    metadata = {**base.metadata, **changes.pop("metadata", {})}
    return field(metadata=metadata, **changes)


def transformers_field(name):
    import transformers

    return transformers.TrainingArguments.__dataclass_fields__[name]


@dataclass
class DPOArguments(TrainingArguments, DPOConfig):
    """TRL's DPOConfig (--beta, --loss_type, ...) on the project's TrainingArguments (gloo on CPUs under torchrun).
    TrainingArguments' defaults stay (no gradient checkpointing, no bf16 unless asked: TRL turns both on); the
    learning rate and logging interval are DPO's."""

    learning_rate: float = field(default=5e-6, metadata={
        "help": "initial AdamW learning rate (default 5e-6; DPO of a LoRA on a pretrained 6B model: 1e-6 to 5e-5)"})
    logging_steps: float = _inherited("logging_steps", default=10)
    max_length: int = field(default=512, metadata={
        "aliases": ["--max_seq_length"],
        "help": "most tokens of prompt + [gMASK] <sop> + answer + <eop>; the prompt is cut first, keeping its "
                "beginning (as finetune.py cuts rows)"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={
        "choices": LOSS_TYPES,
        "help": "DPO loss (TRL's loss_type; several are summed, weighted by --loss_weights): sigmoid (the DPO paper), "
                "hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, "
                "discopop, sft, sigmoid_norm"})


def _given(argv, *flags):
    spellings = {s for flag in flags for s in (flag, flag.replace("_", "-"))}
    return any(a in spellings or a.split("=", 1)[0] in spellings for a in argv)


def with_dpo_demo_defaults(argv):
    """argv with the synthetic preference set and demo settings in front when no --dataset is given (later flags
    win), and --output_dir output-dpo when none is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not _given(argv, "--dataset_path", "--dataset"):
        argv = DPO_DEMO_ARGS + argv
    if not _given(argv, "--output_dir"):
        argv = ["--output_dir", DEFAULT_OUTPUT] + argv
    return argv


def parse_dpo_args(argv=None, description=None):
    """(ModelArguments, PreferenceArguments, LoraArguments, DPOArguments), with parse_training_args' conventions:
    demo defaults without --dataset, --fp16 falls back on CPUs, `--report_to a,b`, `--resume_from_checkpoint
    latest`, a --deepspeed file checked first."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, PreferenceArguments, LoraArguments, DPOArguments),
                              description=description)
    argv = with_dpo_demo_defaults(argv)
    check_deepspeed_file(argv)
    try:
        model_args, pref_args, lora_args, train_args = parser.parse_args_into_dataclasses(argv)
    except ValueError as err:  # DPOConfig / TrainingArguments refusing a combination of flags
        raise UserError(first_line(err)) from None
    changes = dict(label_names=[], **launch_changes(train_args))  # no labels: built from the completion mask
    if train_args.max_length is not None and train_args.max_length < 4:
        raise UserError(f"--max_seq_length {train_args.max_length}: must leave room for [gMASK] <sop> and an answer")
    try:
        train_args = dataclasses.replace(train_args, **changes)
    except ValueError as err:
        raise UserError(first_line(err)) from None
    if lora_args.is_resume and not lora_args.resume_path:
        raise UserError("--is_resume needs --resume_path (a chatglm-lora.pt)")
    if pref_args.lora_path and lora_args.is_resume:
        raise UserError("--lora_path and --is_resume --resume_path both name a starting adapter; give one")
    return model_args, pref_args, lora_args, train_args


# -- data -------------------------------------------------------------------------------------------------------------


def render_preference(row):
    """One row -> (prompt, chosen, rejected), or DataError naming the field."""
    if not isinstance(row, dict):
        raise DataError(f"row is {json_type(row)}, not an object", "not an object")
    if "prompt" in row:
        prompt = text_field(row, "prompt")
        if not prompt.strip():
            raise DataError("empty field 'prompt'", "empty field")
    elif "instruction" in row:
        if not text_field(row, "instruction").strip():
            raise DataError("empty field 'instruction'", "empty field")
        prompt, _ = render_example({"instruction": row["instruction"], "input": row.get("input"), "output": "-"},
                                   "alpaca")
    else:
        raise DataError(f"missing field 'prompt' (or 'instruction'); a preference row is {PREFERENCE_FIELDS}",
                        "missing field")
    answers = []
    for name in ("chosen", "rejected"):
        answer = text_field(row, name)
        if not answer.strip():
            raise DataError(f"empty field '{name}'", "empty field")
        answers.append(answer)
    if answers[0].strip() == answers[1].strip():
        raise DataError("fields 'chosen' and 'rejected' are the same answer", "chosen == rejected")
    return prompt, *answers


def read_preferences(path, skip_bad_rows=False):
    """A preference file -> (list of (prompt, chosen, rejected), Counter of skipped rows by reason). A bad row raises
    DataError("path:line: what") ("path:item N: ..." in a JSON array) unless skip_bad_rows."""
    from collections import Counter

    triples, skipped = [], Counter()
    for where, row in parse_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            triples.append(render_preference(row))
        except DataError as err:
            if not skip_bad_rows:
                raise DataError(f"{path}:{where}: {err}", err.reason) from None
            skipped[err.reason] += 1
    if not triples:
        detail = f" (skipped {sum(skipped.values())} bad rows)" if skipped else ""
        raise DataError(f"{path}: no usable preference pairs{detail}", "no rows")
    return triples, skipped


_TOKENIZED = Features({name: List(Value("int32")) for name in ("prompt_ids", "chosen_ids", "rejected_ids")})


def tokenize_preferences(triples, tokenizer, max_length):
    """(prompt, chosen, rejected) -> (Dataset of prompt_ids / chosen_ids / rejected_ids, rows cut to fit).

    prompt_ids end with [gMASK] <sop> (the tokenizer's own rule), each answer with <eop>. The prompt is cut as
    finetune.py cuts it (fit_to_length, against the longer answer), then each answer to the room left."""
    n_special = tokenizer.num_special_tokens_to_add()
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    cut = 0
    for prompt, chosen, rejected in triples:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answers = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
                   for text in (chosen, rejected)]
        longest = max(answers, key=len)
        if max_length is None:
            kept_prompt = prompt_ids
        else:
            kept_prompt, _ = fit_to_length(prompt_ids, longest, max_length, n_special)
        room = None if max_length is None else max_length - n_special - len(kept_prompt)
        kept = [ids[:room] for ids in answers]
        cut += len(kept_prompt) < len(prompt_ids) or any(len(k) < len(a) for k, a in zip(kept, answers))
        columns["prompt_ids"].append(tokenizer.build_inputs_with_special_tokens(kept_prompt))
        columns["chosen_ids"].append(kept[0])
        columns["rejected_ids"].append(kept[1])
    return Dataset.from_dict(columns, features=_TOKENIZED), cut


def load_preferences(path, tokenizer, max_length, skip_bad_rows=False, log=print):
    triples, skipped = read_preferences(path, skip_bad_rows)
    dataset, cut = tokenize_preferences(triples, tokenizer, max_length)
    if log:
        lengths = sorted(len(p) + max(len(c), len(r)) for p, c, r in
                         zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
        skipped_text = (f", skipped {sum(skipped.values())} bad rows ({', '.join(f'{k}: {v}' for k, v in skipped.items())})"
                        if skipped else "")
        log(f"{path}: {len(dataset)} preference pairs{skipped_text}; {cut} cut to --max_seq_length {max_length}; "
            f"tokens per pair (prompt + longer answer): median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    return dataset


# -- model and trainer ------------------------------------------------------------------------------------------------


def load_policy_model(model_args, pref_args, lora_args, train_args, log=print):
    """The base model with the adapter to train ("default"): a copy of --lora_path's adapter, or fresh LoRA (or the
    seed's --is_resume --resume_path) as finetune.py makes it."""
    from glm_tune.lora import apply_adapter
    from glm_tune.training import load_base_for_training, load_lora_model

    if not pref_args.lora_path:
        return load_lora_model(model_args, lora_args, train_args, log=log)
    model = apply_adapter(load_base_for_training(model_args, train_args), pref_args.lora_path)
    model.peft_config[POLICY].inference_mode = False  # PeftModel.from_pretrained loads adapters frozen
    for name, param in model.named_parameters():
        if "lora_" in name and f".{POLICY}." in name:
            param.requires_grad_(True)
    if log:
        log(f"policy and reference start from the adapter {pref_args.lora_path}")
        model.print_trainable_parameters()
    return model


class ChatGLMDPOTrainer(DPOTrainer):
    """DPOTrainer on rows the project tokenized (prompt_ids / chosen_ids / rejected_ids: ChatGLM's [gMASK] <sop>
    layout, which TRL's own text tokenization would not produce), saving only the policy adapter."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _save(self, output_dir=None, state_dict=None):
        # PeftModel.save_pretrained would also write the frozen reference copy (into output_dir/ref/), which nobody
        # loads: the reference is rebuilt from the starting adapter, also on resume.
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if REFERENCE not in getattr(model, "peft_config", {}):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=[POLICY])
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained


def freeze_reference(model):
    """Make sure nothing of the reference adapter can be trained (TRL copies the policy's adapter into it)."""
    for name, param in model.named_parameters():
        if f".{REFERENCE}." in name:
            param.requires_grad_(False)


@torch.no_grad()
def sequence_logps(model, batch):
    """Summed log-probabilities of each row's completion tokens -> (chosen, rejected), through TRL's fused LM head."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(dim=1).chunk(2, dim=0)


@torch.no_grad()
def preference_accuracy(trainer, dataset, batch_size=32):
    """Held-out implicit-reward accuracy: the fraction of pairs whose chosen answer gets the higher implicit reward
    beta * (log pi(y|x) - log pi_ref(y|x)); a tie (policy = reference, before training) counts as half. Returns
    (accuracy, mean reward margin)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    device = trainer.accelerator.device
    wins, margins = 0.0, []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in trainer.data_collator(rows).items()}
            chosen, rejected = sequence_logps(model, batch)
            with use_adapter(model, REFERENCE if REFERENCE in model.peft_config else None):
                ref_chosen, ref_rejected = sequence_logps(model, batch)
            margin = trainer.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
            wins += (margin > 0).sum().item() + 0.5 * (margin == 0).sum().item()
            margins.extend(margin.tolist())
    finally:
        model.train(was_training)
    return wins / len(dataset), sum(margins) / len(margins)


def write_dpo_outputs(trainer, out, tokenizer, model_args, accuracy=None):
    """The project's run outputs (chatglm-lora.pt, tokenizer, loss_curve.png, the try-it line), plus
    rewards_curve.png (reward margins and accuracies) and preference_accuracy.json."""
    from glm_tune.atomic import write_json
    from glm_tune.lora import lora_state_dict
    from glm_tune.plotting import plot_metrics
    from glm_tune.training import write_run_outputs

    model = trainer.accelerator.unwrap_model(trainer.model)  # the reference adapter is frozen: only the policy's
    write_run_outputs(out, lora_state_dict(model), tokenizer, trainer.state.log_history, model_args)
    plot = plot_metrics(trainer.state.log_history, ["rewards/margins", "rewards/accuracies"],
                        Path(out) / "rewards_curve.png", title="DPO rewards (train)")
    if plot:
        print(f"reward margins and accuracies: {plot}")
    if accuracy is not None:
        write_json(Path(out) / "preference_accuracy.json", accuracy)


def run_dpo(argv=None, description=None):
    """The whole run; returns the trainer (tests inspect its model)."""
    from glm_tune.loading import load_tokenizer
    from glm_tune.locking import hold_output_lock

    model_args, pref_args, lora_args, train_args = parse_dpo_args(argv, description)
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.revision)
    main_process = train_args.process_index == 0  # sets up the process group (gloo on CPUs) before the lock
    log = print if main_process else None
    with hold_output_lock(train_args.output_dir, "--output_dir"):
        train = load_preferences(pref_args.dataset_path, tokenizer, train_args.max_length, pref_args.skip_bad_rows,
                                 log)
        held_out = None
        if pref_args.eval_dataset_path:
            held_out = load_preferences(pref_args.eval_dataset_path, tokenizer, train_args.max_length,
                                        pref_args.skip_bad_rows, log)
        model = load_policy_model(model_args, pref_args, lora_args, train_args, log=log)
        try:
            trainer = ChatGLMDPOTrainer(model=model, args=train_args, train_dataset=train, eval_dataset=held_out,
                                        processing_class=tokenizer)
        except ValueError as err:  # a combination of DPO flags TRL refuses (e.g. exo_pair without label smoothing)
            raise UserError(first_line(err)) from None
        freeze_reference(trainer.model)
        accuracy = None
        if held_out is not None and main_process:
            before, before_margin = preference_accuracy(trainer, held_out)
        trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)
        if held_out is not None and main_process:
            after, after_margin = preference_accuracy(trainer, held_out)
            accuracy = dict(pairs=len(held_out), beta=trainer.beta, before=before, after=after,
                            margin_before=before_margin, margin_after=after_margin)
            print(f"held-out preference accuracy (implicit reward, {len(held_out)} pairs, ties count half): "
                  f"before {before:.1%}, after {after:.1%} (mean reward margin {before_margin:.3f} -> "
                  f"{after_margin:.3f})")
        trainer.save_model(train_args.output_dir)  # the policy adapter (main process only)
        trainer.save_state()
        if trainer.is_world_process_zero():
            write_dpo_outputs(trainer, train_args.output_dir, tokenizer, model_args, accuracy)
    return trainer
