"""Training data shared by every glm-tune script: read rows, render prompts, tokenize, collate.

A data file is JSONL (one object a line) or one JSON array (Alpaca's alpaca_data.json); the first non-space character
tells which. Its row format is taken from the first valid row (or given), and every row of a file has that format:

    alpaca             {"instruction", "input" (optional), "output"}          Alpaca, BELLE
    input_target       {"input", "target"}
    context_target     {"context", "target"}
    prompt_completion  {"prompt", "completion"}
    conversations      {"conversations": [{"from"|"role", "value"|"content"}, ...]}   ShareGPT style

A tokenized row is ChatGLM's blank-filling layout, the one the model trains and generates with:

    prompt text  [gMASK] <sop>  answer text  <eop>
    `------- seq_len -------'   `---- trained on ---'

Bad rows raise `DataError("data/x.jsonl:17: missing field 'output'")` unless the caller asks to skip and count them.
"""

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk

from glm_tune.errors import UserError
from modeling_chatglm import build_chat_prompt, get_position_ids

# format name -> its fields, as shown in --help and in error messages
FORMATS = {
    "alpaca": "instruction, input (optional), output",
    "input_target": "input, target",
    "context_target": "context, target",
    "prompt_completion": "prompt, completion",
    "conversations": "conversations: [{from|role, value|content}, ...]",
}
# The field whose presence identifies a format, checked in this order ("input" alone is ambiguous: alpaca has one too).
_KEY_FIELDS = (
    ("conversations", "conversations"),
    ("alpaca", "instruction"),
    ("prompt_completion", "prompt"),
    ("context_target", "context"),
    ("input_target", "target"),
)
_PROMPT_TARGET_FIELDS = {
    "input_target": ("input", "target"),
    "context_target": ("context", "target"),
    "prompt_completion": ("prompt", "completion"),
}
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "bot"}
# Typed into data, these would still become ChatGLM's control tokens (they are pieces of ice_text.model) and move
# where the model thinks the prompt ends, so such rows are rejected rather than silently mistrained.
CONTROL_TEXT = ("[gMASK]", "[MASK]", "[sMASK]", "<sop>", "<eop>")


class DataError(UserError):
    """A problem with the user's data, as one line; `reason` is the short name rows are counted under when skipped."""

    def __init__(self, message, reason="bad row"):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------------
# Rows -> (prompt, target)


def detect_format(record):
    """Name of the format `record` is written in, judged by its key field; None if it has none of them."""
    if not isinstance(record, dict):
        return None
    return next((fmt for fmt, key in _KEY_FIELDS if key in record), None)


def json_type(value):
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def text_field(record, name, label=None, optional=False):
    """record[name] as a string, or DataError naming the field (`label` when it sits inside a conversation)."""
    label = label or name
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        if name in record:
            raise DataError(f"field '{label}' must be a string, got null", "wrong type")
        raise DataError(f"missing field '{label}'", "missing field")
    if not isinstance(value, str):
        raise DataError(f"field '{label}' must be a string, got {json_type(value)}", "wrong type")
    try:
        # Undecodable bytes arrive as lone surrogates (the file is read with surrogateescape); so do "\udc80" escapes.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"field '{label}' is not valid UTF-8 text", "invalid UTF-8") from None
    control = next((token for token in CONTROL_TEXT if token in value), None)
    if control:
        raise DataError(f"field '{label}' contains ChatGLM's control token '{control}'", "control token in text")
    return value


