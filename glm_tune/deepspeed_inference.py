"""DeepSpeed inference for ChatGLM-6B: `deepspeed.init_inference` with tensor parallelism over the launcher's ranks.

Under `deepspeed --num_gpus N script.py` every rank loads the model and `init_inference` splits each block over the
N ranks (AutoTP): attention heads and MLP units are divided, and attention.dense / mlp.dense_4h_to_h sum the partial
results over the ranks. This runs on GPUs (NCCL) and on CPU processes alike (gloo / shared memory).

One correction is needed. AutoTP recognises the class name `GLMBlock` from ChatGLM2/3 and cuts the two fused
projections the ChatGLM2 way: query_key_value as [all q | all k | all v] and dense_h_to_4h as a packed [gate | up]
pair. ChatGLM-6B stores q, k, v per head ([q k v] of head 0, then of head 1, ...) and has a plain GELU MLP, so after
AutoTP has replaced the layers, each rank's query_key_value and dense_h_to_4h shards are given the rows that match
the input columns its attention.dense and mlp.dense_4h_to_h shards hold: whole heads, and the same MLP units.

Kernel injection (DeepSpeed's fused CUDA transformer kernels) needs a DeepSpeed policy for the model's block class.
DeepSpeed has none for ChatGLM-6B (its policies cover GPT-2, BLOOM, GPT-J, GPT-NeoX, OPT, LLaMA, ...; asked to inject
into a GLMBlock it silently replaces nothing), so "auto" uses kernels only where CUDA and such a policy exist.
"""

import importlib.util
import os

import torch

from glm_tune.errors import UserError

# (column-parallel layer, the row-parallel layer that reads its output, rows of the first per column of the second):
# head h is rows [3hd, 3(h+1)d) of query_key_value (its q, k and v) and columns [hd, (h+1)d) of attention.dense.
_FUSED_PAIRS = (("attention.query_key_value", "attention.dense", 3), ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", 1))


def deepspeed_installed():
    return importlib.util.find_spec("deepspeed") is not None


def launcher_world_size():
    """Processes started by the launcher (deepspeed / torchrun set WORLD_SIZE); 1 when run with plain python."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed():
    """Join the launcher's process group when there is more than one rank; returns (rank, world size).

    On CPU, each of the ranks sharing a machine gets its share of the cores, not all of them."""
    world = launcher_world_size()
    if world == 1:
        return 0, 1
    import deepspeed

    deepspeed.init_distributed()
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.distributed.get_rank(), world


def kernels_supported(model):
    """True when DeepSpeed has fused inference kernels for this model's blocks, and CUDA to run them."""
    from deepspeed.module_inject.auto_tp import AutoTP

    return torch.cuda.is_available() and AutoTP.kernel_supported(AutoTP.get_module_list(model))


def init_inference(model, kernel_inject="auto"):
    """The model under deepspeed.init_inference, split over the launcher's ranks; returns the module to call."""
    import deepspeed

    world = launcher_world_size()
    supported = kernels_supported(model)
    if kernel_inject == "on" and not supported:
        reason = "no CUDA GPU here" if not torch.cuda.is_available() else (
            "DeepSpeed has no kernel policy for ChatGLM-6B's GLMBlock")
        raise UserError(f"--kernel_inject on: {reason}; use --kernel_inject auto (tensor parallelism without fused "
                        "kernels)")
    use_kernels = supported and kernel_inject != "off"
    if world > 1 and getattr(model.config, "pre_seq_len", None):
        raise UserError("tensor parallelism does not split P-Tuning v2 prefixes (pre_seq_len); run one process")
    # References to the whole tensors: AutoTP swaps each parameter's data for this rank's shard.
    whole = {} if use_kernels or world == 1 else {name: p.data for name, p in model.named_parameters()
                                                  if any(f".{layer}." in name for pair in _FUSED_PAIRS
                                                         for layer in pair[:2])}
    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                      replace_with_kernel_inject=use_kernels)
    model = engine.module
    if whole:
        _reslice_fused_projections(model, whole)
    return model


def describe_split(model):
    """What this rank holds of the first block, e.g. '2 of 4 attention heads and 512 of 1024 MLP units'."""
    block, config = model.transformer.layers[0], model.config
    head_dim = config.hidden_size // config.num_attention_heads
    heads = block.attention.query_key_value.weight.shape[0] // (3 * head_dim)
    units = block.mlp.dense_h_to_4h.weight.shape[0]
    return (f"{heads} of {config.num_attention_heads} attention heads and {units} of {config.inner_hidden_size} MLP "
            "units")


@torch.no_grad()
def _reslice_fused_projections(model, whole):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for i, block in enumerate(model.transformer.layers):
        prefix = f"transformer.layers.{i}."
        for column_name, row_name, rows_per_column in _FUSED_PAIRS:
            column, row = block.get_submodule(column_name), block.get_submodule(row_name)
            widths = [None] * world
            torch.distributed.all_gather_object(widths, row.weight.shape[1])
            start, width = sum(widths[:rank]), widths[rank]
            # The row-parallel layer must hold a contiguous block of input columns (whole heads for attention), and
            # the column-parallel layer the matching number of rows; anything else is a DeepSpeed we do not know.
            expected = whole[prefix + row_name + ".weight"][:, start : start + width]
            aligned = rows_per_column == 1 or (start % head_dim == 0 and width % head_dim == 0)
            if not (aligned and column.weight.shape[0] == rows_per_column * width
                    and torch.equal(row.weight, expected.to(row.weight.device, row.weight.dtype))):
                raise RuntimeError(f"DeepSpeed split {prefix}{row_name} / {column_name} in an unexpected way; "
                                   "this DeepSpeed version is not supported for ChatGLM-6B tensor parallelism")
            rows = slice(rows_per_column * start, rows_per_column * (start + width))
            for name in ("weight", "bias"):
                param = getattr(column, name)
                param.data = whole[f"{prefix}{column_name}.{name}"][rows].to(param.device, param.dtype).clone()
