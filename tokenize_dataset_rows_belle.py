"""Tokenize a JSONL / JSON-array training file once and save it for the training scripts (datasets.save_to_disk).

    python tokenize_dataset_rows_belle.py --jsonl_path data/belle.jsonl --save_path data/belle --max_seq_length 512

Row formats, prompt rendering and truncation rules live in glm_tune/data.py, shared with training.
"""

import argparse
from pathlib import Path

from glm_tune.arguments import add_format_argument, add_model_arguments
from glm_tune.atomic import atomic_dir
from glm_tune.data import read_records, tokenize_records
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_tokenizer
from glm_tune.locking import hold_output_lock


def parse_args(argv=None):
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
    add_model_arguments(parser, lora=False, dtype_choices=None)
    parser.add_argument("--num_proc", type=int, default=1, help="processes that tokenize in parallel (default 1)")
    add_format_argument(parser)
    parser.add_argument("--skip_bad_rows", action="store_true",
                        help="skip and count rows that cannot be used instead of stopping at the first one")
    args = parser.parse_args(argv)
    if args.max_seq_length < 3:
        parser.error(f"--max_seq_length must be at least 3 (room for [gMASK] <sop> and one answer token), "
                     f"got {args.max_seq_length}")
    if args.num_proc < 1:
        parser.error(f"--num_proc must be at least 1, got {args.num_proc}")
    return args


def check_save_path(save_path):
    """Only ever replace what this tool writes (or an empty folder), never a folder the user pointed at by mistake."""
    folder = Path(save_path)
    if folder.exists() and not (folder.is_dir() and (
            not any(folder.iterdir()) or (folder / "state.json").exists() or (folder / "dataset_dict.json").exists())):
        raise UserError(f"--save_path {save_path}: exists and is not a saved dataset; refusing to replace it")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    # Held from the first check to the swap: a second run on this --save_path stops at once, naming this one.
    with hold_output_lock(args.save_path, "--save_path"):
        check_save_path(args.save_path)
        tokenizer = load_tokenizer(args.model_name_or_path, args.revision)
        pairs, skipped = read_records(args.jsonl_path, args.data_format, args.skip_bad_rows)
        dataset, summary = tokenize_records(pairs, tokenizer, args.max_seq_length, args.skip_overlength,
                                            args.num_proc, skipped)
        with atomic_dir(args.save_path) as folder:
            dataset.save_to_disk(str(folder))
    print(summary.format())
    print(f"saved {len(dataset)} rows to {args.save_path}")


if __name__ == "__main__":
    main()
