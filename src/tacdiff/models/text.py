"""Text encoders built offline: a CLIP tokenizer from a vocabulary written on the spot (nothing is
downloaded), and a small random ``CLIPTextModel`` to go with it, for test and scale-check pipelines."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CHARACTERS = string.ascii_lowercase + string.digits + ",.!?'-"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def character_tokenizer(folder: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP byte-pair tokenizer whose vocabulary is single characters (:data:`CHARACTERS`, each also in
    its word-final ``</w>`` form) and no merges, written to ``folder``; other characters map to the
    unknown token (``<|endoftext|>``), never an error."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {BOS: 0, EOS: 1}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def random_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, *, layers: int = 2, heads: int = 4,
                        seed: int = 0) -> CLIPTextModel:
    """A seeded random ``CLIPTextModel`` for ``tokenizer``: ``hidden_size``-wide outputs (the UNet's
    ``cross_attention_dim``), ``layers`` transformer layers of ``heads`` heads."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    return CLIPTextModel(config).eval()
