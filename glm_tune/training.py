"""What both training scripts do around their loops: the base model with LoRA adapters (or, with --method ptuning, a
P-Tuning v2 prefix encoder) at the start, and the outputs a run leaves at the end (adapter and chatglm-lora.pt, or the
prefix checkpoint; tokenizer, loss plot, the line that says how to try it)."""

from pathlib import Path

from transformers import set_seed

from glm_tune.loading import load_model
from glm_tune.lora import SEED_FILE, add_lora, load_lora_pt, save_lora_pt
from glm_tune.plotting import plot_loss_curve
from glm_tune.ptuning import describe_trainable, ptuning_overrides, setup_ptuning


def load_trainable_model(model_args, lora_args, ptuning_args, train_args, log=print):
    """The model a training run trains: LoRA adapters on the base (load_lora_model), or with --method ptuning the base
    with a fresh prefix encoder (load_ptuning_model)."""
    if ptuning_args.ptuning:
        return load_ptuning_model(model_args, ptuning_args, train_args, log)
    return load_lora_model(model_args, lora_args, train_args, log)


def load_base_for_training(model_args, train_args, config_overrides=None, seed_first=False):
    """The base model set up for training: no KV cache, gradient checkpointing when asked, and the seed set (before
    loading with seed_first, when the load itself makes new parameters, else after), so that whatever is made next
    (adapters, a prefix encoder) starts from the same values every run."""
    if seed_first:
        set_seed(train_args.seed)
    model = load_model(model_args.model_name_or_path, model_args.dtype, revision=model_args.revision,
                       config_overrides=config_overrides)
    model.config.use_cache = False
    if train_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not seed_first:
        set_seed(train_args.seed)
    return model


def load_ptuning_model(model_args, ptuning_args, train_args, log=print):
    """The base model with pre_seq_len / prefix_projection set: frozen but for transformer.prefix_encoder (fp32, its
    initial values from --seed), set up for training like load_lora_model. No PEFT."""
    overrides = ptuning_overrides(ptuning_args.pre_seq_len, ptuning_args.prefix_projection)
    model = load_base_for_training(model_args, train_args, overrides, seed_first=True)  # the prefix is made in load
    setup_ptuning(model)
    if log:
        log(describe_trainable(model))
    return model


def load_lora_model(model_args, lora_args, train_args, log=print):
    """The base model (under ZeRO-3 partitioned while it loads) with fresh LoRA adapters, or the seed's
    --is_resume --resume_path adapter; set up for training (no KV cache, gradient checkpointing when asked)."""
    model = load_base_for_training(model_args, train_args)  # seeded: the adapters' initial values repeat
    model = add_lora(model, lora_args.lora_rank, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_target)
    if lora_args.is_resume:
        loaded = load_lora_pt(model, lora_args.resume_path)
        if log:
            log(f"loaded {loaded} LoRA tensors from {lora_args.resume_path}")
    if log:
        model.print_trainable_parameters()
    return model


def write_run_outputs(out, lora_state, tokenizer, log_history, model_args, ptuning=False):
    """Beside the PEFT adapter already in `out`: the seed's chatglm-lora.pt, the tokenizer and loss_curve.png; then
    print where they are and the command that tries the adapter. ptuning=True: beside the prefix checkpoint already
    in `out` (no chatglm-lora.pt). Main process only."""
    out = Path(out)
    if not ptuning:
        save_lora_pt(None, out / SEED_FILE, state_dict=lora_state)
    tokenizer.save_pretrained(out)
    plot = plot_loss_curve(log_history, out / "loss_curve.png")
    base = "".join(f" --{name} {getattr(model_args, name)}" for name in ("model_name_or_path", "revision")
                   if getattr(model_args, name))
    what, flag = ("the P-Tuning v2 prefix", "--ptuning_checkpoint") if ptuning else ("the adapter", "--lora_path")
    print(f"saved {what} to {out}/ (loss curve: {plot})")
    print(f"try it: python inference.py {flag} {out}{base}")


def windows(batches, size):
    """The micro-batches of each optimizer step, as lists (the last one of an epoch may be shorter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
