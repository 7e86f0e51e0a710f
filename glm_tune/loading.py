"""Loading a ChatGLM checkpoint (a local folder, a Hugging Face repo id or the embedded demo model) and, optionally, a
LoRA adapter onto it."""

import re
import sys
from pathlib import Path

import torch

from glm_tune.errors import UserError
from glm_tune.runtime import keep_freed_memory, pack_linears_for_cpu_inference, parse_dtype
from modeling_chatglm import ChatGLMForConditionalGeneration
from tokenization_chatglm import ChatGLMTokenizer, IceTextModelError

# What our classes read from a Hub repo: the official *.py files are never run (ours replace them), nor is the rest.
HUB_FILES = ["config.json", "ice_text.model", "tokenizer_config.json", "*.bin", "*.safetensors", "*.index.json"]
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells them
EMBEDDED_NOTICE = ("note: no --model_name_or_path given, so this runs the embedded small demo model (random weights, "
                   "for demos and tests); for real answers pass --model_name_or_path THUDM/chatglm-6b or a local "
                   "chatglm-6b folder")
_embedded_notice_shown = False


def resolve_model_path(model_name_or_path=None, revision=None):
    """The local folder of a ChatGLM checkpoint.

    None is the embedded small demo model (built on first use; said once per process on stderr). An existing folder is
    used as it is (`revision` is ignored, as transformers does). Otherwise `owner/name` is a Hugging Face repo id: its
    snapshot at `revision` (branch, tag or commit id; default main) in the Hugging Face cache, downloaded on first use,
    only the files our classes read. HF_HOME / HF_HUB_CACHE choose the cache; with HF_HUB_OFFLINE=1 it must be there."""
    if model_name_or_path is None:
        from glm_tune.checkpoint import small_checkpoint

        announce_embedded_model()
        return small_checkpoint()
    folder = Path(model_name_or_path)
    where = f"--model_name_or_path {model_name_or_path}"
    if not folder.is_dir():
        if not REPO_ID.fullmatch(str(model_name_or_path)):
            raise UserError(f"{where}: no such folder, and not a Hugging Face repo id (owner/name, e.g. "
                            "THUDM/chatglm-6b)")
        folder = download_from_hub(str(model_name_or_path), revision)
        where = f"{where} (revision {revision or 'main'}, {folder})"
    if not (folder / "config.json").exists() or not (folder / "ice_text.model").exists():
        raise UserError(f"{where}: not a ChatGLM folder (needs config.json and ice_text.model)")
    return folder


def announce_embedded_model():
    global _embedded_notice_shown
    if not _embedded_notice_shown:
        _embedded_notice_shown = True
        print(EMBEDDED_NOTICE, file=sys.stderr, flush=True)