def _render_conversation(record):
    """ShareGPT-style turns -> (multi-round chat prompt, last assistant turn, its label).

    Turns alternate user, assistant, user, ...; an optional leading system message is prepended (with a newline) to
    the first user turn. The LAST assistant turn is the target; earlier pairs become the chat history, and a trailing
    unanswered user turn is ignored.
    """
    if "conversations" not in record:
        raise DataError("missing field 'conversations'", "missing field")
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"field 'conversations' must be a list, got {json_type(turns)}", "wrong type")
    system, pairs, user = "", [], None
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object, got {json_type(turn)}", "wrong type")
        role_key = "from" if "from" in turn or "role" not in turn else "role"
        text_key = "value" if "value" in turn or "content" not in turn else "content"
        role = text_field(turn, role_key, f"{where}.{role_key}").strip().lower()
        text = text_field(turn, text_key, f"{where}.{text_key}")
        if role == "system" and i == 0:
            system = text
        elif role in _USER_ROLES and user is None:
            user = text
        elif role in _ASSISTANT_ROLES and user is not None:
            pairs.append((user, text, f"{where}.{text_key}"))
            user = None
        elif role in _USER_ROLES | _ASSISTANT_ROLES | {"system"}:
            expected = "a user" if user is None else "an assistant"
            raise DataError(f"{where}: expected {expected} turn, got '{role}' (turns must alternate)",
                            "bad conversation")
        else:
            raise DataError(f"{where}: unknown role '{role}' (expected human/user, gpt/assistant/bot, or a "
                            "leading system)", "bad conversation")
    if not pairs:
        raise DataError("conversations has no assistant turn", "bad conversation")
    if system:
        first_user, first_answer, first_label = pairs[0]
        pairs[0] = (f"{system}\n{first_user}", first_answer, first_label)
    *history, (query, answer, label) = pairs
    return build_chat_prompt(query, [(q, a) for q, a, _ in history]), answer, label


def render_example(record, fmt):
    """One row -> (prompt text, target text) under the rules of format `fmt` (see the module docstring).

    alpaca renders "Instruction: {instruction}\\nInput: {input}\\nAnswer: " (no Input line when input is empty);
    input/context/prompt are used as they are; conversations become ChatGLM's multi-round chat prompt.
    Raises DataError (without a location: the caller knows it) for a row that cannot be used.
    """
    if fmt == "alpaca":
        instruction = text_field(record, "instruction")
        extra = text_field(record, "input", optional=True)
        target, label = text_field(record, "output"), "output"
        prompt = f"Instruction: {instruction}\n" + (f"Input: {extra}\n" if extra.strip() else "") + "Answer: "
    elif fmt in _PROMPT_TARGET_FIELDS:
        prompt_field, label = _PROMPT_TARGET_FIELDS[fmt]
        prompt, target = text_field(record, prompt_field), text_field(record, label)
    elif fmt == "conversations":
        prompt, target, label = _render_conversation(record)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not target.strip():
        raise DataError(f"empty answer in field '{label}'", "empty answer")
    return prompt, target


# ----------------------------------------------------------------------------------------------------------------------
# Files -> rows


def parse_json(document):
    """json.loads, except that a document nested too deeply for Python's parser (which gives up with RecursionError
    after about a thousand levels, e.g. '[' * 5000) raises JSONDecodeError("nested too deeply") at its deepest point,
    so that every reader reports it as the file:line of bad JSON it is."""
    try:
        return json.loads(document)
    except RecursionError:
        text = document.decode("utf-8", errors="replace") if isinstance(document, bytes) else document
        raise json.JSONDecodeError("nested too deeply", text, _deepest_point(text)) from None


def _deepest_point(text):
    """Offset of the first '[' or '{' at the deepest nesting of `text` (brackets inside strings do not count)."""
    depth = deepest = at = 0
    for token in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        if token.group() in ("[", "{"):
            depth += 1
            if depth > deepest:
                deepest, at = depth, token.start()
        elif token.group() in ("]", "}"):
            depth -= 1
    return at


