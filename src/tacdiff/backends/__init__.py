"""How quantized layers execute: fake (simulated in float) or integer kernels, chosen at load."""

from tacdiff.backends.select import BACKENDS, backend_counts, use_backend

__all__ = ["BACKENDS", "backend_counts", "use_backend"]
