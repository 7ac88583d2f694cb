"""Quantized attention computed in blocks of heads and query rows: the same result as the whole matrix."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from tacdiff.quant import attention
from tacdiff.quant.attention import quantized_attention
from tacdiff.quant.layers import RangeObserver
from tiny_models import attention_with_ranges

HEADS, QUERIES, KEYS, HEAD_DIM = 6, 40, 24, 8
PROBS_STEP = 1 / 255


def operands(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(heads, tokens, head_dim)`` and an additive mask that differs in every head and query row."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(HEADS, n, HEAD_DIM, generator=generator) for n in (QUERIES, KEYS, KEYS))
    mask = torch.where(torch.rand(HEADS, QUERIES, KEYS, generator=generator) < 0.3, -1e4, 0.0)
    return q, k, v, mask


def probs_calls(attn: Attention) -> list[int]:
    calls: list[int] = []
    attn.probs_quant.register_forward_hook(lambda module, args, out: calls.append(out.shape[0] * out.shape[1]))
    return calls


@pytest.mark.parametrize("block", [KEYS, 5 * KEYS, 3 * QUERIES * KEYS])  # one row, five rows, three heads at a time
@pytest.mark.parametrize("masked", [False, True])
def test_blocks_give_the_whole_matrix_result(block: int, masked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    attn = attention_with_ranges(HEADS, HEAD_DIM)
    q, k, v, mask = operands()
    mask = mask if masked else None
    with torch.no_grad():
        whole = quantized_attention(attn, q, k, v, mask)
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", block)
        calls = probs_calls(attn)
        blocked = quantized_attention(attn, q, k, v, mask)
    assert len(calls) > 1 and sum(calls) == HEADS * QUERIES, "every (head, query) row in exactly one block"
    # a probability on a rounding boundary may flip one code under a smaller matmul's rounding: one step of v
    torch.testing.assert_close(blocked, whole, rtol=0, atol=PROBS_STEP * 3)
    assert (blocked - whole).abs().gt(1e-5).float().mean() < 0.01


def test_a_mask_shared_by_heads_and_rows_broadcasts_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    attn = attention_with_ranges(HEADS, HEAD_DIM)
    q, k, v, mask = operands(1)
    shared = mask[:1, :1]
    with torch.no_grad():
        whole = quantized_attention(attn, q, k, v, shared.expand(HEADS, QUERIES, KEYS))
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", 4 * KEYS)
        blocked = quantized_attention(attn, q, k, v, shared)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=PROBS_STEP * 3)


@pytest.mark.parametrize("why", ["dynamic", "observed"])
def test_ranges_of_the_whole_matrix_keep_it_whole(why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample dynamic ranges and range observers (calibration) need every probability of a head at once."""
    attn = attention_with_ranges(HEADS, HEAD_DIM, dynamic=why == "dynamic")
    if why == "observed":
        attn.probs_quant.observer = RangeObserver(groups=1, segments=1)
    monkeypatch.setattr(attention, "ATTENTION_BLOCK", KEYS)
    calls = probs_calls(attn)
    with torch.no_grad():
        quantized_attention(attn, *operands())
    assert calls == [HEADS * QUERIES]

