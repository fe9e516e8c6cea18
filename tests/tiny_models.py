"""Tiny randomly initialised models and a byte-level tokenizer, built in code (no downloads).

`make_tiny(arch)` covers every architecture the steering code supports: Llama (SmolLM2),
Gemma-2, Gemma-3 text and Gemma-3 multimodal (text layers nested under `model.language_model`).
Attention is eager so that batched (left-padded) and unbatched runs agree to float precision.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

TINY_ARCHS = ("llama", "gemma2", "gemma3", "gemma3_mm")

# Gemma's id layout (pad=0, eos=1, bos=2) for every arch; then the image tokens, then 256 bytes.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<image>", "<start_of_image>", "<end_of_image>")
PAD_ID, EOS_ID, BOS_ID, IMAGE_ID, BOI_ID, EOI_ID = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # 262

_TEXT: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=128,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)
# Gemma: a window shorter than the test prompts, so that sliding layers really slide.
_GEMMA: dict[str, Any] = dict(_TEXT, query_pre_attn_scalar=16, sliding_window=6)
_GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer without merges: one token per UTF-8 byte, `<bos>` prepended.

    Its `len()` equals the tiny models' `vocab_size`; padding is on the left, as for generation.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        padding_side="left",
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def _build(arch: str, sliding_window: int) -> PreTrainedModel:
    gemma = dict(_GEMMA, sliding_window=sliding_window)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**_TEXT, tie_word_embeddings=False))
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**gemma, layer_types=_GEMMA_LAYER_TYPES))
    text_config = Gemma3TextConfig(**gemma, layer_types=_GEMMA_LAYER_TYPES)
    if arch == "gemma3":
        return Gemma3ForCausalLM(text_config)
    # 16x16 images, 4x4 patches -> 16 patches, pooled 2x2 -> 4 soft tokens per image.
    vision_config = SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=4,
        image_token_index=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
    )
    return Gemma3ForConditionalGeneration(config)


def make_tiny(arch: str, seed: int = 0, sliding_window: int = 6) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny randomly initialised model (fp32, eval mode, eager attention) and its tokenizer.

    Args:
        arch: One of `TINY_ARCHS`.
        seed: Seed for the random weights; the same seed gives the same weights.
        sliding_window: the Gemma architectures' window (6: shorter than the test prompts).
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(TINY_ARCHS)}")
    torch.manual_seed(seed)
    model = _build(arch, sliding_window)
    model.set_attn_implementation("eager")
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model.float().eval(), make_tokenizer()
