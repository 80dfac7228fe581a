"""Empirical privacy audits: lower bounds on epsilon from membership tests on canaries.

An audit inserts *canaries* (crafted examples), includes each one with a fair coin, runs the
mechanism, scores every canary from the released output, and turns the scores of included
("in") and excluded ("out") canaries into a statistically valid LOWER bound on the epsilon the
mechanism can have. A correct implementation stays below the epsilon the accountant claims; a
lower bound above the claim proves a privacy bug (wrong noise scale, broken clipping, mixing
between examples), with the stated confidence.

Two audits:

* :func:`audit_gaussian_mechanism` (CI, seconds): the clip + sum + noise path of ONE step
  without subsampling, with Dirac canaries. A bias-free ``nn.Linear(K, R)`` gets examples
  i = (r, k) with one-hot input e_k and output gradient s_i C e_r (s_i in [2, 1000], so
  every canary is clipped): its gradient is s_i C at weight coordinate (r, k) alone. The
  DPEngine clips each example to C and sums the included ones (``clip_sum_fn``), the noise
  function adds sigma C z (``noise_fn``), and canary i's score is the released value at its
  coordinate over C: N(1, sigma^2) if in, N(0, sigma^2) if out. Canaries sit on disjoint
  coordinates, so one engine call gives R*K independent observations per noise draw; the
  clipped sum is deterministic given the coin flips, so ``trials`` fresh noise draws of the
  one clipped sum are ``trials`` runs of the mechanism (the observations are i.i.d. given the
  coins). Claimed epsilon: dp_accounting's PLD epsilon of one Gaussian step (exact for this
  mechanism up to its 1e-4 discretisation, see :func:`gaussian_epsilon`).
* :func:`audit_dpsgd_training` (slow, opt-in): the whole Trainer (Poisson sampling, physical
  batches, engine, the backend's noise, SGD) on a linear softmax model, canaries as training
  examples with out-of-distribution inputs on their own input dimension and random labels,
  white-box scores sum_t <noisy gradient_t, unit direction of the canary's gradient at step t>.
  Claimed epsilon: the plan's accountant after the run.

The bounds (:func:`analyse_scores`), each at confidence 1 - alpha; the candidate thresholds are
chosen on one random half of the observations and the bound is evaluated on the other half,
so the choice costs no multiple-testing correction:

(a) Clopper-Pearson (assumption-free). For an (eps, delta)-DP mechanism every test between
    "in" and "out" has FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta
    (Kairouz, Oh, Viswanath 2015, Thm 2.1; used for auditing by Jagielski, Ullman, Oprea 2020
    and Nasr et al. 2021), hence

        eps >= max( log((1 - delta - FPR_hi) / FNR_hi),  log((1 - delta - FNR_hi) / FPR_hi) )

    with FPR_hi, FNR_hi one-sided Clopper-Pearson upper bounds (alpha/2 each). It needs the
    threshold deep in the tail (FPR ~ e^-eps TPR), hence many samples: with n observations per
    class the smallest resolvable FPR is ~ -ln(alpha)/n. At sigma = 1 (eps 4.38 at delta 1e-5,
    alpha 1e-3) the expected bound is 0.64 of the claim with 10^6 observations in all, 0.76
    with 10^7, 0.87 with 10^8; 0.9 needs ~3 10^8.
(b) Gaussian DP (Dong, Roth, Su 2022; the auditing method of Nasr et al. 2023, "Tight auditing
    of differentially private machine learning"). A mu-GDP mechanism has
    FNR >= Phi(Phi^-1(1 - FPR) - mu) for every test, so

        mu >= mu_lo = Phi^-1(1 - FPR_hi) - Phi^-1(FNR_hi)

    and eps_gdp_lower = eps_mu(mu_lo, delta) with the exact GDP -> (eps, delta) conversion
    (Dong, Roth, Su, Cor. 2.13): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
    "Not mu'-GDP for any mu' < mu_lo" holds without assumptions; reading it as an epsilon
    bound assumes the mechanism's
    trade-off curve is Gaussian, which is exact for one Gaussian step (the CI audit: the
    Gaussian mechanism with sensitivity C and noise sigma C is exactly (1/sigma)-GDP) and only
    approximate (CLT) for subsampled multi-step training. Thresholds near the middle
    (FPR ~ FNR ~ 0.3) are usable, so it is tight with 10^5-10^6 observations.
    The moment fit mu_hat = (mean_in - mean_out) / pooled sd (with its standard error) and
    eps_mu(mu_hat, delta) are reported as point estimates (they assume Gaussian scores).

A result is ``flagged`` when a lower bound (a or b) exceeds the claimed epsilon.

The noise function is an argument (``noise_fn(x, std, step) -> x + std * z``, z ~ N(0, I)
fresh for every step and element), so the same audit runs any generator: :func:`project_noise`
(the default: dpprims' Gaussian kernel), :func:`fused_update_noise` (the fused noise + SGD
update kernel the trainer runs), :func:`torch_randn_noise` (torch.randn, for comparison),
:func:`scaled_noise` (a deliberately wrong std, for negative controls). The torch parts import
torch lazily: the statistics need only numpy and scipy.
"""
from __future__ import annotations

