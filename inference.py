"""Answer prompts with a base model plus a fine-tuned adapter; shows what finetune.py taught the model.

    python inference.py --lora_path output                       # the demo's held-out prompts, with accuracy
    python inference.py --lora_path output --prompt "Translate 'cat' into Chinese."
    python inference.py --model_name_or_path /models/chatglm-6b --lora_path output --input_file data/test.jsonl
    python inference.py --ptuning_checkpoint output/ptuning     # a P-Tuning v2 checkpoint (ours or the official)

Prompts from --input_file are rendered exactly as training rendered them (same formats as finetune.py); when the
rows carry answers, the exact-match accuracy is printed.
"""

import argparse

from glm_tune.arguments import DEMO_TEST, add_compile_argument, add_model_arguments
from glm_tune.data import read_records
from glm_tune.errors import exit_on_user_error
from glm_tune.generation import generate_answers
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.metrics import exact_match


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, ptuning=True)
    add_compile_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a raw prompt (repeatable); used as is")
    parser.add_argument("--input_file", default=None,
                        help=f"JSON/JSONL rows in a training format (default without --prompt: {DEMO_TEST.name} of "
                             "the demo data)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="most tokens per answer")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.lora_path, args.dtype,
                                                revision=args.revision, ptuning_checkpoint=args.ptuning_checkpoint,
                                                pack_for_cpu=True, compile_decoding=args.compile_decoding)
    if args.prompt:
        pairs = [(p, None) for p in args.prompt]
    else:
        pairs, _ = read_records(args.input_file or DEMO_TEST)
    answers = generate_answers(model, tokenizer, [p for p, _ in pairs], args.max_new_tokens, args.batch_size)
    right = 0
    for (prompt, expected), answer in zip(pairs, answers):
        correct = expected is not None and exact_match(answer, expected)
        mark = "" if expected is None else ("  ✓" if correct else f"  ✗ (expected {expected!r})")
        right += correct
        print(f"{prompt.strip()!r} -> {answer!r}{mark}")
    scored = sum(expected is not None for _, expected in pairs)
    if scored:
        print(f"exact match: {right}/{scored} = {right / scored:.1%}")
    return right, scored


if __name__ == "__main__":
    main()
