"""The flags several scripts share are defined once and behave alike everywhere; the precision and dtype decisions
follow the CPU's kind, and GLM_TUNE_FAST_BF16 forces either branch on any machine."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chatglm_deepspeed_inference
import chatglm_multi_gpu_inference
import cli_chat
import inference
import merge_lora
import tokenize_dataset_rows_belle
from glm_tune import runtime
from glm_tune.arguments import MAX_LENGTH, TEMPERATURE, TOP_P, parse_training_args
from glm_tune.errors import UserError
from webui.common import parse_args as webui_args

ROOT = Path(__file__).resolve().parent.parent
ARGPARSE_SCRIPTS = [inference, merge_lora, cli_chat, chatglm_deepspeed_inference, chatglm_multi_gpu_inference]


@pytest.mark.parametrize("script", ARGPARSE_SCRIPTS, ids=lambda m: m.__name__)
def test_an_unknown_dtype_is_refused_by_every_script_without_a_traceback(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--dtype", "fp8"])
    assert exit_info.value.code == 2
    assert "argument --dtype: invalid choice: 'fp8'" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("script", ["finetune.py", "multi_gpu_fintune_belle.py"])
def test_the_training_scripts_refuse_an_unknown_dtype_without_a_traceback(script):
    result = subprocess.run([sys.executable, script, "--dtype", "fp8"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "argument --dtype: invalid choice: 'fp8'" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_the_web_pages_refuse_an_unknown_dtype_in_one_line():
    with pytest.raises(UserError, match=r"argument --dtype: invalid choice: 'fp8'"):
        webui_args(["--dtype", "fp8"], "web_ui.py")


@pytest.mark.parametrize("script", ARGPARSE_SCRIPTS, ids=lambda m: m.__name__)
def test_shared_flags_have_one_definition_and_one_set_of_defaults(script):
    args = script.parse_args([])
    assert args.model_name_or_path is None and args.revision is None
    assert args.dtype == ("checkpoint" if script is merge_lora else "auto")
    if hasattr(args, "temperature"):
        assert (args.temperature, args.top_p) == (TEMPERATURE, TOP_P) == (0.95, 0.7)
    if hasattr(args, "max_length"):
        assert args.max_length == MAX_LENGTH == 2048
    web = webui_args([], "web_ui.py")
    assert (web.temperature, web.top_p, web.max_length, web.revision) == (TEMPERATURE, TOP_P, MAX_LENGTH, None)


def test_revision_reaches_every_script():
    for script in ARGPARSE_SCRIPTS:
        assert script.parse_args(["--model_name_or_path", "THUDM/chatglm-6b", "--revision", "v1.1.0"]).revision == \
            "v1.1.0"
    model_args = parse_training_args(["--revision", "abc", "--output_dir", "o"])[0]
    assert model_args.revision == "abc"


@pytest.mark.parametrize("flag", ["--format", "--data_format"])
def test_format_and_data_format_are_one_flag(flag):
    data_args = parse_training_args([flag, "alpaca", "--output_dir", "o"])[1]
    assert data_args.data_format == "alpaca"
    args = tokenize_dataset_rows_belle.parse_args(["--jsonl_path", "x.jsonl", "--save_path", "d", "--max_seq_length",
                                                   "64", flag, "conversations"])
    assert args.data_format == "conversations"


@pytest.mark.parametrize("forced,dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_dtype_on_a_cpu_follows_its_bf16_support(monkeypatch, forced, dtype):
    monkeypatch.setenv(runtime.FAST_BF16_ENV, forced)
    assert runtime.parse_dtype("auto", "cpu") == dtype
    assert runtime.parse_dtype("fp32", "cpu") == torch.float32  # an explicit dtype is never changed


@pytest.mark.parametrize("forced,fp16,bf16,env,want", [
    ("1", True, False, None, "bf16"),  # the seed's --fp16 on an AMX CPU
    ("0", True, False, None, "no"),  # ... and on an AVX2-only CPU
    ("1", False, False, "fp16", "bf16"),  # an `accelerate launch` config saying fp16
    ("0", False, False, "fp16", "no"),
    ("0", False, True, None, "bf16"),  # asked for explicitly: kept
    ("1", False, False, None, "no"),  # nothing asked: full precision
])
def test_one_precision_decision_for_both_training_scripts(monkeypatch, capsys, forced, fp16, bf16, env, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(runtime.FAST_BF16_ENV, forced)
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert runtime.training_precision(fp16, bf16) == want
    note = capsys.readouterr().err
    if fp16 or env == "fp16":
        assert note == f"note: fp16 needs a CUDA GPU; training on this CPU in {'bf16' if want == 'bf16' else 'fp32'} " \
                       "instead\n"
    else:
        assert note == ""


def test_training_arguments_accept_the_bf16_fallback_on_a_cpu(monkeypatch):
    """transformers refuses bf16 without a GPU unless the run says it is on the CPU (the AMX crash of the seed
    command): the parsed arguments carry both."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(runtime.FAST_BF16_ENV, "1")
    train_args = parse_training_args(["--fp16", "--output_dir", "o"])[3]
    assert (train_args.fp16, train_args.bf16, train_args.use_cpu, train_args.mixed_precision) == \
        (False, True, True, "bf16")
    monkeypatch.setenv(runtime.FAST_BF16_ENV, "0")
    train_args = parse_training_args(["--fp16", "--output_dir", "o"])[3]
    assert (train_args.fp16, train_args.bf16, train_args.mixed_precision) == (False, False, "no")
