"""The LLaVA-1.5-shaped model the VLM benchmarks build (``bench_vlm``, ``bench_vlm_budgets``,
``bench_overhead``): transformers' own classes from configs with random (seeded) weights, a
processor that needs no download, and copies that share one set of weights."""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from transformers import LlavaProcessor

PROMPT = "USER: <image>\nDescribe the image. ASSISTANT:"
WORDS = "<unk> <s> </s> <image> USER : Describe the image . ASSISTANT".split()  # the vocabulary
SHAPES = {  # vision tower, LM, image size; patch 14 everywhere
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32),
        image=336,
    ),
    "small": dict(
        vision=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=3),
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
        image=336,
    ),
    "quick": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4),
        text=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4),
        image=112,
    ),
}  # fmt: skip
VOCAB = 32064


def build_model(args: argparse.Namespace, image_token: int) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    shape = SHAPES[args.shape]
    vision = CLIPVisionConfig(image_size=shape["image"], patch_size=14, **shape["vision"])
    text = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **shape["text"])
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(shape["image"] // 14) ** 2,
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = Llava._from_config(config, dtype=args.dtype, attn_implementation="sdpa")
    return model.eval()


def build_processor(image_size: int) -> LlavaProcessor:
    """A ``LlavaProcessor`` without downloads: CLIP's image processor, a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", WORDS.index("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def shared_copy(model: nn.Module) -> nn.Module:
    """A second instance holding the same parameter and buffer tensors (patched separately)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)
