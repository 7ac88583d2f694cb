"""Tiny real diffusers pipelines saved with ``save_pretrained``, each kind declared once: Stable Diffusion
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a CLIPTokenizer built offline from a character
vocabulary, :mod:`tacdiff.models.text`), LDM with a VQModel, unconditional latent diffusion with an
AutoencoderKL, a class-conditional DiT with named classes, and the text-to-image transformers: PixArt-alpha
and -Sigma (a T5 encoder with a word-level tokenizer built offline) and SD3 (two CLIP encoders with
projections and T5, flow matching, an autoencoder with a shift factor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline,
                       DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, LDMPipeline, PixArtAlphaPipeline,
                       PixArtSigmaPipeline, StableDiffusion3Pipeline, VQModel)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from tacdiff.models.pipelines import stable_diffusion
from tacdiff.models.reference import LATENT_REFERENCE_DIR
from tacdiff.models.train_dit import NULL_CLASS, dit_pipeline
from tacdiff.data.prompts import fashion_vocabulary
from tacdiff.models.text import character_tokenizer, random_text_encoder, word_tokenizer
from tiny_models import POOLED_DIM, TEXT_DIM, tiny_model

TEXT_LENGTH = 16  # tokens per prompt (CLIP's is 77)
LATENT_SIZE = 8   # the tiny UNets' sample size; the autoencoders upsample twice, to 16x16 images
_AUTOENCODER = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, norm_num_groups=32,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def _stable_diffusion(work: Path) -> DiffusionPipeline:
    tokenizer = character_tokenizer(work / "vocab", TEXT_LENGTH)
    text_encoder = random_text_encoder(tokenizer, hidden_size=32)
    unet = tiny_model("cond_unet", sample_size=LATENT_SIZE, layers_per_block=1)
    torch.manual_seed(1)
    vae = AutoencoderKL(**_AUTOENCODER, latent_channels=4)
    return stable_diffusion(unet, vae, text_encoder, tokenizer)


def _fashion_sd(work: Path) -> DiffusionPipeline:
    """Shaped like ``tacdiff train-latent``'s pipeline: grayscale images, a word-level tokenizer over the
    Fashion-MNIST captions' vocabulary."""
    tokenizer = word_tokenizer(fashion_vocabulary(), TEXT_LENGTH)
    text_encoder = random_text_encoder(tokenizer, hidden_size=32)
    unet = tiny_model("cond_unet", sample_size=LATENT_SIZE, layers_per_block=1)
    torch.manual_seed(1)
    vae = AutoencoderKL(**{**_AUTOENCODER, "in_channels": 1, "out_channels": 1}, latent_channels=4)
    return stable_diffusion(unet, vae, text_encoder, tokenizer)


def _ldm(work: Path) -> DiffusionPipeline:
    unet = tiny_model("conv_unet")  # 3x8x8 latents
    torch.manual_seed(1)
    return LDMPipeline(vqvae=VQModel(**_AUTOENCODER, latent_channels=3), unet=unet, scheduler=DDIMScheduler())


def _latent_kl(work: Path) -> DiffusionPipeline:
    unet = tiny_model("conv_unet", in_channels=4, out_channels=4)
    torch.manual_seed(1)
    return LDMPipeline(vqvae=AutoencoderKL(**_AUTOENCODER, latent_channels=4), unet=unet, scheduler=DDIMScheduler())


def _dit(work: Path) -> DiffusionPipeline:
    """Shaped like ``tacdiff train-dit``'s pipeline: a tiny DiT (1000 classes, as DiTPipeline's null class needs) on
    the bundled latent reference's autoencoder (32x32 grayscale images), Fashion-MNIST class names."""
    vae = AutoencoderKL.from_pretrained(LATENT_REFERENCE_DIR / "vae")
    return dit_pipeline(tiny_model("dit", out_channels=4, num_embeds_ada_norm=NULL_CLASS), vae)


