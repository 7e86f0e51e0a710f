"""The folder of a resumable staged run (APP_example/auto_poster, APP_example/digital_human): each stage writes its
own files there, and run.json records, per stage, the values it was made from and the sha256 of each file it wrote.

A later run reuses a stage whose files are all there and whose inputs are unchanged, and makes it again otherwise;
a file whose sha256 differs from the record was edited by hand since (the pipelines say so, and use it). An
unreadable run.json is a warning, and every stage is made again.
"""

import json
import tempfile
from pathlib import Path

from glm_tune.atomic import write_json
from glm_tune.errors import UserError, first_line, warn
from glm_tune.sd_generate import file_sha256

RUN_FILE = "run.json"
RUN_VERSION = 1


def prepare_out_dir(out_dir, flag="--out"):
    """`out_dir`, created and checked writable (one-line UserError otherwise)."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot write there ({err.strerror or first_line(err)})") from None
    return path


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: cannot read it as JSON ({first_line(err)}); delete it, or --redo its stage") \
            from None


def plain(value):
    """`value` as it reads back from JSON (tuples become lists), so that recorded and new inputs compare."""
    return json.loads(json.dumps(value, ensure_ascii=False))


class RunFolder:
    """The run folder and its run.json. `files` maps each stage to the files it writes."""

    def __init__(self, out_dir, files):
        self.dir = Path(out_dir)
        self.files = files
        self.records = {}
        path = self.dir / RUN_FILE
        if path.exists():
            try:
                self.records = dict(json.loads(path.read_text(encoding="utf-8"))["stages"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                warn(f"{path}: unreadable ({first_line(err)}), so every stage is made again")

    def path(self, name):
        return self.dir / name

    def reusable(self, stage, inputs):
        record = self.records.get(stage) or {}
        return record.get("inputs") == plain(inputs) and all(self.path(f).is_file() for f in self.files[stage])

    def edited(self, stage):
        """The stage's files that differ from what it wrote (edited by hand since)."""
        written = (self.records.get(stage) or {}).get("sha256", {})
        return [f for f in self.files[stage] if written.get(f) != file_sha256(self.path(f))]

    def made(self, stage, inputs):
        self.records[stage] = {"inputs": plain(inputs),
                               "sha256": {f: file_sha256(self.path(f)) for f in self.files[stage]}}
        write_json(self.path(RUN_FILE), {"version": RUN_VERSION, "stages": self.records})


class ModelIdentities:
    """For a pipeline's settings with ChatGLM's fields (model_name_or_path, revision, lora_path, dtype) and a Stable
    Diffusion pipeline's (pretrained_model_name_or_path, sd_revision, variant, sd_dtype): the models as a stage's
    inputs record them, so that another model makes the stage again."""

    def chatglm_identity(self):
        return {"model_name_or_path": self.model_name_or_path, "revision": self.revision,
                "lora_path": str(Path(self.lora_path).resolve()) if self.lora_path else None, "dtype": self.dtype}

    def pipeline_identity(self):
        return {"pretrained_model_name_or_path": self.pretrained_model_name_or_path, "revision": self.sd_revision,
                "variant": self.variant, "dtype": self.sd_dtype}
