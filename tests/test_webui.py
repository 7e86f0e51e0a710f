"""The web pages (webui/) and the feedback store behind them: each page's flows under streamlit's AppTest on the
embedded small model, K writers (processes and threads) on one data folder at once, and the feedback page end to end
in headless chromium (Debian's or Playwright's), served by `streamlit run` (screenshots kept in $GLM_TUNE_SCREENSHOTS
or a pytest temp folder)."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

import tokenize_dataset_rows_belle
import webui.common as common
from glm_tune.data import load_training_data, read_records
from glm_tune.errors import UserError
from glm_tune.feedback_store import FeedbackStore, JsonlTable, training_prompt
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.lora import add_lora

import app_helpers
from app_helpers import assert_clean

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--max_length", "40", "--temperature", "0"]  # greedy, a few tokens: the answers below are reproducible


def open_page(monkeypatch, page, *flags):
    return app_helpers.open_page(monkeypatch, ROOT / "webui" / page, *flags)


def greedy_answer(model_and_tokenizer, query, history=(), max_length=40):
    model, tokenizer = model_and_tokenizer
    return model.chat(tokenizer, query, list(history), max_length=max_length, do_sample=False)[0]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def base():
    return load_model_and_tokenizer()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A folder of adapters (as --lora_dir): run1/ with LoRA weights that change the answers, and a decoy."""
    folder = tmp_path_factory.mktemp("adapters")
    model, _ = load_model_and_tokenizer()
    peft = add_lora(model, target="all")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=generator)  # B starts at zero: a fresh adapter would change nothing
    peft.save_pretrained(folder / "run1")
    (folder / "notes").mkdir()
    (folder / "notes" / "adapter_config.json").write_text("{}")  # no weights: not an adapter
    return folder


class KeepDownloads(MemoryMediaFileStorage):
    """AppTest's media storage, keeping what download buttons would send (file name -> bytes)."""

    files = {}

    def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
        KeepDownloads.files[filename] = path_or_data
        return super().load_and_get_id(path_or_data, mimetype, kind, filename)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluate page


def test_feedback_page_generates_logs_and_saves_rated_and_corrected_answers(monkeypatch, tmp_path, base):
    data = tmp_path / "feedback"
    at = open_page(monkeypatch, "web_feadback.py", "--data_dir", str(data), *FAST)
    assert_clean(at)

    at.text_area(key="instruction").set_value("Translate 'cat' into Chinese.")
    at.button(key="generate").click().run()
    assert_clean(at)
    answer = greedy_answer(base, training_prompt("Translate 'cat' into Chinese."))
    assert answer and at.markdown[0].value == answer
    assert at.caption[0].value.startswith("generated in ")
    [logged] = read_jsonl(data / "generations.jsonl")
    assert logged["settings"] == {"max_length": 40, "temperature": 0.0, "top_p": 0.7}
    assert (logged["instruction"], logged["input"], logged["output"]) == ("Translate 'cat' into Chinese.", "", answer)
    assert logged["seconds"] > 0 and logged["time"] and logged["model"] == common.EMBEDDED

    # rated bad and not corrected: nothing to train on, so nothing is saved
    at.feedback[0].set_value(0)
    at.button(key="save").click().run()
    assert "edit the answer" in at.error[0].value and not (data / "dataset.jsonl").exists()

    at.text_area(key=f"answer-{logged['id']}").set_value("猫")
    at.button(key="save").click().run()
    assert_clean(at)
    assert at.success[0].value.startswith("saved row ") and at.button(key="save").disabled  # no double save
    [row] = read_jsonl(data / "dataset.jsonl")
    assert row["output"] == "猫" and row["rating"] == "bad" and row["corrected"] is True
    [pair] = read_jsonl(data / "preferences.jsonl")
    assert (pair["id"], pair["chosen"], pair["rejected"]) == (row["id"], "猫", answer)
    assert pair["prompt"] == "Instruction: Translate 'cat' into Chinese.\nAnswer: "

    at.text_area(key="instruction").set_value("Translate the word into Chinese.")
    at.text_area(key="input").set_value("dog")
    at.button(key="generate").click().run()
    second = greedy_answer(base, training_prompt("Translate the word into Chinese.", "dog"))
    at.feedback[0].set_value(1)  # thumbs up, answer left as it is
    at.button(key="save").click().run()
    assert_clean(at)
    assert len(read_jsonl(data / "generations.jsonl")) == 2 and len(read_jsonl(data / "preferences.jsonl")) == 1

    # the collected file is training data as it is: the prompts the page asked, the answers the human approved
    pairs, _ = read_records(data / "dataset.jsonl")
    assert pairs == [(pair["prompt"], "猫"), ("Instruction: Translate the word into Chinese.\nInput: dog\nAnswer: ",
                                              second)]
    dataset, summary = load_training_data(data / "dataset.jsonl", base[1], max_seq_length=64)
    assert summary.rows_out == 2 and base[1].decode(dataset[0]["input_ids"][dataset[0]["seq_len"]:-1]) == "猫"
    tokenize_dataset_rows_belle.main(["--jsonl_path", str(data / "dataset.jsonl"), "--save_path",
                                      str(tmp_path / "tokenized"), "--max_seq_length", "64"])
    assert load_training_data(tmp_path / "tokenized", base[1], 64)[0]["input_ids"] == dataset["input_ids"]


