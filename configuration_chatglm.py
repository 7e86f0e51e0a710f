"""ChatGLM-6B configuration.

Reads both official `config.json` revisions unchanged:

* the original release (vocab 150528: 20000 image tokens ahead of the text vocabulary), whose config names only
  `bos_token_id` / `eos_token_id` / `pad_token_id`;
* v1.1 and later (vocab 130528), which also names `mask_token_id` / `gmask_token_id` and the P-Tuning v2 fields.

No token id is written here: every id comes from the checkpoint's config (or tokenizer). Where the original release
leaves `[MASK]` / `[gMASK]` implicit they are derived from `<sop>` (the BOS token), because ChatGLM's vocabulary keeps
`[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>` as one consecutive block.
"""

from transformers import PretrainedConfig

# Offsets inside ChatGLM's consecutive special-token block, counted from <sop>.
_MASK_OFFSET_FROM_SOP = -4
_GMASK_OFFSET_FROM_SOP = -3


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
    # Standard names that transformers' generic code (caches, device maps, PEFT) looks up.
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    mask_token_id: int | None = None
    gmask_token_id: int | None = None
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    quantization_bit: int = 0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.bos_token_id is not None:
            if self.mask_token_id is None:
                self.mask_token_id = self.bos_token_id + _MASK_OFFSET_FROM_SOP
            if self.gmask_token_id is None:
                self.gmask_token_id = self.bos_token_id + _GMASK_OFFSET_FROM_SOP
        if self.hidden_size % (2 * self.num_attention_heads):
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of 2 * num_attention_heads "
                f"({2 * self.num_attention_heads}): 2D rotary encoding splits each head in two halves"
            )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


__all__ = ["ChatGLMConfig"]
