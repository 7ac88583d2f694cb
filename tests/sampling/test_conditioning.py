"""Conditioning: per-sample rows, guidance, guided calibration sets and which models take prompts."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from diffusers import DDIMScheduler

from tacdiff.models.loading import load_any_model
from tacdiff.sampling import collect_calibration_set
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for, prompt_conditioning

STEPS, SAMPLES = 3, 3


def fake_encoder(prompts: list[str]) -> dict[str, torch.Tensor]:
    """One distinct embedding per prompt (its length and first letter), shape (N, 2, 4)."""
    return {"encoder_hidden_states": torch.stack([torch.full((2, 4), float(len(p)) + ord(p[:1] or " "))
                                                  for p in prompts])}


def test_prompts_go_round_and_rows_stream_by_index() -> None:
    conditioning = prompt_conditioning(fake_encoder, ["a", "bb"], guidance_scale=3.0, negative_prompt="zz")
    rows = conditioning.rows(1, 3)["encoder_hidden_states"]
    assert torch.equal(rows, fake_encoder(["bb", "a", "bb"])["encoder_hidden_states"])
    assert torch.equal(conditioning.uncond["encoder_hidden_states"], fake_encoder(["zz"])["encoder_hidden_states"])
    assert conditioning.guided and conditioning.prompt(2) == "a"
    assert conditioning.record["guidance_scale"] == 3.0 and conditioning.record["num_prompts"] == 2


@pytest.mark.parametrize("scale, guided", [(0.0, False), (1.0, False), (1.5, True)])
def test_guidance_applies_above_one_as_in_diffusers(scale: float, guided: bool) -> None:
    assert prompt_conditioning(fake_encoder, ["a"], guidance_scale=scale).guided is guided


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_guidance_scales_raise(scale: float) -> None:
    with pytest.raises(ValueError, match="guidance_scale"):
        prompt_conditioning(fake_encoder, ["a"], guidance_scale=scale)


@torch.no_grad()
def test_guided_calibration_sets_keep_both_halves_the_model_sees(pipeline_dir: Callable[[str], Path]) -> None:
    loaded = load_any_model(pipeline_dir("sd"))
    conditioning = conditioning_for(loaded, PromptOptions(("a cat", "a dog"), "ugly", 5.0))
    data = collect_calibration_set(loaded.model, DDIMScheduler.from_config(loaded.scheduler_config),
                                   num_samples=SAMPLES, num_inference_steps=STEPS, kept_steps=STEPS,
                                   cond=conditioning, progress=False)
    assert len(data) == 2 * SAMPLES * STEPS
    assert data.cond["encoder_hidden_states"].shape[0] == 2 * SAMPLES, "one row per trajectory and half"
    for t in torch.unique(data.timesteps):
        index = torch.nonzero(data.timesteps == t).flatten()
        uncond, cond = index.chunk(2)
        assert torch.equal(data.x[uncond], data.x[cond]), "both halves see the same latents"
        text = data.cond_of(index)["encoder_hidden_states"]
        negative = conditioning.uncond["encoder_hidden_states"]
        assert torch.equal(text[:SAMPLES], negative.expand(SAMPLES, -1, -1))
        assert torch.equal(text[SAMPLES:], conditioning.rows(0, SAMPLES)["encoder_hidden_states"])


def test_prompt_options_for_a_model_without_text_encoder_raise(pipeline_dir: Callable[[str], Path]) -> None:
    loaded = load_any_model(pipeline_dir("ldm"))
    assert conditioning_for(loaded).record == {}
    with pytest.raises(ValueError, match="reads no prompts"):
        conditioning_for(loaded, PromptOptions(guidance_scale=3.0))


def test_a_bare_text_unet_runs_on_stand_in_embeddings_with_a_warning(pipeline_dir: Callable[[str], Path]) -> None:
    loaded = load_any_model(pipeline_dir("sd") / "unet")
    with pytest.warns(UserWarning, match="stand-in"):
        conditioning = conditioning_for(loaded, count=2, seed=1)
    assert conditioning.rows(0, 2)["encoder_hidden_states"].shape[0] == 2 and not conditioning.guided
    assert conditioning.record["prompted"] is False


def test_a_bare_unet_with_classes_and_text_gets_both(tmp_path: Path) -> None:
    from tiny_models import tiny_model

    tiny_model("cond_unet", num_class_embeds=5).save_pretrained(tmp_path / "unet")
    with pytest.warns(UserWarning, match="stand-in"):
        conditioning = conditioning_for(load_any_model(tmp_path / "unet"), count=7, seed=1)
    rows = conditioning.rows(0, 7)
    assert rows["class_labels"].tolist() == [0, 1, 2, 3, 4, 0, 1] and rows["encoder_hidden_states"].shape[0] == 7
    assert conditioning.record == {"prompted": False, "class_labels": "sample index mod 5",
                                   "stand_in": "random text embeddings"}


def test_words_outside_the_vocabulary_warn_and_still_run(pipeline_dir: Callable[[str], Path]) -> None:
    loaded = load_any_model("latent-reference")  # a word-level tokenizer with an unknown token
    with pytest.warns(UserWarning, match="prompt 'a zebra': 'zebra' not in the tokenizer's vocabulary"):
        conditioning = conditioning_for(loaded, PromptOptions(("a zebra", "sneakers")))
    assert conditioning.rows(0, 2)["encoder_hidden_states"].shape[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conditioning_for(loaded, PromptOptions(("a photo of a sneaker", "an ankle boot"), "t-shirt"))
        conditioning_for(load_any_model(pipeline_dir("sd")), PromptOptions(("a zebra",)))  # byte-level BPE: no unknowns
