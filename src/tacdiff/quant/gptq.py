"""GPTQ weight rounding: each column's rounding error is compensated by the columns not yet rounded.

GPTQ (Frantar et al., ICLR 2023), built on Optimal Brain Quantization (Frantar & Alistarh,
NeurIPS 2022), rounds a layer's weight matrix one input column at a time and after each
column updates the remaining ones so that the layer's output error ``||W X - Q X||²`` over
calibration inputs ``X`` stays minimal, using the inverse of the inputs' Gram matrix
``H = X Xᵀ``. It needs no gradient steps, only each layer's ``H``, so it takes seconds where
learned rounding (:mod:`tacdiff.quant.adaround`) takes minutes. The grid (per-output-channel
scale and zero point) is the one round-to-nearest picks; only the integer codes change.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tacdiff.quant import primitives as P
from tacdiff.distributed import Shard, rank, world_size
from tacdiff.quant.calibrate import Batch, activations_unquantized, run_batches, split_batches
from tacdiff.quant.layers import QuantConv2d, QuantLinear

if TYPE_CHECKING:  # quant/ sits below sampling/: the calibration set is only named here
    from tacdiff.sampling.calibration import CalibrationSet

DAMP = 0.01  # added to H's diagonal, as a fraction of its mean (GPTQ's default)
MIN_RANK_FRACTION = 0.9  # below this, the calibration inputs are too few to tune the layer to
RANK_RTOL = 1e-5
BLOCK = 128  # columns rounded between two full updates of the rest (GPTQ's lazy batch updates)
MAX_GRAM_BYTES = 1 << 30  # Gram matrices held at once; more layers take more calibration passes
MAX_HELD_BYTES = 1 << 32  # per-batch Gram terms a process holds until the earlier processes' sum arrives
MAX_UNFOLD_BYTES = 1 << 28  # unfolded convolution inputs per chunk while accumulating H

QuantLayer = QuantConv2d | QuantLinear


def gptq_codes(weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               bits: int) -> torch.Tensor:
    """Integer codes of ``weight`` ``(out, columns)`` that GPTQ picks on the grid ``scale``/``zero_point``.

    ``gram`` is ``X Xᵀ`` of the layer's inputs ``(columns, columns)``; ``scale`` and
    ``zero_point`` have the weight's shape (one grid per output channel, repeated over its
    columns). Columns no input ever reached (zero diagonal) are rounded to nearest. Returns
    float codes in ``[0, 2**bits - 1]`` with the weight's shape.
    """
    w = weight.double().clone()
    scale, zero_point = scale.double(), zero_point.double()
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds how column i's error spreads over later columns.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    columns = w.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        errors = torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            codes[:, i] = P.quantize_tensor(w[:, i], scale[:, i], zero_point[:, i], bits)
            error = (w[:, i] - P.dequantize_tensor(codes[:, i], scale[:, i], zero_point[:, i], w.dtype)) / hinv[i, i]
            w[:, i + 1:end] -= error[:, None] * hinv[i, i + 1:end]
            errors[:, i - start] = error
        w[:, end:] -= errors @ hinv[start:end, end:]
    return codes


def gram_rank_fraction(gram: torch.Tensor) -> float:
    """The rank of ``gram`` as a fraction of its size: how many input directions calibration covered.

    Eigenvalues below ``RANK_RTOL`` of the largest count as zero: summing the Gram matrix in
    float32 leaves rounding noise of about 1e-8 of it in directions no input took.
    """
    return torch.linalg.matrix_rank(gram.double(), hermitian=True, rtol=RANK_RTOL).item() / gram.shape[0]


@torch.no_grad()
def quantize_weights_gptq(model: nn.Module, calibration: CalibrationSet, method: P.RangeMethod = "mse", *,
                          batch_size: int = 64, progress: bool = True) -> list[str]:
    """Quantize the weights of every quantized layer of ``model`` with GPTQ, in place.

    Each layer's grid comes from ``method`` on its float weight, as for round-to-nearest.
    ``H`` is gathered from the layer's inputs on the calibration set with activation
    quantizers off; layers are processed in groups whose Gram matrices fit in
    ``MAX_GRAM_BYTES``, one calibration pass each, so a later group sees the earlier ones
    already quantized. Layers GPTQ cannot serve keep round-to-nearest: grouped or
    non-zero-padded convolutions, and layers whose calibration inputs span less than
    ``MIN_RANK_FRACTION`` of their input space (the time embedding sees only as many distinct
    inputs as there are calibration timesteps; tuning it to them would hurt every other timestep).

    Returns:
        The names of the layers left with round-to-nearest codes.
    """
    supported, rounded_to_nearest = [], []
    for name, layer in model.named_modules():
        if isinstance(layer, (QuantConv2d, QuantLinear)) and _supported(layer):
            supported.append((name, layer))
        elif isinstance(layer, (QuantConv2d, QuantLinear)):
            layer.quantize_weight(method)
            rounded_to_nearest.append(name)
    groups = _groups(supported, MAX_GRAM_BYTES)
    with activations_unquantized(model):
        for g, group in enumerate(groups):
            desc = f"GPTQ inputs {g + 1}/{len(groups)}"
            grams = _gram_matrices(model, group, calibration, batch_size, progress, desc)
            for name, layer in tqdm(group, desc="GPTQ rounding", disable=not progress, leave=False):
                gram = grams.pop(name)
                if gram_rank_fraction(gram) < MIN_RANK_FRACTION:
                    layer.quantize_weight(method)
                    rounded_to_nearest.append(name)
                    continue
                _quantize_layer(layer, gram, method)
    return rounded_to_nearest


def _supported(layer: QuantLayer) -> bool:
    if isinstance(layer, QuantLinear):
        return True
    return layer.groups == 1 and not isinstance(layer.padding, str) and layer.padding_mode == "zeros"


def _columns(layer: QuantLayer) -> int:
    return layer.weight[0].numel()


def _groups(layers: list[tuple[str, QuantLayer]], budget: int) -> list[list[tuple[str, QuantLayer]]]:
    """Consecutive layers cut into groups whose float32 Gram matrices fit in ``budget`` bytes (a layer larger
    than that is a group of its own)."""
    groups: list[list[tuple[str, QuantLayer]]] = []
    used = budget
    for entry in layers:
        size = 4 * _columns(entry[1]) ** 2
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(entry)
        used += size
    return groups


def _gram_matrices(model: nn.Module, group: list[tuple[str, QuantLayer]], calibration: CalibrationSet,
                   batch_size: int, progress: bool, desc: str) -> dict[str, torch.Tensor]:
    """``X Xᵀ`` of each layer's inputs over the calibration set, summed in float32 in batch order (zero for a layer
    never called).

    Under ``torchrun`` each process computes its share of the batches' terms and the sum is relayed from rank
    to rank (:meth:`~tacdiff.distributed.Shard.relay`), so it is bit-identical to one process's. The terms a
    process holds until its turn are bounded by ``MAX_HELD_BYTES``: more take several passes over the share,
    and where that would be no faster than one process, every process runs all batches.
    """
    batches, mine = split_batches(model, calibration, batch_size)
    if mine.split:
        most = -(-len(batches) // world_size())  # the largest share
        parts = _groups(group, MAX_HELD_BYTES // most)
        if len(parts) * most < len(batches):
            passes = [_gram_pass(model, part, batches, mine, progress, f"{desc}, part {i + 1}/{len(parts)}")
                      for i, part in enumerate(parts)]
            return {name: gram for grams in passes for name, gram in grams.items()}
    return _gram_pass(model, group, batches, Shard(range(len(batches)), 1), progress, desc)


def _gram_pass(model: nn.Module, group: list[tuple[str, QuantLayer]], batches: list[Batch], mine: Shard,
               progress: bool, desc: str) -> dict[str, torch.Tensor]:
    """One pass of :func:`_gram_matrices` over this process's share ``mine`` of ``batches``."""
    sums = {name: layer.weight.new_zeros(_columns(layer), _columns(layer), dtype=torch.float32)
            for name, layer in group}
    held: dict[str, list[torch.Tensor]] = {name: [] for name in sums}
    hold = mine.split and rank() > 0  # added to the earlier ranks' sum when it arrives

    def accumulate(name: str, layer: QuantLayer, x: torch.Tensor) -> None:
        for rows in _input_rows(layer, x):
            rows = rows.float()
            if hold:
                held[name].append(rows.T @ rows)
            else:
                sums[name] += rows.T @ rows

    handles = [layer.register_forward_pre_hook(lambda mod, args, name=name: accumulate(name, mod,
                                                                                  mod.matmul_input(args[0])))
               for name, layer in group]
    try:
        run_batches(model, mine.take(batches), desc=desc, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    if not mine.split:
        return sums

    def add_held(previous: torch.Tensor | None) -> torch.Tensor:
        if previous is not None:
            for (name, total), start in zip(sums.items(), _offsets(sums)):
                total.copy_(previous[start:start + total.numel()].view_as(total))
                for term in held.pop(name):
                    total += term
        return torch.cat([total.flatten().cpu() for total in sums.values()])

    flat = mine.relay(add_held, torch.empty(sum(total.numel() for total in sums.values())))
    return {name: flat[start:start + total.numel()].view_as(total).to(total.device)
            for (name, total), start in zip(sums.items(), _offsets(sums))}


def _offsets(tensors: dict[str, torch.Tensor]) -> list[int]:
    """Where each of ``tensors`` starts in their flattened concatenation."""
    return [0, *itertools.accumulate(t.numel() for t in tensors.values())][:-1]


def _input_rows(layer: QuantLayer, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The layer's input as rows of its weight's column space, in chunks of bounded memory."""
    if isinstance(layer, QuantLinear):
        yield x.reshape(-1, x.shape[-1])
        return
    positions = _output_positions(layer, x)
    per_sample = x.element_size() * _columns(layer) * positions
    chunk = max(1, MAX_UNFOLD_BYTES // per_sample)
    for start in range(0, x.shape[0], chunk):
        unfolded = F.unfold(x[start:start + chunk], layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        yield unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])


def _output_positions(conv: QuantConv2d, x: torch.Tensor) -> int:
    size = [(x.shape[2 + d] + 2 * conv.padding[d] - conv.dilation[d] * (conv.kernel_size[d] - 1) - 1)
            // conv.stride[d] + 1 for d in range(2)]
    return size[0] * size[1]


def _quantize_layer(layer: QuantLayer, gram: torch.Tensor, method: P.RangeMethod) -> None:
    """Round ``layer``'s float weight with GPTQ on its round-to-nearest grid and store the codes."""
    scale, zero_point = layer.weight_qparams(method)
    weight = layer.weight.reshape(layer.weight.shape[0], -1)

    def per_column(p: torch.Tensor) -> torch.Tensor:
        return layer.expand(p).expand_as(layer.weight).reshape(weight.shape)

    codes = gptq_codes(weight, gram, per_column(scale), per_column(zero_point), layer.w_bits)
    layer.set_codes(codes.reshape(layer.weight.shape), scale, zero_point)
