"""The agent's router adapter: the embedded small model taught to pick tools, trained with finetune.py on first use.

The embedded model has random weights: it cannot follow the router prompt, but a LoRA adapter trained on a few
thousand requests -> tool choices learns it in about two minutes on 2 CPU cores. The rows (router_data/train.jsonl,
heldout.jsonl, written by APP_example/chatglm_agent/make_router_data.py) are {"prompt", "completion"}: the prompt is
the agent's own compact router prompt (`glm_tune.agent.router_prompt(request, steps, compact=True)`) and the
completion the router's answer (`工具: name`, or 完成 after a result), so training and the agent ask the same thing.
Each row also carries its request, tool name, tool input and earlier steps, for the evaluation.

    adapter = ensure_router()             # .path = cache_root()/agent-router-<digest>, trained when missing
    evaluate_router(adapter.path)         # held-out tool accuracy, tool-input exact match, "done" accuracy

The cached adapter's name holds a digest of the training data's bytes, the training flags and the base model
folder's name (the embedded model's folder name carries a digest of the code it is built from), so it is retrained
exactly when one of those changes. Training writes into `<name>.partial` and renames it when finetune.py has
succeeded; a lock beside the adapter keeps two processes from training it at once (the second waits, then uses
the first one's adapter).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from glm_tune.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = REPO_ROOT / "APP_example" / "chatglm_agent"
ROUTER_DATA = AGENT_DIR / "router_data"
TRAIN_FILE = ROUTER_DATA / "train.jsonl"
HELDOUT_FILE = ROUTER_DATA / "heldout.jsonl"
FINETUNE = REPO_ROOT / "finetune.py"
# finetune.py's flags for the router. A random small model needs the demo's large learning rate and adapters on every
# linear layer; the rows are short (compact prompts, median 31 tokens), so 400 steps of 16 rows take 100-130 s on 2 CPU
# cores and reach 94% held-out tool accuracy (see APP_example/chatglm_agent/README.md).
ROUTER_TRAIN_ARGS = (
    "--lora_target", "all", "--learning_rate", "2e-3", "--per_device_train_batch_size", "16", "--max_steps", "400",
    "--warmup_steps", "20", "--lr_scheduler_type", "linear", "--max_seq_length", "128", "--logging_steps", "50",
    "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
)
WAIT_FOR_OTHER_TRAINING_S = 30 * 60  # how long a second process waits for the one training the adapter
WAIT_POLL_S = 2.0


# ----------------------------------------------------------------------------------------------------------------------
# the data set


def router_row(request, tool, tool_input=None, steps=()):
    """One training row: the agent's router prompt for `request` (after `steps`) and the answer it should give
    (tool None: done; no tool_input: the tool runs on the request, and the row's tool_input says so)."""
    from glm_tune.agent import router_prompt, router_target

    row = {"prompt": router_prompt(request, steps, compact=True), "completion": router_target(tool, tool_input),
           "request": request, "tool_name": tool, "tool_input": tool_input or (request if tool else "")}
    if steps:
        row["steps"] = [{key: step[key] for key in ("tool", "input", "output")} for step in steps]
    return row


def read_rows(path):
    """The rows of a router data file (JSONL), each with prompt, completion, request, tool_name, tool_input."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such router data file (make one with APP_example/chatglm_agent/"
                        "make_router_data.py)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err})") from None
            missing = [key for key in ("prompt", "completion", "request", "tool_name") if key not in row]
            if missing:
                raise UserError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# training and the cache


def base_model_folder(model_name_or_path=None, revision=None):
    from glm_tune.loading import resolve_model_path

    return resolve_model_path(model_name_or_path, revision)


def router_cache_path(train_file=TRAIN_FILE, train_args=ROUTER_TRAIN_ARGS, base_folder=None, cache_dir=None):
    """cache_dir (default glm_tune.checkpoint.cache_root()) / agent-router-<digest of data bytes, flags and base
    model folder name>."""
    from glm_tune.checkpoint import cache_root

    base_folder = Path(base_folder) if base_folder else base_model_folder()
    digest = hashlib.sha256(Path(train_file).read_bytes())
    digest.update(json.dumps([list(train_args), base_folder.name]).encode())
    return Path(cache_dir or cache_root()) / f"agent-router-{digest.hexdigest()[:12]}"


def is_trained(path):
    path = Path(path)
    return (path / "adapter_config.json").is_file() and any(path.glob("adapter_model.*"))


@dataclass(frozen=True)
class RouterAdapter:
    path: Path
    trained: bool  # True when this call trained it, False when it came from the cache
    seconds: float  # training time (0 from the cache)


def ensure_router(train_file=TRAIN_FILE, model_name_or_path=None, revision=None, cache_dir=None,
                  train_args=ROUTER_TRAIN_ARGS, log=None):
    """The router adapter for this data, flags and base model: from the cache, or trained now with finetune.py
    (a few minutes). `log` gets progress lines (default: stderr)."""
    from glm_tune.locking import OutputLock

    log = log or _stderr
    train_file = Path(train_file)
    if not train_file.is_file():
        raise UserError(f"{train_file}: no such router data file (make one with "
                        "APP_example/chatglm_agent/make_router_data.py)")
    base_folder = base_model_folder(model_name_or_path, revision)
    path = router_cache_path(train_file, train_args, base_folder, cache_dir)
    if is_trained(path):
        return RouterAdapter(path, False, 0.0)
    lock = OutputLock(path, "router adapter")
    _acquire_waiting(lock, log)
    try:
        if is_trained(path):  # another process trained it while this one waited
            return RouterAdapter(path, False, 0.0)
        seconds = train_router(train_file, path, model_name_or_path, revision, train_args, log)
        return RouterAdapter(path, True, seconds)
    finally:
        lock.release()


def _acquire_waiting(lock, log):
    """Take the lock; while another process holds it (training the same adapter), wait for it."""
    deadline = time.monotonic() + WAIT_FOR_OTHER_TRAINING_S
    said = False
    while True:
        try:
            lock.acquire()
            return
        except UserError as err:
            if time.monotonic() > deadline:
                raise
            if not said:
                log(f"router: waiting: {err}")
                said = True
            time.sleep(WAIT_POLL_S)


def train_router(train_file, output, model_name_or_path=None, revision=None, train_args=ROUTER_TRAIN_ARGS,
                 log=None):
    """Run finetune.py on `train_file` into `output`.partial, then rename it to `output`; -> seconds taken. The
    subprocess's output goes to `log` line by line (stdout stays free for the caller's own output)."""
    log = log or _stderr
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    command = [sys.executable, str(FINETUNE), "--dataset_path", str(train_file), "--output_dir", str(partial),
               "--data_format", "prompt_completion", *train_args]
    if model_name_or_path:
        command += ["--model_name_or_path", str(model_name_or_path)]
    if revision:
        command += ["--revision", revision]
    log(f"router: training the tool-choice adapter once (cached in {output}; about 2-3 minutes on 2 CPU cores)")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = []
    for line in process.stdout:
        line = line.rstrip()
        if line and not line.startswith("try it:"):  # finetune.py's hint names the .partial folder
            tail = (tail + [line])[-20:]
            log(f"router: {line}")
    if process.wait() != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"training the router adapter failed (finetune.py exit {process.returncode}): "
                        f"{tail[-1] if tail else 'no output'}")
    if output.exists():
        shutil.rmtree(output)  # an unfinished leftover (is_trained was false)
    os.replace(partial, output)
    seconds = time.perf_counter() - start
    log(f"router: trained in {seconds:.0f} s -> {output}")
    return seconds


def router_adapter(choice="auto", model_name_or_path=None, revision=None, log=None):
    """The router adapter for --router_lora: "auto" = the trained one on the embedded model (trained on first use),
    nothing on a real checkpoint (ChatGLM-6B follows the prompt alone); "none" = nothing; else the path given."""
    if choice == "none" or (choice == "auto" and model_name_or_path is not None):
        return None
    if choice == "auto":
        return ensure_router(log=log).path
    if not Path(choice).exists():
        raise UserError(f"--router_lora {choice}: no such adapter (auto, none, or an adapter folder)")
    return Path(choice)


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# evaluation on held-out requests


def _same_text(a, b):
    return " ".join(unicodedata.normalize("NFKC", a or "").split()) == \
        " ".join(unicodedata.normalize("NFKC", b or "").split())


@dataclass
class RouterScore:
    rows: int  # first-step rows (a tool to choose)
    tool_right: int
    input_right: int
    done_rows: int  # rows with a result already (the answer should be done)
    done_right: int
    per_tool: dict  # tool -> (right, rows)
    mistakes: list  # (request, expected tool, router's answer), a few

    @property
    def tool_accuracy(self):
        return self.tool_right / self.rows if self.rows else 0.0

    @property
    def input_exact_match(self):
        return self.input_right / self.rows if self.rows else 0.0

    @property
    def done_accuracy(self):
        return self.done_right / self.done_rows if self.done_rows else 0.0

    def format(self):
        lines = [f"tool accuracy: {self.tool_right}/{self.rows} = {self.tool_accuracy:.1%}",
                 f"tool input exact match: {self.input_right}/{self.rows} = {self.input_exact_match:.1%}"]
        if self.done_rows:
            lines.append(f"'done' after a result: {self.done_right}/{self.done_rows} = {self.done_accuracy:.1%}")
        lines += [f"  {tool}: {right}/{rows}" for tool, (right, rows) in sorted(self.per_tool.items())]
        lines += [f"  wrong: {request!r} expected {tool}, got {answer!r}" for request, tool, answer in self.mistakes]
        return "\n".join(lines)


def score_answers(rows, answers, keep_mistakes=10):
    """RouterScore of the router's `answers` to `rows`, read with the agent's own parser."""
    from glm_tune.agent import parse_decision
    from glm_tune.agent_tools import TOOL_NAMES

    tool_right = input_right = done_rows = done_right = 0
    per_tool, mistakes = Counter(), []
    totals = Counter()
    for row, answer in zip(rows, answers):
        decision = parse_decision(answer, list(TOOL_NAMES), row["request"], fallback_tool="kb_search")
        expected = row["tool_name"]
        if expected is None:
            done_rows += 1
            done_right += decision.final
            continue
        totals[expected] += 1
        right = decision.tool == expected and not decision.fallback
        tool_right += right
        per_tool[expected] += right
        input_right += right and _same_text(decision.input, row.get("tool_input"))
        if not right and len(mistakes) < keep_mistakes:
            mistakes.append((row["request"], expected, answer))
    return RouterScore(sum(totals.values()), tool_right, input_right, done_rows, done_right,
                       {tool: (per_tool[tool], totals[tool]) for tool in totals}, mistakes)


def row_prompt(row, compact=True):
    """The agent's router prompt for a data row, as the agent asks it now (compact: with a router adapter)."""
    from glm_tune.agent import router_prompt

    return router_prompt(row["request"], row.get("steps", ()), compact=compact)


