"""Evaluate a model (base + LoRA adapter or P-Tuning v2 prefix) on rows with reference answers: generate an answer for
every row, then report BLEU-4, ROUGE-1/2/L, exact match and answer lengths.

    python evaluate.py                                            # the embedded model on data/demo/test.jsonl
    python evaluate.py --lora_path output                         # the demo adapter: writes output/eval/
    python evaluate.py --model_name_or_path /models/chatglm-6b --ptuning_checkpoint ptuning/checkpoint-3000 \\
        --data dev.json --prompt_column content --reference_column summary --output_dir eval/adgen

Metrics (each row scored, x100, then the mean over rows):
  bleu-4       BLEU-4 (NLTK sentence_bleu, smoothing method3) over jieba tokens: Chinese words, and English words
               and punctuation (jieba splits text at spaces too, so mixed text works)
  bleu-4-char  the same BLEU-4 over characters: the figure THUDM's ptuning/main.py reports as "bleu-4", for
               comparison with official numbers
  rouge-1, rouge-2, rouge-l   ROUGE F-scores (rouge_chinese) over the jieba tokens, as THUDM's ptuning/main.py
  exact_match  share of rows whose answer equals the reference, whitespace around aside (inference.py's accuracy)
  gen_len_tokens, gen_len_chars   mean answer length: generated tokens (end token included), characters
An empty answer scores 0 on BLEU and ROUGE.

Output: a per-row JSONL file (id, prompt, reference, prediction, gen_len_tokens and the row's scores) and a JSON report
(the means, the row count, the settings), in --output_dir (predictions.jsonl, report.json, settings.json) or beside
--output FILE.jsonl (FILE.report.json, FILE.settings.json). It is the batch job of chatglm_multi_gpu_inference.py:
rows are generated in batches and appended as they finish, a killed evaluation run again generates only the rows not
yet written, and a second run on the same output stops at once, naming the first. Running again with other settings
(model, adapter, data, generation flags) on the same output stops too, instead of mixing two evaluations.
"""

import argparse
from pathlib import Path

from glm_tune.arguments import DEMO_TEST, REPO_ROOT, add_format_argument, add_model_arguments, add_sampling_arguments
from glm_tune.atomic import write_json
from glm_tune.batch_inference import resolve_template, sampling_kwargs
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.evaluation import (EvalJob, build_report, check_settings, fingerprint, format_report, output_paths,
                                 read_eval_rows, read_predictions, results_file)
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.locking import hold_output_lock


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", default=str(DEMO_TEST),
                        help="rows to evaluate: .jsonl, .json (an array) or .csv with a header (default: "
                             f"{DEMO_TEST.relative_to(REPO_ROOT)}, the demo's 60 held-out rows)")
    add_format_argument(parser)
    parser.add_argument("--prompt_column", default=None,
                        help="the field holding the prompt text, put into --template; without it rows are rendered "
                             "as training renders them (the --data_format formats)")
    parser.add_argument("--template", default="{text}",
                        help="with --prompt_column: the prompt, a text with {text} where the field goes, or a file "
                             "holding one (default: the field as it is)")
    parser.add_argument("--reference_column", default=None,
                        help="the field holding the reference answer (default: the row format's answer: output, "
                             "target or completion, a conversation's last assistant turn; with --prompt_column the "
                             "first of output, target, completion, response)")
    parser.add_argument("--id_column", default="id",
                        help="the field holding each row's id; data without it is numbered from 1 (default: "
                             "%(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--output_dir", default=None,
                       help="folder for predictions.jsonl, report.json and settings.json (default: <--lora_path or "
                            "--ptuning_checkpoint folder>/eval, else output/eval-base); an existing one is resumed")
    where.add_argument("--output", default=None,
                       help="the per-row file FILE.jsonl instead, with FILE.report.json and FILE.settings.json beside "
                            "it; an existing one is resumed")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="most tokens per answer (default: %(default)s)")
    add_sampling_arguments(parser, do_sample=False, extra=True)
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling (default: %(default)s)")
    return parser.parse_args(argv)


def default_output_dir(args):
    adapter = args.lora_path or getattr(args, "ptuning_checkpoint", None)
    if adapter:
        adapter = Path(adapter)
        return (adapter if adapter.is_dir() else adapter.parent) / "eval"
    return Path("output") / "eval-base"


def settings_of(args):
    """What the predictions depend on: recorded beside them, compared on a rerun."""
    def resolved(path):
        return str(Path(path).resolve()) if path else None

    ptuning = getattr(args, "ptuning_checkpoint", None)
    settings = {
        "model_name_or_path": args.model_name_or_path, "revision": args.revision, "dtype": args.dtype,
        "lora_path": resolved(args.lora_path), "lora_fingerprint": fingerprint(args.lora_path),
        "ptuning_checkpoint": resolved(ptuning), "ptuning_fingerprint": fingerprint(ptuning),
        "data": resolved(args.data), "data_fingerprint": fingerprint(args.data), "data_format": args.data_format,
        "prompt_column": args.prompt_column, "template": args.template, "reference_column": args.reference_column,
        "id_column": args.id_column, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
    }
    settings.update(sampling_kwargs(args))
    return settings


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be at least 1")
    for flag, path in (("--lora_path", args.lora_path), ("--ptuning_checkpoint", getattr(args, "ptuning_checkpoint",
                                                                                         None))):
        if path and not Path(path).exists():
            raise UserError(f"{flag} {path}: no such file or folder")
    rows_path, report_path, settings_path = output_paths(args.output, args.output_dir or default_output_dir(args))
    if rows_path.resolve() == Path(args.data).resolve():
        raise UserError(f"--output {args.output}: is the --data file")
    # a bad data file stops here, before any model is loaded
    rows = read_eval_rows(args.data, args.data_format, args.prompt_column, args.reference_column,
                          resolve_template(args.template), args.id_column)
    job = EvalJob(rows, results_file(rows_path), "prompt", args.batch_size, args.max_new_tokens, sampling_kwargs(args),
                  args.seed)
    settings = settings_of(args)
    # A second run on this output stops here, naming this one, instead of generating the same rows again.
    with hold_output_lock(rows_path, "--output" if args.output else "--output_dir"):
        done = job.results.finished_ids(job.rows)
        check_settings(settings_path, settings, bool(done))
        if len(done) < len(rows):
            extra = {"ptuning_checkpoint": args.ptuning_checkpoint} if getattr(args, "ptuning_checkpoint", None) else {}
            model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.lora_path, args.dtype,
                                                        revision=args.revision, pack_for_cpu=True, **extra)
            print(job.run(model, tokenizer, done))
        report = build_report(read_predictions(rows_path, rows), rows_path, settings)
        write_json(report_path, report)
    print(format_report(report))
    print(f"report: {report_path}, per-row: {rows_path}")
    return report


if __name__ == "__main__":
    main()
