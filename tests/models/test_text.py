"""Offline tokenizers and text encoders: character-level CLIP BPE, word-level over a vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tacdiff.data.prompts import fashion_vocabulary
from tacdiff.models.text import character_tokenizer, random_text_encoder, word_tokenizer

NATURAL = ["a photo of a sneaker", "sneakers", "a pair of trousers", "an ankle boot", "t-shirt", "A Sneaker!"]


@pytest.mark.parametrize("prompt", NATURAL)
def test_natural_phrasings_of_the_classes_are_known_words(prompt: str) -> None:
    tokenizer = word_tokenizer(fashion_vocabulary(), max_length=16)
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) == len(prompt.split()) + 2


def test_unknown_words_map_to_the_unknown_token_and_prompts_pad_and_cut() -> None:
    tokenizer = word_tokenizer(["a", "cat"], max_length=6)
    assert tokenizer("a zebra").input_ids == [0, 3, 2, 1]
    padded = tokenizer("a cat a cat a cat", padding="max_length", max_length=6, truncation=True).input_ids
    assert len(padded) == 6 and padded[0] == 0
    assert tokenizer("a cat", padding="max_length", max_length=6).input_ids == [0, 3, 4, 1, 1, 1]


def test_a_saved_word_tokenizer_loads_as_it_was(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(fashion_vocabulary(), max_length=16)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    caption = "a black and white photo of a coat"
    assert again(caption).input_ids == tokenizer(caption).input_ids
    assert again.model_max_length == 16


@pytest.mark.parametrize("build", [lambda folder: character_tokenizer(folder, 16),
                                   lambda folder: word_tokenizer(fashion_vocabulary(), 16)])
def test_random_text_encoders_fit_their_tokenizer(tmp_path: Path, build) -> None:
    tokenizer = build(tmp_path)
    encoder = random_text_encoder(tokenizer, hidden_size=32, seed=3)
    ids = tokenizer(["a coat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)[0]
    assert out.shape == (1, 16, 32) and torch.isfinite(out).all()
    assert torch.equal(random_text_encoder(tokenizer, hidden_size=32, seed=3)(ids)[0], out), "seeded"
