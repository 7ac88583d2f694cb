"""Activation quantization of the two attention matmuls (``q @ k^T`` and ``softmax @ v``).

The projections ``to_q``/``to_k``/``to_v``/``to_out`` are ordinary quantized linears; this
processor additionally fake-quantizes the matmul operands with quantizers attached to the
diffusers ``Attention`` module as ``q_quant``, ``k_quant``, ``v_quant`` and ``probs_quant``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

MATMUL_OPERANDS = ("q_quant", "k_quant", "v_quant", "probs_quant")


def reproduces_processor(attn: Attention) -> bool:
    """Whether :class:`QuantAttnProcessor` computes what ``attn``'s own processor does.

    It reproduces diffusers' plain processors only; others (added key/value projections as in
    ``SimpleCrossAttn`` blocks, IP-adapters, ...) keep their processor and float matmuls, while
    their projection layers are still quantized.
    """
    return isinstance(attn.processor, (AttnProcessor, AttnProcessor2_0)) and attn.added_kv_proj_dim is None


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

        query = attn.q_quant(attn.head_to_batch_dim(attn.to_q(hidden_states)))
        key = attn.k_quant(attn.head_to_batch_dim(attn.to_k(context)))
        value = attn.v_quant(attn.head_to_batch_dim(attn.to_v(context)))
        probs = attn.probs_quant(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
