"""LoRA (or P-Tuning v2) fine-tuning of ChatGLM-6B with transformers' Trainer.

    python finetune.py                      # the embedded demo: small model + demo data, a few minutes on a CPU
    python finetune.py --model_name_or_path /models/chatglm-6b --dataset_path data/alpaca --lora_rank 8 \
        --per_device_train_batch_size 2 --max_steps 2000 --save_steps 1000 --learning_rate 2e-5 --fp16 \
        --output_dir output --report_to wandb
    torchrun --nproc_per_node=2 finetune.py --deepspeed ds_config_zero3.json ...   # several GPUs, DeepSpeed

Every TrainingArguments flag works (`--help` lists them). The output folder holds the PEFT adapter
(adapter_config.json + adapter_model.safetensors), the seed's chatglm-lora.pt, the tokenizer, trainer_state.json and
loss_curve.png. `--resume_from_checkpoint latest` (or a checkpoint folder) continues an interrupted run exactly.
`--pre_seq_len 128 [--prefix_projection]` trains a P-Tuning v2 prefix instead (the base frozen); the output then holds
the official ptuning layout: pytorch_model.bin (transformer.prefix_encoder.* alone) + config.json.
"""

import torch
from transformers import Trainer, TrainerCallback

from glm_tune.arguments import parse_training_args
from glm_tune.data import PrefixLMCollator, load_train_and_eval
from glm_tune.errors import exit_on_user_error
from glm_tune.loading import load_tokenizer
from glm_tune.locking import hold_output_lock
from glm_tune.lora import lora_state_dict
from glm_tune.metrics import with_generation_eval
from glm_tune.ptuning import PtuningTrainer
from glm_tune.runtime import exit_multiprocess_run
from glm_tune.training import load_trainable_model, write_run_outputs


class ClearCacheCallback(TrainerCallback):
    """The seed's habit on GPUs: return cached blocks every 1000 steps and after eval/save (fragmentation)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % 1000 == 0:
            torch.cuda.empty_cache()

    def on_evaluate(self, args, state, control, **kwargs):
        torch.cuda.empty_cache()

    def on_save(self, args, state, control, **kwargs):
        torch.cuda.empty_cache()


@exit_on_user_error
def main(argv=None):
    model_args, data_args, lora_args, train_args, ptuning_args = parse_training_args(argv, __doc__.split("\n\n")[0])
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.revision)
    main_process = train_args.process_index == 0
    # One run per output_dir: a second launch on it stops, naming this one (after the process group is up, so that
    # under torchrun rank 0 alone holds it and a refusal stops every rank).
    with hold_output_lock(train_args.output_dir, "--output_dir"):
        model = load_trainable_model(model_args, lora_args, ptuning_args, train_args,
                                     log=print if main_process else None)

        train_dataset, eval_dataset = load_train_and_eval(data_args, tokenizer, log=print if main_process else None)
        # with_generation_eval: --predict_with_generate adds generated-answer scores to the eval metrics
        trainer = with_generation_eval(PtuningTrainer if ptuning_args.ptuning else Trainer)(
            model=model,
            args=train_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=PrefixLMCollator(tokenizer, pad_to_multiple_of=data_args.pad_to_multiple_of),
            callbacks=[ClearCacheCallback()] if torch.cuda.is_available() else None,
        )
        trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)

        trainer.save_model(train_args.output_dir)  # the PEFT adapter or the prefix checkpoint (main process only)
        trainer.save_state()
        if trainer.is_world_process_zero():
            write_run_outputs(train_args.output_dir, lora_state_dict(model), tokenizer, trainer.state.log_history,
                              model_args, ptuning=ptuning_args.ptuning)
    exit_multiprocess_run()


if __name__ == "__main__":
    main()
