"""Batch generation with DeepSpeed: one prompt per row of a CSV / JSONL file, the answers into a CSV / JSONL file.

    deepspeed --num_gpus 2 chatglm_deepspeed_inference.py      # the demo: data/demo/copywriting.csv, 2 ranks (CPU too)
    python chatglm_deepspeed_inference.py --input titles.jsonl --column title --output output/copy.jsonl
    deepspeed --num_gpus 4 chatglm_deepspeed_inference.py --model_name_or_path /models/chatglm-6b --lora_path output \\
        --input data/products.csv --column title --output output/copy.csv --batch_size 16

Each row's text goes into --template (default: the seed's copywriting instruction). Launched with N ranks, the model
is split over them by DeepSpeed tensor parallelism (AutoTP, see glm_tune/deepspeed_inference.py); with plain python
it runs in one process, under DeepSpeed when it is installed and in plain PyTorch when not (or with --no_deepspeed).
An adapter is merged into the weights first. Greedy batches give every row the tokens it gets alone (left padding).
The output is resumable: rerun the same command after an interruption and it continues where it stopped.
"""

import argparse
import os
import sys

import torch

from glm_tune.batch_inference import BatchJob, add_job_arguments
from glm_tune.deepspeed_inference import (
    deepspeed_installed, describe_split, init_inference, launcher_world_size, setup_distributed)
from glm_tune.errors import UserError, exit_on_user_error
from glm_tune.loading import load_model_and_tokenizer
from glm_tune.locking import hold_output_lock, run_on_rank0
from glm_tune.runtime import exit_multiprocess_run, finish_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, default_output="output/copywriting_deepspeed.csv")
    parser.add_argument("--kernel_inject", choices=["auto", "on", "off"], default="auto",
                        help="DeepSpeed's fused CUDA kernels: auto = where CUDA and a DeepSpeed policy for the model "
                             "exist (none exists for ChatGLM-6B, so auto means tensor parallelism without them)")
    parser.add_argument("--no_deepspeed", action="store_true",
                        help="plain PyTorch in one process (what happens anyway when DeepSpeed is not installed)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    job = BatchJob.from_args(args)  # a bad input file stops here, before any model is loaded
    use_deepspeed = not args.no_deepspeed and deepspeed_installed()
    if launcher_world_size() > 1 and not use_deepspeed:
        raise UserError("started with several ranks, but tensor parallelism needs DeepSpeed "
                        f"({'--no_deepspeed given' if args.no_deepspeed else 'not installed'}); run with python")
    rank, world = setup_distributed()
    try:
        # Rank 0 alone holds the output's lock and reads and writes the output; a second run on it, or an output of
        # another job, stops every rank (with plain python: the one process) instead of leaving the others waiting.
        with hold_output_lock(args.output):
            done = run_on_rank0(lambda: job.results.finished_ids(job.rows))
            if args.ptuning_checkpoint and world > 1:
                raise UserError(f"--ptuning_checkpoint with {world} ranks: DeepSpeed's tensor parallelism does not "
                                "split the P-Tuning prefix over the ranks; run one rank (python "
                                "chatglm_deepspeed_inference.py ...)")
            model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, args.lora_path, args.dtype,
                                                        merge_adapter=True, revision=args.revision,
                                                        ptuning_checkpoint=args.ptuning_checkpoint)
            if use_deepspeed:
                model = init_inference(model, args.kernel_inject)
                if world > 1 and rank == 0:
                    print(f"DeepSpeed tensor parallelism over {world} ranks: rank 0 holds {describe_split(model)}")
            elif torch.cuda.is_available():
                model = model.cuda()
            summary = job.run(model, tokenizer, done, write=rank == 0)
    except UserError:
        finish_distributed()  # every rank has the error: they leave together
        if rank == 0:
            raise
        sys.exit(2)  # rank 0 tells the user
    if rank == 0:
        print(summary)
    exit_multiprocess_run()


if __name__ == "__main__":
    main()
