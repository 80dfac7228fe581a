"""Gaussian noise for DP-SGD: the generator, its RNG contract, and what its tails cost in delta.

Framework-neutral (pure Python). The kernels are in ``dpprims.kernels.noise`` (noise only) and
``dpprims.kernels.update`` (noise + normalisation + optimizer update in one pass); the torch ops in
``dpprims.bindings.torch.noise`` / ``.update``. All of them draw the *same* numbers for the same
(seed, step, rank, pair index): the torch fallback reproduces the Philox words bit for bit. On a
CPU without Triton, ``dpprims.noise_cpu`` (numba + numpy's float32 libm) evaluates this generator
for the torch plain path and the JAX jnp path at about the speed of torch.randn, bit for bit the
interpreter's kernel - the same generator, so everything below (tails, delta) holds unchanged.

1. The generator
================
For one pair of normals, Philox4x32-10 (key = 64-bit seed, 128-bit counter, see section 2) gives
four 32-bit words w0, w1, w2, w3. With x0 the first word of a second Philox block (counter word 3
with bit 0 set; computed only when w0 == w1 == 0, i.e. with probability 2^-64)::

    J   = w0 * 2^96 + w1 * 2^64 + w2 * 2^32 + x0          (a uniform 128-bit integer)
    u   = (J + 1) * 2^-128                                 (uniform on {2^-128, 2*2^-128, ..., 1})
    rho = sqrt(-2 ln u),  theta = 2 pi * ((w3 >> 8) - 2^23) * 2^-24     (24-bit angle in [-pi, pi))
    z0  = rho cos(theta),  z1 = rho sin(theta)                           (Box-Muller, both used)

For u uniform on (0, 1] this is exact Box-Muller: (z0, z1) ~ N(0, I_2). u is a 128-bit uniform
(not 64-bit) because of the delta budget below: at sigma = 0.3, q = 1 and 10^6 steps a 64-bit
uniform (|z| <= 9.42) costs ~4e-2 in delta and a 96-bit one (|z| <= 11.54) ~2.5e-9; 112 bits are
the least that reach 1e-12, 128 bits (4 words, one Philox block) leave four orders of margin.

fp32 evaluation without losing the small-u precision. u is never formed (2^-128 is subnormal
in fp32 and flushed to zero on GPUs). With k in {0, 1, 2, 3} the number of leading zero words
among (w0, w1, w2), hi/lo the first two words from position k on (x0 + 1 when k = 3)::

    v   = (hi + (lo + 1) * 2^-32) * 2^-32    in [2^-32, 1],   u = 2^(-32 k) * v * (1 + O(2^-32))
    -ln u = k * 32 ln 2 - ln v

so -ln u keeps full fp32 *relative* precision all the way to u = 2^-128. Error budget: v carries
<= 2 roundings (2^-23 relative, i.e. 2^-23 absolute in ln v), ln v <= 4 ulp (numpy) or 2^-22.6 ln 2
absolute (a GPU's fast lg2), k 32 ln 2 and the sum <= 1 ulp each, so the computed L~ of
L = -ln u obeys |L~ - L| <= 2^-21 L + 2^-21. Hence, for every t <= Z_MAX,
P(|rho~| > t) / P(rho > t) lies in exp(+-(t^2 2^-22 + 2^-21)) subset [1 - 5e-5, 1 + 5e-5]:
the fp32 rounding of u and of the logarithm changes tail probabilities by a relative 5e-5 at
most, uniformly up to the largest |z|; the grid of u adds an absolute 2^-128 per pair. Both are
folded into :func:`truncation_delta_bound` (``fp_rel_err``). (What no floating-point sampler
avoids - outputs live on a lattice, Mironov 2012 - is out of scope here as everywhere in DP-SGD.)

Largest |z|: rho <= sqrt(-2 ln 2^-128) = sqrt(256 ln 2) = Z_MAX = 13.3209 (computed value within
a relative 2^-21 of it), |z0|, |z1| <= rho. Compare Triton's tl.randn: u1 clamped to >= 1e-7,
|z| <= sqrt(-2 ln 1e-7) = 5.6777 (Z_MAX_TL_RANDN).

2. RNG contract (Philox4x32-10 counter layout)
==============================================
* key    = the 64-bit seed (k0 = low word, k1 = high word). A user seed, or in secure mode
           :func:`secure_seed` (64 bits from os.urandom). On the device it is an int32[2] array
           [low, high] (bit patterns) so that JAX needs no x64 mode; :func:`seed_words`.
* c0, c1 = low / high word of the 64-bit *pair index* P = pair_offset + (element_index >> 1).
           Element 2j of a parameter gets z0, element 2j+1 gets z1 of pair j. The binding gives
           each parameter a disjoint range of pair indices: :func:`pair_offsets` (cumulative sum
           of ceil(numel / 2) in list order). Limit: total pairs per step < 2^63 (int64).
* c2     = step (one-element int32 device array, 0 <= step < 2^31; the fused Adam update also
           uses it, 1-based, for bias correction).
* c3     = DOMAIN_TAG << 24 | rank << 4 | sub: DOMAIN_TAG = 0x4E separates Gaussian-noise
           streams from any other Philox stream keyed by the same seed (other users must pick
           another tag), rank < 2^20 (data-parallel rank; DESIGN: noise is drawn on one rank, but
           distinct ranks never collide), sub = 0 for the main block, 1 for the extension word.
So (seed, counter) is never reused across parameters (disjoint P ranges), steps (c2), ranks (c3)
or seeds (key): distinct noise unless the caller reuses (seed, step, rank) for the same
parameter list - the torch helper refuses a non-increasing integer step.

3. Truncation: the extra delta (derivation)
===========================================
Units: sensitivity Delta = 1 in units of C, noise sigma (in units of C); in z-units one example
moves the mean by a vector a with ||a||_2 <= B = Delta / sigma. Adjacency add/remove
(D' = D + {x}), Poisson sampling rate q, T adaptive steps.

Idealisation: the generator's pair is N(0, I_2) *conditioned* on the disk ||xi_k|| <= R (R = Z_MAX;
u uniform on [2^-128, 1] gives exactly that law; grid and fp32 effects are the two terms above).
For d coordinates (K = ceil(d/2) pairs) the noise is N(0, I) conditioned on the product of disks
T_R, of Gaussian mass alpha = (1 - e^(-R^2/2))^K. Write phi for the Gaussian density, zeta_t the
output minus the batch mean (given the history and the batch, which Poisson sampling draws alike
under D and D'; condition on the batch sequence and average at the end).

Per step the truncated densities are f_R = phi 1_T / alpha, and
    under D : P_R = phi(zeta) 1_T(zeta) / alpha
    under D': Q_R = [(1-q) phi(zeta) 1_T(zeta) + q phi(zeta - a) 1_T(zeta - a)] / alpha.
Where zeta and zeta - a both lie in T_R the ratio Q_R / P_R equals the ideal ratio (alpha cancels).
Let m = sup_{||a|| <= B} P_{xi ~ f_R}(xi + a not in T_R) (the support mismatch).

(i) Q_R vs P_R. Let E = {some step includes x and its noise + a leaves T_R}; P(E) <= T q m. Off E
the per-step sub-density is <= 1_T(zeta) Q_phi(zeta) / alpha, and P_R = 1_T P_phi / alpha, so with
G = {all zeta_t in T_R}: Q_R(S) <= T q m + alpha^-T Q_phi(S & G) <= T q m + e^eps P_R(S)
+ alpha^-T delta_phi(eps), where delta_phi is the ideal mechanism's delta (what the accountant
computes; the ideal pairs given the batches are dominated by the usual subsampled-Gaussian pair).
(ii) P_R vs Q_R. On zeta in T_R, zeta - a in T_R: P_R = P_phi / alpha, Q_R = Q_phi / alpha. On
zeta in T_R, zeta - a not in T_R: Q_R = (1-q) P_R, so write P_R = w P_phi / alpha + e with
w = (1-q) phi / Q_phi in [0, 1] (then w Q_phi / alpha = Q_R) and an excess e >= 0 of mass
<= min(m, q (1 - alpha) / ((1 - q) alpha)) per step. Multiplying sub-densities by the same
w in [0, 1] cannot increase sup_S (P(S) - e^eps Q(S)), so P_R(S) <= e^eps Q_R(S) + alpha^-T
delta_phi(eps) + T min(m, q (1-alpha) / ((1-q) alpha)).
Together (delta is the larger of the two directions): delta_R(eps) <= alpha^-T delta_phi(eps)
+ max(T q m, T min(m, q (1-alpha)/((1-q) alpha))).

The mismatch m. Pair k leaves the disk only if ||xi_k|| > R - b_k (b_k = ||a_k||, sum b_k^2 <= B^2),
so m <= sum_k f(b_k) / (1 - e^(-R^2/2)) with the Rayleigh annulus mass
f(b) = e^(-(R-b)^2/2) - e^(-R^2/2). A shift concentrated in one pair gives f(B); spread over
many pairs each term is ~ R b e^(-R^2/2): for b <= c/R (c = 2.5) f(b) <= (e^c - 1)/c R e^(-R^2/2) b,
summing to <= A sqrt(s) with A = (e^c-1)/c R e^(-R^2/2) sqrt(K) and s the squared norm on those
pairs (Cauchy-Schwarz); for b >= c/R, f(b)/b^2 is nondecreasing up to B when (R-b) b >= 2 on
[c/R, B] (true for R^2 >= 12.5 and (R-B) B >= 2), so those pairs add <= f(B)(B^2 - s)/B^2
(otherwise <= f(B) (B R / c)^2 (B^2 - s)/B^2). Maximising over s:
m <= [G + A^2 B^2 / (4 G)] / (1 - e^(-R^2/2)) if A B < 2G, else A B / (1 - e^(-R^2/2)).
With K = 2^39 (dim = 2^40 parameters) the spread term is ~1e-31: the concentrated shift decides.
For per-coordinate truncation |z_j| <= z_max ("interval", the tl.randn picture of DESIGN.md) the
same argument holds with f(b) = Phibar(z_max - b) - Phibar(z_max), f(b) <= e^c phi(z_max) b
for b <= c / z_max, K = d; at d = 1 it is the design note's T q Phibar(z_max - 1/sigma).

Numbers (dim = 2^40, delta_phi <= 1):
* dpprims (R = 13.3209), sigma = 0.3, q = 1, T = 10^6: 2.2e-16 (q = 0.01: 2.2e-18); it only
  decreases with sigma and q, so < 1e-12 for every sigma >= 0.3, q <= 1, T <= 10^6.
* Triton tl.randn (5.6777), interval, d = 1, sigma = 1, q = 0.01, T = 1000: 1.44e-5 (the anchor).
  The same with the shift spread over d = 10^5 coordinates: 1.4e-2 - the spread term dominates.
* A 64-bit uniform (R = 9.4196) at sigma = 0.3, q = 1, T = 10^6: 4e-2; 96-bit (11.537): 2.5e-9.
"""
from __future__ import annotations

