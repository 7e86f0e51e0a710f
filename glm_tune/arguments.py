"""Command-line arguments shared by the training scripts (parsed with transformers' HfArgumentParser together with
TrainingArguments), and the embedded demo defaults that a run without --dataset_path uses."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TRAIN = REPO_ROOT / "data" / "demo" / "train.jsonl"
DEMO_TEST = REPO_ROOT / "data" / "demo" / "test.jsonl"
# A random small base model needs a far larger learning rate than a pretrained 6B one, and adapters on every
# linear layer; these settings learn the demo task (held-out accuracy > 90%) in a few minutes on 2 CPU cores.
DEMO_ARGS = [
    "--dataset_path", str(DEMO_TRAIN), "--eval_dataset_path", str(DEMO_TEST), "--lora_target", "all",
    "--learning_rate", "2e-3", "--per_device_train_batch_size", "16", "--max_steps", "1200",
    "--warmup_steps", "20", "--lr_scheduler_type", "linear", "--logging_steps", "50", "--save_steps", "400",
    "--eval_strategy", "steps", "--eval_steps", "400", "--max_seq_length", "64",
]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={
        "help": "ChatGLM-6B checkpoint folder (official layout). Default: the embedded small model, built on first use."})
    dtype: str = field(default="auto", metadata={
        "help": "weights dtype: auto (bf16 on GPUs and AMX CPUs, else fp32), fp32, bf16 or fp16"})


@dataclass
class DataArguments:
    dataset_path: str = field(default=None, metadata={
        "help": "training data: a folder from tokenize_dataset_rows_belle.py, or a .json/.jsonl file (tokenized on "
                "the fly). Default: the embedded demo data set with demo hyperparameters"})
    eval_dataset_path: str = field(default=None, metadata={"help": "evaluation data, same kinds as --dataset_path"})
    eval_split: float = field(default=0.0, metadata={
        "help": "fraction of the training rows held out for evaluation when --eval_dataset_path is not given"})
    max_seq_length: int = field(default=512, metadata={"help": "most tokens per row for data tokenized on the fly"})
    data_format: str = field(default="auto", metadata={
        "help": "row format of .json/.jsonl data: auto, alpaca, input_target, context_target, prompt_completion, "
                "conversations"})
    skip_bad_rows: bool = field(default=False, metadata={"help": "skip unusable rows instead of stopping"})
    skip_overlength: bool = field(default=False, metadata={"help": "drop rows over --max_seq_length instead of "
                                                                   "truncating them"})
    num_proc: int = field(default=1, metadata={"help": "processes that tokenize in parallel"})
    pad_to_multiple_of: int = field(default=None, metadata={"help": "pad batches to a multiple of this (e.g. 8)"})


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


def with_demo_defaults(argv):
    """argv with the demo data and settings in front when no --dataset_path is given (later flags win)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def given(flag):  # HfArgumentParser accepts --a_b, --a-b and --a_b=value
        spellings = (flag, flag.replace("_", "-"))
        return any(a in spellings or a.startswith(tuple(s + "=" for s in spellings)) for a in argv)

    if not given("--dataset_path"):
        argv = DEMO_ARGS + argv
    if not given("--output_dir"):
        argv = ["--output_dir", "output"] + argv
    return argv
