"""Shared constants of the correction tests (the tiny models are in tests/tiny_models.py)."""

from __future__ import annotations

SHAPE, STEPS = (3, 16, 16), 6
SAMPLES = 64  # calibration trajectories: element-wise IBC (768 means per step) overfits 8 or 32 on fresh seeds
