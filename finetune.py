"""LoRA fine-tuning of ChatGLM-6B with transformers' Trainer.

    python finetune.py                      # the embedded demo: small model + demo data, a few minutes on a CPU
    python finetune.py --model_name_or_path /models/chatglm-6b --dataset_path data/alpaca --lora_rank 8 \
        --per_device_train_batch_size 2 --max_steps 2000 --save_steps 1000 --learning_rate 2e-5 --fp16 \
        --output_dir output --report_to wandb
    torchrun --nproc_per_node=2 finetune.py --deepspeed ds_config_zero3.json ...   # several GPUs, DeepSpeed

Every TrainingArguments flag works (`--help` lists them). The output folder holds the PEFT adapter
(adapter_config.json + adapter_model.safetensors), the seed's chatglm-lora.pt, the tokenizer, trainer_state.json and
loss_curve.png. `--resume_from_checkpoint latest` (or a checkpoint folder) continues an interrupted run exactly.
"""

import torch
from transformers import Trainer, TrainerCallback, set_seed

from glm_tune.arguments import parse_training_args
from glm_tune.data import PrefixLMCollator, load_train_and_eval
from glm_tune.errors import exit_on_user_error
from glm_tune.loading import load_model, load_tokenizer
from glm_tune.lora import SEED_FILE, add_lora, load_lora_pt, save_lora_pt
from glm_tune.plotting import plot_loss_curve


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
    model_args, data_args, lora_args, train_args = parse_training_args(argv, __doc__.split("\n\n")[0])
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    model = load_model(model_args.model_name_or_path, model_args.dtype)
    model.config.use_cache = False  # no KV cache while training
    set_seed(train_args.seed)  # before the adapters are created: their initial values must repeat too
    model = add_lora(model, lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target)
    if lora_args.is_resume:
        print(f"loaded {load_lora_pt(model, lora_args.resume_path)} LoRA tensors from {lora_args.resume_path}")
    model.print_trainable_parameters()

    train_dataset, eval_dataset = load_train_and_eval(data_args, tokenizer,
                                                      log=print if train_args.process_index == 0 else None)
    trainer = Trainer(
        model=model,
        args=train_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PrefixLMCollator(tokenizer, pad_to_multiple_of=data_args.pad_to_multiple_of),
        callbacks=[ClearCacheCallback()] if torch.cuda.is_available() else None,
    )
    trainer.train(resume_from_checkpoint=train_args.resume_from_checkpoint)

    out = train_args.output_dir
    trainer.save_model(out)  # the PEFT adapter (main process only)
    trainer.save_state()
    if trainer.is_world_process_zero():
        save_lora_pt(model, f"{out}/{SEED_FILE}")
        tokenizer.save_pretrained(out)
        plot = plot_loss_curve(trainer.state.log_history, f"{out}/loss_curve.png")
        base = f" --model_name_or_path {model_args.model_name_or_path}" if model_args.model_name_or_path else ""
        print(f"saved the adapter to {out}/ (loss curve: {plot})")
        print(f"try it: python inference.py --lora_path {out}{base}")


if __name__ == "__main__":
    main()
