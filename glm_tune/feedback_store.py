"""Human feedback collected by the web UI, kept as JSONL files that many server sessions write at once.

A data folder (`--data_dir`) holds three tables, one JSON object a line:

    dataset.jsonl      {"instruction", "input", "output", ...}   approved answers: a training file as it is
    preferences.jsonl  {"prompt", "chosen", "rejected", ...}     corrected answers: (chosen = the correction,
                                                                  rejected = the model's answer), for DPO-style training
    generations.jsonl  {"time", "seconds", "settings", "instruction", "input", "output", ...}   every generation

Every row carries an "id". dataset.jsonl rows are Alpaca rows: the extra fields (id, rating, time, model, ...) are
ignored by glm_tune.data, so `finetune.py --dataset_path data/feedback/dataset.jsonl` trains on the file directly.

Durability: every write holds a lock file beside the table (`dataset.jsonl.lock`). An append writes one whole line and
fsyncs it; an edit or a delete writes the whole new table beside the old one and renames it over (glm_tune.atomic), so
a reader sees the old table or the new one, never half of either, and no concurrent append is lost in between.
"""

import json
import os
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from glm_tune.atomic import append_bytes, write_bytes
from glm_tune.data import parse_json, render_example
from glm_tune.errors import UserError

LOCK_TIMEOUT_S = 30
RATINGS = ("good", "bad")


def now_iso():
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def new_id():
    return uuid.uuid4().hex[:12]