def test_save_refuses_answers_that_cannot_train(tmp_path):
    store = FeedbackStore(tmp_path)
    generation = store.log_generation("Say hi.", "", "hi", 0.1, {}, "m", None)
    for answer, rating, message in [("hi", None, "rate the answer"), ("", "good", "empty answer"),
                                    ("hi [gMASK]", "good", "control token"), ("hi", "great", "rating must be")]:
        with pytest.raises(UserError, match=message):
            store.save_feedback(generation, answer, rating)
    assert not store.dataset.path.exists() and not store.preferences.path.exists()
    row, pair = store.save_feedback(generation, " hi ", "good")  # whitespace alone is no correction
    assert (row["output"], row["corrected"], pair) == ("hi", False, None)


# ----------------------------------------------------------------------------------------------------------------------
# Data page


def test_data_page_lists_filters_edits_deletes_and_exports(monkeypatch, tmp_path):
    monkeypatch.setattr("streamlit.testing.v1.app_test.MemoryMediaFileStorage", KeepDownloads)
    store = FeedbackStore(tmp_path)
    rows = []
    for instruction, output, answer, rating in [("cat?", "猫", "猫", "good"), ("dog?", "x", "狗", "bad"),
                                                ("bird?", "鸟", "鸟", "good")]:
        generation = store.log_generation(instruction, "", output, 0.1, {"max_length": 40}, "m", None)
        rows.append(store.save_feedback(generation, answer, rating)[0])
    at = open_page(monkeypatch, "web_feadback.py", "--data_dir", str(tmp_path))
    at.radio(key="page").set_value("Data").run()
    assert_clean(at)
    assert list(at.dataframe[0].value["id"]) == [r["id"] for r in rows] and at.caption[0].value.startswith("3 of 3")

    at.text_input(key="filter").set_value("DOG").run()
    assert list(at.dataframe[0].value["output"]) == ["狗"]
    at.text_input(key="filter").set_value("").run()
    at.selectbox(key="rating_filter").set_value("good").run()
    assert list(at.dataframe[0].value["instruction"]) == ["cat?", "bird?"]
    assert at.download_button(key="export").label == "Export 2 rows (JSONL)"
    at.download_button(key="export").click().run()
    exported = KeepDownloads.files["dataset.jsonl"].decode().splitlines()
    assert [json.loads(line) for line in exported] == [{"instruction": "cat?", "input": "", "output": "猫"},
                                                       {"instruction": "bird?", "input": "", "output": "鸟"}]

    at.selectbox(key="row").set_value(rows[2]["id"]).run()
    at.text_area(key=f"edit-{rows[2]['id']}-output").set_value("")
    at.button[0].click().run()  # "Save changes": an empty answer is refused, the file is left alone
    assert "empty answer" in at.error[0].value and read_jsonl(store.dataset.path)[2]["output"] == "鸟"
    at.text_area(key=f"edit-{rows[2]['id']}-output").set_value("小鸟")
    at.button[0].click().run()
    assert_clean(at)
    assert at.success[0].value == f"row {rows[2]['id']} saved"
    assert list(at.dataframe[0].value["output"]) == ["猫", "小鸟"]
    assert read_jsonl(store.dataset.path)[2]["output"] == "小鸟"

    at.selectbox(key="row").set_value(rows[0]["id"]).run()
    at.button(key="delete").click().run()
    assert [r["id"] for r in read_jsonl(store.dataset.path)] == [rows[1]["id"], rows[2]["id"]]

    at.selectbox(key="table").set_value("preferences").run()
    at.selectbox(key="rating_filter").set_value("any").run()
    assert list(at.dataframe[0].value["chosen"]) == ["狗"] and list(at.dataframe[0].value["rejected"]) == ["x"]
    at.selectbox(key="table").set_value("generations").run()
    assert len(at.dataframe[0].value) == 3 and "row" not in [w.key for w in at.selectbox]  # a log: read only


