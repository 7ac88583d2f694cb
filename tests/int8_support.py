"""What the int8 tests can run on this CPU: 8-bit x 8-bit products sum exactly only with VNNI or AMX."""

from __future__ import annotations

import pytest

from tacdiff.backends import int8, select
from tacdiff.backends.codes import exact_int8_cpu

needs_exact_int8 = pytest.mark.skipif(
    not exact_int8_cpu(), reason="8-bit activations times 8-bit weights, and torch._int_mm, are exact only on CPUs "
    "with VNNI or AMX (this one sums pairs of int8 products in int16); the route for such CPUs is tested with "
    "4-bit weights and 7-bit activations")


def pretend_no_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the int8 backend choose its kernels as on a CPU without VNNI or AMX (the kernels it then picks are
    exact on every CPU for the codes it lets through, so the answers can be checked here too)."""
    for module in (int8, select):
        monkeypatch.setattr(module, "exact_int8_cpu", lambda: False)