import dataclasses
import math
import time
import numpy as np

__all__ = [
    "AuditResult", "analyse_scores", "audit_dpsgd_training", "audit_gaussian_mechanism",
    "clopper_pearson", "dirac_canaries", "epsilon_lower_bound_cp", "gaussian_delta", "gaussian_epsilon",
    "fused_update_noise", "gdp_fit", "gdp_mu_lower_bound", "gaussian_mechanism_epsilon", "project_noise",
    "scaled_noise", "torch_engine_clip_sum", "torch_randn_noise",
]

# ============================================================================ privacy curves
def _log_ndtr(x):
    from scipy.special import log_ndtr

    return log_ndtr(x)


def gaussian_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP, i.e. of the Gaussian mechanism with sensitivity / std = mu:
    Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2022, Cor. 2.13; Balle and
    Wang 2018, Thm 8), evaluated in log space so that tiny deltas keep their precision."""
    mu, eps = float(mu), float(eps)
    if mu <= 0.0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = float(_log_ndtr(-eps / mu + mu / 2.0))
    b = eps + float(_log_ndtr(-eps / mu - mu / 2.0))
    if b >= a:
        return 0.0
    return math.exp(a) * -math.expm1(b - a)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest eps >= 0 with gaussian_delta(mu, eps) <= delta: the exact epsilon of mu-GDP
    (the Gaussian mechanism with sensitivity / std = mu) at ``delta``. 0 for mu <= 0, inf for
    mu = inf; nan propagates."""
    mu, delta = float(mu), float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if math.isnan(mu):
        return math.nan
    if mu <= 0.0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    from scipy.optimize import brentq

    hi = 1.0
    while gaussian_delta(mu, hi) > delta:
        hi *= 2.0
    return float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float, *, method: str = "pld") -> float:
    """What dpprims claims for ONE step of the Gaussian mechanism without subsampling (q = 1):
    the project's accountant (dpprims.accounting, dp_accounting's PLD or RDP) after one step."""
    from dpprims.accounting import PrivacyAccountant

    acc = PrivacyAccountant(noise_multiplier, 1.0, delta, method=method)
    acc.step()
    return float(acc.epsilon())