# ----------------------------------------------------------------------------------------------------------------------
# Chat page, model choice, loading once


def test_chat_page_streams_answers_with_history_and_clears(monkeypatch, base):
    common.load_model.clear()
    loads = len(common.LOADS)
    at = open_page(monkeypatch, "web_ui.py", *FAST)
    at.chat_input(key="question").set_value("Hello").run()
    assert_clean(at)
    first = greedy_answer(base, "Hello")
    assert [m.name for m in at.chat_message] == ["user", "assistant"] and at.chat_message[1].markdown[0].value == first
    at.chat_input(key="question").set_value("And then?").run()
    assert at.chat_message[3].markdown[0].value == greedy_answer(base, "And then?", [("Hello", first)])
    assert at.session_state.history[0] == ("Hello", first) and len(at.session_state.history) == 2

    at.button(key="clear").click().run()
    assert not at.chat_message and at.session_state.history == []
    # a second session shares the model the first one loaded
    other = open_page(monkeypatch, "web_ui.py", *FAST)
    other.chat_input(key="question").set_value("Hello").run()
    assert other.chat_message[1].markdown[0].value == first
    assert common.LOADS[loads:] == [(None, None)]


def test_chat_page_with_static_decoding_answers_as_without(monkeypatch):
    """fp32, where the static decoder's tokens are generate()'s exactly (tests/test_static_decode.py)."""
    common.load_model.clear()
    loads = len(common.LOADS)
    at = open_page(monkeypatch, "web_ui.py", *FAST, "--dtype", "fp32", "--compile_decoding", "eager")
    at.chat_input(key="question").set_value("Hello").run()
    assert_clean(at)
    assert at.chat_message[1].markdown[0].value == greedy_answer(load_model_and_tokenizer(dtype="fp32"), "Hello")
    assert common.LOADS[loads:] == [(None, None)]
    model, _ = common.load_model(None, None, "fp32", None, None, "eager")  # the page's load, from the cache
    assert model.static_decoder.mode == "eager" and common.LOADS[loads:] == [(None, None)]
    common.load_model.clear()


def test_checkpoint_and_adapter_from_the_command_line_and_only_configured_choices(
        monkeypatch, make_checkpoint, adapter_dir):
    checkpoint = str(make_checkpoint())
    at = open_page(monkeypatch, "web_ui.py", "--model_name_or_path", checkpoint, "--lora_dir", str(adapter_dir),
                   "--lora_path", str(adapter_dir / "run1"), *FAST)
    sidebar = at.sidebar
    assert sidebar.selectbox(key="model").options == [checkpoint]
    assert sidebar.selectbox(key="adapter").options == [common.NO_ADAPTER, str(adapter_dir / "run1")]
    assert sidebar.selectbox(key="adapter").value == 1 and not at.text_input  # no path can be typed in
    at.chat_input(key="question").set_value("Hello").run()
    assert_clean(at)
    tuned, untuned = load_model_and_tokenizer(checkpoint, adapter_dir / "run1"), load_model_and_tokenizer(checkpoint)
    assert at.chat_message[1].markdown[0].value == greedy_answer(tuned, "Hello") != greedy_answer(untuned, "Hello")
    assert common.LOADS[-1] == (checkpoint, str(adapter_dir / "run1"))

    at.button(key="clear").click().run()
    at.sidebar.selectbox(key="adapter").set_value(0).run()  # the base model alone
    at.chat_input(key="question").set_value("Hello").run()
    assert at.chat_message[1].markdown[0].value == greedy_answer(untuned, "Hello")


