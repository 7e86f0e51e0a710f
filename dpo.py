"""DPO of a LoRA adapter on preference pairs (chosen vs rejected answers), with TRL's DPOTrainer.

    python dpo.py                                                  # the embedded demo: synthetic pairs, ~1 minute
    python dpo.py --dataset data/feedback/preferences.jsonl        # the web UI's corrections, as they are
    python dpo.py --model_name_or_path /models/chatglm-6b --lora_path output --dataset data/feedback/preferences.jsonl \
        --beta 0.1 --learning_rate 5e-6 --num_train_epochs 3 --output_dir output-dpo
    torchrun --nproc_per_node=2 dpo.py ...                         # several processes (gloo on CPUs)

Rows: {prompt, chosen, rejected} or {instruction, input, chosen, rejected} (JSONL or a JSON array). With --lora_path
the policy trains a copy of that (SFT) adapter against it frozen; without, a fresh LoRA against the base model. The
output folder holds the policy adapter (PEFT files + chatglm-lora.pt: `python inference.py --lora_path OUT`),
loss_curve.png, rewards_curve.png and, with --eval_dataset, preference_accuracy.json (the held-out pairs whose chosen
answer gets the higher implicit reward, before and after). Every TrainingArguments flag works;
`--resume_from_checkpoint latest` continues an interrupted run.
"""

from glm_tune.dpo import run_dpo
from glm_tune.errors import exit_on_user_error
from glm_tune.runtime import exit_multiprocess_run


@exit_on_user_error
def main(argv=None):
    trainer = run_dpo(argv, __doc__.split("\n\n")[0])
    exit_multiprocess_run()
    return trainer


if __name__ == "__main__":
    main()
