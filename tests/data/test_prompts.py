"""Prompt sets: the default list, prompt files and the prompt-set hash."""

from __future__ import annotations

from pathlib import Path

import pytest

from tacdiff.data.prompts import (DEFAULT_PROMPTS, FASHION_NAMES, PIPELINE_PROMPTS, PLURAL_NAMES, default_prompts,
                                  fashion_captions, fashion_class_of, fashion_prompts, fashion_vocabulary, prompt_of,
                                  prompt_set_sha256, read_prompts)


def test_prompt_files_hold_one_prompt_per_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("  a red shoe \n\n a cat\n\t\n", encoding="utf-8")
    assert read_prompts(file) == ["a red shoe", "a cat"]


@pytest.mark.parametrize("content, message", [(None, "not found"), ("\n \n", "holds no prompt"),
                                              (b"\xff\xfe\x00", "not UTF-8")])
def test_bad_prompt_files_raise_naming_the_file(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    file = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        read_prompts(file)
    assert str(file) in str(error.value)


def test_the_hash_identifies_an_ordered_set() -> None:
    assert prompt_set_sha256(["a", "b"]) == prompt_set_sha256(["a", "b"])
    assert len({prompt_set_sha256(p) for p in (["a", "b"], ["b", "a"], ["a"], ["a b"], ["ab"])}) == 5


def test_prompts_are_used_in_turn_and_the_default_list_varies() -> None:
    assert [prompt_of(["x", "y", "z"], i) for i in range(5)] == ["x", "y", "z", "x", "y"]
    assert len(set(DEFAULT_PROMPTS)) == len(DEFAULT_PROMPTS) >= 32


def test_fashion_captions_name_their_class_and_leave_some_empty() -> None:
    labels = [i % 10 for i in range(2000)]
    captions = fashion_captions(labels, seed=0)
    assert captions == fashion_captions(labels, seed=0) and captions != fashion_captions(labels, seed=1)
    assert 0.08 < sum(c == "" for c in captions) / len(captions) < 0.12
    for label, caption in zip(labels, captions):
        assert caption == "" or any(name in caption for name in FASHION_NAMES[label]), (label, caption)
    assert not any(f"a {name}" in caption for caption in captions for name in PLURAL_NAMES)
    assert set(" ".join(captions).replace(",", " ").split()) <= set(fashion_vocabulary())


@pytest.mark.parametrize("prompt, label", [("a shirt", 6), ("a t-shirt", 0), ("a photo of a sneaker", 7),
                                           ("sneakers, product photo", 7), ("a pair of ankle boots", 9),
                                           ("a bag and a coat", None), ("a cat", None), ("", None)])
def test_the_class_a_prompt_names(prompt: str, label: int | None) -> None:
    assert fashion_class_of(prompt) == label


def test_every_caption_names_its_own_class() -> None:
    labels = [i % 10 for i in range(500)]
    for label, caption in zip(labels, fashion_captions(labels, seed=3, empty_fraction=0.0)):
        assert fashion_class_of(caption) == label, caption


def test_fashion_prompts_are_balanced_and_cover_every_class_in_ten_samples() -> None:
    prompts = fashion_prompts()
    classes = [fashion_class_of(prompt_of(prompts, i)) for i in range(40)]
    assert all(sorted(classes[i:i + 10]) == list(range(10)) for i in range(0, 40, 10))
    assert [classes.count(c) for c in range(10)] == [4] * 10
    assert set(" ".join(prompts).replace(",", " ").split()) <= set(fashion_vocabulary())


def test_a_pipeline_folder_may_carry_its_default_prompts(tmp_path: Path) -> None:
    assert default_prompts(None) == DEFAULT_PROMPTS and default_prompts(tmp_path) == DEFAULT_PROMPTS
    (tmp_path / PIPELINE_PROMPTS).write_text("a photo of a bag\n\ncoat\n", encoding="utf-8")
    assert default_prompts(tmp_path) == ("a photo of a bag", "coat")
