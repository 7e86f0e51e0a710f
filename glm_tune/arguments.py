"""Command-line flags: the ones several scripts share (model, adapter, dtype, sampling, data format), defined once
here for argparse and for the training scripts' HfArgumentParser dataclasses; the training scripts' parsing, and the
embedded demo defaults that a run without --dataset_path uses."""

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

import torch
import transformers

from glm_tune.data import FORMATS, parse_json
from glm_tune.errors import UserError
from glm_tune.runtime import DTYPE_CHOICES, training_precision

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TRAIN = REPO_ROOT / "data" / "demo" / "train.jsonl"
DEMO_TEST = REPO_ROOT / "data" / "demo" / "test.jsonl"
# A random small base model needs a far larger learning rate than a pretrained 6B one, and adapters on every
# linear layer; these settings learn the demo task (held-out accuracy > 90%) in a few minutes on 2 CPU cores. The
# warm-up is 100 steps: with 20, the fp32 run on a 2-core AVX2 AMD EPYC reached only 48/60 held-out answers (50/60
# with 1500 steps, 51/60 at a 1e-3 rate, 1/60 at 3e-3), though it had passed elsewhere; with 100 it reached 59/60.
DEMO_ARGS = [
    "--dataset_path", str(DEMO_TRAIN), "--eval_dataset_path", str(DEMO_TEST), "--lora_target", "all",
    "--learning_rate", "2e-3", "--per_device_train_batch_size", "16", "--max_steps", "1200",
    "--warmup_steps", "100", "--lr_scheduler_type", "linear", "--logging_steps", "50", "--save_steps", "400",
    "--eval_strategy", "steps", "--eval_steps", "400", "--max_seq_length", "64",
]

# P-Tuning v2 on the random small model: the prefix alone must carry the task, so a far larger learning rate (the
# official ptuning uses 2e-2 on the 6B model); with --pre_seq_len 64 the demo reaches ~67% held-out exact match in
# 1000 steps (tests/test_ptuning.py), 128 gets there too, more slowly per step.
DEMO_PTUNING_ARGS = ["--learning_rate", "1e-1", "--max_steps", "1000", "--warmup_steps", "20"]  # measured with 20

# -- the flags several scripts share ----------------------------------------------------------------------------------

MODEL_HELP = ("ChatGLM-6B checkpoint: a local folder in the official layout, or a Hugging Face repo id such as "
              "THUDM/chatglm-6b (read from the Hugging Face cache; HF_HUB_OFFLINE=1 never downloads). Default: the "
              "embedded small demo model (random weights, built on first use)")
REVISION_HELP = "branch, tag or commit id of a hub --model_name_or_path (default: main)"
LORA_HELP = "adapter: a finetune.py output folder, a PEFT adapter folder or a chatglm-lora.pt"
PTUNING_HELP = ("P-Tuning v2 checkpoint folder (pytorch_model.bin with the transformer.prefix_encoder.* tensors + "
                "config.json with pre_seq_len), from finetune.py --pre_seq_len or THUDM's ptuning/main.py; instead of "
                "--lora_path")
DTYPE_HELP = ("weights dtype: auto = bf16 on GPUs and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32 "
              "(GLM_TUNE_FAST_BF16=1 or 0 overrides the CPU check)")
# The official chat() defaults.
TEMPERATURE, TOP_P, MAX_LENGTH = 0.95, 0.7, 2048
FORMATS_HELP = ("row format of .json/.jsonl data: auto (taken from the first valid row), alpaca {instruction, input, "
                "output}, input_target {input, target}, context_target {context, target}, prompt_completion "
                "{prompt, completion}, conversations {conversations: [{from|role, value|content}]}")


def add_model_arguments(parser, lora=True, lora_default=None, dtype_choices=DTYPE_CHOICES, dtype_help=DTYPE_HELP,
                        repeatable=False, ptuning=False):
    """--model_name_or_path, --revision, --lora_path (unless lora=False), --ptuning_checkpoint (with ptuning=True, for
    the scripts that load through load_model_and_tokenizer's ptuning_checkpoint; never repeatable) and --dtype (unless dtype_choices=None; the first choice is the default). repeatable=True: the
    model and adapter flags may be given several times (a list; the web pages offer each)."""
    many = dict(action="append", default=[]) if repeatable else {}
    again = "; repeatable" if repeatable else ""
    parser.add_argument("--model_name_or_path", **(many or dict(default=None)), help=MODEL_HELP + again)
    parser.add_argument("--revision", default=None, help=REVISION_HELP)
    if lora:
        parser.add_argument("--lora_path", **(many or dict(default=lora_default)),
                            help=LORA_HELP + again + (" (default: %(default)s)" if lora_default else ""))
    if ptuning:
        parser.add_argument("--ptuning_checkpoint", default=None, help=PTUNING_HELP)
    if dtype_choices:
        parser.add_argument("--dtype", default=dtype_choices[0], choices=dtype_choices, help=dtype_help)


