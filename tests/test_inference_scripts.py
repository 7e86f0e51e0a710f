"""The inference scripts, each checked against an independent computation on a small checkpoint: batched == one row
at a time; a killed and resumed job == an uninterrupted one, every id once; 2-process DeepSpeed tensor parallelism ==
one process; a model split over CPU and disk == the unsplit model; merged checkpoint == base + adapter; the chat CLI
== model.chat() with the same history; bad input files stop with a one-line error."""

import csv
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

import chatglm_deepspeed_inference
import chatglm_multi_gpu_inference
import cli_chat
import merge_lora
from glm_tune.batch_inference import ResultFile, read_inputs
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.lora import add_lora, save_lora_pt
from modeling_chatglm import ChatGLMForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
# init_std 0.3: a random model whose greedy answers vary from prompt to prompt (at 0.1 it ends every answer at once).
# 4 heads split 2 + 2 over two ranks; 4 layers leave room for a CPU / disk split.
SHAPE = dict(hidden_size=64, num_layers=4, num_attention_heads=4, inner_hidden_size=256, init_std=0.3)
TITLES = ["轻薄笔记本电脑", "降噪蓝牙耳机，主动降噪，续航 8 小时", "smart watch", "便携咖啡机", "儿童学习桌 (可升降)",
          "空气炸锅 4.5 L", "yoga mat, extra thick", "电动牙刷", "保温杯", "机械键盘 with RGB backlight, 87 keys"]
