"""The tiny LLaVA factory: tokenizer, tiny CLIP and tiny LLaVA, saved as Hugging Face folders."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<s>", "<unk>", "</s>", "<image>"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny CLIP and LLaVA (a few million parameters)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 3
    clip_text_layers: int = 2
    projection_dim: int = 128
    text_hidden: int = 192
    text_layers: int = 4
    heads: int = 4
    intermediate: int = 512
    vocab_size: int = 1024
    max_positions: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on the micro world's text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=10_000,
    )


def image_processor(cfg: TinyConfig) -> CLIPImageProcessor:
    size = cfg.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def vision_config(cfg: TinyConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
    )


def build_clip(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    """A tiny CLIP (vision + text towers) sharing the micro tokenizer."""
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.projection_dim,
        intermediate_size=cfg.projection_dim * 2,
        num_hidden_layers=cfg.clip_text_layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=77,
        projection_dim=cfg.projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = CLIPConfig(
        text_config=text.to_dict(),
        vision_config=vision_config(cfg).to_dict(),
        projection_dim=cfg.projection_dim,
    )
    return CLIPModel(config)


FEATURE_STRATEGY = "full"


def build_llava(
    cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast
) -> LlavaForConditionalGeneration:
    """A tiny LLaVA-1.5: Llama text model, CLIP vision tower, two-layer MLP projector.

    The language model reads the class token beside the patches (``full``; LLaVA-1.5 drops it):
    the class token is what the tiny CLIP's contrastive loss trains, and with three vision
    layers it holds the image's summary (object class, counts) that 8 px patches do not.
    """
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # the patches and the class token
    config = LlavaConfig(
        vision_config=vision_config(cfg).to_dict() | {"model_type": "clip_vision_model"},
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_tokens,
        vision_feature_select_strategy=FEATURE_STRATEGY,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config)


def llava_processor(cfg: TinyConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=image_processor(cfg),
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy=FEATURE_STRATEGY,
        num_additional_image_tokens=1,
    )


def save_llava(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, folder: Path
) -> Path:
    """Save in the standard Hugging Face layout, loadable like llava-1.5-7b-hf."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
