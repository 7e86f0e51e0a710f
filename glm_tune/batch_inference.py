"""The batch generation job of chatglm_deepspeed_inference.py and chatglm_multi_gpu_inference.py.

    input file ----------------> prompt ----------> generate ----------> output file
    CSV column or JSONL field    --template         left-padded batches   CSV or JSONL: id, the input text, response

Every input row has an id, its --id_column value (or its row number when the input has no such column), and gets
exactly one output row carrying that id. The job is resumable: finished rows are appended a whole batch at a time
(one write, then fsync), and a rerun reads back the ids already in the output and generates only the others. A kill
during a write can leave at most a torn last row; the rerun cuts it off before appending, so no row is lost and none
appears twice. The scripts hold a lock on the output while they run (glm_tune/locking.py): a second run started on it
stops at once, naming the first, instead of generating the same rows again.
"""

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from glm_tune.arguments import add_model_arguments, add_sampling_arguments
from glm_tune.atomic import append_bytes, write_bytes
from glm_tune.data import DataError, json_type, parse_json, parse_rows, text_field
from glm_tune.errors import UserError
from glm_tune.generation import generate_batch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_INPUT = REPO_ROOT / "data" / "demo" / "copywriting.csv"
RESPONSE_FIELD = "response"
# The seed's instruction: one product title rewritten for different audiences, ten lines, JSON out.
TEMPLATES = {
    "copywriting": "你是一名资深营销文案。请把下面的商品标题改写成面向 10 类不同人群的推广文案，每类人群一行，共 10 行。"
                   "只输出 JSON 数组，每个元素形如 {\"人群\": \"…\", \"文案\": \"…\"}。\n商品标题：{text}",
    "plain": "{text}",
}


def add_job_arguments(parser, default_output):
    """The flags both batch scripts share."""
    add_model_arguments(parser, ptuning=True)
    parser.add_argument("--input", default=str(DEMO_INPUT.relative_to(REPO_ROOT)),
                        help="rows to answer: .csv (with a header) or .jsonl / .json (default: %(default)s)")
    parser.add_argument("--output", default=default_output,
                        help="answers, one row per input row: .csv or .jsonl; an existing file is resumed "
                             "(default: %(default)s)")
    parser.add_argument("--column", default="title", help="the CSV column / JSON field holding the text "
                                                          "(default: %(default)s)")
    parser.add_argument("--id_column", default="id",
                        help="the column / field holding each row's id; inputs without it are numbered from 1 "
                             "(default: %(default)s)")
    parser.add_argument("--template", default="copywriting",
                        help="the prompt: a text with {text} where the input goes, a file holding one, or a built-in "
                             f"name ({', '.join(TEMPLATES)}; default: %(default)s, the seed's copywriting instruction)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate() call (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="most tokens per answer (default: %(default)s)")
    add_sampling_arguments(parser, do_sample=False, extra=True)
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling")


# ----------------------------------------------------------------------------------------------------------------------
# Input rows


@dataclass
class InputRow:
    id: object  # the --id_column value as read (JSON keeps numbers), or the row number
    text: str  # the --column value
    prompt: str  # text inside the template
    where: str  # "file:line", for messages

    @property
    def key(self):
        return str(self.id)


def resolve_template(value):
    """A built-in name, a file holding the template, or the template itself; it must contain {text}."""
    template = TEMPLATES.get(value, value)
    if value not in TEMPLATES and "{text}" not in value and Path(value).is_file():
        template = Path(value).read_text(encoding="utf-8")
    if "{text}" not in template:
        raise UserError(f"--template {value!r}: needs {{text}} where the input text goes (or a built-in name: "
                        f"{', '.join(TEMPLATES)}, or a file holding a template)")
    return template


def _csv_records(path):
    """(location, row dict) of every record of a CSV file with a header line."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty file (expected a header line, then rows)")
        start = reader.line_num + 1
        for record in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not record:  # a blank line
                continue
            if len(record) != len(header):
                raise UserError(f"{where}: {len(record)} fields, the header has {len(header)}")
            yield where, dict(zip(header, record))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def _json_records(path):
    try:
        for where, row in parse_rows(path):
            if isinstance(row, DataError):
                raise UserError(f"{path}:{where}: {row}")
            if not isinstance(row, dict):
                raise UserError(f"{path}:{where}: row is {json_type(row)}, not an object")
            yield f"{path}:{where}", row
    except DataError as err:  # no such file, a JSON array that does not parse
        raise UserError(str(err)) from None


def _text_field(row, name, where):
    if name not in row:
        raise UserError(f"{where}: no field '{name}' (fields: {', '.join(map(str, row)) or 'none'}; choose one with "
                        "--column)")
    try:
        value = text_field(row, name)  # a string, valid UTF-8, no control tokens: what training data must be too
    except DataError as err:
        raise UserError(f"{where}: {err}") from None
    if not value.strip():
        raise UserError(f"{where}: field '{name}' is empty")
    return value


def read_inputs(path, column, template, id_column="id", make_row=None):
    """Every row of a CSV / JSONL / JSON-array file as an InputRow; a bad row raises UserError("file:line: ...").

    `make_row(row_id, record, where)` -> an InputRow replaces the --column + --template rule (evaluate.py renders
    prompts and references its own way); ids, their checks and the file formats stay the same."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a .csv, .jsonl or .json file")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise UserError(f"{path}: unknown input format '{suffix}' (expected .csv, .jsonl or .json)")
    records = _csv_records(path) if suffix == ".csv" else _json_records(path)
    rows, seen, has_ids = [], {}, None
    for number, (where, record) in enumerate(records, start=1):
        if has_ids is None:  # the first row decides whether the file carries ids
            has_ids = id_column in record
        if has_ids:
            if id_column not in record:
                raise UserError(f"{where}: no field '{id_column}' (the first row has one: every row needs an id)")
            row_id = record[id_column]
            if isinstance(row_id, bool) or not isinstance(row_id, (str, int)) or str(row_id).strip() == "":
                raise UserError(f"{where}: field '{id_column}' must be a non-empty string or an integer, got "
                                f"{row_id!r}")
        else:
            row_id = number
        if str(row_id) in seen:
            raise UserError(f"{where}: id {row_id!r} appears twice (first at {seen[str(row_id)]})")
        seen[str(row_id)] = where
        if make_row is not None:
            rows.append(make_row(row_id, record, where))
            continue
        text = _text_field(record, column, where)
        rows.append(InputRow(row_id, text, template.replace("{text}", text), where))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# The output file


