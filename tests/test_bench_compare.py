"""bench/compare.py runs another revision's bench_model.py and this checkout's in alternating rounds and prints
medians and ratios (issue 16's measurements)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_compare_against_head_prints_both_sides_and_their_ratio():
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (git archive exports the other revision)")
    args = ["--config", "small", "--dtype", "fp32", "--threads", "1", "--train", "--steps", "2", "--warmup", "0",
            "--batch_size", "1", "--seq_len", "32"]
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--rev", "HEAD", "--rounds", "2",
                          "--", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert sum(line.startswith("round ") for line in lines) == 4  # 2 rounds x (baseline, now), alternating
    assert [line.split()[2] for line in lines if line.startswith("round ")] == ["baseline", "now"] * 2
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("train_")}
    assert set(rows) == {"train_tokens_per_s", "train_step_s", "train_step_s_min"}
    baseline, now, ratio = rows["train_step_s"]
    assert float(baseline) > 0 and float(now) > 0
    assert ratio.endswith("x") and abs(float(ratio[:-1]) - float(baseline) / float(now)) < 0.02


def test_compare_rejects_an_unknown_revision():
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "compare.py"), "--rev", "no-such-revision", "--",
                          "--config", "small"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "git archive no-such-revision" in out.stderr
    assert "Traceback" not in out.stderr
