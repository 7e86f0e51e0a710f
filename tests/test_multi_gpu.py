"""multi_gpu_fintune_belle.py over 2 CPU processes (gloo), through every launcher: DDP, DeepSpeed ZeRO-2, ZeRO-2 with
CPU offload and ZeRO-3 each train, save a loadable adapter and resume; 2 processes x batch 1 follow 1 process x
batch 2; the ZeRO-3 adapter equals DeepSpeed's own reconstruction of the weights; finetune.py --deepspeed (Trainer)
gives the curve of the Accelerate loop on the same config; a dead rank ends the run.

Every launch is a real subprocess with a timeout, so a hang fails the test instead of stalling the suite.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from glm_tune.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPT = "multi_gpu_fintune_belle.py"
TIMEOUT = 300
# Same order of float operations is not guaranteed across backends (bucketed all-reduce, partitioned optimizers):
# curves must agree to 1e-4 relative; a resumed run must repeat the uninterrupted one to 1e-5.
CURVE_RTOL, RESUME_RTOL = 1e-4, 1e-5
# The seed's commands say --fp16; on a CPU that becomes fp32 or bf16 by the CPU's kind. Exact comparisons pin fp32.
AVX2_CPU, AMX_CPU = {"GLM_TUNE_FAST_BF16": "0"}, {"GLM_TUNE_FAST_BF16": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc=2):
    return [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]


def deepspeed_launcher():
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]


def accelerate_launch(config):
    return [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", str(free_port())]


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    """A tiny checkpoint, 64 training rows and the flags every run shares (6 steps, checkpoints at 3 and 6)."""
    folder = tmp_path_factory.mktemp("multi")
    model = make_checkpoint("v1.1", ("safetensors",), hidden_size=128, num_layers=2, num_attention_heads=4,
                            inner_hidden_size=256)
    rows = (ROOT / "data/demo/train.jsonl").read_text().splitlines()[:64]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    flags = ["--model_name_or_path", str(model), "--dataset_path", str(folder / "train.jsonl"),
             "--max_seq_length", "64", "--lora_rank", "4", "--lora_dropout", "0", "--learning_rate", "1e-3",
             "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--report_to", "none",
             "--disable_tqdm", "true", "--seed", "7", "--dtype", "fp32"]  # exactness is an fp32 claim
    return model, folder, flags


def launch(prefix, script, flags, out, *extra, timeout=TIMEOUT, env=None):
    result = subprocess.run([*prefix, script, *flags, "--output_dir", str(out), *extra], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if result.returncode != 0:  # pytest shows what a failed test printed, in full
        print(f"$ {' '.join(result.args)}\n--- stdout\n{result.stdout[-5000:]}\n--- stderr\n{result.stderr[-20000:]}")
    assert result.returncode == 0, f"exit status {result.returncode}"
    return result


def losses(out, name="training_state.json"):
    state = json.loads((Path(out) / name).read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def adapter(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_close_curves(got, want, rtol):
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rtol), (step, got[step], want[step])


def assert_same_adapter(a, b, atol):
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), name


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The reference: one plain process with batch 2 (logging to tensorboard and to wandb offline)."""
    model, _, flags = setup
    out = tmp_path_factory.mktemp("one") / "out"
    result = launch([sys.executable], SCRIPT, flags, out, "--per_device_train_batch_size", "2",
                    "--report_to", "tensorboard,wandb", env={"WANDB_MODE": "offline", "WANDB_DIR": str(out.parent)})
    return out, result


