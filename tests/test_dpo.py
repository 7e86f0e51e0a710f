"""dpo.py: DPO of a LoRA adapter with TRL's DPOTrainer. The embedded default learns the synthetic preference rule
(held-out implicit-reward accuracy 50% -> >= 80%), the reference never moves, the web UI's preference file trains as
it is, bad rows are one-line errors, a run resumes exactly, and two torchrun processes (gloo) train together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import app_helpers
import glm_tune.dpo as dpo_module
from glm_tune.dpo import POLICY, REFERENCE, read_preferences, tokenize_preferences
from glm_tune.feedback_store import FeedbackStore, training_prompt
from glm_tune.loading import load_model, load_model_and_tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
dpo_script = app_helpers.load_script(ROOT / "dpo.py", "root")
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--dtype", "fp32"]  # exact comparisons: fp32
# Small runs on the synthetic set: batch 8, a few steps, the held-out file for the before/after accuracy.
SHORT = ["--dataset", str(dpo_module.DPO_TRAIN), "--eval_dataset", str(dpo_module.DPO_TEST), "--lora_target", "all",
         "--learning_rate", "2e-3", "--per_device_train_batch_size", "8", "--max_seq_length", "64",
         "--logging_steps", "1", *QUIET]


def run_dpo(monkeypatch, *argv):
    """dpo.py's main in this process -> (trainer, {name: tensor} of every reference parameter as training began: the
    base weights and the frozen reference adapter, everything but the policy adapter)."""
    snapshot = {}
    freeze = dpo_module.freeze_reference

    def freeze_and_snapshot(model):
        freeze(model)
        snapshot.update({name: param.detach().clone() for name, param in model.named_parameters()
                         if f".{POLICY}." not in name})

    monkeypatch.setattr(dpo_module, "freeze_reference", freeze_and_snapshot)
    trainer = dpo_script.main(list(map(str, argv)))
    return trainer, snapshot


def assert_reference_unchanged(model, snapshot):
    now = dict(model.named_parameters())
    assert any(f".{REFERENCE}." in name for name in snapshot) and any("lora_" not in name for name in snapshot)
    for name, before in snapshot.items():
        assert torch.equal(now[name].detach(), before), name
        assert not now[name].requires_grad, name


def base_parameters_equal_checkpoint(model):
    """Every base weight of `model` equals the embedded checkpoint's, loaded fresh."""
    fresh = dict(load_model(None, "fp32").named_parameters())
    for name, param in model.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(param.detach(), fresh[key]), name


