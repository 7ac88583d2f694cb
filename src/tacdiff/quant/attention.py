"""Activation quantization of the two attention matmuls (``q @ k^T`` and ``softmax @ v``).

The projections ``to_q``/``to_k``/``to_v``/``to_out`` are ordinary quantized linears; these
processors additionally fake-quantize the matmul operands with quantizers attached to the
diffusers ``Attention`` module as ``q_quant``, ``k_quant``, ``v_quant`` and ``probs_quant``:
:class:`QuantAttnProcessor` for diffusers' plain (self- and cross-) attention, and
:class:`QuantJointAttnProcessor` for SD3's joint attention over image and text tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, JointAttnProcessor2_0

MATMUL_OPERANDS = ("q_quant", "k_quant", "v_quant", "probs_quant")


def quant_processor(attn: Attention) -> QuantAttnProcessor | QuantJointAttnProcessor | None:
    """The processor that computes what ``attn``'s own does with quantized matmul operands, or None.

    Diffusers' plain processors (without added key/value projections, as ``SimpleCrossAttn`` blocks have
    them) and SD3's ``JointAttnProcessor2_0`` are reproduced, matched by exact class; others (IP-adapters,
    fused projections, a user's own) keep their processor and float matmuls, while their projection layers
    are still quantized.
    """
    kind = type(attn.processor)
    if kind in (AttnProcessor, AttnProcessor2_0) and attn.added_kv_proj_dim is None:
        return QuantAttnProcessor()
    if kind is JointAttnProcessor2_0:
        return QuantJointAttnProcessor()
    return None


def reproduces_processor(attn: Attention) -> bool:
    """Whether tacdiff has a quantizing twin of ``attn``'s processor (:func:`quant_processor`)."""
    return quant_processor(attn) is not None


VALUES_KERNEL = "values_kernel"
"""The attribute of an ``Attention`` module where an execution backend attaches its ``probabilities @ values``
kernel (see :func:`_values_product`)."""
ATTENTION_BLOCK = 2**20
"""Attention scores per block (4 MiB in float32): :func:`quantized_attention` computes long sequences block by
block, so that each block's softmax and probability quantization run in cache, not over the whole matrix."""


def quantized_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``(batch * heads, tokens, head_dim)`` operands, each fake-quantized by
    ``attn``'s operand quantizers (the probabilities too), in diffusers' eager arithmetic.

    With a calibrated static range for the probabilities (and no observer recording them), the scores are
    computed in blocks of heads and query rows of at most :data:`ATTENTION_BLOCK` elements: every probability
    is the same function of its own row, so the result is that of the whole matrix (up to the float rounding of
    a smaller matmul), 2-3x faster at SD 1.5's 4096 tokens and without the ``heads x tokens^2`` tensor.
    """
    query, key = attn.q_quant(query), attn.k_quant(key)
    times_values = _values_product(attn, value)
    heads, rows = _block_shape(*query.shape[:2], key.shape[1])
    probs_quant = attn.probs_quant
    if probs_quant.dynamic or probs_quant.observer is not None or (heads, rows) == query.shape[:2]:
        return times_values(attn.get_attention_scores(query, key, mask), slice(None))
    out = value.new_empty(*query.shape[:2], value.shape[2])
    for h in range(0, len(query), heads):
        for r in range(0, query.shape[1], rows):
            block_mask = None if mask is None else _block_of(mask, slice(h, h + heads), slice(r, r + rows))
            scores = attn.get_attention_scores(query[h: h + heads, r: r + rows], key[h: h + heads], block_mask)
            out[h: h + heads, r: r + rows] = times_values(scores, slice(h, h + heads))
    return out


def _values_product(attn: Attention, value: torch.Tensor) -> Callable[[torch.Tensor, slice], torch.Tensor]:
    """``(probabilities, heads) -> quantized probabilities @ quantized values[heads]``: on the integer kernel an
    execution backend attached as :data:`VALUES_KERNEL` (see :mod:`tacdiff.backends.int8`; it may decline a
    call by returning None), else in float with the quantizers simulated."""
    kernel = getattr(attn, VALUES_KERNEL, None)
    product = None if kernel is None else kernel(value)
    if product is not None:
        return product
    value = attn.v_quant(value)
    return lambda probs, heads: torch.bmm(attn.probs_quant(probs), value[heads])


def _block_of(mask: torch.Tensor, heads: slice, rows: slice) -> torch.Tensor:
    """The part of an additive attention mask ``(batch * heads or 1, queries or 1, keys)`` for a block."""
    return mask[heads if len(mask) > 1 else slice(None), rows if mask.shape[1] > 1 else slice(None)]


def _block_shape(batch_heads: int, rows: int, keys: int) -> tuple[int, int]:
    """Heads and query rows per block of :func:`quantized_attention`: whole rows, as many as fit."""
    block_rows = min(rows, max(1, ATTENTION_BLOCK // keys))
    return min(batch_heads, max(1, ATTENTION_BLOCK // (block_rows * keys))), block_rows


class QuantAttnProcessor:
    """Attention processor equal to diffusers' eager ``AttnProcessor`` plus quantized matmul operands."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: object) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query, key, value = (attn.head_to_batch_dim(project(x)) for project, x in
                             ((attn.to_q, hidden_states), (attn.to_k, context), (attn.to_v, context)))
        hidden_states = attn.batch_to_head_dim(quantized_attention(attn, query, key, value, attention_mask))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantJointAttnProcessor:
    """Diffusers' ``JointAttnProcessor2_0`` (SD3's MMDiT: the image tokens' and the text tokens' projections,
    QK-normalised, attend jointly; the output splits back into the two streams) in eager arithmetic, with
    quantized matmul operands over the joint sequence."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: object,
                 **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, tokens = hidden_states.shape[:2]
        query, key, value = self._heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                                        (attn.norm_q, attn.norm_k))
        if encoder_hidden_states is not None:
            text = self._heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                               (attn.norm_added_q, attn.norm_added_k))
            query, key, value = (torch.cat(pair, dim=2) for pair in zip((query, key, value), text))
        heads, length, head_dim = query.shape[1:]
        out = quantized_attention(attn, *(x.reshape(batch * heads, length, head_dim) for x in (query, key, value)))
        out = out.view(batch, heads, length, head_dim).transpose(1, 2).reshape(batch, length, heads * head_dim)
        image = attn.to_out[1](attn.to_out[0](out[:, :tokens]))
        if encoder_hidden_states is None:
            return image
        text_out = out[:, tokens:]
        return image, (text_out if attn.context_pre_only else attn.to_add_out(text_out))

    @staticmethod
    def _heads(attn: Attention, x: torch.Tensor, projections: tuple, norms: tuple) -> tuple[torch.Tensor, ...]:
        """``x``'s query, key and value as ``(batch, heads, tokens, head_dim)``, query and key normalised."""
        q, k, v = (project(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for project in projections)
        q, k = (x if norm is None else norm(x) for x, norm in zip((q, k), norms))
        return q, k, v
