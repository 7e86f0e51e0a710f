"""evaluate.py's job: the batch job of glm_tune/batch_inference.py (ids, batches, resumable output, the output lock)
over rows that carry a reference answer, then the scores of glm_tune/metrics.py over every row.

    data rows ---------------> prompt, reference -----> generate -----> predictions.jsonl -----> report.json
    JSONL / JSON / CSV         as training renders      greedy          one row per id,          means over rows
                               them, or the columns     batches         with its scores

The per-row file is the batch job's resumable output: a killed evaluation, run again, generates only the rows not yet
in it, and the report is computed from the file, so it covers every row once. Beside it, `settings.json` records
what the predictions were made with (model, adapter fingerprint, data, generation flags); a rerun with other settings
stops instead of mixing two evaluations in one file.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from glm_tune.atomic import write_json
from glm_tune.batch_inference import BatchJob, InputRow, ResultFile, read_inputs
from glm_tune.data import FORMATS, DataError, detect_format, parse_json, render_example, text_field
from glm_tune.errors import UserError
from glm_tune.metrics import METRICS, mean_scores, row_scores

# where a training format keeps its answer
TARGET_FIELDS = {"alpaca": "output", "input_target": "target", "context_target": "target",
                 "prompt_completion": "completion"}
# the reference of a row read through --prompt_column, when --reference_column is not given: the first one present
REFERENCE_FIELDS = ("output", "target", "completion", "response")
PREDICTION_FIELD = "prediction"


@dataclass
class EvalRow(InputRow):
    reference: str = ""


def _field(record, name, where, flag):
    if name not in record:
        raise UserError(f"{where}: no field '{name}' (fields: {', '.join(map(str, record)) or 'none'}; name another "
                        f"with {flag})")
    try:
        return text_field(record, name)
    except DataError as err:
        raise UserError(f"{where}: {err}") from None


def eval_row_maker(data_format="auto", prompt_column=None, reference_column=None, template="{text}"):
    """read_inputs' make_row for evaluation rows: (prompt, reference) of each record.

    Without `prompt_column` the row is rendered as training renders it (the format of the first row, or
    `data_format`) and the reference is its answer (output / target / completion, a {prompt, response} row's
    response, a conversation's last assistant turn); with `prompt_column` the prompt is `template` around that field
    and the reference the first of REFERENCE_FIELDS the row has. `reference_column` names the reference field
    either way."""
    state = {"format": None if data_format == "auto" else data_format}

    def make_row(row_id, record, where):
        reference = _field(record, reference_column, where, "--reference_column") if reference_column else None
        if prompt_column:
            text = _field(record, prompt_column, where, "--prompt_column")
            prompt = template.replace("{text}", text)
            if reference is None:
                name = next((n for n in REFERENCE_FIELDS if n in record), None)
                if name is None:
                    raise UserError(f"{where}: no reference field ({' / '.join(REFERENCE_FIELDS)}; fields: "
                                    f"{', '.join(map(str, record)) or 'none'}; name it with --reference_column)")
                reference = _field(record, name, where, "--reference_column")
        else:
            fmt = state["format"] or detect_format(record)
            if fmt is None:
                raise UserError(f"{where}: cannot tell the row format from fields {sorted(map(str, record))}; "
                                "expected one of: " + "; ".join(f"{n} ({f})" for n, f in FORMATS.items())
                                + " (or name the prompt field with --prompt_column)")
            state["format"] = fmt
            target = TARGET_FIELDS.get(fmt)
            if reference is not None and target:
                record = {**record, target: reference}  # the prompt does not depend on it
            elif fmt == "prompt_completion" and target not in record and "response" in record:
                record = {**record, target: record["response"]}
            elif target and target not in record:
                raise UserError(f"{where}: no reference: missing field '{target}' (fields: "
                                f"{', '.join(map(str, record))}; name the reference field with --reference_column)")
            try:
                prompt, answer = render_example(record, fmt)
            except DataError as err:
                raise UserError(f"{where}: {err}") from None
            text, reference = prompt, answer if reference is None else reference
        if not reference.strip():
            raise UserError(f"{where}: the reference is empty")
        return EvalRow(row_id, text, prompt, where, reference)

    return make_row


def read_eval_rows(path, data_format="auto", prompt_column=None, reference_column=None, template="{text}",
                   id_column="id"):
    """Every row of a JSONL / JSON-array / CSV file as an EvalRow; a bad row raises UserError("file:line: ...")."""
    return read_inputs(path, prompt_column, template, id_column,
                       make_row=eval_row_maker(data_format, prompt_column, reference_column, template))


class EvalJob(BatchJob):
    """The batch job whose output rows carry the prompt, reference, prediction, generated tokens and scores."""

    def output_record(self, row, answer, n_tokens):
        return {"id": row.id, "prompt": row.prompt, "reference": row.reference, PREDICTION_FIELD: answer,
                "gen_len_tokens": n_tokens, **row_scores(answer, row.reference)}


def output_paths(output=None, output_dir=None):
    """(per-row JSONL, report JSON, settings JSON): --output FILE.jsonl gives FILE.jsonl, FILE.report.json and
    FILE.settings.json; --output_dir DIR gives DIR/predictions.jsonl, DIR/report.json and DIR/settings.json."""
    if output:
        rows = Path(output)
        if rows.suffix.lower() != ".jsonl":
            raise UserError(f"--output {output}: the per-row file is JSONL: name it *.jsonl")
        stem = rows.with_suffix("")
        return rows, Path(f"{stem}.report.json"), Path(f"{stem}.settings.json")
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file")
    return folder / "predictions.jsonl", folder / "report.json", folder / "settings.json"


def fingerprint(path):
    """sha256 of a file, or of a folder's top-level files (names and contents): what an adapter or data file is."""
    if not path:
        return None
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for file in files:
        if not file.exists():
            return None
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_settings(path, settings, has_rows):
    """Write `settings` to `path` when the per-row file has no rows yet; otherwise they must equal the recorded ones
    (UserError naming the first difference)."""
    path = Path(path)
    if not has_rows or not path.exists():
        write_json(path, settings)
        return
    try:
        recorded = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; delete it and the predictions beside it to start over") from None
    for key in settings:
        if recorded.get(key) != settings[key]:
            raise UserError(f"{path}: the predictions beside it were made with {key} = {recorded.get(key)!r}, this "
                            f"run has {settings[key]!r}; choose another --output_dir / --output, or delete them to "
                            "start over")


def read_predictions(path, rows):
    """The per-row records of `path` in the order of `rows` (every row must be there)."""
    by_id = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = parse_json(line)
        by_id[str(record["id"])] = record
    missing = [row.key for row in rows if row.key not in by_id]
    if missing:
        raise UserError(f"{path}: no prediction for id {missing[0]!r} ({len(missing)} missing)")
    return [by_id[row.key] for row in rows]


def build_report(records, predictions_path, settings):
    """The report: means over rows of the per-row scores (recomputed from prediction and reference), the row count,
    where the rows are, and the settings."""
    scores = [row_scores(r[PREDICTION_FIELD], r["reference"]) for r in records]
    metrics = mean_scores(scores, [r["gen_len_tokens"] for r in records])
    return {"rows": len(records), "metrics": metrics, "predictions": str(predictions_path), "settings": settings}


def format_report(report):
    metrics = report["metrics"]
    names = [*METRICS, "gen_len_tokens"]
    return f"{report['rows']} rows: " + ", ".join(f"{name} {metrics[name]:.2f}" for name in names)


def results_file(path):
    return ResultFile(path, "prompt")
