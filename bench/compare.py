"""Compare this checkout's bench/bench_model.py figures with another revision's, in alternating runs.

On shared or throttled machines the same code can run 30% faster or slower from one minute to the next, so one run
of each side says little. This script exports the baseline revision (git archive) once, then runs the baseline's and
this checkout's own bench_model.py one after the other, --rounds times, each in a fresh process with the same
arguments, and prints every round's figures, the median of each side and the ratio of the medians (now / baseline;
for times and memory, baseline / now: above 1 is better either way).

    python bench/compare.py --rev 0afe021 -- --config mid --dtype bf16 --threads 2 --train
    python bench/compare.py --rev 0afe021 --rounds 5 -- --config mid --dtype bf16 --threads 2 --generate
    python bench/compare.py --baseline /tmp/old-checkout -- --config mid --memory

Arguments after `--` go to both sides' bench_model.py; use flags that the baseline's version also has.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# figure -> True when larger is better
FIGURES = {"train_tokens_per_s": True, "train_step_s": False, "train_step_s_min": False, "peak_memory_gb": False}


def export_revision(rev, into):
    """`git archive REV` unpacked into `into` (a plain tree: no .git, nothing untracked)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=False)
    if archive.returncode:
        sys.exit(f"compare.py: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_side(tree, bench_args):
    """One bench_model.py run of `tree` (its own code on PYTHONPATH); returns its flat figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "res.json"
        cmd = [sys.executable, str(tree / "bench" / "bench_model.py"), *bench_args, "--json", str(out)]
        proc = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
        if proc.returncode or not out.exists():
            sys.exit(f"compare.py: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    figures = {k: res[k] for k in FIGURES if k in res}
    if res.get("train_step_times_s"):  # interference only ever adds time: the fastest step is the steadiest figure
        figures["train_step_s_min"] = min(res["train_step_times_s"])
    for bs, gen in res.get("generate", {}).items():
        figures[f"decode_tokens_per_s_bs{bs}"] = gen["decode_tokens_per_s"]
        figures[f"ttft_s_bs{bs}"] = gen["ttft_s"]
    return figures


def higher_is_better(name):
    return FIGURES.get(name, not name.startswith("ttft"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--rev", help="baseline git revision of this repository (exported with git archive)")
    side.add_argument("--baseline", type=Path, help="baseline: a directory holding another checkout")
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (default 3)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: bench_model.py's arguments")
    args = p.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    with tempfile.TemporaryDirectory(prefix="glm-compare-") as tmp:
        baseline = export_revision(args.rev, Path(tmp)) if args.rev else args.baseline.resolve()
        if not (baseline / "bench" / "bench_model.py").is_file():
            sys.exit(f"compare.py: {baseline}: no bench/bench_model.py there")
        runs = {"baseline": [], "now": []}
        for i in range(args.rounds):
            for name, tree in (("baseline", baseline), ("now", REPO)):
                runs[name].append(run_side(tree, bench_args))
                print(f"round {i + 1} {name:8s} " + "  ".join(f"{k} {v:.4g}" for k, v in runs[name][-1].items()),
                      flush=True)

    names = [k for k in runs["now"][0] if all(k in r for r in runs["baseline"] + runs["now"])]
    print(f"\n{'figure':32s} {'baseline (median)':>18s} {'now (median)':>14s} {'ratio':>8s}")
    for name in names:
        old = statistics.median(r[name] for r in runs["baseline"])
        new = statistics.median(r[name] for r in runs["now"])
        ratio = new / old if higher_is_better(name) else old / new
        print(f"{name:32s} {old:18.4g} {new:14.4g} {ratio:7.2f}x")
    print("ratio: above 1 = this checkout is better (faster, or less memory)")


if __name__ == "__main__":
    main()