def parse_rows(path):
    """Yield (location, JSON value or DataError) for every row of a JSONL or JSON-array file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a .json or .jsonl file")
    with open(path, "rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        # surrogateescape keeps undecodable bytes as lone surrogates, so the bad row can be named (item N).
        text = path.read_bytes().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
        try:
            items = parse_json(text)
        except json.JSONDecodeError as err:
            message = f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
            raise DataError(message, "not JSON") from None
        if not isinstance(items, list):  # e.g. "[1] [2]" never parses, but be explicit
            raise DataError(f"{path}: expected a JSON array of rows")
        for number, item in enumerate(items, start=1):
            yield f"item {number}", item
        return
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8", errors="surrogateescape")
            if number == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield str(number), parse_json(line)
            except json.JSONDecodeError as err:
                yield str(number), DataError(f"not JSON ({err.msg}, column {err.colno})", "not JSON")


def render_columns(record, columns):
    """One row under the official ptuning flags: `columns` = (prompt_column, response_column, history_column or
    None) -> (prompt, target); the history, a list of [question, answer] pairs, goes into ChatGLM's [Round i] chat
    prompt (none, or an empty list: the bare prompt, as chat() does)."""
    prompt_column, response_column, history_column = columns
    query, target = text_field(record, prompt_column), text_field(record, response_column)
    history = []
    if history_column:
        if history_column not in record:
            raise DataError(f"missing field '{history_column}'", "missing field")
        turns = record[history_column]
        turns = [] if turns is None else turns
        if not isinstance(turns, list):
            raise DataError(f"field '{history_column}' must be a list of [question, answer] pairs, got "
                            f"{json_type(turns)}", "wrong type")
        for i, turn in enumerate(turns):
            label = f"{history_column}[{i}]"
            if not isinstance(turn, list) or len(turn) != 2:
                raise DataError(f"field '{label}' must be a [question, answer] pair", "bad history")
            history.append(tuple(text_field({"q": q}, "q", label) for q in turn))
    if not target.strip():
        raise DataError(f"empty answer in field '{response_column}'", "empty answer")
    return build_chat_prompt(query, history), target


def read_records(path, fmt="auto", skip_bad_rows=False, columns=None):
    """Read a JSONL / JSON-array file -> (list of (prompt, target), Counter of skipped rows by reason).

    With fmt="auto" the format of the first valid row is the file's format; `columns` (prompt, response, history or
    None: the official ptuning flags) name the fields instead. A bad row raises DataError("path:line: what")
    ("path:item N: what" in a JSON array), or is skipped and counted with skip_bad_rows.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    file_format = None if fmt == "auto" else fmt
    pairs, skipped = [], Counter()
    for where, row in parse_rows(path):
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"row is {json_type(row)}, not an object", "not an object")
            if columns:
                pairs.append(render_columns(row, columns))
                continue
            row_format = file_format or detect_format(row)
            if row_format is None:
                raise DataError(f"cannot tell the row format from fields {sorted(row)}; expected one of: "
                                + "; ".join(f"{name} ({fields})" for name, fields in FORMATS.items()),
                                "unknown format")
            pairs.append(render_example(row, row_format))
            file_format = row_format
        except DataError as err:
            if not skip_bad_rows:
                raise DataError(f"{path}:{where}: {err}", err.reason) from None
            skipped[err.reason] += 1
    if not pairs:
        detail = f" (skipped {sum(skipped.values())} bad rows)" if skipped else ""
        raise DataError(f"{path}: no usable rows{detail}", "no rows")
    return pairs, skipped


# ----------------------------------------------------------------------------------------------------------------------
# (prompt, target) -> token ids