def evaluate_router(router_dir, heldout_file=HELDOUT_FILE, model_name_or_path=None, revision=None, batch_size=16,
                    max_new_tokens=96):
    """Greedy answers of the base model (+ router adapter) to the held-out requests -> RouterScore. The prompts are
    the agent's: compact with an adapter, with the tool menu without one (a real ChatGLM-6B on the prompt alone)."""
    from glm_tune.generation import generate_answers
    from glm_tune.loading import load_model_and_tokenizer

    rows = read_rows(heldout_file)
    model, tokenizer = load_model_and_tokenizer(model_name_or_path, str(router_dir) if router_dir else None,
                                                revision=revision)
    prompts = [row_prompt(row, compact=router_dir is not None) for row in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    return score_answers(rows, answers)


def eval_main(argv=None, description=None):
    """APP_example/chatglm_agent/eval_router.py: train (or reuse) the router, print its held-out scores."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model_name_or_path", default=None, help="base model (default: the embedded small model)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--router_lora", default="auto",
                        help="auto = train (or reuse) the router on --train_file; none = the prompt alone; or a path "
                             "(default: %(default)s)")
    parser.add_argument("--train_file", default=str(TRAIN_FILE), help="router training rows (default: %(default)s)")
    parser.add_argument("--heldout", default=str(HELDOUT_FILE), help="held-out rows (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.router_lora == "auto":
        adapter = ensure_router(args.train_file, args.model_name_or_path, args.revision)
        router_dir = adapter.path
        how = f"trained in {adapter.seconds:.0f} s" if adapter.trained else "from the cache"
        print(f"router adapter: {router_dir} ({how})")
    else:
        router_dir = None if args.router_lora == "none" else args.router_lora
    start = time.perf_counter()
    score = evaluate_router(router_dir, args.heldout, args.model_name_or_path, args.revision)
    print(score.format())
    print(f"evaluated {score.rows + score.done_rows} held-out rows in {time.perf_counter() - start:.0f} s")
    return score