def add_sampling_arguments(parser, do_sample=None, max_length=False, extra=False):
    """--temperature and --top_p; --do_sample (default `do_sample`) unless it is None; --max_length (prompt + answer
    tokens) when asked; --top_k and --repetition_penalty with extra=True."""
    if max_length:
        parser.add_argument("--max_length", type=int, default=MAX_LENGTH,
                            help="most tokens of prompt (history included) plus answer (default: %(default)s)")
    if do_sample is not None:
        parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=do_sample,
                            help="sample (like the official chat()) or decode greedily (--no-do_sample) "
                                 "(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE,
                        help="sampling temperature (default: %(default)s)")
    parser.add_argument("--top_p", type=float, default=TOP_P, help="nucleus sampling mass (default: %(default)s)")
    if extra:
        parser.add_argument("--top_k", type=int, default=0,
                            help="sample among the k likeliest tokens; 0 = all (default: %(default)s)")
        parser.add_argument("--repetition_penalty", type=float, default=1.0,
                            help="> 1 discourages repeats (default: %(default)s)")


def add_compile_argument(parser):
    """--compile_decoding: glm_tune.static_decode's static-cache decoder for generate() (off by default)."""
    from glm_tune.static_decode import COMPILE_MODES

    parser.add_argument("--compile_decoding", default="off", choices=COMPILE_MODES,
                        help="decode with a static KV cache, compiled by torch.compile in this mode (frozen weights; "
                             "'eager': static cache, no compilation). Pays off for one row at a time: measured on "
                             "a 2-core AMX CPU in bf16, max-autotune took about 1.13x less time per token than the "
                             "default path at batch 1 and more at batch 8. Compiling takes tens of seconds at the first "
                             "answer and again for each new batch size or cache size (prompt + new tokens, rounded "
                             "up to 128) (default: %(default)s)")


def add_format_argument(parser):
    """--data_format (alias --format): the training rows' format."""
    parser.add_argument("--data_format", "--format", dest="data_format", default="auto", choices=["auto", *FORMATS],
                        help=FORMATS_HELP)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": MODEL_HELP})
    revision: str = field(default=None, metadata={"help": REVISION_HELP})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPE_CHOICES})


@dataclass
class DataArguments:
    dataset_path: str = field(default=None, metadata={
        "help": "training data: a folder from tokenize_dataset_rows_belle.py, or a .json/.jsonl file (tokenized on "
                "the fly). Default: the embedded demo data set with demo hyperparameters"})
    eval_dataset_path: str = field(default=None, metadata={"help": "evaluation data, same kinds as --dataset_path"})
    eval_split: float = field(default=0.0, metadata={
        "help": "fraction of the training rows held out for evaluation when --eval_dataset_path is not given"})
    max_seq_length: int = field(default=512, metadata={"help": "most tokens per row for data tokenized on the fly"})
    data_format: str = field(default="auto", metadata={"help": FORMATS_HELP, "aliases": ["--format"],
                                                       "choices": ["auto", *FORMATS]})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip unusable rows instead of stopping"})
    skip_overlength: bool = field(default=False, metadata={"help": "drop rows over --max_seq_length instead of "
                                                                   "truncating them"})
    num_proc: int = field(default=1, metadata={"help": "processes that tokenize in parallel"})
    pad_to_multiple_of: int = field(default=None, metadata={"help": "pad batches to a multiple of this (e.g. 8)"})
    # THUDM's ptuning/main.py data flags
    prompt_column: str = field(default=None, metadata={
        "help": "(official ptuning) rows are JSON objects: the field holding the prompt (with --response_column); "
                "replaces --data_format"})
    response_column: str = field(default=None, metadata={"help": "(official ptuning) the field holding the answer"})
    history_column: str = field(default=None, metadata={
        "help": "(official ptuning) the field holding earlier turns, a list of [question, answer] pairs, rendered "
                "in ChatGLM's [Round i] chat prompt"})
    max_source_length: int = field(default=None, metadata={
        "help": "(official ptuning) cut prompts to max_source_length - 1 tokens and answers to max_target_length "
                "- 2 (+ <eop>) instead of --max_seq_length; the other defaults to the official 1024 / 128"})
    max_target_length: int = field(default=None, metadata={"help": "(official ptuning) see --max_source_length"})