def fit_to_length(prompt_ids, answer_ids, max_seq_length, n_special=2):
    """Cut text ids so that prompt + specials + answer fit in max_seq_length.

    The prompt goes first (its beginning is kept), but never below min(len(prompt), max_seq_length // 4) tokens, so
    that the answer keeps some context; then the answer is cut (losing <eop>) if it still does not fit.
    """
    room = max_seq_length - n_special
    if len(prompt_ids) + len(answer_ids) <= room:
        return prompt_ids, answer_ids
    floor = min(len(prompt_ids), max_seq_length // 4)
    keep_prompt = min(len(prompt_ids), max(floor, room - len(answer_ids)))
    return prompt_ids[:keep_prompt], answer_ids[: room - keep_prompt]


# The official ptuning/main.py's lengths when only one of --max_source_length / --max_target_length is given.
OFFICIAL_SOURCE_TARGET = (1024, 128)


def fit_source_target(prompt_ids, answer_ids, max_source_length, max_target_length):
    """The official ptuning/main.py's cut: the prompt to its first max_source_length - 1 tokens, the answer (whose
    last id is <eop>) to its first max_target_length - 2 text tokens plus <eop>; a row then has at most
    max_source_length + max_target_length tokens with [gMASK] <sop>."""
    text = answer_ids[:-1]
    if len(text) > max_target_length - 2:
        answer_ids = text[: max_target_length - 2] + answer_ids[-1:]
    return prompt_ids[: max_source_length - 1], answer_ids


def _tokenize_batch(batch, tokenizer, max_seq_length, source_target=None):
    out = {"input_ids": [], "seq_len": [], "overlength": []}
    for prompt, target in zip(batch["prompt"], batch["target"]):
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
        if source_target:
            cut_prompt, cut_answer = fit_source_target(prompt_ids, answer_ids, *source_target)
        else:
            cut_prompt, cut_answer = fit_to_length(prompt_ids, answer_ids, max_seq_length,
                                                   tokenizer.num_special_tokens_to_add())
        # The tokenizer's own rule appends [gMASK] <sop>: the same ids as tokenizer.encode(prompt), cut text inside.
        prompt_with_specials = tokenizer.build_inputs_with_special_tokens(cut_prompt)
        out["input_ids"].append(prompt_with_specials + cut_answer)
        out["seq_len"].append(len(prompt_with_specials))
        out["overlength"].append(len(cut_prompt) < len(prompt_ids) or len(cut_answer) < len(answer_ids))
    return out


def _keep_fitting(overlength):
    return [not flag for flag in overlength]


def _row_lengths(dataset):
    # Counted in Arrow: pulling every row's ids into Python lists would cost gigabytes on a 2M-row BELLE set.
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()


def _nearest_rank(sorted_values, percent):
    if not sorted_values:
        return 0
    return sorted_values[max(0, math.ceil(percent / 100 * len(sorted_values)) - 1)]


@dataclass
class DataSummary:
    """What happened to the rows between the file and the training set."""

    rows_in: int
    rows_out: int
    skipped: Counter = field(default_factory=Counter)  # bad rows by reason
    overlength: int = 0  # rows longer than max_seq_length: truncated, or dropped when overlength_dropped
    overlength_dropped: bool = False
    max_seq_length: int | None = None
    length_p50: int = 0  # token lengths of the rows out
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0

    @classmethod
    def from_lengths(cls, lengths, **fields):
        lengths = sorted(lengths)
        return cls(rows_out=len(lengths), length_p50=_nearest_rank(lengths, 50), length_p90=_nearest_rank(lengths, 90),
                   length_p99=_nearest_rank(lengths, 99), length_max=lengths[-1] if lengths else 0, **fields)

    def format(self):
        lines = [f"rows: {self.rows_in} in, {self.rows_out} out"]
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common())
            lines.append(f"skipped bad rows: {sum(self.skipped.values())} ({reasons})")
        if self.max_seq_length is not None:
            action = "dropped" if self.overlength_dropped else "truncated"
            lines.append(f"overlength (> {self.max_seq_length} tokens): {self.overlength} {action}")
        lines.append(f"tokens per row: p50 {self.length_p50}, p90 {self.length_p90}, p99 {self.length_p99}, "
                     f"max {self.length_max}")
        return "\n".join(lines)


_TOKENIZED = Features({"input_ids": List(Value("int32")), "seq_len": Value("int32"), "overlength": Value("bool")})


def tokenize_records(pairs, tokenizer, max_seq_length, skip_overlength=False, num_proc=1, skipped=None,
                     source_target=None):
    """(prompt, target) pairs -> (Dataset with input_ids and seq_len, DataSummary); rows keep their order.

    input_ids = tokenizer.encode(prompt) + answer ids + [eos], cut to max_seq_length by `fit_to_length`, or dropped
    when skip_overlength. seq_len is the prompt length including [gMASK] <sop>. `skipped` (from read_records) only
    goes into the summary, so that it counts the rows of the file. `source_target` = (max_source_length,
    max_target_length) cuts the official ptuning way instead (`fit_source_target`), max_seq_length unused.
    """
    skipped = Counter(skipped or {})
    if max_seq_length < tokenizer.num_special_tokens_to_add() + 1:
        raise ValueError(f"max_seq_length must leave room for at least one answer token, got {max_seq_length}")
    rows = Dataset.from_dict({"prompt": [p for p, _ in pairs], "target": [t for _, t in pairs]})
    tokenized = rows.map(
        _tokenize_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 and len(rows) > 1 else None,
        remove_columns=["prompt", "target"],
        features=_TOKENIZED,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "source_target": source_target},
        desc="Tokenizing",
    )
    overlength = sum(tokenized["overlength"])
    if skip_overlength and overlength:
        tokenized = tokenized.filter(_keep_fitting, input_columns="overlength", batched=True,
                                     desc="Dropping overlength")
    tokenized = tokenized.remove_columns("overlength")
    summary = DataSummary.from_lengths(_row_lengths(tokenized), rows_in=len(pairs) + sum(skipped.values()),
                                       skipped=skipped, overlength=overlength, overlength_dropped=skip_overlength,
                                       max_seq_length=sum(source_target) if source_target else max_seq_length)
    return tokenized, summary


