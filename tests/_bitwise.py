"""Bit-for-bit comparison of float32 arrays for the generator tests (tests/ is on sys.path under
pytest's default import mode)."""
import numpy as np


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_bits(a, b, what):
    """a and b have the same shape and the same float32 bit patterns (so NaN == NaN, -0 != +0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and np.array_equal(_bits(a), _bits(b)), \
        f"{what}: {np.count_nonzero(_bits(a) != _bits(b))} of {a.size} elements differ"
