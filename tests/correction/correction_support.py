"""Shared constants of the correction tests (the tiny models are in tests/tiny_models.py)."""

from __future__ import annotations

SHAPE, STEPS, SAMPLES = (3, 16, 16), 6, 8