def _t5(seed: int) -> tuple[T5Tokenizer, T5EncoderModel]:
    """A T5 encoder (``TEXT_DIM`` wide) with a sentencepiece-style word-level tokenizer over the Fashion-MNIST
    captions' words (other words are ``<unk>``)."""
    words = sorted({word.lower() for word in fashion_vocabulary()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -1.0) for w in words]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=2, num_heads=4)
    return tokenizer, T5EncoderModel(config).eval()


def _clip_with_projection(seed: int, width: int) -> tuple[object, CLIPTextModelWithProjection]:
    tokenizer = word_tokenizer(fashion_vocabulary(), 77)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=width)
    return tokenizer, CLIPTextModelWithProjection(config).eval()


def _pixart(cls: type[DiffusionPipeline]) -> Callable[[Path], DiffusionPipeline]:
    def build(work: Path) -> DiffusionPipeline:
        tokenizer, text_encoder = _t5(2)
        torch.manual_seed(1)
        vae = AutoencoderKL(**_AUTOENCODER, latent_channels=4)
        return cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=tiny_model("pixart"),
                   scheduler=DPMSolverMultistepScheduler())
    return build


def _sd3(**flow: Any) -> Callable[[Path], DiffusionPipeline]:
    """SD3's three text encoders: two CLIPs whose token embeddings (side by side) and pooled projections
    (concatenated, ``POOLED_DIM`` wide) feed the MMDiT, and T5 (``TEXT_DIM`` wide); a flow-matching scheduler
    configured by ``flow``."""
    def build(work: Path) -> DiffusionPipeline:
        (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = (_clip_with_projection(seed, POOLED_DIM // 2)
                                                                    for seed in (3, 4))
        tokenizer_3, text_encoder_3 = _t5(5)
        torch.manual_seed(1)
        vae = AutoencoderKL(**_AUTOENCODER, latent_channels=4, scaling_factor=1.5, shift_factor=0.1)
        return StableDiffusion3Pipeline(transformer=tiny_model("sd3"),
                                        scheduler=FlowMatchEulerDiscreteScheduler(**flow), vae=vae,
                                        text_encoder=text_encoder, tokenizer=tokenizer,
                                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return build


TINY_PIPELINES: dict[str, Callable[[Path], DiffusionPipeline]] = {
    "sd": _stable_diffusion,     # text-to-image, 4x8x8 latents, 16x16 RGB images
    "fashion_sd": _fashion_sd,   # text-to-image, 4x8x8 latents, 16x16 grayscale images, word-level tokenizer
    "ldm": _ldm,                 # unconditional, VQModel, 3x8x8 latents
    "latent_kl": _latent_kl,     # unconditional, AutoencoderKL in LDMPipeline's autoencoder slot, 4x8x8 latents
    "ddpm": lambda work: DDPMPipeline(unet=tiny_model("conv_unet"), scheduler=DDPMScheduler()),  # pixels, 3x8x8
    "ddim": lambda work: DDIMPipeline(unet=tiny_model("conv_unet"), scheduler=DDIMScheduler()),
    "dit": _dit,                 # class-conditional transformer, 4x8x8 latents, 32x32 grayscale images
    "pixart": _pixart(PixArtAlphaPipeline),  # text-to-image transformer, T5 text, 4x8x8 latents, 16x16 RGB images
    "pixart_sigma": _pixart(PixArtSigmaPipeline),
    "sd3": _sd3(shift=3.0),      # MMDiT, flow matching, CLIP + CLIP + T5 text, 4x8x8 latents, 16x16 RGB images
    # the same with sigmas shifted by image size, as FLUX's scheduler: 16 tokens between the base and max lengths
    "sd3_shifting": _sd3(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64),
}


def save_tiny_pipeline(name: str, folder: Path) -> Path:
    """Build ``TINY_PIPELINES[name]`` from fixed seeds and ``save_pretrained`` it (safetensors) to ``folder``."""
    pipe = TINY_PIPELINES[name](folder.parent / f"{folder.name}-build")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
