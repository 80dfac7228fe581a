"""dpprims: fused Triton kernels for differentially private deep learning.

Subpackages import their framework lazily: ``dpprims.torch`` needs torch, ``dpprims.jax`` and
``dpprims.reference`` need jax; importing ``dpprims`` itself imports neither and never queries
a GPU.
"""
__version__ = "0.1.0"
