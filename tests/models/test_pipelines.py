"""Pipeline folders: supported kinds load around the denoiser, and tacdiff's loop with their components
reproduces the diffusers pipelines' own images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from tacdiff.data import FASHION_MNIST_CLASSES
from tacdiff.models.kinds import ModelDenoiser, sample_shape_of, set_timesteps
from tacdiff.models.loading import LoadedModel, build_scheduler, load_any_model
from tacdiff.models.pipelines import PIPELINE_KINDS, PromptEncoder
from tacdiff.sampling.batching import batched_trajectories, sample_noise
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for
from tacdiff.sampling.loop import sample
from tiny_models import tiny_model
from tiny_pipelines import TINY_PIPELINES

STEPS = 3


@pytest.mark.parametrize("name, cls, decoder, prompts, size", [
    ("sd", "StableDiffusionPipeline", "AutoencoderKL", True, 16), ("ldm", "LDMPipeline", "VQModel", False, 16),
    ("latent_kl", "LDMPipeline", "AutoencoderKL", False, 16), ("ddpm", "DDPMPipeline", None, False, 8),
    ("ddim", "DDIMPipeline", None, False, 8), ("pixart", "PixArtAlphaPipeline", "AutoencoderKL", True, 16),
    ("pixart_sigma", "PixArtSigmaPipeline", "AutoencoderKL", True, 16),
    ("sd3", "StableDiffusion3Pipeline", "AutoencoderKL", True, 16)])
def test_pipeline_folders_load_around_their_denoiser(pipeline_dir: Callable[[str], Path], name: str, cls: str,
                                                     decoder: str | None, prompts: bool, size: int) -> None:
    loaded = load_any_model(pipeline_dir(name))
    assert type(loaded.pipeline).__name__ == cls and getattr(loaded.pipeline, loaded.kind.denoiser) is loaded.model
    parts = None if loaded.kind.decoder is None else type(getattr(loaded.pipeline, loaded.kind.decoder)).__name__
    assert parts == decoder and loaded.reads_prompts is prompts and not loaded.quantized
    latents = torch.randn(2, *sample_shape_of(loaded.model))
    assert tuple(loaded.decode(latents).shape) == (2, *loaded.image_shape) == (2, 3, size, size)


@pytest.mark.parametrize("name, scheduler, call", [
    ("sd", "ddim", {}), ("pixart", "dpm", {"use_resolution_binning": False, "clean_caption": False}),
    ("sd3", "auto", {})])
@torch.no_grad()
def test_the_loop_reproduces_text_to_image_pipelines_with_guidance(pipeline_dir: Callable[[str], Path], name: str,
                                                                   scheduler: str, call: dict[str, bool]) -> None:
    """Prompt embeddings (SD3's pooled projections and PixArt's attention mask too), classifier-free guidance,
    the sampler (flow matching for SD3) and decoding (SD3's shifted latents) as the diffusers pipelines do them."""
    loaded = load_any_model(pipeline_dir(name))
    ours, theirs, noise = _guided_loop_and_pipeline(loaded, scheduler, call)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    unguided = loaded.pipeline(["a red shoe"] * 2, guidance_scale=1.0, num_inference_steps=STEPS, latents=noise,
                               output_type="pt", **call).images
    assert (unguided - theirs).abs().max() > 100 * (ours - theirs).abs().max(), "guidance matters"


def _guided_loop_and_pipeline(loaded: LoadedModel, scheduler: str, call: dict[str, bool]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two guided images from tacdiff's loop and from the diffusers pipeline (same prompts and noise), and the noise."""
    conditioning = conditioning_for(loaded, PromptOptions(("a red shoe",), "blurry", 4.0))
    sched = build_scheduler(scheduler, loaded.scheduler_config, loaded.model)
    assert type(sched) is type(loaded.pipeline.scheduler)
    noise = sample_noise(sample_shape_of(loaded.model), 0, 2, seed=3)
    (_, (final,)), = batched_trajectories([conditioning.guide(ModelDenoiser(loaded.model, sched))], sched,
                                          num_samples=2, sample_shape=noise.shape[1:], num_inference_steps=STEPS,
                                          seed=3, cond=conditioning.rows, progress=False)
    ours = (loaded.decode(final) / 2 + 0.5).clamp(0, 1)
    theirs = loaded.pipeline(["a red shoe"] * 2, negative_prompt=["blurry"] * 2, guidance_scale=4.0,
                             num_inference_steps=STEPS, latents=noise, output_type="pt", **call).images
    return ours, theirs, noise


@torch.no_grad()
def test_the_loop_reproduces_sd3_with_a_resolution_dependent_shift(pipeline_dir: Callable[[str], Path]) -> None:
    """A flow scheduler with use_dynamic_shifting (as FLUX's) gets the shift SD3's pipeline computes for the
    transformer's sample size (16 tokens here, between the scheduler's base and max sequence lengths)."""
    loaded = load_any_model(pipeline_dir("sd3_shifting"))
    ours, theirs, _ = _guided_loop_and_pipeline(loaded, "auto", {})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    fixed = build_scheduler("auto", {**loaded.scheduler_config, "use_dynamic_shifting": False})
    fixed.set_timesteps(STEPS)
    shifted = build_scheduler("auto", loaded.scheduler_config, loaded.model)
    set_timesteps(shifted, STEPS)
    assert not torch.allclose(shifted.sigmas, fixed.sigmas), "the shift changes the schedule"
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        build_scheduler("auto", loaded.scheduler_config)  # no model: no image size to shift by


@torch.no_grad()
def test_the_loop_reproduces_ldm_with_its_vq_decoder(pipeline_dir: Callable[[str], Path]) -> None:
    loaded = load_any_model(pipeline_dir("ldm"))
    scheduler = DDIMScheduler.from_config(loaded.scheduler_config)
    shape = sample_shape_of(loaded.model)
    generator = torch.Generator().manual_seed(7)
    theirs = loaded.pipeline(batch_size=2, generator=generator, num_inference_steps=STEPS, output_type="np").images
    noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(7))  # as the pipeline draws it
    latents = sample(ModelDenoiser(loaded.model, scheduler), scheduler, noise, num_inference_steps=STEPS,
                     progress=False)
    ours = (loaded.decode(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < 1e-5


def test_an_unsupported_pipeline_class_names_the_supported_ones(pipeline_dir: Callable[[str], Path],
                                                                tmp_path: Path) -> None:
    folder = shutil.copytree(pipeline_dir("ldm"), tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline") as error:
        load_any_model(folder)
    assert all(name in str(error.value) for name in PIPELINE_KINDS)


def test_a_component_with_pickled_weights_only_is_refused_unread(pipeline_dir: Callable[[str], Path],
                                                                 tmp_path: Path) -> None:
    folder = shutil.copytree(pipeline_dir("sd"), tmp_path / "pickled")
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="never loads pickled weights") as error:
        load_any_model(folder)
    assert str(folder / "text_encoder") in str(error.value)


def test_the_empty_prompt_of_the_load_check_is_embedded_once(pipeline_dir: Callable[[str], Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit check at load embeds "" to compare widths; the default negative prompt reuses it."""
    calls: list[str] = []
    encode = StableDiffusionPipeline.encode_prompt
    monkeypatch.setattr(StableDiffusionPipeline, "encode_prompt", lambda pipe, prompt, *args, **kwargs:
                        calls.append(prompt) or encode(pipe, prompt, *args, **kwargs))
    loaded = load_any_model(pipeline_dir("sd"))
    conditioning = conditioning_for(loaded, PromptOptions(("a red shoe",), None, 4.0))
    conditioning.rows(0, 2)  # prompt rows are embedded when a batch asks for them
    assert sorted(calls) == ["", "a red shoe"]


def test_prompt_embeddings_are_computed_once_per_prompt(pipeline_dir: Callable[[str], Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = load_any_model(pipeline_dir("sd")).pipeline
    calls: list[str] = []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda prompt, *args: calls.append(prompt) or encode(prompt, *args))
    encoder = PromptEncoder(pipe, cache_size=2)
    embeds = encoder(["a", "b", "a"])["encoder_hidden_states"]
    assert embeds.shape[0] == 3 and torch.equal(embeds[0], embeds[2]) and not torch.equal(embeds[0], embeds[1])
    assert calls == ["a", "b"]
    encoder(["c", "a"])  # "c" evicts the least recently used prompt, "b"; "a" is still cached
    encoder(["b"])
    assert calls == ["a", "b", "c", "b"]


def test_every_pipeline_kind_has_a_tiny_pipeline(tmp_path: Path) -> None:
    assert {type(build(tmp_path)).__name__ for build in TINY_PIPELINES.values()} == set(PIPELINE_KINDS)


def test_components_tacdiff_does_not_load_are_not_read(pipeline_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """A Stable Diffusion folder as older conversions ship it: a pickled safety checker (never opened) and
    a feature extractor; tacdiff decodes latents itself and loads neither."""
    folder = shutil.copytree(pipeline_dir("sd"), tmp_path / "with-checker")
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"not even a pickle")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    loaded = load_any_model(folder)
    assert loaded.pipeline.safety_checker is None and loaded.reads_prompts


@pytest.mark.parametrize("damage, message", [
    ("swap", "lacks weights for"), ("no_tokenizer", "tokenizer' but"), ("mismatch", "do not fit together")])
def test_broken_pipeline_folders_are_refused_with_the_reason(pipeline_dir: Callable[[str], Path], tmp_path: Path,
                                                             damage: str, message: str) -> None:
    """Weights that do not belong to a component (the libraries would initialise the rest randomly and only
    log it), a listed component without its folder, and components that do not fit together."""
    folder = shutil.copytree(pipeline_dir("sd" if damage != "mismatch" else "latent_kl"), tmp_path / damage)
    if damage == "swap":
        vae_weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        shutil.copy(vae_weights, folder / "text_encoder" / "model.safetensors")
    elif damage == "no_tokenizer":
        shutil.rmtree(folder / "tokenizer")
    else:
        shutil.rmtree(folder / "unet")
        shutil.copytree(pipeline_dir("ldm") / "unet", folder / "unet")  # 3-channel latents for a 4-channel VAE
    with pytest.raises(ValueError, match=message):
        load_any_model(folder)


def test_a_prompt_past_the_tokenizer_limit_warns_once(pipeline_dir: Callable[[str], Path]) -> None:
    encoder = PromptEncoder(load_any_model(pipeline_dir("sd")).pipeline)
    long = "a very long prompt about a red shoe on a table"
    with pytest.warns(UserWarning, match="the text encoder reads the first 16") as seen:
        encoder([long, long, "short"])
    assert len(seen) == 1


def test_float16_folders_saved_as_a_variant_only_load(pipeline_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """``save_pretrained(variant="fp16")`` writes only ``*.fp16.safetensors``: the variant is found and loaded."""
    load_any_model(pipeline_dir("sd")).pipeline.to(torch.float16).save_pretrained(tmp_path / "half", variant="fp16")
    assert not (tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_any_model(tmp_path / "half")
    embeds = PromptEncoder(loaded.pipeline)(["a cat"])["encoder_hidden_states"]
    assert embeds.shape == (1, 16, 32) and torch.isfinite(embeds).all()
    assert loaded.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)


def test_an_sd3_folder_without_t5_embeds_prompts_with_zeros_in_its_place(pipeline_dir: Callable[[str], Path],
                                                                         tmp_path: Path) -> None:
    """``from_pretrained(..., text_encoder_3=None, tokenizer_3=None)`` then ``save_pretrained``: index entries of
    nulls, no folders; diffusers pads the CLIP embeddings with zeros where T5's would be."""
    folder = shutil.copytree(pipeline_dir("sd3"), tmp_path / "no-t5")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None],
                                                         "tokenizer_3": [None, None]}))
    for name in ("text_encoder_3", "tokenizer_3"):
        shutil.rmtree(folder / name)
    loaded = load_any_model(folder)
    assert loaded.pipeline.text_encoder_3 is None
    embeds = PromptEncoder(loaded.pipeline)(["a red shoe"])["encoder_hidden_states"]
    assert embeds.shape == (1, 77 + 256, 32) and embeds[:, 77:].eq(0).all()  # CLIP tokens, then 256 zero tokens


def test_a_t5_tokenizer_shipped_as_a_sentencepiece_model_only_loads(pipeline_dir: Callable[[str], Path],
                                                                     tmp_path: Path) -> None:
    """PixArt folders on the Hub ship T5's tokenizer as ``spiece.model`` without ``tokenizer.json``."""
    import sentencepiece

    folder = shutil.copytree(pipeline_dir("pixart"), tmp_path / "spiece")
    shutil.rmtree(folder / "tokenizer")
    (folder / "tokenizer").mkdir()
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(f"a photo of a {name}, product photo" for name in FASHION_MNIST_CLASSES) * 10)
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer" / "spiece"),
                                             vocab_size=36, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, minloglevel=2)
    (folder / "tokenizer" / "spiece.vocab").unlink()
    loaded = load_any_model(folder)
    embeds = PromptEncoder(loaded.pipeline)(["a photo of a sneaker", "a bag"])["encoder_hidden_states"]
    assert embeds.shape == (2, 120, 32) and not torch.equal(embeds[0], embeds[1])


def test_text_encoders_of_another_width_than_the_transformer_reads_are_refused(pipeline_dir: Callable[[str], Path],
                                                                                tmp_path: Path) -> None:
    folder = shutil.copytree(pipeline_dir("sd3"), tmp_path / "wide")
    shutil.rmtree(folder / "transformer")
    tiny_model("sd3", joint_attention_dim=48).save_pretrained(folder / "transformer")
    with pytest.raises(ValueError, match="transformer attends to 48-wide text embeddings but the text encoders make "
                                         "32-wide ones"):
        load_any_model(folder)