class ResultFile:
    """A batch job's output: CSV (header id, <column>, response) or JSONL by suffix, appended a batch at a time."""

    def __init__(self, path, column):
        self.path = Path(path)
        self.format = {".csv": "csv", ".jsonl": "jsonl"}.get(self.path.suffix.lower())
        if self.format is None:
            raise UserError(f"--output {path}: unknown output format (expected .csv or .jsonl)")
        if column in ("id", RESPONSE_FIELD):
            raise UserError(f"--column {column}: the output has columns 'id' and '{RESPONSE_FIELD}' of its own; "
                            "rename the input column")
        self.fields = ["id", column, RESPONSE_FIELD]

    def finished_ids(self, input_rows):
        """Ids of the rows already in the file; creates the file (CSV: its header) when there is none, and cuts off a
        torn last row left by a kill during a write."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            write_bytes(self.path, self._encode([]))
            return set()
        data = self.path.read_bytes()
        rows, complete = self._parse_jsonl(data) if self.format == "jsonl" else self._parse_csv(data)
        if complete < len(data):
            print(f"{self.path}: cut off a torn last row ({len(data) - complete} bytes) left by an interrupted run")
            os.truncate(self.path, complete)
        known, done = {row.key for row in input_rows}, set()
        for where, row_id in rows:
            if str(row_id) not in known:
                raise UserError(f"{where}: id {row_id!r} is not in the input: this output belongs to another job "
                                "(choose another --output, or delete it to start over)")
            if str(row_id) in done:
                raise UserError(f"{where}: id {row_id!r} appears twice")
            done.add(str(row_id))
        return done

    def _parse_jsonl(self, data):
        complete = data.rfind(b"\n") + 1  # a last line without its newline is torn
        rows = []
        for number, line in enumerate(data[:complete].split(b"\n")[:-1], start=1):
            where = f"{self.path}:{number}"
            try:
                row = parse_json(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{where}: not a JSON row; not an output of this script?") from None
            if not isinstance(row, dict) or "id" not in row:
                raise UserError(f"{where}: a row without 'id'; not an output of this script?")
            rows.append((where, row["id"]))
        return rows, complete

    def _parse_csv(self, data):
        """Complete records only: a record counts when it parses (strict quoting), has the header's number of fields
        and ends with a newline; the first that does not, and everything after it, is the torn tail."""
        text = data.decode("utf-8", errors="surrogateescape")
        lines = io.StringIO(text, newline="").readlines()
        consumed = [0]

        def tracked():
            for line in lines:
                consumed[0] += len(line)
                yield line

        def ends_a_line():
            return text[consumed[0] - 1] == "\n"

        reader = csv.reader(tracked(), strict=True)
        try:
            header = next(reader)
        except csv.Error:
            header = None
        if header != self.fields:
            raise UserError(f"{self.path}:1: columns {header}, expected {self.fields}: this output belongs to another "
                            "job (choose another --output, or delete it to start over)")
        complete = consumed[0] if ends_a_line() else 0
        rows = []
        try:
            for record in reader:
                if len(record) != len(self.fields) or not ends_a_line():
                    break
                rows.append((f"{self.path}:{reader.line_num}", record[0]))
                complete = consumed[0]
        except csv.Error:  # ends inside a quoted field
            pass
        return rows, len(text[:complete].encode("utf-8", errors="surrogateescape"))

    def _encode(self, rows):
        if self.format == "jsonl":
            return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not rows:
            writer.writerow(self.fields)
        writer.writerows([row[f] for f in self.fields] for row in rows)
        return buffer.getvalue().encode("utf-8")

    def append(self, rows):
        """Rows (dicts with self.fields) added with one write, flushed to disk before returning."""
        append_bytes(self.path, self._encode(rows))


# ----------------------------------------------------------------------------------------------------------------------
# The job


def sampling_kwargs(args):
    """generate() keywords of the add_sampling_arguments(..., do_sample=False, extra=True) flags."""
    kwargs = dict(do_sample=args.do_sample, repetition_penalty=args.repetition_penalty)
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return kwargs


@dataclass
class BatchJob:
    rows: list
    results: ResultFile
    column: str
    batch_size: int = 8
    max_new_tokens: int = 256
    generate_kwargs: dict = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def from_args(cls, args):
        """Everything the flags describe, checked before any model is loaded."""
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise UserError("--batch_size and --max_new_tokens must be at least 1")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UserError(f"--output {args.output}: is the input file")
        results = ResultFile(args.output, args.column)
        rows = read_inputs(args.input, args.column, resolve_template(args.template), args.id_column)
        return cls(rows, results, args.column, args.batch_size, args.max_new_tokens, sampling_kwargs(args), args.seed)

    def output_record(self, row, answer, n_tokens):
        """The output row of one answered input row (`n_tokens`: the new tokens, end token included)."""
        return {"id": row.id, self.column: row.text, RESPONSE_FIELD: answer}

    def run(self, model, tokenizer, done=frozenset(), write=True):
        """Generate the rows whose id is not in `done`; `write` (one process of a tensor-parallel group) appends each
        finished batch to the output and shows progress. Returns a summary line."""
        pending = [row for row in self.rows if row.key not in done]
        torch.manual_seed(self.seed)  # the same on every process: sampled tokens must agree under tensor parallelism
        tokens, seconds = 0, 0.0
        with tqdm(total=len(self.rows), initial=len(self.rows) - len(pending), unit="row", disable=not write,
                  desc="generating") as bar:
            for start in range(0, len(pending), self.batch_size):
                batch = pending[start : start + self.batch_size]
                began = time.perf_counter()
                answers, lengths = generate_batch(model, tokenizer, [row.prompt for row in batch],
                                                  self.max_new_tokens, **self.generate_kwargs)
                seconds += time.perf_counter() - began
                tokens += sum(lengths)
                if write:
                    self.results.append([self.output_record(row, answer, n)
                                         for row, answer, n in zip(batch, answers, lengths)])
                bar.update(len(batch))
                bar.set_postfix_str(f"{tokens / max(seconds, 1e-9):.1f} tokens/s")
        rate = f", {tokens} new tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s" if pending else ""
        return (f"{self.results.path}: {len(pending)} rows generated, {len(self.rows) - len(pending)} already "
                f"there{rate}")
