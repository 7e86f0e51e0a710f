"""Tests for glm_tune/data.py and tokenize_dataset_rows_belle.py: formats, truncation, bad rows, CLI, collator."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import load_from_disk

from glm_tune.data import (
    FORMATS,
    DataError,
    PrefixLMCollator,
    detect_format,
    fit_to_length,
    load_training_data,
    read_records,
    render_example,
    tokenize_records,
)
from modeling_chatglm import ChatGLMForConditionalGeneration, get_position_ids
from tokenization_chatglm import ChatGLMTokenizer

ROOT = Path(__file__).resolve().parents[1]

CONVERSATION = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Hi"},
    {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "What is 2+2?"},
    {"from": "gpt", "value": "4"},
    {"from": "human", "value": "unanswered, ignored"},
]}
# (format, record, expected prompt, expected target)
EXAMPLES = [
    ("alpaca", {"instruction": "Add the numbers", "input": "1 2", "output": "3"},
     "Instruction: Add the numbers\nInput: 1 2\nAnswer: ", "3"),
    ("alpaca", {"instruction": "Say hello", "input": "", "output": "Hello!"},
     "Instruction: Say hello\nAnswer: ", "Hello!"),
    ("alpaca", {"instruction": "Say hello", "output": "Hello!"}, "Instruction: Say hello\nAnswer: ", "Hello!"),
    ("input_target", {"input": "The sky is", "target": "blue"}, "The sky is", "blue"),
    ("context_target", {"context": "Q: two plus two\nA:", "target": " four"}, "Q: two plus two\nA:", " four"),
    ("prompt_completion", {"prompt": "Once upon", "completion": "a time"}, "Once upon", "a time"),
    ("conversations", CONVERSATION,
     "[Round 0]\n问：Be brief.\nHi\n答：Hello.\n[Round 1]\n问：What is 2+2?\n答：", "4"),
    ("conversations", {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "Hi", "Yo"),
]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("v1.1")


@pytest.fixture(scope="module")
def tok(checkpoint):
    return ChatGLMTokenizer.from_pretrained(checkpoint)


def write_rows(path, rows, as_array=False):
    """Rows (dicts, or raw str/bytes lines) -> a JSONL file, or a JSON array file."""
    if as_array:
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return path
    path.write_bytes(b"".join(_line(row) + b"\n" for row in rows))
    return path


def _line(row):
    """A JSONL line: dicts as JSON; str and bytes written as they are (to make bad lines)."""
    if isinstance(row, bytes):
        return row
    return (row if isinstance(row, str) else json.dumps(row)).encode()


def expected_ids(tok, prompt, target):
    return tok.encode(prompt) + tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]


# ----- formats -----

@pytest.mark.parametrize("as_array", [False, True], ids=["jsonl", "json-array"])
@pytest.mark.parametrize("fmt, record, prompt, target", EXAMPLES, ids=[f"{e[0]}-{i}" for i, e in enumerate(EXAMPLES)])
def test_each_format_renders_exact_prompt_target_and_ids(tmp_path, tok, as_array, fmt, record, prompt, target):
    path = write_rows(tmp_path / "rows.json", [record, record], as_array)
    pairs, skipped = read_records(path)
    assert pairs == [(prompt, target)] * 2 and not skipped
    assert render_example(record, fmt) == (prompt, target)

    dataset, summary = tokenize_records(pairs, tok, max_seq_length=512)
    row = dataset[0]
    assert row["input_ids"] == expected_ids(tok, prompt, target)
    assert row["seq_len"] == len(tok.encode(prompt))
    assert row["input_ids"][row["seq_len"] - 2 : row["seq_len"]] == [tok.gmask_token_id, tok.bos_token_id]
    assert row["input_ids"][-1] == tok.eos_token_id
    assert (summary.rows_in, summary.rows_out, summary.overlength) == (2, 2, 0)


def test_detect_format_by_key_field():
    assert detect_format({"instruction": "a", "input": "b", "output": "c"}) == "alpaca"
    assert detect_format({"input": "a", "target": "b"}) == "input_target"
    assert detect_format({"context": "a", "target": "b"}) == "context_target"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"conversations": []}) == "conversations"
    assert detect_format({"question": "a", "answer": "b"}) is None
    assert set(FORMATS) == {"alpaca", "input_target", "context_target", "prompt_completion", "conversations"}


def test_first_valid_row_fixes_the_file_format(tmp_path):
    # line 1 is bad, so detection waits for line 2 (input_target); line 3 is then judged as input_target too
    rows = ["oops", {"input": "a", "target": "b"}, {"prompt": "p", "completion": "c"}]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    pairs, skipped = read_records(path, skip_bad_rows=True)
    assert pairs == [("a", "b")]
    assert skipped == Counter({"not JSON": 1, "missing field": 1})
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:1: not JSON (Expecting value, column 1)"
    path.write_text("\n".join(json.dumps(row) for row in rows[1:]) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:2: missing field 'input'"


def test_format_flag_overrides_detection(tmp_path):
    path = write_rows(tmp_path / "both.jsonl", [{"input": "a", "context": "c", "target": "b"}])
    assert read_records(path)[0] == [("c", "b")]  # "context" wins detection
    assert read_records(path, fmt="input_target")[0] == [("a", "b")]
    with pytest.raises(DataError) as err:
        read_records(path, fmt="alpaca")
    assert str(err.value) == f"{path}:1: missing field 'instruction'"
    with pytest.raises(ValueError, match="unknown format 'belle'"):
        read_records(path, fmt="belle")


# ----- truncation -----

def test_fit_to_length_cuts_prompt_first_then_answer():
    prompt, answer = list(range(100, 130)), list(range(200, 204))  # 30 prompt tokens, 4 answer tokens (with eos)
    assert fit_to_length(prompt, answer, 36) == (prompt, answer)  # 30 + 2 specials + 4 fits exactly
    assert fit_to_length(prompt, answer, 20) == (prompt[:14], answer)  # 20 - 2 - 4 = 14 prompt tokens, beginning kept
    long_answer = list(range(200, 230))
    # the prompt keeps its floor of 20 // 4 = 5 tokens; the answer gets the other 13 (its eos is lost)
    assert fit_to_length(prompt, long_answer, 20) == (prompt[:5], long_answer[:13])
    # a prompt already under the floor stays whole
    assert fit_to_length(prompt[:3], long_answer, 20) == (prompt[:3], long_answer[:15])


def test_truncation_keeps_specials_and_counts_overlength(tok):
    long_text = " ".join(f"word{i}" for i in range(60))
    pairs = [(long_text, "short answer"), ("Q", long_text), ("fits", "ok")]
    n, eos, specials = 24, tok.eos_token_id, [tok.gmask_token_id, tok.bos_token_id]
    long_ids = tok.encode(long_text, add_special_tokens=False)
    short_answer = tok.encode("short answer", add_special_tokens=False) + [eos]
    q = tok.encode("Q", add_special_tokens=False)
    assert len(long_ids) > n and len(short_answer) < n - 2 - n // 4 and len(q) < n // 4

    dataset, summary = tokenize_records(pairs, tok, max_seq_length=n)
    keep = n - 2 - len(short_answer)
    assert dataset[0] == {"input_ids": long_ids[:keep] + specials + short_answer, "seq_len": keep + 2}
    assert dataset[1] == {"input_ids": q + specials + long_ids[: n - 2 - len(q)], "seq_len": len(q) + 2}
    assert dataset[2]["input_ids"] == expected_ids(tok, "fits", "ok")
    assert [len(row) for row in dataset["input_ids"]][:2] == [n, n]
    assert (summary.rows_out, summary.overlength, summary.length_max) == (3, 2, n)
    assert "overlength (> 24 tokens): 2 truncated" in summary.format()

    kept, dropped_summary = tokenize_records(pairs, tok, max_seq_length=n, skip_overlength=True)
    assert kept["input_ids"] == [expected_ids(tok, "fits", "ok")]
    assert (dropped_summary.rows_in, dropped_summary.rows_out, dropped_summary.overlength) == (3, 1, 2)
    assert "overlength (> 24 tokens): 2 dropped" in dropped_summary.format()


# ----- bad rows -----

ALPACA_OK = {"instruction": "x", "output": "y"}
CONVERSATION_OK = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
# (reason, good first row, bad second row, message after "file:2: ")
BAD_ROWS = [
    ("not JSON", ALPACA_OK, "not json", "not JSON (Expecting value, column 1)"),
    ("not an object", ALPACA_OK, "[1, 2]", "row is a list, not an object"),
    ("missing field", ALPACA_OK, {"instruction": "x"}, "missing field 'output'"),
    ("wrong type", ALPACA_OK, {"instruction": "x", "output": 3}, "field 'output' must be a string, got a number"),
    ("wrong type", ALPACA_OK, {"instruction": ["x"], "output": "y"},
     "field 'instruction' must be a string, got a list"),
    ("empty answer", ALPACA_OK, {"instruction": "x", "output": " \n"}, "empty answer in field 'output'"),
    ("invalid UTF-8", ALPACA_OK, b'{"instruction": "x", "output": "caf\xe9"}',  # Latin-1, not UTF-8
     "field 'output' is not valid UTF-8 text"),
    ("control token in text", ALPACA_OK, {"instruction": "a <sop> b", "output": "y"},
     "field 'instruction' contains ChatGLM's control token '<sop>'"),
    ("wrong type", CONVERSATION_OK, {"conversations": "hi"}, "field 'conversations' must be a list, got a string"),
    ("wrong type", CONVERSATION_OK, {"conversations": ["hi"]}, "conversations[0] must be an object, got a string"),
    ("missing field", CONVERSATION_OK, {"conversations": [{"from": "human"}]},
     "missing field 'conversations[0].value'"),
    ("bad conversation", CONVERSATION_OK, {"conversations": [{"from": "alien", "value": "q"}]},
     "conversations[0]: unknown role 'alien' (expected human/user, gpt/assistant/bot, or a leading system)"),
    ("bad conversation", CONVERSATION_OK, {"conversations": [{"from": "human", "value": "q"}]},
     "conversations has no assistant turn"),
    ("bad conversation", CONVERSATION_OK,
     {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     "conversations[1]: expected an assistant turn, got 'human' (turns must alternate)"),
    ("empty answer", CONVERSATION_OK,
     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "empty answer in field 'conversations[1].value'"),
]


# A JSON array with a broken item is a broken file, not a bad row: see test_broken_json_array_is_fatal.
BAD_ROW_CASES = [
    pytest.param(as_array, *row, id=f"{'json-array' if as_array else 'jsonl'}-{row[0]}-{i}")
    for i, row in enumerate(BAD_ROWS)
    for as_array in (False, True)
    if not (as_array and row[0] == "not JSON")
]


@pytest.mark.parametrize("as_array, reason, good, bad, message", BAD_ROW_CASES)
def test_bad_row_message_and_count(tmp_path, as_array, reason, good, bad, message):
    path = tmp_path / ("rows.json" if as_array else "rows.jsonl")
    if as_array:
        path.write_bytes(b"[\n" + _line(good) + b",\n" + _line(bad) + b"\n]\n")
    else:
        path.write_bytes(_line(good) + b"\n" + _line(bad) + b"\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    where = "item 2" if as_array else "2"
    assert str(err.value) == f"{path}:{where}: {message}"
    assert err.value.reason == reason

    pairs, skipped = read_records(path, skip_bad_rows=True)
    assert pairs == [render_example(good, detect_format(good))]
    assert skipped == Counter({reason: 1})


def test_skipped_rows_are_summarised_by_reason(tmp_path, tok):
    rows = [ALPACA_OK, *(bad for _, good, bad, _ in BAD_ROWS if good is ALPACA_OK), ALPACA_OK]
    path = write_rows(tmp_path / "many.jsonl", rows)
    dataset, summary = load_training_data(path, tok, 64, skip_bad_rows=True)
    assert len(dataset) == 2
    assert summary.skipped == Counter({"wrong type": 2, "not JSON": 1, "not an object": 1, "missing field": 1,
                                       "empty answer": 1, "invalid UTF-8": 1, "control token in text": 1})
    assert (summary.rows_in, summary.rows_out) == (10, 2)
    assert summary.format().splitlines()[:2] == [
        "rows: 10 in, 2 out",
        "skipped bad rows: 8 (wrong type: 2, not JSON: 1, not an object: 1, missing field: 1, empty answer: 1, "
        "invalid UTF-8: 1, control token in text: 1)",
    ]


def test_unrecognised_first_row_names_the_formats(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:1: cannot tell the row format from fields ['answer', 'question']; expected one of: "
        "alpaca (instruction, input (optional), output); input_target (input, target); context_target (context, "
        "target); prompt_completion (prompt, completion); conversations (conversations: [{from|role, value|content}, "
        "...])"
    )
    assert err.value.reason == "unknown format"


def test_saved_folder_must_hold_tokenized_rows(tmp_path, tok):
    from datasets import Dataset

    Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "raw"))
    with pytest.raises(DataError) as err:
        load_training_data(tmp_path / "raw", tok, 64)
    assert str(err.value) == (f"{tmp_path / 'raw'}: saved dataset lacks column 'input_ids'; write it with "
                              "tokenize_dataset_rows_belle.py")


def test_broken_json_array_is_fatal(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"instruction": "x", "output": "y"},\n{"instruction": \n]\n')
    with pytest.raises(DataError) as err:
        read_records(path, skip_bad_rows=True)
    assert str(err.value) == f"{path}:4: not valid JSON (Expecting value, column 1)"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError) as err:
        read_records(tmp_path / "nope.jsonl")
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: no such file"
    empty = write_rows(tmp_path / "empty.jsonl", ["not json"])
    with pytest.raises(DataError) as err:
        read_records(empty, skip_bad_rows=True)
    assert str(err.value) == f"{empty}: no usable rows (skipped 1 bad rows)"


# ----- the CLI -----

def run_cli(*args):
    command = [sys.executable, str(ROOT / "tokenize_dataset_rows_belle.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_saves_dataset_that_loads_back(tmp_path, tok, checkpoint):
    alpaca_rows = [record for fmt, record, _, _ in EXAMPLES if fmt == "alpaca"][:2]
    data = write_rows(tmp_path / "belle.jsonl", [alpaca_rows[0], "not json", alpaca_rows[1]])
    save = tmp_path / "tokenized"
    save.mkdir()
    (save / "state.json").write_text("{}")  # a previous dataset there is replaced

    result = run_cli("--jsonl_path", data, "--save_path", save, "--max_seq_length", 64,
                     "--model_name_or_path", checkpoint, "--skip_bad_rows")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "rows: 3 in, 2 out",
        "skipped bad rows: 1 (not JSON: 1)",
        "overlength (> 64 tokens): 0 truncated",
        result.stdout.splitlines()[3],  # token-length percentiles, checked below
        f"saved 2 rows to {save}",
    ]
    expected = [
        {"input_ids": expected_ids(tok, prompt, target), "seq_len": len(tok.encode(prompt))}
        for prompt, target in [EXAMPLES[0][2:], EXAMPLES[1][2:]]
    ]
    assert load_from_disk(str(save)).to_list() == expected
    longest = max(len(row["input_ids"]) for row in expected)
    assert result.stdout.splitlines()[3].endswith(f"max {longest}")
    loaded, summary = load_training_data(save, tok, 64)
    assert loaded.to_list() == expected and summary.rows_out == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["belle.jsonl", "tokenized"]  # no temp folders left


def test_cli_bad_file_exits_2_with_one_line(tmp_path, checkpoint):
    data = write_rows(tmp_path / "bad.jsonl", [ALPACA_OK, {"instruction": "x"}])
    result = run_cli("--jsonl_path", data, "--save_path", tmp_path / "out", "--max_seq_length", 64,
                     "--model_name_or_path", checkpoint)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {data}:2: missing field 'output'"
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def run_main(main, argv, capsys):
    """main(argv) in this process -> (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_errors_in_process(tmp_path, checkpoint, capsys):
    from tokenize_dataset_rows_belle import main

    common = ["--max_seq_length", "64", "--model_name_or_path", str(checkpoint)]
    assert run_main(main, ["--jsonl_path", str(tmp_path / "nope.jsonl"), "--save_path", str(tmp_path / "out"),
                           *common], capsys) == (2, f"error: {tmp_path / 'nope.jsonl'}: no such file\n")

    data = write_rows(tmp_path / "ok.jsonl", [ALPACA_OK])
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    args = ["--jsonl_path", str(data), "--save_path", str(tmp_path / "out"), "--max_seq_length", "64"]
    assert run_main(main, [*args, "--model_name_or_path", str(not_a_model)], capsys) == (
        2, f"error: --model_name_or_path {not_a_model}: not a ChatGLM folder (needs config.json and ice_text.model)\n")

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert run_main(main, ["--jsonl_path", str(data), "--save_path", str(precious), *common], capsys) == (
        2, f"error: --save_path {precious}: exists and is not a saved dataset; refusing to replace it\n")
    assert (precious / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.lock").exists()


def test_cli_refuses_a_save_path_another_run_holds(tmp_path, checkpoint, capsys):
    from glm_tune.locking import hold_output_lock, read_holder
    from tokenize_dataset_rows_belle import main

    data = write_rows(tmp_path / "ok.jsonl", [ALPACA_OK])
    save = tmp_path / "tokenized"
    argv = ["--jsonl_path", str(data), "--save_path", str(save), "--max_seq_length", "64",
            "--model_name_or_path", str(checkpoint)]
    with hold_output_lock(save, "--save_path"):  # another run, tokenizing into the same folder
        holder = read_holder(save)
        status, err = run_main(main, argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --save_path {save}: in use by pid {os.getpid()} on {holder['host']} since "
                          f"{holder['started']} (")
    assert not save.exists()
    main(argv)  # once it is gone, the folder is ours
    assert len(load_from_disk(str(save))) == 1


# ----- JSON nested deeper than Python's parser goes -----

DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_OBJECT = '{"a":' * 3000 + "1" + "}" * 3000


@pytest.mark.parametrize("deep", [DEEP_LIST, DEEP_OBJECT], ids=["list", "object"])
def test_a_row_nested_too_deeply_is_a_bad_row(tmp_path, deep):
    path = write_rows(tmp_path / "deep.jsonl", [ALPACA_OK, deep, ALPACA_OK])
    with pytest.raises(DataError) as err:
        read_records(path)
    column = 5000 if deep is DEEP_LIST else 14996  # the innermost '[', or '{"a":{' ... the innermost '{'
    assert str(err.value) == f"{path}:2: not JSON (nested too deeply, column {column})"
    assert read_records(path, skip_bad_rows=True)[1] == Counter({"not JSON": 1})

    array = tmp_path / "deep.json"
    array.write_text(f'[\n{json.dumps(ALPACA_OK)},\n{deep}\n]\n')
    with pytest.raises(DataError) as err:
        read_records(array, skip_bad_rows=True)  # a broken array is a broken file
    assert str(err.value) == f"{array}:3: not valid JSON (nested too deeply, column {column})"


def test_cli_row_nested_too_deeply_exits_2_with_one_line_or_is_skipped(tmp_path, checkpoint):
    data = write_rows(tmp_path / "deep.jsonl", [ALPACA_OK, DEEP_LIST, ALPACA_OK])
    common = ["--save_path", tmp_path / "out", "--max_seq_length", 64, "--model_name_or_path", checkpoint]
    result = run_cli("--jsonl_path", data, *common)
    assert result.returncode == 2
    assert result.stderr == f"error: {data}:2: not JSON (nested too deeply, column 5000)\n"
    assert "Traceback" not in result.stdout and not (tmp_path / "out").exists()

    result = run_cli("--jsonl_path", data, *common, "--skip_bad_rows")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["rows: 3 in, 2 out", "skipped bad rows: 1 (not JSON: 1)"]


def test_every_json_reader_names_a_too_deep_line(tmp_path):
    from glm_tune.batch_inference import ResultFile, read_inputs
    from glm_tune.errors import UserError
    from glm_tune.feedback_store import JsonlTable

    path = write_rows(tmp_path / "in.jsonl", [{"title": "a"}, DEEP_OBJECT])
    with pytest.raises(UserError) as err:  # batch inference inputs
        read_inputs(path, "title", "{text}")
    assert str(err.value) == f"{path}:2: not JSON (nested too deeply, column 14996)"

    rows = read_inputs(write_rows(tmp_path / "ok.jsonl", [{"id": "a", "title": "a"}]), "title", "{text}")
    out = write_rows(tmp_path / "out.jsonl", [{"id": "a", "title": "a", "response": "r"}, DEEP_LIST])
    with pytest.raises(UserError) as err:  # batch inference outputs, read back to resume
        ResultFile(out, "title").finished_ids(rows)
    assert str(err.value) == f"{out}:2: not a JSON row; not an output of this script?"

    table = JsonlTable(write_rows(tmp_path / "dataset.jsonl", [{"id": "x", **ALPACA_OK}, DEEP_LIST]))
    assert [row["id"] for row in table.rows()] == ["x"] and table.bad_lines == 1  # feedback tables


# ----- parallel tokenization -----

def test_num_proc_2_gives_the_same_dataset(tok):
    pairs = [(f"question {i} " * (i % 7 + 1), f"answer {i} " * (i % 3 + 1)) for i in range(40)]
    for skip_overlength in (False, True):
        one, one_summary = tokenize_records(pairs, tok, 24, skip_overlength=skip_overlength, num_proc=1)
        two, two_summary = tokenize_records(pairs, tok, 24, skip_overlength=skip_overlength, num_proc=2)
        assert one.to_list() == two.to_list()
        assert one_summary == two_summary and one_summary.overlength > 0


# ----- the collator -----

@pytest.fixture(scope="module")
def features(tok):
    pairs = [("Add the numbers 1 and 2", "3"), ("Hi", "Hello there, how are you today?"), ("Say yes", "yes")]
    dataset, _ = tokenize_records(pairs, tok, 64)
    return dataset.to_list()


def test_collator_right_pads_and_masks_prompt_labels(tok, features):
    batch = PrefixLMCollator(tok)(features)
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, width), "attention_mask": (3, width), "labels": (3, width), "position_ids": (3, 2, width)}
    assert all(v.dtype == torch.long for v in batch.values())
    for i, (feature, n) in enumerate(zip(features, lengths)):
        ids, prompt = feature["input_ids"], feature["seq_len"]
        pad = width - n
        assert batch["input_ids"][i].tolist() == ids + [tok.pad_token_id] * pad
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * pad
        assert batch["labels"][i].tolist() == [-100] * prompt + ids[prompt:] + [-100] * pad
        alone = get_position_ids(torch.tensor([ids]), tok)[0]
        assert torch.equal(batch["position_ids"][i, :, :n], alone)


