"""dpprims for PyTorch: the DP engine and make_private for your own loop (imports torch)."""
from .attention import DPMultiheadAttention, convert_multihead_attention
from .engine import DPEngine
from .private import DPOptimizer, PhysicalBatch, PoissonLoader, PrivateTraining, make_private

__all__ = ["DPEngine", "DPMultiheadAttention", "DPOptimizer", "PhysicalBatch", "PoissonLoader", "PrivateTraining",
           "convert_multihead_attention", "make_private"]
