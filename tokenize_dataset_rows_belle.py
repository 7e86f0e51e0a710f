"""Tokenize a JSONL / JSON-array training file once and save it for the training scripts (datasets.save_to_disk).

    python tokenize_dataset_rows_belle.py --jsonl_path data/belle.jsonl --save_path data/belle --max_seq_length 512

Row formats, prompt rendering and truncation rules live in glm_tune/data.py, shared with training.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from glm_tune.data import FORMATS, DataError, read_records, tokenize_records
from glm_tune.errors import UserError
from glm_tune.loading import load_tokenizer


def parse_args(argv=None):
    formats = "; ".join(f"{name}: {fields}" for name, fields in FORMATS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsonl_path", required=True,
                        help="input file: JSONL (one object a line) or a JSON array such as alpaca_data.json")
    parser.add_argument("--save_path", required=True,
                        help="output folder (datasets.save_to_disk); an existing saved dataset there is replaced "
                             "only after the new one is written")
    parser.add_argument("--max_seq_length", type=int, required=True,
                        help="most tokens per row, prompt + [gMASK] <sop> + answer + <eop>; longer rows have their "
                             "prompt cut first (down to a quarter of this), then their answer")
    parser.add_argument("--skip_overlength", action="store_true",
                        help="drop rows longer than --max_seq_length instead of truncating them")
    parser.add_argument("--model_name_or_path", default=None,
                        help="ChatGLM checkpoint folder (or hub id) whose tokenizer to use; default: the embedded "
                             "small model")
    parser.add_argument("--num_proc", type=int, default=1, help="processes that tokenize in parallel (default 1)")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help=f"row format; auto takes it from the first valid row. Formats: {formats}")
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="skip and count rows that cannot be used instead of stopping at the first one")
    args = parser.parse_args(argv)
    if args.max_seq_length < 3:
        parser.error(f"--max_seq_length must be at least 3 (room for [gMASK] <sop> and one answer token), "
                     f"got {args.max_seq_length}")
    if args.num_proc < 1:
        parser.error(f"--num_proc must be at least 1, got {args.num_proc}")
    return args


def save_atomically(dataset, save_path):
    """save_to_disk into a sibling temp folder, then swap it in: an interrupted run never leaves a half-written D."""
    save_path = Path(save_path)
    if save_path.exists() and not _replaceable(save_path):
        raise DataError(f"--save_path {save_path}: exists and is not a saved dataset; refusing to replace it")
    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{save_path.name}.tmp-", dir=save_path.parent))
    old = None
    try:
        dataset.save_to_disk(str(tmp))
        if save_path.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{save_path.name}.old-", dir=save_path.parent))
            os.replace(save_path, old / save_path.name)
        os.replace(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not save_path.exists():  # put the previous dataset back
            os.replace(old / save_path.name, save_path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _replaceable(folder):
    # Only ever delete what this tool writes (or an empty folder), never a folder the user pointed at by mistake.
    return folder.is_dir() and (
        not any(folder.iterdir()) or (folder / "state.json").exists() or (folder / "dataset_dict.json").exists()
    )


def main(argv=None):
    args = parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.model_name_or_path)
        pairs, skipped = read_records(args.jsonl_path, args.format, args.skip_bad_rows)
        dataset, summary = tokenize_records(pairs, tokenizer, args.max_seq_length, args.skip_overlength,
                                            args.num_proc, skipped)
        save_atomically(dataset, args.save_path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    print(f"saved {len(dataset)} rows to {args.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
