"""dpprims for PyTorch: the DP engine (imports torch)."""
from .engine import DPEngine

__all__ = ["DPEngine"]