def load_training_data(path, tokenizer, max_seq_length, fmt="auto", skip_bad_rows=False, skip_overlength=False,
                       num_proc=1, columns=None, source_target=None):
    """A training set from `path` -> (Dataset with input_ids and seq_len, DataSummary).

    A folder written by save_to_disk (tokenize_dataset_rows_belle.py) is loaded as saved: its rows were cut when it
    was written, and `max_seq_length` is not applied again. A .json / .jsonl file is read and tokenized now.
    """
    path = Path(path)
    if path.is_dir():
        try:
            dataset = load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path}: not a dataset folder written by save_to_disk") from None
        if isinstance(dataset, DatasetDict):
            if "train" not in dataset:
                raise DataError(f"{path}: dataset has splits {sorted(dataset)} but no 'train'")
            dataset = dataset["train"]
        missing = [column for column in ("input_ids", "seq_len") if column not in dataset.column_names]
        if missing:
            raise DataError(f"{path}: saved dataset lacks column '{missing[0]}'; write it with "
                            "tokenize_dataset_rows_belle.py")
        return dataset, DataSummary.from_lengths(_row_lengths(dataset), rows_in=len(dataset))
    pairs, skipped = read_records(path, fmt, skip_bad_rows, columns)
    return tokenize_records(pairs, tokenizer, max_seq_length, skip_overlength, num_proc, skipped, source_target)


def official_data_options(data_args):
    """(columns, source_target) of a DataArguments' official ptuning flags (each None when not given)."""
    columns = None
    if getattr(data_args, "prompt_column", None):
        columns = (data_args.prompt_column, data_args.response_column, data_args.history_column)
    source, target = getattr(data_args, "max_source_length", None), getattr(data_args, "max_target_length", None)
    source_target = None
    if source is not None or target is not None:
        source_target = (source or OFFICIAL_SOURCE_TARGET[0], target or OFFICIAL_SOURCE_TARGET[1])
    return columns, source_target


def load_train_and_eval(data_args, tokenizer, log=print):
    """(train, eval or None) for a DataArguments: --dataset_path, and --eval_dataset_path or an --eval_split of it.
    Each file's summary (rows, lengths, truncation) goes to `log` (None: silent, e.g. on non-main processes)."""

    def load(path):
        dataset, summary = load_training_data(path, tokenizer, data_args.max_seq_length, data_args.data_format,
                                              data_args.skip_bad_rows, data_args.skip_overlength, data_args.num_proc,
                                              *official_data_options(data_args))
        if log:
            log(f"{path}:\n{summary.format()}")
        return dataset

    train = load(data_args.dataset_path)
    if data_args.eval_dataset_path:
        return train, load(data_args.eval_dataset_path)
    if data_args.eval_split > 0:
        split = train.train_test_split(test_size=data_args.eval_split, seed=0)
        return split["train"], split["test"]
    return train, None


# ----------------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class PrefixLMCollator:
    """Features with `input_ids` and `seq_len` -> a padded batch of torch tensors for ChatGLM training.

    Rows are padded on the RIGHT to the batch's longest (rounded up to `pad_to_multiple_of`), so that a row's
    positions and the model's prefix-LM mask are the ones it has alone; the model builds that mask itself from
    input_ids and attention_mask. labels are input_ids with `label_pad` on the prompt (the first seq_len tokens) and
    on padding. position_ids are GLM's 2D positions, [batch, 2, length].
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    label_pad: int = -100

    def __call__(self, features):
        rows = [torch.as_tensor(feature["input_ids"], dtype=torch.long) for feature in features]
        length = max(len(row) for row in rows)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), self.label_pad, dtype=torch.long)
        for i, (row, feature) in enumerate(zip(rows, features)):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
            labels[i, int(feature["seq_len"]) : len(row)] = row[int(feature["seq_len"]) :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            # the tokenizer carries the bos / mask / gmask ids get_position_ids needs from a config
            "position_ids": get_position_ids(input_ids, self.tokenizer, attention_mask),
        }