# ============================================================================ statistics
def clopper_pearson(k, n, alpha: float):
    """One-sided Clopper-Pearson bounds (lo, hi) of a binomial proportion with k successes in n
    trials, each at level alpha: P(p < lo) <= alpha and P(p > hi) <= alpha. Vectorised over k."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    n = float(n)
    if n <= 0:
        return np.zeros_like(k), np.ones_like(k)
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1.0), 0.0)
        hi = np.where(k < n, beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1e-300)), 1.0)
    return lo, hi


def _error_counts(s_in: np.ndarray, s_out: np.ndarray, thresholds: np.ndarray):
    """(false negatives, false positives) of the tests "in iff score > t" for each t."""
    s_in = np.sort(s_in)
    s_out = np.sort(s_out)
    fn = np.searchsorted(s_in, thresholds, side="right")  # in-scores <= t
    fp = s_out.size - np.searchsorted(s_out, thresholds, side="right")  # out-scores > t
    return fn, fp


def _eps_cp(fn, fp, n_in, n_out, delta, alpha):
    _, fnr_hi = clopper_pearson(fn, n_in, alpha / 2.0)
    _, fpr_hi = clopper_pearson(fp, n_out, alpha / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(np.maximum(1.0 - delta - fpr_hi, 0.0) / fnr_hi)
        e2 = np.log(np.maximum(1.0 - delta - fnr_hi, 0.0) / fpr_hi)
    e = np.fmax(e1, e2)  # nan only where both are nan (0/0): no evidence
    return np.maximum(np.nan_to_num(e, nan=0.0, posinf=np.inf, neginf=0.0), 0.0)


def _mu_cp(fn, fp, n_in, n_out, alpha):
    from scipy.stats import norm

    _, fnr_hi = clopper_pearson(fn, n_in, alpha / 2.0)
    _, fpr_hi = clopper_pearson(fp, n_out, alpha / 2.0)
    mu = norm.isf(fpr_hi) - norm.ppf(fnr_hi)  # Phi^-1(1 - FPR_hi) - Phi^-1(FNR_hi)
    return np.where(np.isfinite(mu), np.maximum(mu, 0.0), 0.0)


def _candidates(s_in, s_out, num: int) -> np.ndarray:
    pooled = np.concatenate([s_in, s_out])
    if pooled.size == 0:
        return np.zeros(1)
    # dense in the middle and log-spaced into both tails (the CP bound lives in the tails)
    p = np.concatenate([np.linspace(0.0, 1.0, num), np.logspace(-7, -0.5, num), 1.0 - np.logspace(-7, -0.5, num)])
    return np.unique(np.quantile(pooled, np.clip(p, 0.0, 1.0)))


def epsilon_lower_bound_cp(s_in, s_out, delta: float, alpha: float, threshold: float):
    """(a) of the module docstring at one fixed threshold: (eps lower bound, FPR_hi, FNR_hi)."""
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    fn, fp = _error_counts(s_in, s_out, np.array([threshold]))
    eps = float(_eps_cp(fn, fp, s_in.size, s_out.size, delta, alpha)[0])
    _, fnr_hi = clopper_pearson(fn, s_in.size, alpha / 2.0)
    _, fpr_hi = clopper_pearson(fp, s_out.size, alpha / 2.0)
    return eps, float(fpr_hi[0]), float(fnr_hi[0])


def gdp_mu_lower_bound(s_in, s_out, alpha: float, threshold: float) -> float:
    """(b) of the module docstring at one fixed threshold: mu_lo = Phi^-1(1 - FPR_hi) -
    Phi^-1(FNR_hi) (0 when negative)."""
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    fn, fp = _error_counts(s_in, s_out, np.array([threshold]))
    return float(_mu_cp(fn, fp, s_in.size, s_out.size, alpha)[0])


def gdp_fit(s_in, s_out) -> tuple[float, float]:
    """Moment fit of mu-GDP to the scores: (mu_hat, standard error), mu_hat = (mean_in -
    mean_out) / pooled sd. A point estimate assuming N(mu, 1) vs N(0, 1) scores (up to scale)."""
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    n1, n0 = s_in.size, s_out.size
    if n1 < 2 or n0 < 2:
        return math.nan, math.nan
    sd = math.sqrt(((n1 - 1) * s_in.var(ddof=1) + (n0 - 1) * s_out.var(ddof=1)) / (n1 + n0 - 2))
    mu = (s_in.mean() - s_out.mean()) / sd
    se = math.sqrt(1.0 / n1 + 1.0 / n0 + mu * mu / (2.0 * (n1 + n0 - 2)))
    return float(mu), float(se)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of an audit. Epsilons are at ``delta``; bounds hold with confidence 1 - alpha each.

    claimed_epsilon: what the accountant claims. eps_cp_lower: bound (a). mu_lower,
    eps_gdp_lower: bound (b). mu_hat, mu_se, eps_gdp_fit: the moment fit (point estimate).
    threshold_cp, threshold_gdp: thresholds chosen on the selection half. n_in, n_out: number
    of in / out observations (both halves). info: audit-specific details (trial counts, timing,
    the largest deviation of the clipped sum from C per canary, ...).
    """

    claimed_epsilon: float
    delta: float
    alpha: float
    n_in: int
    n_out: int
    eps_cp_lower: float
    threshold_cp: float
    fpr_hi: float
    fnr_hi: float
    mu_lower: float
    eps_gdp_lower: float
    threshold_gdp: float
    mu_hat: float
    mu_se: float
    eps_gdp_fit: float
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def eps_lower(self) -> float:
        """The larger of the two lower bounds."""
        return max(self.eps_cp_lower, self.eps_gdp_lower)

    @property
    def flagged(self) -> bool:
        """True when a lower bound exceeds the claimed epsilon: the mechanism leaks more than
        claimed (with confidence >= 1 - 2 alpha)."""
        return self.eps_lower > self.claimed_epsilon

    def summary(self) -> str:
        c = self.claimed_epsilon
        return (f"claimed eps {c:.4f} at delta {self.delta:g}; lower bounds (confidence {1 - self.alpha:g} each): "
                f"Clopper-Pearson {self.eps_cp_lower:.4f} ({self.eps_cp_lower / c:.3f}x), "
                f"GDP mu >= {self.mu_lower:.4f} -> eps {self.eps_gdp_lower:.4f} ({self.eps_gdp_lower / c:.3f}x); "
                f"GDP fit mu {self.mu_hat:.4f} +- {self.mu_se:.4f} -> eps {self.eps_gdp_fit:.4f} "
                f"({self.eps_gdp_fit / c:.3f}x); n_in {self.n_in}, n_out {self.n_out}; "
                f"{'FLAGGED' if self.flagged else 'not flagged'}")


