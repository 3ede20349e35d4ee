"""Builders for a tiny random-weight Arc2Face model laid out exactly like the released files.

Two folders, as a user has them after downloading:

- the base model (SD-1.5 layout): ``vae/``, ``tokenizer/`` (vocab.json + merges.txt, no
  tokenizer.json, like the real repo), ``scheduler/`` (SD-1.5 ships a PNDM config), ``model_index.json``;
- the Arc2Face folder: ``arc2face/`` (UNet), ``encoder/`` (CLIP text model), optionally ``controlnet/``.

Weights are seeded random and saved as safetensors, so the production loader reads them through the
same code path as the real weights. The text width is 576 (> 512) so the zero-padding of the
512-d identity vector is exercised; the VAE has four levels so its scale factor is 8, as in SD.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_WIDTH = 576
MAX_LENGTH = 77
WORDS = ("photo", "of", "a", "id", "person")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that turn a word's characters into the single token ``word</w>``."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges = []
    left = pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def write_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> Path:
    """A CLIP BPE tokenizer whose vocabulary holds each of ``words`` as one token."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in words for c in w})
    vocab: list[str] = [*letters, *(c + "</w>" for c in letters)]
    merges: list[tuple[str, str]] = []
    for word in words:
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
            if left + right not in vocab:
                vocab.append(left + right)
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _vocab_size(tokenizer_dir: Path) -> int:
    return len(json.loads((tokenizer_dir / "vocab.json").read_text()))


def build_base_model(folder: Path, seed: int = 0) -> Path:
    """An SD-1.5-layout folder with only what Arc2Face takes from the base model."""
    from diffusers import AutoencoderKL, PNDMScheduler

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        block_out_channels=(8, 8, 8, 8),
        sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    # SD-1.5's own scheduler config (PNDM); the loader swaps in DPM-Solver++ from it, as Arc2Face does.
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


def build_arc2face(folder: Path, vocab_size: int, seed: int = 1, controlnet: bool = False) -> Path:
    """``arc2face/`` (UNet), ``encoder/`` (CLIP text model) and optionally ``controlnet/``."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "encoder", safe_serialization=True)
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet.save_pretrained(folder / "arc2face", safe_serialization=True)
    if controlnet:
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
        # A fresh ControlNet's output convolutions are zero (it starts as a no-op); a trained one's are not.
        with torch.no_grad():
            for conv in [
                *net.controlnet_down_blocks,
                net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out,
            ]:
                conv.weight.normal_(0.0, 0.2)
        net.save_pretrained(folder / "controlnet", safe_serialization=True)
    return folder


def build_tiny_arc2face(root: Path, controlnet: bool = False) -> tuple[Path, Path]:
    """(base model folder, Arc2Face folder) under ``root``."""
    base = build_base_model(root / "sd15")
    models = build_arc2face(root / "models", _vocab_size(base / "tokenizer"), controlnet=controlnet)
    return base, models
