"""DreamBooth LoRA training of Stable Diffusion: teach a pipeline one subject from a few of its images.

    python APP_example/lora_sd/train_lora_sd.py          # the embedded demo: the shipped orange disc, small pipeline
    python APP_example/lora_sd/train_lora_sd.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --resolution 512 --train_batch_size 1 \\
        --gradient_accumulation_steps 1 --learning_rate 1e-4 --max_train_steps 500 --mixed_precision fp16 \\
        --output_dir output/sks_dog
    ... --with_prior_preservation --class_data_dir dogs --class_prompt "a photo of a dog" --num_class_images 200
    torchrun --nproc_per_node=2 APP_example/lora_sd/train_lora_sd.py ...      # several processes (DDP)
    accelerate launch APP_example/lora_sd/train_lora_sd.py ...                  # with your accelerate config

The flags are those of diffusers' examples/dreambooth/train_dreambooth_lora.py, plus --lora_layers,
--validation_steps and the validation image settings. Output in --output_dir: pytorch_lora_weights.safetensors
(diffusers' format: `pipe.load_lora_weights(output_dir)`, or generate.py --lora), loss_curve.png, validation/
(images every --validation_steps and at the end), checkpoint-N/ every --checkpointing_steps (resume with
--resume_from_checkpoint latest), training_state.json and progress.json. One run per --output_dir at a time.
"""

from torch.distributed.elastic.multiprocessing.errors import record

from glm_tune.errors import exit_on_user_error
from glm_tune.sd_lora import main as train_main


@record
@exit_on_user_error
def main(argv=None):
    return train_main(argv, __doc__)


if __name__ == "__main__":
    main()
