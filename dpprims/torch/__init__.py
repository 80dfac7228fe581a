"""dpprims for PyTorch: the DP engine and make_private for your own loop (imports torch)."""
from .engine import DPEngine
from .private import DPOptimizer, PhysicalBatch, PoissonLoader, PrivateTraining, make_private

__all__ = ["DPEngine", "DPOptimizer", "PhysicalBatch", "PoissonLoader", "PrivateTraining", "make_private"]
