"""The bundled reference models, their training, and loading of diffusers models and pipeline folders.

Submodules load on first use (``tacdiff.models.reference.LATENT_REFERENCE_DIR`` after ``import tacdiff``).
"""

from tacdiff._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {})
