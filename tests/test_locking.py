"""glm_tune.locking: one holder per output; a refusal is one line naming the holder; a holder killed with SIGKILL
blocks nobody; under torch.distributed rank 0 holds the lock and every rank hears of a refusal."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glm_tune.errors import UserError
from glm_tune.locking import OutputLock, hold_output_lock, lock_path, read_holder

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from glm_tune.locking import hold_output_lock
with hold_output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(output):
    """A separate process holding the lock of `output`, once this returns."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_holder_record_while_held_and_no_file_after(tmp_path):
    output = tmp_path / "out.csv"
    with hold_output_lock(output) as lock:
        assert lock.held and lock_path(output) == tmp_path / "out.csv.lock"
        record = read_holder(output)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] and record["started"]
        assert not output.exists()  # the lock is beside the output, which it leaves alone
    assert not lock.held and not lock_path(output).exists()


def test_second_holder_is_refused_with_one_line_naming_the_first(tmp_path):
    output = tmp_path / "out.jsonl"
    holder = start_holder(output)
    try:
        with pytest.raises(UserError) as err, hold_output_lock(output):
            pass
        message = str(err.value)
        record = read_holder(output)
        assert record["pid"] == holder.pid
        assert message == (f"--output {output}: in use by pid {holder.pid} on {socket.gethostname()} since "
                           f"{record['started']} ({' '.join(record['command'].split())}); wait for it to finish, or "
                           "choose another --output")
        assert "\n" not in message and "glm_tune.locking import hold_output_lock" in message
    finally:
        holder.kill()
        holder.wait()


def test_every_spelling_of_one_output_shares_one_lock(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with hold_output_lock("sub/../data", "--save_path"):
        with pytest.raises(UserError, match=rf"^--save_path {tmp_path / 'data'}: in use by pid {os.getpid()} "):
            OutputLock(tmp_path / "data", "--save_path").acquire()
        with pytest.raises(UserError):
            OutputLock("data/", "--save_path").acquire()


def test_a_holder_killed_with_sigkill_blocks_nobody(tmp_path):
    output = tmp_path / "out.csv"
    holder = start_holder(output)
    with pytest.raises(UserError):
        OutputLock(output).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_holder(output)["pid"] == holder.pid  # its file stays, with its record: no matter
    with hold_output_lock(output):
        assert read_holder(output)["pid"] == os.getpid()


def test_a_lock_file_left_behind_is_not_a_lock(tmp_path):
    output = tmp_path / "out.csv"
    lock_path(output).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with hold_output_lock(output):
        assert read_holder(output)["pid"] == os.getpid()


def test_a_lock_file_deleted_by_its_last_holder_is_not_used(tmp_path):
    """A run that opened the lock file just before its holder deleted it locks a file no one else will see: it must
    lock the file at the path instead, or two runs would both hold 'the' lock."""
    output = tmp_path / "out.csv"
    first = OutputLock(output)
    first.acquire()
    real_open, opened = os.open, []

    def open_then_holder_leaves(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:  # the first open: the old file, released and deleted by its holder right after
            first.release()
        opened.append(fd)
        return fd

    second = OutputLock(output)
    try:
        os.open = open_then_holder_leaves
        second.acquire()
    finally:
        os.open = real_open
    assert len(opened) == 2  # it retried on the new file
    with pytest.raises(UserError):
        OutputLock(output).acquire()  # and holds the one that counts
    second.release()


def test_an_unwritable_place_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"^--output_dir .*: cannot create its lock file .*\(Not a directory\)$"):
        OutputLock(blocker / "sub" / "out", "--output_dir").acquire()


# ----- torch.distributed: rank 0 holds, every rank hears -----

RANKS = """
import os, sys, torch.distributed as dist
from glm_tune.errors import UserError
from glm_tune.locking import hold_output_lock, read_holder
dist.init_process_group("gloo")
try:
    with hold_output_lock(sys.argv[1]) as lock:
        held = [None] * dist.get_world_size()
        dist.all_gather_object(held, (lock.held, read_holder(sys.argv[1])["pid"]))
        print(f"rank {dist.get_rank()} ran: {held}", flush=True)
except UserError as err:
    print(f"rank {dist.get_rank()} refused: {err}", flush=True)
dist.destroy_process_group()
"""


def run_ranks(output, port):
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANKS, str(output)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    return outs


def test_under_torch_distributed_rank0_holds_and_every_rank_hears_a_refusal(tmp_path):
    output = tmp_path / "out.csv"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    outs = run_ranks(output, port)
    pid0 = int(outs[0].split("ran: [(True, ")[1].split(")")[0])
    assert outs == [f"rank 0 ran: [(True, {pid0}), (False, {pid0})]\n",
                    f"rank 1 ran: [(True, {pid0}), (False, {pid0})]\n"]  # one holder, rank 0
    holder = start_holder(output)
    try:
        outs = run_ranks(output, port + 1 if port < 65535 else port - 1)
    finally:
        holder.kill()
        holder.wait()
    refusal = f"refused: --output {output}: in use by pid {holder.pid} on "
    assert all(out.startswith(f"rank {rank} {refusal}") and out.count("\n") == 1 for rank, out in enumerate(outs))
    assert time.monotonic() - started < 120


# ----- the batch scripts: two runs on one --output -----

SHAPE = dict(hidden_size=64, num_layers=4, num_attention_heads=4, inner_hidden_size=256, init_std=0.3)
IDS = [f"r{i:02d}" for i in range(30)]


@pytest.fixture(scope="module")
def job(make_checkpoint, tmp_path_factory):
    """(the command of a 30-row batch job, minus --output) on a small checkpoint."""
    folder = tmp_path_factory.mktemp("job")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "title": f"商品 {i}"}, ensure_ascii=False) + "\n" for i in IDS),
                    encoding="utf-8")
    checkpoint = make_checkpoint("v1.1", ("safetensors",), **SHAPE)
    return [sys.executable, "chatglm_multi_gpu_inference.py", "--model_name_or_path", str(checkpoint), "--input",
            str(rows), "--template", "{text}", "--max_new_tokens", "8", "--batch_size", "1", "--dtype", "fp32"]


