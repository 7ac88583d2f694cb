"""tacdiff: post-training quantization of diffusers models with timestep-aware correction.

Implements the method of "Timestep-Aware Correction for Quantized Diffusion Models"
(Yao et al., ECCV 2024) on top of a Q-Diffusion-style PTQ engine.
"""

__version__ = "0.1.0"