IDS = [f"p{i:02d}" for i in range(1, len(TITLES) + 1)]
# fp32 pinned: every comparison here is exact ("auto" is bf16 on CPUs with native bf16).
JOB = ["--template", "写一句广告语：{text}", "--max_new_tokens", "10", "--column", "title", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("v1.1", ("safetensors",), **SHAPE)


@pytest.fixture(scope="module")
def titles_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "titles.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "title", "content"])
        writer.writerows([i, t, "…"] for i, t in zip(IDS, TITLES))
    return path


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    """A PEFT adapter folder (with the seed's chatglm-lora.pt) whose B matrices are random, so it changes the model."""
    folder = tmp_path_factory.mktemp("adapter")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, _ = load_model_and_tokenizer(checkpoint, dtype="fp32")
        model = add_lora(model, rank=4, target="all")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    model.save_pretrained(folder)
    save_lora_pt(model, folder / "chatglm-lora.pt")
    return folder


def read_output(path):
    """{id: response} of an output file, failing on a repeated id."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [str(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)), f"repeated ids in {path}: {ids}"
    return {str(r["id"]): r["response"] for r in rows}


def run_job(script, checkpoint, titles_csv, output, *extra):
    script.main(["--model_name_or_path", str(checkpoint), "--input", str(titles_csv), "--output", str(output),
                 *JOB, *extra])
    return read_output(output)


@pytest.fixture(scope="module")
def one_at_a_time(checkpoint, titles_csv, tmp_path_factory):
    """The reference: plain PyTorch, one prompt per generate() call."""
    out = tmp_path_factory.mktemp("reference") / "single.jsonl"
    answers = run_job(chatglm_deepspeed_inference, checkpoint, titles_csv, out, "--no_deepspeed", "--batch_size", "1")
    assert list(answers) == IDS
    # A meaningful reference: the answers differ between prompts (a broken split or padding changes them).
    assert len(set(answers.values())) >= 8 and all(answers.values())
    return answers


def test_batched_generation_equals_single(checkpoint, titles_csv, one_at_a_time, tmp_path):
    tokenizer = load_model_and_tokenizer(checkpoint, dtype="fp32")[1]
    lengths = {len(tokenizer.encode(f"写一句广告语：{t}")) for t in TITLES}
    assert len(lengths) >= 5  # the batches really are left-padded
    batched = run_job(chatglm_deepspeed_inference, checkpoint, titles_csv, tmp_path / "batched.csv",
                      "--no_deepspeed", "--batch_size", "4")
    assert batched == one_at_a_time


def test_without_deepspeed_installed_the_job_runs_in_plain_pytorch(checkpoint, titles_csv, one_at_a_time, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` finds when it is not installed
    assert run_job(chatglm_deepspeed_inference, checkpoint, titles_csv, tmp_path / "plain.jsonl") == one_at_a_time
    capsys.readouterr()
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by a launcher: tensor parallelism is impossible without DeepSpeed
    with pytest.raises(SystemExit) as exit_info:
        run_job(chatglm_deepspeed_inference, checkpoint, titles_csv, tmp_path / "tp.jsonl")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: started with several ranks, but tensor parallelism needs DeepSpeed (not "
                                       "installed); run with python\n")


@pytest.mark.parametrize("script", [chatglm_deepspeed_inference, chatglm_multi_gpu_inference],
                         ids=lambda m: m.__name__)
def test_batch_jobs_run_in_bf16_where_the_cpu_has_native_bf16(checkpoint, titles_csv, one_at_a_time, tmp_path,
                                                             monkeypatch, script):
    """The AMX branch, forced so that any CPU runs it: --dtype auto loads bf16 weights and the job completes. bf16
    keeps 8 bits of mantissa, so answers may part from fp32's after a few tokens: each answer is checked to be there,
    and most first tokens to agree."""
    from glm_tune.batch_inference import BatchJob

    monkeypatch.setenv("GLM_TUNE_FAST_BF16", "1")
    dtypes, run = [], BatchJob.run

    def run_recording_dtype(self, model, *args, **kwargs):
        dtypes.append(model.dtype)
        return run(self, model, *args, **kwargs)

    monkeypatch.setattr(BatchJob, "run", run_recording_dtype)
    out = tmp_path / "bf16.jsonl"
    script.main(["--model_name_or_path", str(checkpoint), "--input", str(titles_csv), "--output", str(out),
                 *JOB, "--dtype", "auto"])
    answers = read_output(out)
    assert dtypes == [torch.bfloat16] and list(answers) == IDS and all(answers.values())
    assert sum(answers[i][:1] == one_at_a_time[i][:1] for i in IDS) >= 7


def test_killed_job_resumes_without_losing_or_repeating_a_row(checkpoint, tmp_path):
    # 40 rows, so that the job is still running when its first row appears and the kill comes
    ids = [f"r{i}" for i in range(40)]
    titles = [f"{TITLES[i % len(TITLES)]} #{i}" for i in range(40)]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, titles)),
                    encoding="utf-8")
    uninterrupted = run_job(chatglm_deepspeed_inference, checkpoint, rows, tmp_path / "whole.csv", "--no_deepspeed")

    out = tmp_path / "resumed.csv"
    cmd = [sys.executable, "chatglm_deepspeed_inference.py", "--model_name_or_path", str(checkpoint), "--input",
           str(rows), "--output", str(out), *JOB, "--no_deepspeed", "--batch_size", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:  # the header and a first finished row
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    written = read_output(out)
    assert 1 <= len(written) < len(ids), "the job was not interrupted half-way"
    assert written == {k: uninterrupted[k] for k in written}
    # A kill during a write leaves a torn row: the next id with half its answer, inside an open quote.
    pending = next(i for i in ids if i not in written)
    with open(out, "ab") as f:
        f.write(f'{pending},{titles[ids.index(pending)]},"half an ans'.encode())

    run_job(chatglm_deepspeed_inference, checkpoint, rows, out)  # in this process, under DeepSpeed (1 rank)
    assert read_output(out) == uninterrupted  # every id once, the same answers as the uninterrupted job
    run_job(chatglm_deepspeed_inference, checkpoint, rows, out)  # nothing left to do: nothing added
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1 + len(ids)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_torn_last_write_is_cut_at_the_last_complete_row(tmp_path, suffix):
    rows = read_inputs(_tricky_input(tmp_path), "title", "{text}")
    first, second = rows[:3], rows[3:]
    answers = {r.key: f'answer to {r.text}, with "quotes",\r\nlines and 中文' for r in rows}
    results = ResultFile(tmp_path / f"out{suffix}", "title")

    def as_output(batch):
        return [{"id": r.id, "title": r.text, "response": answers[r.key]} for r in batch]

    assert results.finished_ids(rows) == set()  # creates the file
    results.append(as_output(first))
    intact = results.path.read_bytes()
    tail = results._encode(as_output(second))
    ends = [len(results._encode(as_output(second[: n + 1]))) for n in range(len(second))]
    for cut in range(len(tail) + 1):  # a kill after every possible byte of the second batch
        results.path.write_bytes(intact + tail[:cut])
        whole = [r for r, end in zip(second, ends) if end <= cut]
        assert results.finished_ids(rows) == {r.key for r in first + whole}, cut
        assert results.path.read_bytes() == intact + tail[: max([0] + [e for e in ends if e <= cut])], cut
    # the resumed job: cut the torn row, append what is missing
    results.path.write_bytes(intact + tail[: ends[0] + 5])
    done = results.finished_ids(rows)
    results.append(as_output([r for r in rows if r.key not in done]))
    assert read_output(results.path) == answers


def _tricky_input(tmp_path):
    path = tmp_path / "tricky.jsonl"
    titles = ["a, b", 'say "hi"', "two\nlines", "中文标题", "tab\there", "x" * 50]
    path.write_text("".join(json.dumps({"id": i, "title": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(titles, start=7)), encoding="utf-8")
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_deepspeed_tensor_parallel_equals_one_process(checkpoint, titles_csv, one_at_a_time, tmp_path):
    out = tmp_path / "tp.jsonl"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "chatglm_deepspeed_inference.py", "--model_name_or_path", str(checkpoint), "--input", str(titles_csv),
           "--output", str(out), *JOB, "--batch_size", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tensor parallelism over 2 ranks: rank 0 holds 2 of 4 attention heads and 128 of 256 MLP units" \
        in proc.stdout
    assert read_output(out) == one_at_a_time


@pytest.mark.parametrize("with_adapter", [False, True])
def test_model_split_over_cpu_and_disk_gives_the_unsplit_models_tokens(checkpoint, titles_csv, adapter, tmp_path,
                                                                       capsys, with_adapter):
    lora = ["--lora_path", str(adapter)] if with_adapter else []
    unsplit = run_job(chatglm_multi_gpu_inference, checkpoint, titles_csv, tmp_path / "unsplit.jsonl", *lora)
    assert "the whole model runs on the CPU" in capsys.readouterr().out
    # Room for the embeddings and two of the four blocks (in the dtype the job uses, fp32), and the two blocks' worth
    # that accelerate keeps free to load offloaded layers into: the other two blocks and the final layer norm go to
    # disk.
    model = ChatGLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    block = size(model.transformer.layers[0])
    budget = size(model.transformer.word_embeddings) + 4 * block
    split = run_job(chatglm_multi_gpu_inference, checkpoint, titles_csv, tmp_path / "split.jsonl", *lora,
                    "--max_memory", f"cpu={budget}", "--offload_folder", str(tmp_path / "offload"))
    plan = capsys.readouterr().out
    assert "device map: cpu: transformer.word_embeddings, lm_head, transformer.rotary_emb, layers 0-1 | disk: " \
           "transformer.final_layernorm, layers 2-3" in plan
    assert split == unsplit and len(set(split.values())) >= 8


@pytest.mark.parametrize("adapter_file", ["", "chatglm-lora.pt"])
def test_merged_checkpoint_computes_base_plus_adapter(checkpoint, adapter, tmp_path, adapter_file):
    out = tmp_path / "merged"
    merge_lora.main(["--model_name_or_path", str(checkpoint), "--lora_path", str(adapter / adapter_file),
                     "--output_dir", str(out), "--max_shard_size", "200KB"])
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_chatglm.ChatGLMForConditionalGeneration"

    adapted, tokenizer = load_model_and_tokenizer(checkpoint, adapter, dtype="fp32")
    base, _ = load_model_and_tokenizer(checkpoint, dtype="fp32")
    batch = tokenizer(["你好，世界", "def f(x):\n    return x", "hello there"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = adapted(**batch).logits
        assert (base(**batch).logits - expected).abs().max() > 1.0  # the adapter matters
        remote = AutoModel.from_pretrained(out, trust_remote_code=True)
        assert type(remote).__module__.startswith("transformers_modules.")
        ours = ChatGLMForConditionalGeneration.from_pretrained(out)
        # W + s*B@A vs W x + s*B(A x): fp32 rounding only, on logits of size ~10 (up to 3.9e-4 apart with MKL on an
        # AMD EPYC; the adapter itself moves them by more than 1)
        for merged in (remote, ours):
            torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-3, rtol=0)


class Writes(io.StringIO):
    """stdout that counts the pieces written into it."""

    count = 0

    def write(self, text):
        self.count += 1
        return super().write(text)


def test_chat_cli_streams_answers_and_keeps_the_history(checkpoint, adapter):
    queries = ["你好", "介绍一下你自己", "clear", "hello, who are you?"]
    out = Writes()
    cli_chat.main(["--model_name_or_path", str(checkpoint), "--lora_path", str(adapter), "--no-do_sample",
                   "--max_length", "40", "--dtype", "fp32"], stdin=io.StringIO("\n".join(queries) + "\n"), out=out)
    turns = out.getvalue().split("\n用户：")[1:]
    answers = [t.removeprefix("\nChatGLM：").removesuffix("\n") for t in turns if t.startswith("\nChatGLM：")]
    assert "(new conversation)" in turns[2]

    model, tokenizer = load_model_and_tokenizer(checkpoint, adapter, dtype="fp32")
    chat = dict(do_sample=False, max_length=40)
    first, history = model.chat(tokenizer, "你好", [], **chat)
    second, _ = model.chat(tokenizer, "介绍一下你自己", history, **chat)
    third, _ = model.chat(tokenizer, "hello, who are you?", [], **chat)  # after 'clear'
    assert answers == [first, second, third]
    assert second != model.chat(tokenizer, "介绍一下你自己", [], **chat)[0]  # the history changes the answer
    assert out.count > 3 * 10  # streamed: many pieces, not one write per answer


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name,content,argv,message", [
    ("missing.csv", None, [], "{path}: no such file"),
    ("t.csv", "id,name\n1,a\n", [], "{path}:2: no field 'title' (fields: id, name; choose one with --column)"),
    ("t.csv", "id,title\n1,a\n2,\n", [], "{path}:3: field 'title' is empty"),
    ("t.csv", "id,title\n1,a\n1,b\n", [], "{path}:3: id '1' appears twice (first at {path}:2)"),
    ("t.csv", 'id,title\n1,"a\n', [], "{path}:2: not valid CSV (unexpected end of data)"),
    ("t.csv", "id,title\n1,a,b\n", [], "{path}:2: 3 fields, the header has 2"),
    ("t.jsonl", '{"title": "a"}\n{"title": 5}\n', [], "{path}:2: field 'title' must be a string, got a number"),
    ("t.jsonl", '{"title": "a"}\n{"title": "b" "c"}\n', [], "{path}:2: not JSON (Expecting ',' delimiter, column 15)"),
    ("t.jsonl", '{"title": "a [gMASK] b"}\n', [], "{path}:1: field 'title' contains ChatGLM's control token "
                                                 "'[gMASK]'"),
    ("t.txt", "title\na\n", [], "{path}: unknown input format '.txt' (expected .csv, .jsonl or .json)"),
    ("t.csv", "id,title\n1,a\n", ["--template", "no placeholder"], "--template 'no placeholder': needs {{text}}"),
])
def test_bad_input_stops_with_a_one_line_error(tmp_path, capsys, name, content, argv, message):
    path = tmp_path / name if content is None else _write(tmp_path / name, content)
    for script in (chatglm_deepspeed_inference, chatglm_multi_gpu_inference):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--input", str(path), "--output", str(tmp_path / "out.csv"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: " + message.format(path=path)), err
    assert not (tmp_path / "out.csv").exists()


def test_an_output_of_another_job_or_a_bad_flag_stops_with_a_one_line_error(titles_csv, tmp_path, capsys):
    other = _write(tmp_path / "other.csv", "id,title,response\nzz,x,y\n")
    cases = [
        (chatglm_deepspeed_inference, ["--output", str(other)],
         f"error: {other}:2: id 'zz' is not in the input: this output belongs to another job"),
        (chatglm_multi_gpu_inference, ["--output", str(tmp_path / "o.csv"), "--max_memory", "cpu=lots"],
         "error: --max_memory cpu=lots: 'cpu=lots' is not DEVICE=SIZE"),
        (merge_lora, ["--lora_path", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "m")],
         f"error: --lora_path {tmp_path / 'nothing'}: no such file or folder"),
    ]
    for script, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--input", str(titles_csv), *argv] if script is not merge_lora else argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err
    assert other.read_text() == "id,title,response\nzz,x,y\n"  # left as it was
