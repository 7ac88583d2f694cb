"""The bundled text-to-image latent pipeline: a plain diffusers folder, loaded by name, whose FP samples show
the prompted class (a CI-sized run: few images, few steps)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.data.prompts import fashion_class_of, fashion_prompts
from tacdiff.evaluation import evaluate
from tacdiff.metrics.prompt_accuracy import prompt_accuracy
from tacdiff.models.loading import load_any_model
from tacdiff.models.reference import LATENT_REFERENCE, LATENT_REFERENCE_DIR

STEPS = 20
PROMPT_ACCURACY_FLOOR = 0.9
"""The shipped pipeline scored 1.0 at these settings (20 samples, DDIM 20, guidance 7.5 and 3)."""


def test_the_folder_is_a_stable_diffusion_pipeline_diffusers_loads() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(LATENT_REFERENCE_DIR)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a photo of a sneaker", "a pair of trousers"], num_inference_steps=STEPS, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 1, 32, 32) and pipe.safety_checker is None
    accuracy = prompt_accuracy(images * 2 - 1, [fashion_class_of("sneaker"), fashion_class_of("trousers")])
    assert accuracy["overall"] == 1.0, accuracy


def test_it_loads_by_name_with_its_default_prompts() -> None:
    loaded = load_any_model(LATENT_REFERENCE)
    assert loaded.reads_prompts and loaded.image_shape == (1, 32, 32)
    assert (LATENT_REFERENCE_DIR / "prompts.txt").read_text().split("\n")[:20] == fashion_prompts()
    assert sum(f.stat().st_size for f in LATENT_REFERENCE_DIR.rglob("*") if f.is_file()) < 30 * 2**20


def test_fp_samples_name_the_prompted_class() -> None:
    result = evaluate(LATENT_REFERENCE, steps=STEPS, samples=20, seed=0, batch_size=20, progress=False)
    assert result["prompt_accuracy"] >= PROMPT_ACCURACY_FLOOR, result["prompt_accuracy_per_class"]
    assert result["conditioning"]["prompted"]


def test_sample_command_takes_the_name_and_plain_prompts(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", LATENT_REFERENCE, "--out", str(out), "--prompt", "sneakers",
                                      "--prompt", "an ankle boot, unseen words", "--num-samples", "2", "--steps", "10",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 3  # two images and the grid


def test_outputs_never_replace_the_bundled_folder() -> None:
    result = CliRunner().invoke(app, ["quantize", LATENT_REFERENCE, "--out", str(LATENT_REFERENCE_DIR), "--overwrite",
                                      "--quiet"])
    assert result.exit_code == 2 and "is the input" in result.output, result.output
    assert (LATENT_REFERENCE_DIR / "model_index.json").is_file()