import math
import os

# ----------------------------------------------------------------------------- constants
U_BITS = 128
Z_MAX = math.sqrt(2.0 * U_BITS * math.log(2.0))  # 13.3209..., largest |z| of dpprims' generator
Z_MAX_U64 = math.sqrt(2.0 * 64 * math.log(2.0))  # 9.4196..., a 64-bit uniform (for comparison)
Z_MAX_U96 = math.sqrt(2.0 * 96 * math.log(2.0))  # 11.537..., a 96-bit uniform (for comparison)
Z_MAX_TL_RANDN = math.sqrt(-2.0 * math.log(1e-7))  # 5.6777..., Triton tl.randn (u clamped at 1e-7)
DIM_MAX = 2**40  # parameter count the default bound is valid for (about 1.1e12)
FP_REL_ERR = 5e-5  # relative change of tail probabilities from fp32 evaluation (derived above)

# counter layout (section 2)
DOMAIN_TAG = 0x4E
RANK_BITS = 20
MAX_RANK = (1 << RANK_BITS) - 1
MAX_STEP = (1 << 31) - 1
MAX_PAIRS = (1 << 63) - 1
SUB_MAIN = 0
SUB_EXTENSION = 1


# ----------------------------------------------------------------------------- RNG layout
def stream_word(rank: int) -> int:
    """Philox counter word c3 for the main block of ``rank`` (the kernel sets bit 0 for the
    extension word)."""
    rank = int(rank)
    if not 0 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [0, {MAX_RANK}] (counter layout: {RANK_BITS} rank bits), got {rank}")
    return (DOMAIN_TAG << 24) | (rank << 4) | SUB_MAIN