@pytest.mark.parametrize("flags, message", [
    (["--model_name_or_path", "/no/such/model"], "--model_name_or_path /no/such/model: no such folder"),
    (["--lora_path", "/no/such/adapter"], "--lora_path /no/such/adapter: no adapter there"),
    (["--lora_dir", "/no/such/dir"], "--lora_dir /no/such/dir: no such folder"),
    (["--temperature", "-1"], "--temperature"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--compile_decoding", "fast"], "--compile_decoding: invalid choice: 'fast'"),
])
def test_bad_flags_are_one_line_errors_on_the_page(monkeypatch, flags, message):
    at = open_page(monkeypatch, "web_ui.py", *FAST, *flags)  # the later flag wins
    if not at.error:
        at.chat_input(key="question").set_value("Hello").run()
    assert not at.exception and len(at.error) == 1
    assert at.error[0].value.startswith("error: ") and message in at.error[0].value and "\n" not in at.error[0].value


# ----------------------------------------------------------------------------------------------------------------------
# Durability


def _append_rows(folder, writer, count, barrier):
    store = FeedbackStore(folder)
    barrier.wait()
    for i in range(count):
        generation = store.log_generation(f"w{writer} q{i}", "", f"a{i}", 0.0, {}, "m", None)
        store.save_feedback(generation, f"w{writer} corrected {i}" if i % 2 else f"a{i}", "good")


def _edit_and_delete(folder, ids, barrier):
    store = FeedbackStore(folder)
    barrier.wait()
    for n, row_id in enumerate(ids):
        if n % 2:
            store.dataset.delete(row_id)
        else:
            store.edit(store.dataset, row_id, {"output": f"edited {n}"})


def test_concurrent_writers_lose_and_break_no_rows(tmp_path):
    """Server sessions are threads of one process, and several servers may share a folder: both kinds write at once,
    while another process edits and deletes rows (each a rewrite of the whole file)."""
    processes, threads, per_writer = 4, 2, 15
    writers = processes + threads
    store = FeedbackStore(tmp_path)
    seeded = [store.dataset.append({"instruction": f"seed {n}", "input": "", "output": "x"})["id"] for n in range(20)]
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(writers + 1)
    jobs = [context.Process(target=_append_rows, args=(tmp_path, w, per_writer, barrier)) for w in range(processes)]
    jobs.append(context.Process(target=_edit_and_delete, args=(tmp_path, seeded, barrier)))
    for job in jobs:
        job.start()
    sessions = [threading.Thread(target=_append_rows, args=(tmp_path, w, per_writer, barrier))
                for w in range(processes, writers)]
    for session in sessions:
        session.start()
    for job in [*jobs, *sessions]:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0] * len(jobs) and not any(s.is_alive() for s in sessions)

    lines = store.dataset.path.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole
    assert len(store.dataset.rows()) == len(rows) and store.dataset.bad_lines == 0
    assert len({r["id"] for r in rows}) == len(rows)
    seed_rows = {r["instruction"]: r["output"] for r in rows if r["instruction"].startswith("seed")}
    assert seed_rows == {f"seed {n}": f"edited {n}" for n in range(0, 20, 2)}  # every edit kept, every delete done
    appended = sorted(r["instruction"] for r in rows if not r["instruction"].startswith("seed"))
    assert appended == sorted(f"w{w} q{i}" for w in range(writers) for i in range(per_writer))
    assert len(read_jsonl(store.generations.path)) == writers * per_writer
    assert len(read_jsonl(store.preferences.path)) == writers * (per_writer // 2)
    assert len(read_records(store.dataset.path)[0]) == len(rows)


def test_a_torn_line_is_kept_apart_and_survives_rewrites(tmp_path):
    table = JsonlTable(tmp_path / "dataset.jsonl")
    first = table.append({"instruction": "a", "input": "", "output": "b"})
    with open(table.path, "ab") as out:
        out.write(b'{"instruction": "cut sho')  # a writer killed mid-line
    second = table.append({"instruction": "c", "input": "", "output": "d"})
    assert [r["id"] for r in table.rows()] == [first["id"], second["id"]] and table.bad_lines == 1
    table.delete(first["id"])
    assert table.path.read_text().splitlines()[0] == '{"instruction": "cut sho'
    with pytest.raises(UserError, match=f"no row with id {first['id']}"):
        table.update(first["id"], {"output": "z"})


# ----------------------------------------------------------------------------------------------------------------------
# End to end in a real browser


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listeners(port):
    """Local addresses listening on `port` (hex, as in /proc/net/tcp*)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.append(local.rsplit(":", 1)[0])
    return found


@pytest.fixture
def server(tmp_path):
    """`streamlit run webui/web_feadback.py` from the repository root, as an operator starts it."""
    port, data, log = _free_port(), tmp_path / "feedback", tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "webui/web_feadback.py", "--server.port",
                                 str(port), "--", "--data_dir", str(data), *FAST], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"streamlit did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", port, data, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def screenshots(tmp_path, capsys):
    folder = Path(os.environ.get("GLM_TUNE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    with capsys.disabled():
        print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture
def chromium():
    """The browser: $GLM_TUNE_CHROMIUM if set, else Debian's /usr/bin/chromium, else the one `playwright install` keeps.
    None installed fails the test under CI=true (setup.sh installs it there) and skips it elsewhere, saying how."""
    from playwright.sync_api import sync_playwright

    chosen = os.environ.get("GLM_TUNE_CHROMIUM")
    if chosen:
        candidates = [chosen]
    else:
        with sync_playwright() as pw:
            candidates = ["/usr/bin/chromium", pw.chromium.executable_path]
    found = next((path for path in candidates if Path(path).is_file()), None)
    if found:
        return found
    message = (f"no chromium for the browser test ({' or '.join(candidates)} missing): bash setup.sh as root installs "
               "Debian's (apt-get install chromium); or: python -m playwright install chromium")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def test_browser_generate_feedback_and_export_end_to_end(chromium, server, screenshots):
    from playwright.sync_api import sync_playwright

    url, port, data, log = server
    assert _listeners(port) == ["0100007F"]  # 127.0.0.1 only, from webui/.streamlit/config.toml
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=flags,
                                                        viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            instruction = page.get_by_label("Instruction")
            instruction.fill("Translate 'cat' into Chinese.")
            instruction.press("Control+Enter")  # commits the text (as leaving the box does)
            page.get_by_role("button", name="Generate").click()
            page.get_by_text("generated in").wait_for()
            page.screenshot(path=screenshots / "1-generated.png", full_page=True)

            page.get_by_role("radio", name="Thumbs down").click()
            correction = page.get_by_label("Correct answer: edit the model's answer if it is wrong")
            correction.fill("猫")
            correction.press("Control+Enter")
            page.get_by_role("button", name="Save feedback").click()
            page.get_by_text("saved row").wait_for()
            page.screenshot(path=screenshots / "2-saved.png", full_page=True)

            [logged] = read_jsonl(data / "generations.jsonl")
            [row] = read_jsonl(data / "dataset.jsonl")
            assert {k: row[k] for k in ("instruction", "input", "output", "rating", "corrected")} == {
                "instruction": "Translate 'cat' into Chinese.", "input": "", "output": "猫", "rating": "bad",
                "corrected": True}
            assert read_jsonl(data / "preferences.jsonl")[0]["rejected"] == logged["output"]

            page.get_by_text("Data", exact=True).click()
            page.get_by_role("button", name="Export 1 row (JSONL)").wait_for()
            page.screenshot(path=screenshots / "3-data.png", full_page=True)
            with page.expect_download() as download:
                page.get_by_role("button", name="Export 1 row (JSONL)").click()
            exported = Path(download.value.path()).read_text(encoding="utf-8")
            assert [json.loads(line) for line in exported.splitlines()] == [
                {"instruction": "Translate 'cat' into Chinese.", "input": "", "output": "猫"}]

            second = browser.new_page()  # another session of the same server
            second.goto(url)
            second.get_by_role("button", name="Generate").wait_for()
            second.get_by_label("Instruction").fill("Translate 'dog' into Chinese.")
            second.get_by_label("Instruction").press("Control+Enter")
            second.get_by_role("button", name="Generate").click()
            second.get_by_text("generated in").wait_for()
        finally:
            browser.close()
    assert len(read_jsonl(data / "generations.jsonl")) == 2
    assert log.read_text().count("webui: loaded ") == 1  # one model load for the server, not one per session