class JsonlTable:
    """One JSONL file whose rows have an "id": append, read, update and delete them under a file lock.

    A line that is not a JSON object (a row a crashed writer cut short, a hand edit gone wrong) is never dropped:
    reads skip it and count it in `bad_lines`, rewrites keep it as it was.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = FileLock(f"{self.path}.lock", timeout=LOCK_TIMEOUT_S)
        self.bad_lines = 0

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise UserError(f"{self.path}: still locked by another writer after {LOCK_TIMEOUT_S} s") from None
        try:
            yield
        finally:
            self._lock.release()

    def _read_lines(self):
        """[(raw line, row or None)] of the whole file, read under the lock by the caller."""
        if not self.path.exists():
            return []
        lines = []
        for raw in self.path.read_bytes().splitlines(keepends=False):
            if not raw.strip():
                continue
            try:
                row = parse_json(raw)  # nested too deeply counts as bad too
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            lines.append((raw, row if isinstance(row, dict) else None))
        return lines

    def _rewrite(self, lines):
        write_bytes(self.path, b"".join((raw if row is None else _encode(row)) + b"\n" for raw, row in lines))

    def rows(self):
        """Every valid row, in file order."""
        with self._locked():
            lines = self._read_lines()
        self.bad_lines = sum(row is None for _, row in lines)
        return [row for _, row in lines if row is not None]

    def append(self, row):
        """Add `row` (an "id" is given to it when it has none); returns the row as written."""
        row = {"id": new_id(), **row}
        line = _encode(row) + b"\n"
        with self._locked():
            if self.path.exists() and self.path.stat().st_size:
                with open(self.path, "rb") as last:
                    last.seek(-1, os.SEEK_END)
                    if last.read(1) != b"\n":  # a writer that died mid-line: keep its fragment on a line of its own
                        line = b"\n" + line
            append_bytes(self.path, line)
        return row

    def update(self, row_id, changes, prepare=None):
        """Set `changes` on the row with id `row_id`; returns the new row. `prepare(new_row)`, called under the lock,
        may fill in derived fields, or raise UserError to refuse the edit."""
        with self._locked():
            lines = self._read_lines()
            index = self._find(lines, row_id)
            row = {**lines[index][1], **changes, "edited": now_iso()}
            if prepare:
                prepare(row)
            lines[index] = (None, row)
            self._rewrite(lines)
        return row

    def delete(self, row_id):
        with self._locked():
            lines = self._read_lines()
            del lines[self._find(lines, row_id)]
            self._rewrite(lines)

    def _find(self, lines, row_id):
        for index, (_, row) in enumerate(lines):
            if row is not None and row.get("id") == row_id:
                return index
        raise UserError(f"{self.path}: no row with id {row_id} (deleted by another session?)")


def _encode(row):
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


def to_jsonl(rows, fields):
    """`rows` as JSONL text with only `fields` (in that order): what the data page exports."""
    return "".join(json.dumps({name: row.get(name) for name in fields}, ensure_ascii=False) + "\n" for row in rows)


def training_prompt(instruction, input_text=""):
    """The prompt an Alpaca row {instruction, input} trains with, rendered by glm_tune.data itself, so the page asks
    the model exactly what a saved row will teach it. Raises DataError for text that training would reject."""
    prompt, _ = render_example({"instruction": instruction, "input": input_text, "output": "-"}, "alpaca")
    return prompt


def check_training_row(row):
    """Raise UserError unless `row` is an Alpaca row that glm_tune.data (finetune.py, tokenize_dataset_rows_belle.py)
    accepts."""
    if not str(row.get("instruction", "")).strip():
        raise UserError("the instruction is empty")
    try:
        render_example(row, "alpaca")
    except UserError as err:
        raise UserError(f"not a usable training row: {err}") from None


def check_preference_row(row):
    check_training_row({"instruction": row.get("instruction"), "input": row.get("input"), "output": row.get("chosen")})
    if row.get("chosen") == row.get("rejected"):
        raise UserError("the chosen and the rejected answer are the same")


class FeedbackStore:
    """The three tables of a data folder, and the rule that turns one rated / corrected answer into rows."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        self.dataset = JsonlTable(self.data_dir / "dataset.jsonl")
        self.preferences = JsonlTable(self.data_dir / "preferences.jsonl")
        self.generations = JsonlTable(self.data_dir / "generations.jsonl")

    def log_generation(self, instruction, input_text, output, seconds, settings, model, adapter):
        return self.generations.append({
            "time": now_iso(), "seconds": round(seconds, 3), "settings": settings, "instruction": instruction,
            "input": input_text, "output": output, "model": model, "adapter": adapter,
        })

    def save_feedback(self, generation, answer, rating):
        """Keep the human's verdict on `generation` (a row of generations.jsonl) -> (dataset row, preference row).

        `answer` is the answer as the human left it, `rating` "good", "bad" or None. An unchanged answer is saved
        when rated good; a changed one is saved as the correct answer, and the (correction, model answer) pair goes to
        preferences.jsonl. An answer rated bad and not corrected teaches nothing and is refused.
        """
        if rating not in (*RATINGS, None):
            raise UserError(f"rating must be one of {RATINGS} or none, got {rating!r}")
        model_answer = generation["output"]
        corrected = answer.strip() != model_answer.strip()
        if not corrected and rating != "good":
            raise UserError("rated bad: edit the answer into the correct one before saving" if rating == "bad"
                            else "rate the answer, or edit it into the correct one, before saving")
        common = {"instruction": generation["instruction"], "input": generation["input"]}
        meta = {"rating": rating, "corrected": corrected, "time": now_iso(), "generation_id": generation["id"],
                "model": generation.get("model"), "adapter": generation.get("adapter")}
        row = {**common, "output": answer.strip(), **meta}
        check_training_row(row)
        row = self.dataset.append(row)
        pair = None
        if corrected:  # the same id links the pair to its training row
            prompt = training_prompt(row["instruction"], row["input"])
            pair = self.preferences.append({"id": row["id"], "prompt": prompt, **common, "chosen": row["output"],
                                            "rejected": model_answer, **meta})
        return row, pair

    def edit(self, table, row_id, changes):
        """Change fields of a dataset or preferences row, refusing edits that would make it unusable for training."""
        if table is self.dataset:
            return table.update(row_id, changes, prepare=check_training_row)
        if table is self.preferences:
            def prepare(row):
                check_preference_row(row)
                row["prompt"] = training_prompt(row["instruction"], row["input"])
            return table.update(row_id, changes, prepare=prepare)
        raise UserError(f"{table.path.name} is a log; its rows cannot be edited")