def counter_words(pair_index: int, step: int, rank: int, extension: bool = False) -> tuple[int, int, int, int]:
    """The 128-bit Philox counter (c0, c1, c2, c3) of noise pair ``pair_index`` (uint32 values)."""
    pair_index, step = int(pair_index), int(step)
    check_step(step)
    if not 0 <= pair_index <= MAX_PAIRS:
        raise ValueError(f"pair index must be in [0, 2^63), got {pair_index}")
    return (pair_index & 0xFFFFFFFF, pair_index >> 32, step, stream_word(rank) | int(bool(extension)))


def check_step(step: int) -> None:
    step = int(step)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be in [0, 2^31) (Philox counter word c2, an int32 array), got {step}")


def pair_offsets(numels) -> tuple[list[int], int]:
    """Disjoint pair-index ranges for a list of parameters: parameter i owns pairs
    [offsets[i], offsets[i] + ceil(numels[i] / 2)). Returns (offsets, total_pairs)."""
    offsets, total = [], 0
    for n in numels:
        n = int(n)
        if n < 0:
            raise ValueError(f"negative numel {n}")
        offsets.append(total)
        total += (n + 1) // 2
    if total > MAX_PAIRS:
        raise ValueError(f"{total} noise pairs in one step exceed the counter layout's limit of 2^63 - 1")
    return offsets, total