def download_from_hub(repo_id, revision=None, allow_patterns=HUB_FILES, flag="--model_name_or_path",
                      example="THUDM/chatglm-6b", local_folder="a local chatglm-6b folder"):
    """Snapshot folder of `repo_id` at `revision` in the Hugging Face cache (downloading what is missing of
    `allow_patterns`); every way it cannot be had is a one-line UserError saying what to do, naming `flag`, an
    `example` id and the `local_folder` to pass instead."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    revision_name = revision or "main"
    where = f"{flag} {repo_id} (revision {revision_name})"
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except HFValidationError:
        raise UserError(f"{flag} {repo_id}: no such folder, and not a Hugging Face repo id (owner/name, "
                        f"e.g. {example})") from None
    except GatedRepoError:
        raise UserError(f"{where}: the repo is gated: accept its terms on https://huggingface.co/{repo_id}, then log "
                        "in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no such local folder, and no Hugging Face repo you can access by that id: check "
                        "the path or the id (a private repo needs hf auth login)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: {repo_id} has no revision {revision_name}: give a branch, tag or commit id that "
                        f"exists (https://huggingface.co/{repo_id}/commits/main)") from None
    except IncompleteSnapshotError:
        raise UserError(f"{where}: the cached copy in {constants.HF_HUB_CACHE} is incomplete and the Hub cannot be "
                        "reached: run again with network access to finish the download") from None
    except LocalEntryNotFoundError:
        missing = f"{where}: no such local folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE}"
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"{missing}, which HF_HUB_OFFLINE=1 forbids downloading into: check the name, unset "
                            "HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE (or HF_HOME) at the cache that "
                            "holds it") from None
        raise UserError(f"{missing}, and the Hugging Face Hub cannot be reached: check the name and the network (or "
                        f"HF_ENDPOINT / proxy settings), or pass {local_folder}") from None
    except HfHubHTTPError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{where}: the Hugging Face Hub answered {first_line}: try again later, or pass a local "
                        "folder") from None


def load_tokenizer(model_name_or_path=None, revision=None):
    # Always our tokenizer class: the official folder's tokenization_chatglm.py does not run on transformers 5.
    try:
        return ChatGLMTokenizer.from_pretrained(str(resolve_model_path(model_name_or_path, revision)))
    except IceTextModelError as err:  # an ice_text.model of neither official layout: its one line, file named
        raise UserError(str(err)) from None


def load_model(model_name_or_path=None, dtype="auto", device_map=None, max_memory=None, offload_folder=None,
               revision=None, config_overrides=None):
    """Our model class on the checkpoint's weights (see resolve_model_path), checked against its tokenizer.

    `device_map` ("auto" or a plan) splits the model by layer over GPUs, CPU and disk within `max_memory`
    ({0: "20GiB", "cpu": "60GiB"}); layers planned on "disk" are kept in `offload_folder` and loaded as needed.
    `config_overrides` replace config.json fields (e.g. pre_seq_len / prefix_projection for P-Tuning v2)."""
    folder = resolve_model_path(model_name_or_path, revision)
    dtype = parse_dtype(dtype) if isinstance(dtype, (str, type(None))) else dtype
    if device_map is None and not torch.cuda.is_available():
        keep_freed_memory()  # CPU steps reuse their freed activations' memory (see runtime.keep_freed_memory)
    split = {} if device_map is None else dict(max_memory=max_memory, offload_folder=offload_folder)
    model = ChatGLMForConditionalGeneration.from_pretrained(str(folder), dtype=dtype, device_map=device_map, **split,
                                                            **(config_overrides or {}))
    check_tokenizer_matches(model.config, load_tokenizer(folder), folder)
    return model


def check_tokenizer_matches(config, tokenizer, where):
    """Token ids must agree between config.json and ice_text.model, or generation never stops (a known seed bug)."""
    for name in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
        ours, theirs = getattr(config, name), getattr(tokenizer, name)
        if ours is not None and ours != theirs:
            raise UserError(f"{where}/config.json: {name} is {ours} but the tokenizer's is {theirs} (mismatched "
                            "config.json and ice_text.model)")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{where}/config.json: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size}")


def load_model_and_tokenizer(model_name_or_path=None, lora_path=None, dtype="auto", device_map=None,
                             merge_adapter=False, max_memory=None, offload_folder=None, revision=None,
                             ptuning_checkpoint=None, pack_for_cpu=False, compile_decoding="off"):
    """The base model (plus adapter, or P-Tuning v2 prefix, if given) in eval mode, and its tokenizer.

    merge_adapter=True adds the adapter into the base weights (one plain model, no LoRA layers left): what tensor
    parallelism needs, and faster. With a `device_map` (see load_model) an adapter is always merged, in CPU memory
    before the model is split: PEFT cannot load adapter weights into layers offloaded to disk.
    `ptuning_checkpoint`: a P-Tuning v2 checkpoint folder (ours or the official trainer's): the base is loaded with its
    config.json's pre_seq_len / prefix_projection and the prefix encoder (kept in fp32) gets its tensors.
    pack_for_cpu=True (generation-only callers): linear layers on the CPU get weights prepacked for oneDNN
    (runtime.pack_linears_for_cpu_inference): bf16 ones on a CPU with native bf16 (bit-identical, about 2x faster
    matmuls when decoding), fp32 ones of 16 MB or more (within fp32 rounding; 1.1-1.3x faster at one row and 1.8-3.5x
    at eight for the 6B shape's layers on 2 AVX2 cores); the model can then no longer be trained, merged or saved.
    compile_decoding (static_decode.COMPILE_MODES): generate() calls go through a static-cache decoder, compiled in
    that mode (weights frozen: generation only); compiled modes skip the packing (the compiler packs frozen weights
    itself)."""
    from glm_tune.lora import apply_adapter
    from glm_tune.ptuning import load_prefix_checkpoint, read_ptuning_config
    from glm_tune.static_decode import enable_static_decoding

    if lora_path and ptuning_checkpoint:
        raise UserError("--lora_path and --ptuning_checkpoint: give one of them (a model has a LoRA adapter or a "
                        "P-Tuning prefix)")
    overrides = read_ptuning_config(ptuning_checkpoint) if ptuning_checkpoint else None
    folder = resolve_model_path(model_name_or_path, revision)  # once: a Hub id is looked up once
    split_after_merge = bool(lora_path or ptuning_checkpoint) and device_map is not None
    model = load_model(folder, dtype, None if split_after_merge else device_map, max_memory,
                       offload_folder, config_overrides=overrides)
    if ptuning_checkpoint:
        load_prefix_checkpoint(model, ptuning_checkpoint)
        model.transformer.prefix_encoder.float()  # as the official code runs it over an fp16 base
    if lora_path:
        model = apply_adapter(model, lora_path)
        if merge_adapter or split_after_merge:
            model = model.merge_and_unload()
    if split_after_merge:
        model = split_model(model, device_map, max_memory, offload_folder)
    if pack_for_cpu and device_map is None and compile_decoding in (None, "off", "eager"):
        pack_linears_for_cpu_inference(model)
    model.eval()
    if device_map is None:
        enable_static_decoding(model, compile_decoding)
    return model, load_tokenizer(folder)


def split_model(model, device_map="auto", max_memory=None, offload_folder=None):
    """A model in memory spread over devices the way from_pretrained(device_map="auto") plans it: balanced over the
    GPUs, whole GLMBlocks, the rest on "cpu", then on disk in `offload_folder`."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = model._no_split_modules
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map, offload_dir=offload_folder)