@dataclass
class LoraArguments:
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA input"})
    lora_target: str = field(default="query_key_value", metadata={
        "help": "layers that get adapters: comma-separated among query_key_value, dense, dense_h_to_4h, "
                "dense_4h_to_h, or 'all'"})
    is_resume: bool = field(default=False, metadata={"help": "(seed) load --resume_path before training"})
    resume_path: str = field(default=None, metadata={"help": "(seed) a chatglm-lora.pt to start the adapter from"})


@dataclass
class PtuningArguments:
    method: str = field(default=None, metadata={
        "help": "what trains: lora (adapters, the default) or ptuning (P-Tuning v2: the base frozen, only "
                "transformer.prefix_encoder; needs --pre_seq_len, which alone implies it)",
        "choices": ["lora", "ptuning"]})
    pre_seq_len: int = field(default=None, metadata={
        "help": "P-Tuning v2 prefix length (official ptuning: 128); implies --method ptuning"})
    prefix_projection: bool = field(default=False, metadata={
        "help": "P-Tuning v2: produce the prefixes with a two-layer MLP (official --prefix_projection)"})

    @property
    def ptuning(self):
        return self.method == "ptuning"


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments, with processes set up right on machines without CUDA.

    There, transformers gives Accelerate no communication backend: under torchrun without --use_cpu every process
    trains alone, and with --deepspeed the run is "distributed" over one process while DeepSpeed averages gradients
    over all of them. On CPUs this sets up gloo: Accelerate's MULTI_CPU for DDP, DEEPSPEED (over gloo) with DeepSpeed.

    Plus the official ptuning scripts' generation-based evaluation (glm_tune.metrics.GenerationEvalTrainer).
    """

    predict_with_generate: bool = field(default=False, metadata={
        "help": "at each evaluation also generate an answer for every eval row (greedy, from its prompt) and log "
                "eval_bleu-4, eval_bleu-4-char, eval_rouge-1/2/l, eval_exact_match, eval_gen_len_* (as evaluate.py "
                "computes them) next to eval_loss"})
    generation_max_length: int = field(default=128, metadata={
        "help": "with --predict_with_generate: most new tokens generated per eval row"})

    @cached_property
    def _setup_devices(self):
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if torch.cuda.is_available() or not launched:
            return super()._setup_devices
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        deepspeed = bool(self.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        timeout = timedelta(seconds=self.ddp_timeout)
        if deepspeed:  # Accelerate's DeepSpeed branch, with the backend it would otherwise leave unset
            saved = os.environ.get("ACCELERATE_USE_DEEPSPEED")
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                self.distributed_state = PartialState(backend="gloo", timeout=timeout)
            finally:
                if saved is None:
                    del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            self.distributed_state = PartialState(cpu=True, backend="gloo", timeout=timeout)
        self._n_gpu = 0
        return self.distributed_state.device


def _flag_value(argv, flag):
    """The value given to `flag` in argv (`--flag value` or `--flag=value`; the last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def with_demo_defaults(argv):
    """argv with the demo data and settings in front when no --dataset_path is given (later flags win)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def given(flag):  # HfArgumentParser accepts --a_b, --a-b and --a_b=value
        spellings = (flag, flag.replace("_", "-"))
        return any(a in spellings or a.startswith(tuple(s + "=" for s in spellings)) for a in argv)

    if not given("--dataset_path"):
        ptuning = given("--pre_seq_len") or _flag_value(argv, "--method") == "ptuning"
        argv = DEMO_ARGS + (DEMO_PTUNING_ARGS if ptuning else []) + argv
    if not given("--output_dir"):
        argv = ["--output_dir", "output"] + argv
    return argv


def parse_training_args(argv=None, description=None):
    """(ModelArguments, DataArguments, LoraArguments, TrainingArguments, PtuningArguments) from the command line, the
    same for every training script: demo defaults without --dataset_path, --fp16 falls back on CPUs, `--report_to
    a,b`, `--resume_from_checkpoint latest`, --method resolved (lora, or ptuning when --pre_seq_len is given)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ModelArguments, DataArguments, LoraArguments, TrainingArguments, PtuningArguments),
                              description=description)
    argv = with_demo_defaults(argv)
    check_deepspeed_file(argv)
    model_args, data_args, lora_args, train_args, ptuning_args = parser.parse_args_into_dataclasses(argv)
    check_ptuning_args(ptuning_args, lora_args)
    check_column_args(data_args)
    changes = dict(remove_unused_columns=False,  # the collator needs seq_len, which the model does not take
                   label_names=["labels"], **launch_changes(train_args))
    # a fresh TrainingArguments, so that what __post_init__ derives (the DeepSpeed config's "auto" values among it)
    # sees the final flags
    train_args = dataclasses.replace(train_args, **changes)
    if lora_args.is_resume and not lora_args.resume_path:
        raise UserError("--is_resume needs --resume_path (a chatglm-lora.pt)")
    return model_args, data_args, lora_args, train_args, ptuning_args