def check_pair_range(pair_offset: int, numel: int) -> None:
    """Raise unless pairs [pair_offset, pair_offset + ceil(numel/2)) fit the 63-bit pair index."""
    pair_offset, numel = int(pair_offset), int(numel)
    if pair_offset < 0 or numel < 0 or pair_offset + (numel + 1) // 2 > MAX_PAIRS:
        raise ValueError(f"noise pairs [{pair_offset}, {pair_offset} + ceil({numel}/2)) leave [0, 2^63)")


def seed_words(seed: int) -> tuple[int, int]:
    """A 64-bit seed as the (low, high) words the kernels read, as signed int32 bit patterns."""
    seed = int(seed)
    if not 0 <= seed < (1 << 64):
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")

    def s32(w):
        return w - (1 << 32) if w >= (1 << 31) else w

    return s32(seed & 0xFFFFFFFF), s32(seed >> 32)


def secure_seed() -> int:
    """A 64-bit seed from the operating system's CSPRNG (secure mode)."""
    return int.from_bytes(os.urandom(8), "little")


# ----------------------------------------------------------------------------- tails and delta
def normal_tail(x: float) -> float:
    """P(N(0,1) > x), accurate in the far tail."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


_C = 2.5  # split point c of the derivation (needs z_max^2 >= c^2 / (c - 2) = 12.5)


def mismatch_probability(sigma: float, z_max: float = Z_MAX, *, geometry: str = "disk",
                         dim: int = DIM_MAX, sensitivity: float = 1.0) -> float:
    """m of the derivation: sup over shifts ||a|| <= sensitivity/sigma of the probability that the
    truncated noise plus the shift leaves the truncation set (one step, one example)."""
    if sigma <= 0:
        return 1.0
    R, B = float(z_max), float(sensitivity) / float(sigma)
    if geometry == "disk":
        tail = lambda t: math.exp(-0.5 * t * t)  # noqa: E731  Rayleigh: P(rho > t)
        K = (int(dim) + 1) // 2
        norm = 1.0 - tail(R)
        coef = (math.exp(_C) - 1.0) / _C * R * tail(R)
    elif geometry == "interval":
        tail = normal_tail
        K = int(dim)
        norm = 1.0 - 2.0 * tail(R)
        coef = math.exp(_C) * _normal_pdf(R)
    else:
        raise ValueError(f"geometry must be 'disk' or 'interval', got {geometry!r}")
    if B >= R or K < 1:
        return 1.0
    f = lambda b: tail(R - b) - tail(R)  # noqa: E731
    if K == 1:
        return min(1.0, f(B) / norm)
    if B < _C / R:
        G = 0.0
    elif R * R >= _C * _C / (_C - 2.0) and (R - B) * B >= 2.0:
        G = f(B)
    else:
        G = f(B) * (B * R / _C) ** 2
    A = coef * math.sqrt(K)
    h = A * B if A * B >= 2.0 * G else G + (A * B) ** 2 / (4.0 * G)
    return min(1.0, h / norm)


def truncation_delta_bound(sigma: float, q: float, steps: int, z_max: float = Z_MAX, *,
                           geometry: str = "disk", dim: int = DIM_MAX, sensitivity: float = 1.0,
                           delta: float = 1.0, fp_rel_err: float = FP_REL_ERR) -> float:
    """Extra delta that truncating the Gaussian noise at ``z_max`` adds to the ideal mechanism's
    delta (module docstring, section 3):

        delta_R(eps) <= delta_phi(eps) + truncation_delta_bound(...)
        bound = max(T q m, T min(m, q (1 - alpha) / ((1 - q) alpha))) + (alpha^-T - 1) delta

    sigma: noise multiplier (std / C); q: Poisson sampling rate; steps: T; z_max: truncation radius
    (Z_MAX for dpprims, Z_MAX_TL_RANDN for tl.randn); geometry: "disk" (pairs truncated to radius
    z_max: Box-Muller) or "interval" (each coordinate to |z| <= z_max); dim: number of noised
    coordinates the bound must hold for (dim = 1 reproduces the design note's one-coordinate
    estimate); delta: the accountant's delta_phi (<= 1) for the multiplicative alpha^-T term;
    fp_rel_err: relative error of the generator's tail probabilities (fp32 evaluation).
    Edge cases: sigma <= 0 or 1/sigma >= z_max -> no bound (returns 1.0); q = 0 -> 0.
    """
    q, T = float(q), int(steps)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if T < 0:
        raise ValueError(f"steps must be >= 0, got {T}")
    if q == 0.0 or T == 0:
        return 0.0
    m = mismatch_probability(sigma, z_max, geometry=geometry, dim=dim, sensitivity=sensitivity)
    if m >= 1.0:
        return 1.0
    m = min(1.0, m * (1.0 + fp_rel_err) + (2.0 ** -U_BITS if geometry == "disk" else 0.0))
    R = float(z_max)
    if geometry == "disk":
        K, out1 = (int(dim) + 1) // 2, math.exp(-0.5 * R * R)
    else:
        K, out1 = int(dim), 2.0 * normal_tail(R)
    log_alpha = K * math.log1p(-out1)  # alpha = P(untruncated Gaussian lies in the truncation set)
    one_minus_alpha = -math.expm1(log_alpha)
    second = m if q >= 1.0 else min(m, q * one_minus_alpha / ((1.0 - q) * math.exp(log_alpha)))
    renorm = math.expm1(-T * log_alpha) * float(delta)
    return min(1.0, max(T * q * m, T * second) + renorm)
