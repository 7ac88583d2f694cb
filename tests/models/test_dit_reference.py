"""The bundled class-conditional DiT: a plain DiTPipeline folder, loaded by name, whose FP samples show the chosen
class (a CI-sized run: few images, few steps)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiTPipeline
from typer.testing import CliRunner

from tacdiff.cli import app
from tacdiff.evaluation import evaluate
from tacdiff.metrics.prompt_accuracy import prompt_accuracy
from tacdiff.models.loading import load_any_model
from tacdiff.models.reference import DIT_REFERENCE, DIT_REFERENCE_DIR

STEPS = 20
CLASS_ACCURACY_FLOOR = 0.9
"""The shipped DiT scored 1.0 at these settings (20 samples, DDIM 20, guidance 4, DiTPipeline's default)."""


def test_the_folder_is_a_dit_pipeline_diffusers_loads() -> None:
    pipe = DiTPipeline.from_pretrained(DIT_REFERENCE_DIR)
    pipe.set_progress_bar_config(disable=True)
    labels = pipe.get_label_ids(["sneaker", "trousers"])
    images = pipe(class_labels=labels, num_inference_steps=STEPS, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1)
    accuracy = prompt_accuracy(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1, labels)
    assert accuracy["overall"] == 1.0, accuracy


def test_it_loads_by_name_within_the_size_budget() -> None:
    loaded = load_any_model(DIT_REFERENCE)
    assert loaded.image_shape == (1, 32, 32) and type(loaded.model).__name__ == "DiTTransformer2DModel"
    assert sum(f.stat().st_size for f in DIT_REFERENCE_DIR.rglob("*") if f.is_file()) <= 20 * 2**20


def test_fp_samples_show_the_chosen_class() -> None:
    result = evaluate(DIT_REFERENCE, steps=STEPS, samples=20, seed=0, batch_size=20, progress=False)
    assert result["prompt_accuracy"] >= CLASS_ACCURACY_FLOOR, result["prompt_accuracy_per_class"]


def test_sample_command_takes_the_name_and_a_class(tmp_path: Path) -> None:
    out = tmp_path / "samples"
    result = CliRunner().invoke(app, ["sample", DIT_REFERENCE, "--class", "sneaker", "--out", str(out),
                                      "--num-samples", "2", "--steps", "10", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 3  # two images and the grid
