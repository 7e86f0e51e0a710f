"""Merge a LoRA adapter into the base weights and write a complete checkpoint folder.

    python merge_lora.py --lora_path output                    # the demo adapter + embedded model -> output/merged
    python merge_lora.py --model_name_or_path /models/chatglm-6b --lora_path output --output_dir /models/chatglm-6b-tuned

The folder has the official layout: config.json (with auto_map), the weights as safetensors shards with their index,
the three code files and the tokenizer files. It loads with AutoModel.from_pretrained(folder, trust_remote_code=True)
and with our classes, and every script here takes it as --model_name_or_path, no --lora_path needed. Each adapted
weight becomes W + (alpha / r) * B @ A, so the merged model computes what base + adapter computed.
"""

import argparse
import shutil
from pathlib import Path

from configuration_chatglm import ChatGLMConfig
from glm_tune.arguments import add_model_arguments
from glm_tune.atomic import atomic_dir
from glm_tune.checkpoint import AUTO_MAP, CODE_FILES, REPO_ROOT
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_model_and_tokenizer, resolve_model_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, lora_default="output", dtype_choices=["checkpoint", "fp32", "bf16", "fp16"],
                        dtype_help="dtype of the written weights: checkpoint = the base folder's own (fp16 for "
                                   "chatglm-6b)")
    parser.add_argument("--output_dir", default="output/merged", help="the new checkpoint folder (default: "
                                                                      "%(default)s)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors file (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def check_output_dir(output_dir, base, lora_path, overwrite):
    output_dir = output_dir.resolve()
    for name, path in (("--model_name_or_path", base), ("--lora_path", Path(lora_path))):
        path = path.resolve()
        if output_dir == path or output_dir in path.parents:
            raise UserError(f"--output_dir {output_dir}: would overwrite {name} {path}; choose another folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir}: exists and is not empty (pass --overwrite to replace it)")


def save_merged(model, tokenizer, output_dir, max_shard_size):
    """Weights, config and tokenizer written into a temporary folder beside `output_dir`, then renamed into place."""
    with atomic_dir(output_dir) as tmp:
        model.config.auto_map = AUTO_MAP  # AutoModel(..., trust_remote_code=True) finds the code files through it
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        for name in CODE_FILES:  # ours, which run on transformers 5 (the official folder's no longer do)
            shutil.copy2(REPO_ROOT / name, tmp / name)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if not Path(args.lora_path).exists():
        raise UserError(f"--lora_path {args.lora_path}: no such file or folder")
    base = resolve_model_path(args.model_name_or_path, args.revision)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, base, args.lora_path, args.overwrite)
    dtype = ChatGLMConfig.from_pretrained(base).dtype if args.dtype == "checkpoint" else args.dtype
    model, tokenizer = load_model_and_tokenizer(base, args.lora_path, dtype, merge_adapter=True)
    save_merged(model, tokenizer, output_dir, args.max_shard_size)
    print(f"{output_dir}: {args.lora_path} merged into {base} ({str(model.dtype).removeprefix('torch.')}); use it as "
          f"--model_name_or_path {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()
