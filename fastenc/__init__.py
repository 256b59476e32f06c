"""fastenc: one engine to train and compare vision encoders (CLIP, SigLIP, DINO, ...) under identical conditions.

Importing fastenc never touches CUDA and never requires an optional accelerator library (triton, flash_attn,
nvidia.dali, deepspeed, the native extension): those are imported lazily behind `fastenc.utils.optional`.
"""

__version__ = "0.1.0"
