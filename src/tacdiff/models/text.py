"""Text encoders built offline (nothing is downloaded): a CLIP tokenizer over single characters, a
word-level tokenizer over a known vocabulary (unknown words map to an unknown token, never an error),
and a small random ``CLIPTextModel`` to go with either."""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast

CHARACTERS = string.ascii_lowercase + string.digits + ",.!?'-"
BOS, EOS, UNKNOWN = "<|startoftext|>", "<|endoftext|>", "<|unknown|>"


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


def word_tokenizer(words: Sequence[str], max_length: int = 77) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words``, CLIP's way round: lowercased, punctuation but ``'`` and ``-``
    dropped, ``<|startoftext|>`` and ``<|endoftext|>`` around the words, padded with ``<|endoftext|>``;
    a word not in ``words`` is ``<|unknown|>``. Save it with ``save_pretrained`` (``tokenizer.json``)."""
    vocab = {BOS: 0, EOS: 1, UNKNOWN: 2}
    for word in sorted(set(words)):
        vocab.setdefault(word.lower(), len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                                 normalizers.Replace(Regex(r"[^\w\s'-]"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                             special_tokens=[(BOS, 0), (EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNKNOWN, model_max_length=max_length)


def random_text_encoder(tokenizer: CLIPTokenizer | PreTrainedTokenizerFast, hidden_size: int, *, layers: int = 2,
                        heads: int = 4, seed: int = 0) -> CLIPTextModel:
    """A seeded random ``CLIPTextModel`` for ``tokenizer``: ``hidden_size``-wide outputs (the UNet's
    ``cross_attention_dim``), ``layers`` transformer layers of ``heads`` heads; the global RNG is untouched."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    with torch.random.fork_rng(devices=[]):  # seeded, leaving the global generator as it was
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()