def analyse_scores(scores, labels, *, delta: float, claimed_epsilon: float, alpha: float = 1e-3,
                   seed: int = 0, num_thresholds: int = 400, info: dict | None = None) -> AuditResult:
    """Lower bounds (a) and (b) and the GDP fit from per-observation ``scores`` (higher = more
    likely "in") and boolean ``labels`` (True = in). A random half (``seed``) selects each bound's
    threshold among ``3 * num_thresholds`` score quantiles; the other half evaluates it."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a non-finite released value is itself a bug)")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    rng = np.random.default_rng(seed)
    sel = rng.random(scores.size) < 0.5
    s_in_a, s_out_a = scores[sel & labels], scores[sel & ~labels]
    s_in_b, s_out_b = scores[~sel & labels], scores[~sel & ~labels]
    cand = _candidates(s_in_a, s_out_a, num_thresholds)
    fn, fp = _error_counts(s_in_a, s_out_a, cand)
    t_cp = float(cand[int(np.argmax(_eps_cp(fn, fp, s_in_a.size, s_out_a.size, delta, alpha)))])
    t_gdp = float(cand[int(np.argmax(_mu_cp(fn, fp, s_in_a.size, s_out_a.size, alpha)))])
    eps_cp, fpr_hi, fnr_hi = epsilon_lower_bound_cp(s_in_b, s_out_b, delta, alpha, t_cp)
    mu_lo = gdp_mu_lower_bound(s_in_b, s_out_b, alpha, t_gdp)
    mu_hat, mu_se = gdp_fit(scores[labels], scores[~labels])
    return AuditResult(
        claimed_epsilon=float(claimed_epsilon), delta=float(delta), alpha=float(alpha),
        n_in=int(labels.sum()), n_out=int((~labels).sum()),
        eps_cp_lower=eps_cp, threshold_cp=t_cp, fpr_hi=fpr_hi, fnr_hi=fnr_hi,
        mu_lower=mu_lo, eps_gdp_lower=gaussian_epsilon(mu_lo, delta), threshold_gdp=t_gdp,
        mu_hat=mu_hat, mu_se=mu_se, eps_gdp_fit=gaussian_epsilon(max(mu_hat, 0.0), delta),
        info=dict(info or {}))


# ============================================================================ noise functions
def project_noise(seed: int = 0):
    """noise_fn(x, std, step) -> x + std * z with z from dpprims' Gaussian generator
    (``dpprims.bindings.torch.noise.add_gaussian_noise_``: the Triton kernel on CUDA and under
    TRITON_INTERPRET=1, its bit-identical torch twin otherwise), keyed by (seed, step). The
    default noise of :func:`audit_gaussian_mechanism`."""
    import torch

    from dpprims.bindings.torch.noise import add_gaussian_noise_

    def noise_fn(x, std: float, step: int):
        out = x.to(torch.float32).contiguous().clone()
        add_gaussian_noise_(out, std=float(std), seed=int(seed), step=int(step))
        return out

    return noise_fn


def fused_update_noise(seed: int = 0):
    """noise_fn through the fused noise + normalise + optimizer kernel the trainer runs
    (``dpprims.bindings.torch.update.add_noise_and_step``): a zero parameter with .grad = x takes
    one SGD step (lr 1, no momentum, normaliser 1), and the released value is read back from the
    parameter as -p = x + std * z (the white-box view of the update)."""
    import torch

    from dpprims.bindings.torch.update import add_noise_and_step

    def noise_fn(x, std: float, step: int):
        p = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        p.grad = x.to(torch.float32).contiguous().clone()
        add_noise_and_step([p], state={}, noise_std=float(std), normaliser=1.0, seed=int(seed),
                           step=int(step) + 1, optimizer="sgd", lr=1.0, momentum=0.0)
        return -p.detach()

    return noise_fn


def torch_randn_noise(seed: int = 0):
    """noise_fn(x, std, step) -> x + std * z with z = torch.randn from a generator keyed by
    (seed, step) (fp32, on x's device): a reference generator to compare the project's with."""
    import torch

    def noise_fn(x, std: float, step: int):
        g = torch.Generator(device=x.device)
        g.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))
        z = torch.randn(x.shape, generator=g, device=x.device, dtype=torch.float32)
        return x.float() + float(std) * z

    return noise_fn


def scaled_noise(noise_fn, factor: float):
    """A deliberately broken noise function that draws ``factor`` * the requested std (the
    negative control: run with 0.8 sigma while the accountant claims sigma)."""
    def broken(x, std: float, step: int):
        return noise_fn(x, float(std) * float(factor), step)

    return broken


# ============================================================================ Dirac canaries
def dirac_canaries(rows: int, cols: int, max_grad_norm: float, *, seed: int = 0,
                   overshoot: tuple = (2.0, 1000.0)):
    """Canaries for a bias-free Linear(cols -> rows): example i = (r, k) = (i // cols, i % cols)
    has input e_k and output gradient s_i C e_r with s_i log-uniform in ``overshoot``, so its
    weight gradient is s_i C at coordinate (r, k) only, and clipping scales it to C.
    Returns (inputs [B, cols], output_grads [B, rows]) as float32 numpy arrays, B = rows * cols."""
    B = rows * cols
    rng = np.random.default_rng(seed)
    s = np.exp(rng.uniform(math.log(overshoot[0]), math.log(overshoot[1]), size=B))
    A = np.zeros((B, cols), np.float32)
    A[np.arange(B), np.arange(B) % cols] = 1.0
    V = np.zeros((B, rows), np.float32)
    V[np.arange(B), np.arange(B) // cols] = (s * max_grad_norm).astype(np.float32)
    return A, V


def torch_engine_clip_sum(inputs: np.ndarray, output_grads: np.ndarray, mask: np.ndarray,
                          max_grad_norm: float, *, device: str = "cpu", **engine_kwargs) -> np.ndarray:
    """The clipped sum sum_i c_i g_i through dpprims.torch.DPEngine on a bias-free
    nn.Linear(cols, rows): per-example loss <Linear(x_i), v_i>, so the layer's output gradient is
    v_i. Returns the weight's .grad [rows, cols] as float64 numpy."""
    import torch

    from dpprims.torch import DPEngine

    rows, cols = output_grads.shape[1], inputs.shape[1]
    layer = torch.nn.Linear(cols, rows, bias=False).to(device)
    with torch.no_grad():
        layer.weight.zero_()
    engine = DPEngine(layer, max_grad_norm, **engine_kwargs)
    x = torch.as_tensor(inputs, device=device)
    v = torch.as_tensor(output_grads, device=device)
    losses = (layer(x) * v).sum(dim=1)
    engine.backward(losses, mask=torch.as_tensor(mask, device=device))
    out = layer.weight.grad.detach().double().cpu().numpy()
    engine.detach()
    return out


def audit_gaussian_mechanism(*, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                             delta: float = 1e-5, noise_fn=None, rows: int = 8, cols: int = 32,
                             trials: int = 8192, trials_per_call: int = 4096, alpha: float = 1e-3,
                             seed: int = 0, clip_sum_fn=None, device: str = "cpu",
                             claimed_epsilon: float | None = None) -> AuditResult:
    """Audit one step of clip + sum + noise with Dirac canaries (module docstring).

    Args:
        noise_multiplier: sigma of the CLAIM; ``noise_fn`` is asked for std = sigma * C.
        max_grad_norm: C.
        delta: the delta of the claimed and the empirical epsilons.
        noise_fn: ``noise_fn(x, std, step) -> x + std * z`` (torch tensors; z ~ N(0, I) fresh per
            step and element). Default :func:`project_noise` (seed). It is called with x of
            shape [n, rows, cols] (n noise draws of the clipped sum at once) and step 0, 1, ...
        rows, cols: canary grid: B = rows * cols canaries (examples in ONE engine call), each on
            its own weight coordinate; each included with probability 1/2.
        trials: noise draws of the clipped sum; observations = trials * rows * cols.
        alpha: each lower bound holds with confidence 1 - alpha.
        clip_sum_fn: ``(inputs [B, cols], output_grads [B, rows], mask [B], C) -> [rows, cols]``
            clipped sum; default :func:`torch_engine_clip_sum` (DPEngine + fused kernels).
        claimed_epsilon: default :func:`gaussian_mechanism_epsilon` (the project's PLD accountant).
    """
    import torch

    t0 = time.perf_counter()
    C = float(max_grad_norm)
    sigma = float(noise_multiplier)
    if not (C > 0 and math.isfinite(C)):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm!r}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
    noise_fn = noise_fn if noise_fn is not None else project_noise(seed)
    clip_sum_fn = clip_sum_fn if clip_sum_fn is not None else (
        lambda A, V, m, c: torch_engine_clip_sum(A, V, m, c, device=device))
    claimed = gaussian_mechanism_epsilon(sigma, delta) if claimed_epsilon is None else float(claimed_epsilon)

    A, V = dirac_canaries(rows, cols, C, seed=seed)
    rng = np.random.default_rng(seed + 1)
    inside = rng.random(rows * cols) < 0.5  # the fair coins
    S = np.asarray(clip_sum_fn(A, V, inside, C), np.float64)  # [rows, cols]
    if S.shape != (rows, cols):
        raise ValueError(f"clip_sum_fn returned shape {S.shape}, expected {(rows, cols)}")
    t_clip = time.perf_counter() - t0
    expected = C * inside.reshape(rows, cols)
    clip_err = float(np.max(np.abs(S - expected))) / C  # contribution of each canary vs C

    x1 = torch.as_tensor(S, dtype=torch.float32, device=device)
    scores = np.empty((trials, rows * cols), np.float64)
    done, step = 0, 0
    while done < trials:
        n = min(trials_per_call, trials - done)
        released = noise_fn(x1.expand(n, rows, cols).contiguous(), sigma * C, step)
        scores[done:done + n] = released.detach().double().cpu().numpy().reshape(n, rows * cols) / C
        done += n
        step += 1
    labels = np.broadcast_to(inside, scores.shape)
    info = dict(canaries=rows * cols, trials=trials, observations=trials * rows * cols, noise_calls=step,
                max_contribution_error=clip_err, clip_sum_seconds=t_clip,
                noise_multiplier=sigma, max_grad_norm=C)
    res = analyse_scores(scores, labels, delta=delta, claimed_epsilon=claimed, alpha=alpha, seed=seed + 2,
                         info=info)
    res.info["seconds"] = time.perf_counter() - t0
    return res


# ============================================================================ whole-trainer audit
def audit_dpsgd_training(*, num_canaries: int = 1000, num_data: int = 200, data_features: int = 10,
                         num_classes: int = 4, expected_batch_size: float = 140.0, physical_batch_size: int = 176,
                         steps: int = 40, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0,
                         delta: float = 1e-5, lr: float = 0.05, canary_scale: float = 100.0,
                         accountant: str = "pld", alpha: float = 0.05, seed: int = 0,
                         noise_scale_bug: float = 1.0) -> AuditResult:
    """End-to-end audit of dpprims.trainer.Trainer + TorchBackend (module docstring).

    Model: Linear(data_features + num_canaries -> num_classes) (softmax regression, SGD without
    momentum so that the noisy normalised gradient g_t = (p_t - p_{t+1}) / lr is read exactly).
    Data: ``num_data`` Gaussian-blob examples, zero on the canary dimensions. Canary k: input
    ``canary_scale`` * e_(data_features + k), random label; in the training set iff its fair
    coin says so (N = num_data + number of in-canaries). Score of canary k:
    sum_t <g_t[:, d_k], u_{k,t}> * q N / C with u_{k,t} the unit direction of the canary's weight
    gradient column at the parameters before step t (its clipped contribution is ~C along u).
    ``noise_scale_bug`` < 1 patches the backend to draw that fraction of the noise (negative
    control). Claimed epsilon: the plan's accountant after ``steps`` steps.

    Besides the bounds, ``info`` holds a calibration check of the released noise: an out-canary's
    score is exactly N(0, sigma^2 T) (its coordinates carry noise only), so ``out_std_ratio`` =
    RMS(out scores) / (sigma sqrt(T)) must be 1; ``out_std_ratio_interval`` is its chi-square
    interval (confidence 1 - alpha). ``in_mean`` should be close to ``in_mean_expected`` = q T
    (each sampled step adds ~1: the clipped canary gradient, C, along its direction).
    """
    import torch

    from dpprims.data import Dataset
    from dpprims.plan import DPPlan
    from dpprims.trainer import Trainer
    from dpprims.trainer.torch_backend import TorchBackend

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    D = data_features + num_canaries
    centers = rng.normal(size=(num_classes, data_features)).astype(np.float32) * 2.0
    y_data = rng.integers(0, num_classes, size=num_data)
    x_data = np.zeros((num_data, D), np.float32)
    x_data[:, :data_features] = centers[y_data] + rng.normal(size=(num_data, data_features)).astype(np.float32)
    inside = rng.random(num_canaries) < 0.5
    y_can = rng.integers(0, num_classes, size=num_canaries)
    x_can = np.zeros((num_canaries, D), np.float32)
    x_can[np.arange(num_canaries), data_features + np.arange(num_canaries)] = canary_scale
    x_train = np.concatenate([x_data, x_can[inside]])
    y_train = np.concatenate([y_data, y_can[inside]]).astype(np.int64)
    perm = rng.permutation(len(x_train))
    x_train, y_train = x_train[perm], y_train[perm]
    data = Dataset(x_train=x_train, y_train=y_train, x_test=x_data[:50], y_test=y_data[:50].astype(np.int64),
                   num_classes=num_classes, name="audit-canaries", input_shape=(D,))
    N = len(x_train)
    plan = DPPlan.create(num_examples=N, expected_batch_size=float(expected_batch_size),
                         physical_batch_size=physical_batch_size, max_grad_norm=max_grad_norm, delta=delta,
                         steps=steps, noise_multiplier=noise_multiplier, accountant=accountant)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(D, num_classes))
    with torch.no_grad():
        model[0].weight[:, data_features:].zero_()
    backend = TorchBackend(model, plan, optimizer="sgd", lr=lr, momentum=0.0)
    if noise_scale_bug != 1.0:
        true_noise_std = plan.noise_std * float(noise_scale_bug)
        orig = backend.noisy_step

        class _BuggyPlan:  # the backend reads plan.noise_std and plan.normaliser
            noise_std = true_noise_std
            normaliser = plan.normaliser

        def noisy_step(step):
            saved = backend.plan
            backend.plan = _BuggyPlan
            try:
                orig(step)
            finally:
                backend.plan = saved

        backend.noisy_step = noisy_step
    trainer = Trainer(backend, plan, data, seed=seed, progress=False)

    W = model[0].weight
    bias = model[0].bias
    cols = torch.arange(num_canaries) + data_features
    xk = torch.as_tensor(x_can)
    yk = torch.as_tensor(y_can)
    onehot = torch.nn.functional.one_hot(yk, num_classes).double()
    scores = torch.zeros(num_canaries, dtype=torch.float64)
    scale = plan.normaliser / plan.max_grad_norm
    for _ in range(steps):
        with torch.no_grad():
            w0 = W.detach().double().clone()
            # canary k's weight-gradient column is (softmax(W x_k + b) - e_y) * canary_scale
            logits = xk.double() @ w0.T + bias.detach().double()
            u = (torch.softmax(logits, dim=1) - onehot)  # [K, classes]
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
        trainer.step()
        with torch.no_grad():
            g = (w0 - W.detach().double()) / lr  # noisy normalised gradient
            scores += (g[:, cols].T * u).sum(dim=1) * scale
    claimed = trainer.accountant.epsilon()
    # Calibration check of the released noise (not a DP bound): an out-canary's score is
    # sum_t <sigma z_t, u_t> ~ N(0, sigma^2 T) exactly, so its sample std over sigma sqrt(T)
    # must be 1 (chi-square interval at confidence 1 - alpha).
    from scipy.stats import chi2

    s_out = scores.numpy()[~inside]
    n0 = s_out.size
    ratio = float(np.sqrt(np.mean(s_out ** 2)) / (noise_multiplier * math.sqrt(steps)))
    lo = ratio * math.sqrt(n0 / chi2.ppf(1 - alpha / 2, n0))
    hi = ratio * math.sqrt(n0 / chi2.ppf(alpha / 2, n0))
    info = dict(canaries=num_canaries, in_canaries=int(inside.sum()), num_examples=N, steps=steps,
                sample_rate=plan.sample_rate, noise_multiplier=noise_multiplier, noise_scale_bug=noise_scale_bug,
                accountant=accountant, out_std_ratio=ratio, out_std_ratio_interval=(lo, hi),
                in_mean_expected=plan.sample_rate * steps, in_mean=float(scores.numpy()[inside].mean()),
                seconds_training=time.perf_counter() - t0)
    res = analyse_scores(scores.numpy(), inside, delta=delta, claimed_epsilon=claimed, alpha=alpha, seed=seed + 2,
                         num_thresholds=100, info=info)
    res.info["seconds"] = time.perf_counter() - t0
    return res