def test_collator_pads_to_multiple_of_8(tok, features):
    width = max(len(f["input_ids"]) for f in features)
    batch = PrefixLMCollator(tok, pad_to_multiple_of=8)(features)
    padded = -(-width // 8) * 8
    assert width % 8 != 0 and batch["input_ids"].shape[-1] == padded
    assert (batch["input_ids"][:, width:] == tok.pad_token_id).all()
    assert (batch["labels"][:, width:] == -100).all() and (batch["attention_mask"][:, width:] == 0).all()


def test_batched_loss_equals_each_row_alone(tok, features, checkpoint):
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    collate = PrefixLMCollator(tok, pad_to_multiple_of=8)
    batch = collate(features)
    inputs = ("input_ids", "attention_mask", "position_ids")
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        logits = out.logits
        for i, feature in enumerate(features):
            alone = PrefixLMCollator(tok)([feature])
            alone_logits = model(**{k: alone[k] for k in inputs}, use_cache=False).logits
            batched_loss = F.cross_entropy(logits[i, :-1], batch["labels"][i, 1:], ignore_index=-100)
            alone_loss = F.cross_entropy(alone_logits[0, :-1], alone["labels"][0, 1:], ignore_index=-100)
            assert abs(batched_loss.item() - alone_loss.item()) < 1e-5
    # the model's own loss is the token mean over the same labels
    all_tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert abs(out.loss.item() - all_tokens.item()) < 1e-6