def check_deepspeed_file(argv):
    """A --deepspeed file (not inline JSON) must exist and be JSON: checked before TrainingArguments reads it, which
    fails with a traceback."""
    deepspeed = _flag_value(argv, "--deepspeed")
    if deepspeed is None or deepspeed.lstrip().startswith("{"):
        return
    if not Path(deepspeed).is_file():
        raise UserError(f"--deepspeed {deepspeed}: no such DeepSpeed config file")
    try:
        parse_json(Path(deepspeed).read_text())
    except ValueError as err:
        raise UserError(f"{deepspeed}:{getattr(err, 'lineno', '?')}: not valid JSON ({err})") from None


def launch_changes(train_args):
    """What every training script changes in its parsed TrainingArguments: the precision this machine can do (--fp16
    falls back on CPUs; an `accelerate launch` config's choice follows), `--report_to a,b` split, and
    `--resume_from_checkpoint latest` (or a folder, which must exist) resolved."""
    from transformers.trainer_utils import get_last_checkpoint

    precision = training_precision(train_args.fp16, train_args.bf16)
    changes = dict(fp16=precision == "fp16", bf16=precision == "bf16")
    if precision == "bf16" and not torch.cuda.is_available():
        changes["use_cpu"] = True  # transformers refuses bf16 on a CPU unless told the run is on one
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # an `accelerate launch` config's choice, after the fallback
        os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    if len(train_args.report_to) == 1 and "," in train_args.report_to[0]:  # --report_to tensorboard,wandb
        changes["report_to"] = [name.strip() for name in train_args.report_to[0].split(",")]
    resume = train_args.resume_from_checkpoint
    if str(resume).lower() in ("latest", "true"):
        last = get_last_checkpoint(train_args.output_dir) if Path(train_args.output_dir).is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-* folder in {train_args.output_dir}")
        changes["resume_from_checkpoint"] = last
    elif resume and not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder")
    return changes


def check_ptuning_args(ptuning_args, lora_args):
    """--method from --pre_seq_len when not given; the combinations that cannot work are one-line errors."""
    if ptuning_args.method is None:
        ptuning_args.method = "ptuning" if ptuning_args.pre_seq_len is not None else "lora"
    if ptuning_args.ptuning:
        if ptuning_args.pre_seq_len is None:
            raise UserError("--method ptuning needs --pre_seq_len N (the prefix length; the official scripts use 128)")
        if ptuning_args.pre_seq_len < 1:
            raise UserError(f"--pre_seq_len {ptuning_args.pre_seq_len}: must be at least 1")
        if lora_args.is_resume:
            raise UserError("--is_resume loads a LoRA chatglm-lora.pt; with --method ptuning resume with "
                            "--resume_from_checkpoint")
    elif ptuning_args.pre_seq_len is not None or ptuning_args.prefix_projection:
        given = "--pre_seq_len" if ptuning_args.pre_seq_len is not None else "--prefix_projection"
        raise UserError(f"{given} is a P-Tuning flag, but --method is lora" + (
            "" if ptuning_args.pre_seq_len is not None else " (give --pre_seq_len N for P-Tuning v2)"))


def check_column_args(data_args):
    """The official ptuning data flags: --response_column / --history_column need --prompt_column and vice versa;
    lengths are positive."""
    columns = (data_args.prompt_column, data_args.response_column)
    if any(columns) and not all(columns):
        raise UserError("--prompt_column and --response_column go together (name both fields)")
    if data_args.history_column and not data_args.prompt_column:
        raise UserError("--history_column needs --prompt_column and --response_column")
    for name in ("max_source_length", "max_target_length"):
        value = getattr(data_args, name)
        if value is not None and value < (2 if name == "max_source_length" else 3):
            raise UserError(f"--{name} {value}: too small to leave room for one token")
