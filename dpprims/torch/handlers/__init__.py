"""Layer handlers of the torch DPEngine, one per supported module type (see base.py)."""
from __future__ import annotations

from .base import LayerHandler
from .conv import ConvHandler
from .embedding import EmbeddingHandler
from .linear import LinearHandler
from .norm import GroupNormHandler, LayerNormHandler
from .rmsnorm import RMSNormHandler

HANDLERS: list = [LinearHandler, ConvHandler, GroupNormHandler, LayerNormHandler, RMSNormHandler, EmbeddingHandler]


def handler_for(module):
    """The handler class for ``module`` (exact type first, then isinstance), or None."""
    for h in HANDLERS:
        if type(module) in h.module_types:
            return h
    for h in HANDLERS:
        if isinstance(module, h.module_types):
            return h
    return None


__all__ = ["HANDLERS", "LayerHandler", "handler_for"]