def start(command):
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_holder(output, procs, timeout=120):
    """The one of `procs` that holds the lock of `output`, as soon as it does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = (read_holder(output) or {}).get("pid")
        holder = next((proc for proc in procs if proc.pid == pid), None)
        if holder:
            return holder
        assert all(proc.poll() is None for proc in procs), [proc.communicate() for proc in procs]
        time.sleep(0.002)
    raise AssertionError("no run took the lock")


def output_ids(path):
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_runs_on_one_output_one_refuses_naming_the_other_and_every_id_is_written_once(job, tmp_path):
    output = tmp_path / "out.jsonl"
    runs = [start([*job, "--output", str(output)]) for _ in range(2)]  # a double launch
    try:
        holder = wait_for_holder(output, runs)
        # Paused while it holds the lock: the other run meets it however fast either one is.
        holder.send_signal(signal.SIGSTOP)
        (other,) = [run for run in runs if run is not holder]
        out, err = other.communicate(timeout=120)
        holder.send_signal(signal.SIGCONT)
        holder_out, holder_err = holder.communicate(timeout=300)
    finally:
        for run in runs:
            run.kill()
    assert holder.returncode == 0, holder_err[-3000:]
    assert f"{output}: 30 rows generated, 0 already there" in holder_out
    assert other.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err + out
    assert err.startswith(f"error: --output {output}: in use by pid {holder.pid} on {socket.gethostname()} since ")
    assert "chatglm_multi_gpu_inference.py --model_name_or_path" in err
    assert err.endswith("; wait for it to finish, or choose another --output\n")
    assert output_ids(output) == IDS  # every id once
    assert not lock_path(output).exists()


def test_a_run_killed_with_sigkill_does_not_block_the_next_one(job, tmp_path):
    output = tmp_path / "out.jsonl"
    killed = start([*job, "--output", str(output)])
    try:
        wait_for_holder(output, [killed])
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert read_holder(output)["pid"] == killed.pid  # its lock file is left, with its record in it
    rerun = start([*job, "--output", str(output)])
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert sorted(output_ids(output)) == IDS  # resumed: every id once
    assert not lock_path(output).exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
@pytest.mark.parametrize("script", ["finetune.py", "multi_gpu_fintune_belle.py"])
def test_a_training_run_refuses_an_output_dir_in_use_on_every_rank(make_checkpoint, tmp_path, script, launcher):
    """A second training run on a busy --output_dir stops before it trains, naming the holder; under torchrun rank 0
    holds the lock and every rank stops (no rank waits on the others until a timeout)."""
    out = tmp_path / "out"
    holder = start_holder(out)
    model = make_checkpoint("v1.1", ("safetensors",), hidden_size=64, num_layers=2, num_attention_heads=4,
                            inner_hidden_size=128)
    prefix = [sys.executable] if launcher == "python" else [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}"]
    try:
        started = time.monotonic()
        result = subprocess.run([*prefix, script, "--model_name_or_path", str(model), "--output_dir", str(out),
                                 "--max_steps", "1", "--report_to", "none"], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0 and took < 120
    # one line, the same from every rank (torchrun itself then reports the failed ranks)
    [line] = {line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: ")}
    assert line.startswith(f"error: --output_dir {out}: in use by pid {holder.pid} on {socket.gethostname()} since ")
    if launcher == "python":
        assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written