def test_one_process_run_writes_its_outputs_logs_and_memory_report(one_process):
    out, result = one_process
    for name in ("adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt", "tokenizer_config.json",
                 "training_state.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    state = json.loads((out / "training_state.json").read_text())
    assert state["global_step"] == 6 and len(losses(out)) == 6
    entry = state["log_history"][0]
    assert entry["perplexity"] == pytest.approx(2.718281828 ** entry["loss"], rel=1e-6)
    assert entry["tokens_per_second"] > 0 and 0 < entry["learning_rate"] <= 1e-3
    assert "epoch 0: train loss" in result.stdout and "CPU memory: before" in result.stdout
    assert list(out.rglob("events.out.tfevents.*")), "no tensorboard events"
    assert list((out.parent / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert (out / "checkpoint-3" / "training_state.json").is_file() and not list(out.glob("*.partial"))


def resume_run(prefix, flags, full, tmp_path, *extra, env=None):
    """Copy a finished run's checkpoint-3 alone into a fresh folder and resume it there with `latest`."""
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(full / "checkpoint-3", out / "checkpoint-3")
    result = launch(prefix, SCRIPT, flags, out, "--resume_from_checkpoint", "latest", *extra, env=env)
    assert f"resumed from {out / 'checkpoint-3'}: step 3" in result.stdout
    return out


BACKENDS = {
    # name: (launcher for the full run, launcher for the resumed run, extra flags)
    "ddp": ("two-nodes", "torchrun", []),
    "zero2": ("deepspeed", "deepspeed", ["--deepspeed", "configs/ds_zero2.json"]),
    "zero3": ("torchrun", "torchrun", ["--deepspeed", "configs/ds_zero3.json"]),
}


def two_nodes(flags, out, *extra):
    """The documented multi-node path on one machine: two torchrun 'nodes' of one process each, c10d rendezvous on
    127.0.0.1."""
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=glm-tune-test",
                               SCRIPT, *flags, "--output_dir", str(out), *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outputs]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_train_like_one_save_a_loadable_adapter_and_resume(backend, setup, one_process, tmp_path):
    model, _, flags = setup
    one_process, _ = one_process
    full_launcher, resume_launcher, extra = BACKENDS[backend]
    prefixes = {"torchrun": torchrun(), "deepspeed": deepspeed_launcher()}
    flags = [*flags, "--per_device_train_batch_size", "1"]
    full = tmp_path / "full"
    if full_launcher == "two-nodes":
        two_nodes(flags, full, *extra)
    else:
        launch(prefixes[full_launcher], SCRIPT, flags, full, *extra)

    # 2 processes x batch 1 follow 1 process x batch 2: the loss is the mean over both processes' tokens
    assert_close_curves(losses(full), losses(one_process), CURVE_RTOL)
    assert_same_adapter(adapter(full), adapter(one_process), atol=1e-5)

    # the adapter loads onto the base model, in both formats, and is trained (lora_B starts at zero)
    loaded, _ = load_model_and_tokenizer(str(model), str(full), dtype="fp32")
    seed_file = torch.load(full / "chatglm-lora.pt", weights_only=True)
    state = {name: p.detach() for name, p in loaded.named_parameters() if "lora_" in name}
    assert len(state) == len(seed_file) == 4
    for name, tensor in seed_file.items():
        assert torch.equal(state[name], tensor), name
    assert all(t.abs().sum() > 0 for n, t in seed_file.items() if "lora_B" in n)
    assert {p.name for p in full.glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    for checkpoint in ("checkpoint-3", "checkpoint-6"):  # both ranks' shares are in it, written before the rename
        assert {p.name for p in (full / checkpoint).glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                   "random_states_1.pkl"}

    # resumed from checkpoint-3 (through another launcher), steps 4-6 and the final adapter repeat the full run
    resumed = resume_run(prefixes[resume_launcher], flags, full, tmp_path, *extra)
    want = losses(full)
    assert_close_curves(losses(resumed), want, RESUME_RTOL)
    assert_same_adapter(adapter(resumed), adapter(full), atol=1e-6)

    if backend == "zero3":  # the saved adapter is DeepSpeed's own reconstruction of the partitioned weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for checkpoint in ("checkpoint-3", "checkpoint-6"):
            gathered = get_fp32_state_dict_from_zero_checkpoint(str(full / checkpoint))
            gathered = {k.replace(".default", ""): v for k, v in gathered.items() if "lora_" in k}
            assert_same_adapter(adapter(full / checkpoint), gathered, atol=0)


def test_seed_deepspeed_command_zero2_offload_equals_trainer_and_resumes(setup, tmp_path):
    """The seed's torchrun command with ds_config_zero3.json (ZeRO-2, optimizer offloaded to the CPU, DeepSpeed's own
    AdamW + WarmupDecayLR from "auto" values) follows finetune.py --deepspeed on the same file, and resumes."""
    _, _, flags = setup
    flags = [*flags, "--per_device_train_batch_size", "1", "--fp16"]
    ours, trainer = tmp_path / "ours", tmp_path / "trainer"
    result = launch(torchrun(), SCRIPT, flags, ours, "--deepspeed", "ds_config_zero3.json", env=AVX2_CPU)
    assert "DeepSpeed ZeRO-2" in result.stdout
    if not torch.cuda.is_available():
        assert "training on this CPU in fp32" in result.stdout + result.stderr
    launch(torchrun(), "finetune.py", flags, trainer, "--deepspeed", "ds_config_zero3.json", env=AVX2_CPU)
    assert_close_curves(losses(ours), losses(trainer, "trainer_state.json"), CURVE_RTOL)
    assert_same_adapter(adapter(ours), adapter(trainer), atol=1e-5)

    resumed = resume_run(torchrun(), flags, ours, tmp_path, "--deepspeed", "ds_config_zero3.json", env=AVX2_CPU)
    assert_close_curves(losses(resumed), losses(ours), RESUME_RTOL)
    assert_same_adapter(adapter(resumed), adapter(ours), atol=1e-6)


def test_seed_accelerate_command_zero3_cpu_offload(setup, one_process, tmp_path):
    """`accelerate launch --config_file accelerate_ds_zero3_cpu_offload_config.yaml ...`: ZeRO-3 with parameters and
    optimizer offloaded, the model partitioned as it loads; the curve is the one-process curve and the adapter is
    complete (equal to DeepSpeed's reconstruction from the partitions, and to one process's)."""
    _, _, flags = setup
    one_process, _ = one_process
    out = tmp_path / "out"
    result = launch(accelerate_launch(ROOT / "accelerate_ds_zero3_cpu_offload_config.yaml"), SCRIPT,
                    [*flags, "--per_device_train_batch_size", "1", "--fp16"], out, env=AVX2_CPU)
    assert "2 process(es)" in result.stdout and "DeepSpeed ZeRO-3" in result.stdout
    assert_close_curves(losses(out), losses(one_process), CURVE_RTOL)
    assert_same_adapter(adapter(out), adapter(one_process), atol=1e-5)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    gathered = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-6"))
    gathered = {k.replace(".default", ""): v for k, v in gathered.items() if "lora_" in k}
    assert_same_adapter(adapter(out), gathered, atol=0)
    # checkpoints hold the trainable tensors, not a copy of the frozen model
    assert sum(f.stat().st_size for f in (out / "checkpoint-6").rglob("*") if f.is_file()) < 2_000_000


def test_seed_accelerate_command_on_cpus_with_native_bf16_trains_in_bf16(setup, one_process, tmp_path):
    """The same command where the CPU has native bf16 (AMX; forced here so that any CPU runs this branch): fp16 becomes
    bf16, weights ("auto") and DeepSpeed's mixed precision alike, instead of transformers refusing bf16 on a CPU. The
    curve stays within 3% of the fp32 one (bf16 keeps 8 bits of mantissa); the adapters stay fp32 over the bf16 base
    weights (PEFT), and the saved one is DeepSpeed's reconstruction of them."""
    _, _, flags = setup
    one_process, _ = one_process
    out = tmp_path / "out"
    result = launch(accelerate_launch(ROOT / "accelerate_ds_zero3_cpu_offload_config.yaml"), SCRIPT,
                    [*flags, "--per_device_train_batch_size", "1", "--fp16", "--dtype", "auto"], out, env=AMX_CPU)
    assert "note: fp16 needs a CUDA GPU; training on this CPU in bf16 instead" in result.stderr
    assert "DeepSpeed ZeRO-3" in result.stdout
    got, want = losses(out), losses(one_process)
    assert sorted(got) == sorted(want) and got != want  # another precision really ran
    assert_close_curves(got, want, 0.03)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = adapter(out)
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-6"))
    gathered = {k.replace(".default", ""): v for k, v in gathered.items() if "lora_" in k}
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert_same_adapter(saved, gathered, atol=0)


def test_a_dead_rank_ends_the_run_with_the_failure_named(setup, tmp_path):
    _, _, flags = setup
    out = tmp_path / "out"
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen([*torchrun(), SCRIPT, *flags, "--max_steps", "100000", "--per_device_train_batch_size",
                             "1", "--output_dir", str(out)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while "loss=" not in (tmp_path / "log.txt").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.5)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if SCRIPT in " ".join(p.cmdline())]
        victim = next(p for p in workers if p.environ().get("RANK") == "1")
        killed_at = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        rc = proc.wait(timeout=120)
        ended_after = time.time() - killed_at
    finally:
        proc.kill()
    text = (tmp_path / "log.txt").read_text()
    assert rc != 0 and ended_after < 60
    assert "Root Cause" in text and "rank      : 1" in text and "SIGKILL" in text
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


@pytest.mark.parametrize("args, message", [
    (["--deepspeed", "missing.json"], "--deepspeed missing.json: no such DeepSpeed config file"),
    (["--dataset_path", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_input_is_a_one_line_error(setup, tmp_path, args, message):
    model, _, _ = setup
    result = subprocess.run([sys.executable, SCRIPT, "--model_name_or_path", str(model), "--output_dir",
                             str(tmp_path / "o"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_accumulation_equals_a_bigger_batch_and_eval_loss_is_the_adapters(setup, one_process, tmp_path):
    """batch 1 x accumulation 2 follows batch 2; --save_total_limit keeps the newest checkpoints; the logged eval loss
    is the finished adapter's mean token loss on the eval rows, computed here independently."""
    from glm_tune.data import PrefixLMCollator, load_training_data

    model, folder, flags = setup
    one_process, _ = one_process
    rows = (ROOT / "data/demo/test.jsonl").read_text().splitlines()[:10]
    (folder / "eval.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    launch([sys.executable], SCRIPT, flags, out, "--per_device_train_batch_size", "1",
           "--gradient_accumulation_steps", "2", "--eval_dataset_path", str(folder / "eval.jsonl"),
           "--eval_strategy", "steps", "--eval_steps", "3", "--per_device_eval_batch_size", "4",
           "--save_steps", "2", "--save_total_limit", "2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # 2 of 2, 4, 6
    assert_close_curves(losses(out), losses(one_process), CURVE_RTOL)
    assert_same_adapter(adapter(out), adapter(one_process), atol=1e-5)

    logged = {e["step"]: e["eval_loss"] for e in json.loads((out / "training_state.json").read_text())["log_history"]
              if "eval_loss" in e}
    assert sorted(logged) == [3, 6]
    peft_model, tokenizer = load_model_and_tokenizer(str(model), str(out), dtype="fp32")
    dataset, _ = load_training_data(folder / "eval.jsonl", tokenizer, 64)
    batch = PrefixLMCollator(tokenizer)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        total = peft_model(**batch, num_items_in_batch=1).loss  # the sum over every labelled token
    assert logged[6] == pytest.approx((total / batch["labels"][:, 1:].ne(-100).sum()).item(), rel=1e-5)
