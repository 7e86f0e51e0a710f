"""evaluate.py and glm_tune/metrics.py: the metrics against formulas written out here (not the libraries again),
evaluate.py end to end on the embedded model with an adapter, a killed evaluation resumed without duplicates, bad
input as one line, and finetune.py --predict_with_generate logging the same scores as the saved adapter gets."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jieba
import pytest

import evaluate
from app_helpers import one_line_error
from glm_tune.arguments import DEMO_TEST, DEMO_TRAIN
from glm_tune.data import read_records
from glm_tune.generation import generate_batch
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.metrics import METRICS, row_scores, score

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------------------------------
# The metrics, computed independently


def words(text):
    return [t for t in jieba.cut(text) if t.strip()]


def ngrams(tokens, n):
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def bleu4(hyp, ref):
    """Papineni et al.'s sentence BLEU-4 with NLTK's smoothing method3 (Chen & Cherry 2014, "NIST geometric
    sequence"): the k-th order without a match gets precision 1 / (2^k * its n-gram count, at least 1)."""
    if not hyp or not ref:
        return 0.0
    precisions, k = [], 1
    for n in range(1, 5):
        hyp_counts, ref_counts = Counter(ngrams(hyp, n)), Counter(ngrams(ref, n))
        clipped = sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
        total = max(1, sum(hyp_counts.values()))
        if n == 1 and clipped == 0:
            return 0.0  # nothing matches at all
        if clipped == 0:
            precisions.append(1 / (2**k * total))
            k += 1
        else:
            precisions.append(clipped / total)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(sum(0.25 * math.log(p) for p in precisions))


def f1(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def rouge_n(hyp, ref, n):
    """F of ROUGE-N as rouge_chinese (so the official numbers) counts it: over DISTINCT n-grams (sets)."""
    if not hyp or not ref:
        return 0.0
    h, r = set(ngrams(hyp, n)), set(ngrams(ref, n))
    overlap = len(h & r)
    return f1(overlap / len(h) if h else 0.0, overlap / len(r) if r else 0.0)


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l(hyp, ref):
    if not hyp or not ref:
        return 0.0
    common = lcs(hyp, ref)
    return f1(common / len(hyp), common / len(ref))


def independent(prediction, reference):
    h, r = words(prediction), words(reference)
    return {"bleu-4": 100 * bleu4(h, r), "bleu-4-char": 100 * bleu4(list(prediction), list(reference)),
            "rouge-1": 100 * rouge_n(h, r, 1), "rouge-2": 100 * rouge_n(h, r, 2), "rouge-l": 100 * rouge_l(h, r),
            "exact_match": 100.0 * (prediction.strip() == reference.strip()), "gen_len_chars": len(prediction)}


PAIRS = [
    ("苹果", "苹果"),  # exact match, Chinese
    ("我爱北京天安门", "我爱北京"),
    ("今天天气很好，我们去公园散步吧。", "今天天气不错，我们去公园走走。"),
    ("the cat sat on the mat", "the cat is on the mat"),  # "the" twice: ROUGE-N counts it once
    ("The quick brown fox jumps over the lazy dog.", "A quick brown fox leaps over a lazy dog."),
    ("", "书"),  # empty prediction: 0, no crash
    ("  hello world ", "hello world"),  # exact match after stripping
    ("猫 is a cat", "猫"),  # mixed
    ("狗", "书"),  # nothing in common
]


def test_metrics_equal_the_formulas_on_hand_made_pairs():
    rows = []
    for prediction, reference in PAIRS:
        got, want = row_scores(prediction, reference), independent(prediction, reference)
        assert set(got) == set(METRICS)
        for name in METRICS:
            assert got[name] == pytest.approx(want[name], abs=1e-3), (prediction, reference, name)
        rows.append(want)
    # Hand-computed anchors. "苹果" == "苹果": characters 苹 果 match 2/2 unigrams, 1/1 bigram, and no 3-/4-grams
    # (count 0 -> denominator 1, smoothed to 1/2 and 1/4): BLEU = (1 * 1 * 1/2 * 1/4)^(1/4) = 0.594604; as one
    # jieba word: 1/1, then 1/2, 1/4, 1/8: (1/64)^(1/4) = 0.353553.
    apple = row_scores("苹果", "苹果")
    assert apple["bleu-4-char"] == pytest.approx(59.4604, abs=1e-4)
    assert apple["bleu-4"] == pytest.approx(35.3553, abs=1e-4)
    assert apple["rouge-1"] == apple["rouge-l"] == pytest.approx(100.0, abs=1e-4) and apple["exact_match"] == 100.0
    # the cat sat on the mat / the cat is on the mat: distinct unigrams {the cat sat on mat} vs {the cat is on mat}:
    # 4 of 5 each way -> ROUGE-1 F 0.8; LCS "the cat on the mat" = 5 of 6 -> ROUGE-L F 5/6.
    cat = row_scores("the cat sat on the mat", "the cat is on the mat")
    assert cat["rouge-1"] == pytest.approx(80.0, abs=1e-3) and cat["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    empty = row_scores("", "书")
    assert all(empty[name] == 0 for name in METRICS)
    means = score([p for p, _ in PAIRS], [r for _, r in PAIRS], token_lengths=[3] * len(PAIRS))
    for name in METRICS:
        assert means[name] == pytest.approx(sum(row[name] for row in rows) / len(rows), abs=1e-3)
    assert means["gen_len_tokens"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# evaluate.py

ROWS = [json.loads(line) for line in DEMO_TEST.read_text(encoding="utf-8").splitlines()]
FAST = ["--dtype", "fp32", "--max_new_tokens", "6"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ids = [str(r["id"]) for r in rows]
    assert len(ids) == len(set(ids)), f"repeated ids in {path}"
    return {str(r["id"]): r for r in rows}


@pytest.fixture(scope="module")
def adapter(make_adapter):
    return make_adapter()  # the embedded model's LoRA adapter with random B: it changes the answers


def test_evaluate_reports_the_scores_of_the_adapters_answers(adapter, tmp_path, capsys):
    # ids of both kinds, two row formats in the training layouts (alpaca rendered as training renders it)
    data = write_jsonl(tmp_path / "test.jsonl", [{"id": f"q{i}", **row} for i, row in enumerate(ROWS[:10])])
    out = tmp_path / "eval"
    report = evaluate.main(["--lora_path", str(adapter), "--data", str(data), "--output_dir", str(out),
                            "--batch_size", "4", *FAST])
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    rows = read_rows(out / "predictions.jsonl")
    assert list(rows) == [f"q{i}" for i in range(10)]

    # the answers: what the base model + adapter generates for the rendered prompts, one row at a time
    pairs, _ = read_records(data)
    model, tokenizer = load_model_and_tokenizer(lora_path=adapter, dtype="fp32")
    answers, lengths = zip(*(generate_batch(model, tokenizer, [p], 6) for p, _ in pairs))
    answers, lengths = [a[0] for a in answers], [n[0] for n in lengths]
    assert len(set(answers)) >= 3  # a meaningful check: answers differ between prompts
    for (prompt, reference), answer, n, row in zip(pairs, answers, lengths, rows.values()):
        assert (row["prompt"], row["reference"], row["prediction"], row["gen_len_tokens"]) == (prompt, reference,
                                                                                               answer, n)
        assert {k: row[k] for k in METRICS} == row_scores(answer, reference)
    assert report["rows"] == 10
    assert report["metrics"] == score(answers, [r for _, r in pairs], lengths)
    assert report["settings"]["lora_path"] == str(Path(adapter).resolve()) and report["settings"]["lora_fingerprint"]
    assert "exact_match" in capsys.readouterr().out

    # run again: nothing to generate, the same report; other settings on the same output: refused in one line
    assert evaluate.main(["--lora_path", str(adapter), "--data", str(data), "--output_dir", str(out), *FAST]) == report
    line = one_line_error(capsys, evaluate.main, "--data", data, "--output_dir", out, *FAST)
    assert "settings.json: the predictions beside it were made with lora_path" in line


def test_prompt_and_reference_columns_and_csv(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("id,question,answer\na,Translate 'cat' into Chinese.,猫\nb,What is water in Chinese?,水\n",
                    encoding="utf-8")
    out = tmp_path / "qa.jsonl"
    report = evaluate.main(["--data", str(data), "--prompt_column", "question", "--reference_column", "answer",
                            "--template", "Q: {text}\nA: ", "--output", str(out), *FAST])
    rows = read_rows(out)
    assert [r["prompt"] for r in rows.values()] == ["Q: Translate 'cat' into Chinese.\nA: ",
                                                    "Q: What is water in Chinese?\nA: "]
    assert [r["reference"] for r in rows.values()] == ["猫", "水"]
    assert json.loads((tmp_path / "qa.report.json").read_text(encoding="utf-8")) == report
    assert (tmp_path / "qa.settings.json").is_file()
    # {prompt, response} rows: the response is the reference
    data = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "1+1=", "response": "2"}])
    evaluate.main(["--data", str(data), "--output", str(tmp_path / "pr.jsonl.out.jsonl"), *FAST])
    assert read_rows(tmp_path / "pr.jsonl.out.jsonl")["1"]["reference"] == "2"


def test_killed_evaluation_resumes_without_duplicates(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"id": f"r{i}", **ROWS[i % len(ROWS)]} for i in range(30)])
    argv = ["--data", str(data), "--batch_size", "1", *FAST]
    whole = evaluate.main([*argv, "--output_dir", str(tmp_path / "whole")])

    out = tmp_path / "killed"
    predictions = out / "predictions.jsonl"
    proc = subprocess.Popen([sys.executable, "evaluate.py", *argv, "--output_dir", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if predictions.exists() and predictions.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    written = read_rows(predictions)
    assert 3 <= len(written) < 30, "the evaluation was not interrupted half-way"
    assert not (out / "report.json").exists()
    with open(predictions, "ab") as f:  # a kill during a write leaves a torn row
        f.write(b'{"id": "r29", "prompt": "half a ro')

    resumed = evaluate.main([*argv, "--output_dir", str(out)])
    rows = read_rows(predictions)
    assert sorted(rows) == sorted(f"r{i}" for i in range(30))  # every id exactly once
    assert rows == read_rows(tmp_path / "whole" / "predictions.jsonl")
    assert resumed["rows"] == 30 and resumed["metrics"] == whole["metrics"]
    assert {**resumed, "predictions": None} == {**whole, "predictions": None}


@pytest.mark.parametrize("name, content, argv, message", [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n',
     [], "bad.jsonl:2: not JSON"),
    ("noref.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": ""}\n',
     [], "noref.jsonl:2: no reference: missing field 'output'"),
    ("cols.jsonl", '{"q": "a", "answer": "b"}\n{"q": "c", "reply": "d"}\n',
     ["--prompt_column", "q", "--reference_column", "answer"], "cols.jsonl:2: no field 'answer'"),
    ("cols.csv", "q,reply\nc,d\n", ["--prompt_column", "q"], "cols.csv:2: no reference field"),
    ("empty.jsonl", '{"prompt": "a", "completion": "  "}\n', [], "empty.jsonl:1: empty answer in field 'completion'"),
])
def test_bad_input_stops_with_a_one_line_error(tmp_path, capsys, name, content, argv, message):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    line = one_line_error(capsys, evaluate.main, "--data", data, "--output_dir", tmp_path / "out", *argv)
    assert line.startswith(f"error: {data.parent}/") and message in line, line
    assert not (tmp_path / "out").exists()  # stopped before any output or model


# ----------------------------------------------------------------------------------------------------------------------
# finetune.py --predict_with_generate


def test_finetune_predict_with_generate_logs_the_scores_of_the_saved_adapter(tmp_path):
    # 24 training rows, learnt by heart in 40 steps; eval: 3 of them and 3 held-out rows (some right, some wrong)
    seen = [json.loads(line) for line in DEMO_TRAIN.read_text(encoding="utf-8").splitlines()[:24]]
    train = write_jsonl(tmp_path / "train.jsonl", seen)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [seen[0], ROWS[0], seen[8], ROWS[1], seen[16], ROWS[2]])
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "finetune.py", "--dataset_path", str(train), "--eval_dataset_path", str(held_out),
         "--output_dir", str(out), "--dtype", "fp32", "--lora_target", "all", "--learning_rate", "2e-3",
         "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4", "--max_steps", "40",
         "--max_seq_length", "64", "--eval_strategy", "steps", "--eval_steps", "20", "--save_strategy", "no",
         "--predict_with_generate", "--generation_max_length", "6", "--logging_steps", "20", "--report_to", "none",
         "--disable_tqdm", "true", "--seed", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert [e["step"] for e in evals] == [20, 40]
    for entry in evals:
        assert {f"eval_{name}" for name in [*METRICS, "gen_len_tokens"]} <= set(entry)
    last = evals[-1]
    assert 0 < last["eval_exact_match"] < 100 and last["eval_rouge-1"] > 0  # a meaningful comparison

    # the saved adapter, loaded afresh, answers the eval prompts: the logged scores are those answers' scores
    pairs, _ = read_records(held_out)
    model, tokenizer = load_model_and_tokenizer(lora_path=out, dtype="fp32")
    answers, lengths = [], []
    for start in range(0, len(pairs), 4):
        batch_answers, batch_lengths = generate_batch(model, tokenizer, [p for p, _ in pairs[start : start + 4]], 6)
        answers += batch_answers
        lengths += batch_lengths
    expected = score(answers, [r for _, r in pairs], lengths)
    for name, value in expected.items():
        assert last[f"eval_{name}"] == pytest.approx(value, abs=1e-9), name