def policy_logits(trainer, out):
    """Logits of the trained policy in memory and of base + saved adapter (as inference.py loads it)."""
    tokenizer = load_tokenizer()
    batch = tokenizer([training_prompt("Translate 'cat' into Chinese."), training_prompt("猫用英语怎么说？")],
                      return_tensors="pt", padding=True)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        trained = model(**batch).logits
    loaded, _ = load_model_and_tokenizer(lora_path=out, dtype="fp32")
    seed_file, _ = load_model_and_tokenizer(lora_path=out / "chatglm-lora.pt", dtype="fp32")
    with torch.no_grad():
        return trained, loaded(**batch).logits, seed_file(**batch).logits


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python dpo.py` with no data arguments (the embedded model, the synthetic set, the demo settings), once."""
    out = tmp_path_factory.mktemp("dpo") / "output"
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainer, snapshot = run_dpo(monkeypatch, "--output_dir", out, *QUIET)
    return out, trainer, snapshot


def test_embedded_default_learns_the_preference_rule_on_held_out_pairs(demo_run):
    out, trainer, _ = demo_run
    accuracy = json.loads((out / "preference_accuracy.json").read_text())
    # At the start the policy is the reference: every implicit reward is 0, a tie, counted half.
    assert accuracy["pairs"] == 60 and accuracy["before"] == 0.5 and accuracy["margin_before"] == 0
    assert accuracy["after"] >= 0.8 and accuracy["margin_after"] > 0, accuracy
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 60 and logged[-1]["rewards/accuracies"] > 0.7 and logged[-1]["rewards/margins"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt", "tokenizer_config.json",
                 "loss_curve.png", "rewards_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "rewards_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / REFERENCE).exists()  # only the policy adapter is written
    trained, loaded, seed_file = policy_logits(trainer, out)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(seed_file, trained, atol=1e-5, rtol=0)


def test_reference_of_a_fresh_adapter_is_the_base_and_never_changes(demo_run):
    _, trainer, snapshot = demo_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert_reference_unchanged(model, snapshot)
    base_parameters_equal_checkpoint(model)
    reference_b = [p for n, p in model.named_parameters() if f"lora_B.{REFERENCE}." in n]
    assert reference_b and all(not p.any() for p in reference_b)  # a fresh LoRA's B: the reference is the base


def test_starting_from_an_sft_adapter_trains_a_copy_against_it_frozen(monkeypatch, tmp_path, make_adapter):
    sft = make_adapter(seed=3)
    out = tmp_path / "out"
    trainer, snapshot = run_dpo(monkeypatch, *SHORT, "--lora_path", sft, "--max_steps", "6", "--save_strategy", "no",
                                "--output_dir", out)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert_reference_unchanged(model, snapshot)
    base_parameters_equal_checkpoint(model)
    # The reference adapter is the SFT adapter as saved; the policy started there and moved.
    saved = load_file(sft / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    for key, tensor in saved.items():
        name = key.replace(".weight", f".{REFERENCE}.weight")
        assert torch.equal(params[name].detach(), tensor), name
    moved = [not torch.equal(params[key.replace(".weight", f".{POLICY}.weight")].detach(), tensor)
             for key, tensor in saved.items()]
    assert all(moved)
    accuracy = json.loads((out / "preference_accuracy.json").read_text())
    assert accuracy["before"] == 0.5  # policy = reference at the start, also from an adapter
    trained, loaded, _ = policy_logits(trainer, out)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)  # usable on the base alone


def test_the_web_ui_preference_file_trains_as_it_is(monkeypatch, tmp_path):
    store = FeedbackStore(tmp_path / "feedback")
    for instruction, model_answer, correction in [("Translate 'cat' into Chinese.", "cat", "猫"),
                                                   ("狗用英语怎么说？", "狗", "dog"),
                                                   ("Translate 'tea' into Chinese.", "水", "茶")]:
        generation = store.log_generation(instruction, "", model_answer, 0.1, {}, "m", None)
        store.save_feedback(generation, correction, "bad")
    triples, _ = read_preferences(store.preferences.path)
    assert triples[0] == (training_prompt("Translate 'cat' into Chinese."), "猫", "cat")
    out = tmp_path / "out"
    trainer, _ = run_dpo(monkeypatch, "--dataset", store.preferences.path, "--max_steps", "2",
                         "--per_device_train_batch_size", "2", "--output_dir", out, *QUIET)
    assert trainer.state.global_step == 2 and (out / "adapter_model.safetensors").is_file()


def test_rows_are_tokenized_as_finetune_does():
    tokenizer = load_tokenizer()
    rows = [(training_prompt("Translate 'apple' into Chinese."), "苹果", "apple")]
    dataset, cut = tokenize_preferences(rows, tokenizer, 64)
    row = dataset[0]
    assert cut == 0
    assert row["prompt_ids"] == tokenizer.encode(rows[0][0])  # text + [gMASK] <sop>, the tokenizer's own rule
    assert row["prompt_ids"][-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert row["chosen_ids"] == tokenizer.encode("苹果", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert row["rejected_ids"][-1] == tokenizer.eos_token_id
    # A long prompt is cut first, keeping its beginning; the specials and the answers stay whole.
    long = [("word " * 200, "苹果", "apple")]
    dataset, cut = tokenize_preferences(long, tokenizer, 32)
    cut_row = dataset[0]
    assert cut == 1
    assert len(cut_row["prompt_ids"]) + len(cut_row["rejected_ids"]) <= 32
    assert cut_row["prompt_ids"][-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert cut_row["chosen_ids"][-1] == cut_row["rejected_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "fields 'chosen' and 'rejected' are the same"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"instruction": "q", "input": "", "chosen": " ", "rejected": "b"}', "empty field 'chosen'"),
    ('{"chosen": "a", "rejected": "b"}', "missing field 'prompt' (or 'instruction')"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "field 'chosen' must be a string"),
    ('{"prompt": "p", "chosen": "a", "rejected"', "not JSON"),
])
def test_bad_rows_are_one_line_errors_naming_file_line_and_field(capsys, tmp_path, line, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    error = app_helpers.one_line_error(capsys, dpo_script.main, "--dataset", data, "--output_dir", tmp_path / "o")
    assert error.startswith(f"error: {data}:2: ") and message in error, error


def test_bad_flags_are_errors_not_tracebacks(capsys, tmp_path):
    error = app_helpers.one_line_error(capsys, dpo_script.main, "--resume_from_checkpoint", "latest", "--output_dir",
                                       tmp_path / "none")
    assert "no checkpoint-* folder" in error
    with pytest.raises(SystemExit) as exit_info:  # argparse's own message for a loss TRL does not have
        dpo_script.main(["--loss_type", "nonsense"])
    assert exit_info.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_help_explains_the_dpo_and_shared_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dpo_script.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--dataset", "--eval_dataset", "--lora_path", "--beta", "--loss_type", "--max_seq_length",
                 "--model_name_or_path", "--lora_rank", "--lora_target", "--resume_from_checkpoint",
                 "--learning_rate"):
        assert flag in text, flag
    assert "sigmoid" in text and "ipo" in text


def test_resume_from_the_latest_checkpoint_ends_as_an_uninterrupted_run(monkeypatch, tmp_path):
    flags = [*SHORT, "--max_steps", "4", "--save_steps", "2"]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    run_dpo(monkeypatch, *flags, "--output_dir", whole)
    # The interrupted run: stopped after its step-2 checkpoint (the same run's files, minus what came later).
    interrupted.mkdir()
    (interrupted / "checkpoint-2").symlink_to(whole / "checkpoint-2", target_is_directory=True)
    trainer, _ = run_dpo(monkeypatch, *flags, "--output_dir", interrupted, "--resume_from_checkpoint", "latest")
    state = json.loads((interrupted / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    expected, resumed = (load_file(folder / "adapter_model.safetensors") for folder in (whole, interrupted))
    for key, tensor in expected.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=1e-5)


def test_two_torchrun_processes_train_together_over_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "dpo.py",
         *SHORT, "--max_steps", "3", "--save_strategy", "no", "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    state = json.loads((out / "trainer_state.json").read_text())
    # 2 processes x batch 8: each optimizer step sees 16 of the 660 pairs, and the logged rewards gather both ranks.
    assert state["global_step"] == 3 and state["log_history"][-1]["epoch"] == pytest.approx(3 / 42, abs=1e-3)
    assert (out / "adapter_model.safetensors").is_file() and result.stdout.count("held-out preference accuracy") == 1


def test_web_ui_data_page_shows_the_dpo_command(monkeypatch, tmp_path):
    store = FeedbackStore(tmp_path)
    generation = store.log_generation("dog?", "", "x", 0.1, {}, "m", None)
    store.save_feedback(generation, "狗", "bad")
    at = app_helpers.open_page(monkeypatch, ROOT / "webui" / "web_feadback.py", "--data_dir", tmp_path,
                               "--lora_path", tmp_path / "sft")
    at.radio(key="page").set_value("Data").run()
    at.selectbox(key="table").set_value("preferences").run()
    app_helpers.assert_clean(at)
    assert at.code[0].value == f"python dpo.py --dataset {store.preferences.path} --lora_path {tmp_path / 'sft'}"
