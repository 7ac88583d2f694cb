"""How quantized layers execute: fake (simulated in float) or integer kernels, chosen at load.

One module per kernel family: :mod:`~tacdiff.backends.int_mm` (``torch._int_mm``: dynamic and per-token
ranges, and CUDA) and :mod:`~tacdiff.backends.onednn` (oneDNN's int8 convolution and linear layer, on the CPU),
over the shared code arithmetic of
:mod:`~tacdiff.backends.codes`; :mod:`~tacdiff.backends.int8` builds the integer layers and
:mod:`~tacdiff.backends.select` applies a backend to a model with one verb, :func:`use_backend`.

Why these kernels: PyTorch 2.13 deprecates the quantized-tensor functions that the faster ``torch.ao``
quantized modules need. ``torch.ops.onednn.qconv2d_pointwise`` is the int8 convolution that PyTorch's
own x86 Inductor lowering of quantized models calls, on plain uint8/int8 tensors, and ``torch._int_mm``
the plain int8 GEMM that torchao builds its int8 paths on; ``torch._weight_int8pack_mm`` is far slower
than float32 here. ``benchmarks/speed.py --kernels`` measures the candidates.
"""

from tacdiff.backends.select import BACKENDS, backend_counts, check_backend, use_backend

__all__ = ["BACKENDS", "backend_counts", "check_backend", "use_backend"]
