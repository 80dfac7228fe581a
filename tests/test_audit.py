"""Mechanism audits (dpprims.audit): empirical lower bounds on epsilon vs what the accountant claims.

CI audit: one Gaussian step (sigma = 1, C = 1, delta = 1e-5: claimed eps 4.377 from the PLD
accountant) through DPEngine (clip + sum) and dpprims' noise kernel, 256 Dirac canaries x 4096
noise draws = 2^20 observations. Why that many: the GDP lower bound is evaluated on one half
(~2^18 observations per class) at a central threshold (FPR ~ FNR ~ 0.31), where the one-sided
Clopper-Pearson half-width at alpha/2 = 5e-4 is ~3e-3, i.e. ~0.009 in probit units per rate, so
mu_lo ~ mu - 0.017 and eps_gdp_lower ~ 0.98 of the claim (0.9 is reached from ~2^16
observations on: the test has a wide margin). The Clopper-Pearson epsilon bound needs the
threshold in the tail and is ~0.6-0.67 of the claim at 2^20 observations (0.76 at 1e7, 0.87 at
1e8, 0.9 from ~3e8, by the expected counts): it is asserted to stay below the claim and above
0.5 of it. Negative controls (noise 0.8 sigma; contributions 1.25 C) must be flagged.

The end-to-end trainer audit is opt-in (--runslow, ~5.5 minutes on 2 CPU cores):
    pytest tests/test_audit.py --runslow -k trainer
"""
import math

import numpy as np
import pytest

from dpprims import audit

SIGMA, C, DELTA = 1.0, 1.0, 1e-5
TRIALS = 4096  # x 256 canaries = 2^20 observations


# ============================================================================== statistics
@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0])
def test_claimed_epsilon_is_the_exact_gaussian_epsilon(sigma):
    """dp_accounting's PLD epsilon of one Gaussian step equals the analytic GDP conversion (it is
    pessimistic by at most its discretisation)."""
    exact = audit.gaussian_epsilon(1.0 / sigma, DELTA)
    claimed = audit.gaussian_mechanism_epsilon(sigma, DELTA)
    assert exact - 1e-9 <= claimed <= exact + 2e-3
    assert math.isclose(audit.gaussian_delta(1.0 / sigma, exact), DELTA, rel_tol=1e-6)


def test_gaussian_epsilon_edge_cases():
    assert audit.gaussian_epsilon(0.0, 1e-5) == 0.0
    assert audit.gaussian_epsilon(math.inf, 1e-5) == math.inf
    assert audit.gaussian_epsilon(1e-3, 0.5) == 0.0  # delta(0) < delta
    assert audit.gaussian_epsilon(2.0, 1e-5) > audit.gaussian_epsilon(1.0, 1e-5)
    with pytest.raises(ValueError):
        audit.gaussian_epsilon(1.0, 0.0)


def test_clopper_pearson_known_values():
    lo, hi = audit.clopper_pearson([0, 10, 10], 10, 0.05)
    assert lo[0] == 0.0 and hi[2] == 1.0
    assert math.isclose(hi[0], 1 - 0.05 ** (1 / 10), rel_tol=1e-9)  # k = 0: 1 - alpha^(1/n)
    assert math.isclose(lo[2], 0.05 ** (1 / 10), rel_tol=1e-9)  # k = n: alpha^(1/n)
    lo, hi = audit.clopper_pearson(50, 100, 0.025)
    assert 0.39 < lo < 0.5 < hi < 0.61


def test_analysis_on_exact_gaussian_scores():
    """The statistics alone (numpy scores N(mu, 1) vs N(0, 1)): tight for mu = 1, flagged for
    mu = 1.25, no evidence for mu = 0."""
    claimed = audit.gaussian_epsilon(1.0, DELTA)
    rng = np.random.default_rng(7)
    labels = rng.random(1 << 20) < 0.5
    for mu, flagged in ((1.0, False), (1.25, True), (0.0, False)):
        scores = mu * labels + rng.standard_normal(labels.size)
        r = audit.analyse_scores(scores, labels, delta=DELTA, claimed_epsilon=claimed)
        assert r.flagged == flagged, r.summary()
        if mu == 1.0:
            assert 0.9 * claimed <= r.eps_gdp_lower <= claimed and r.eps_cp_lower <= claimed, r.summary()
        if mu == 0.0:
            assert r.eps_gdp_lower < 0.05 * claimed and r.eps_cp_lower < 0.05 * claimed, r.summary()


def test_analysis_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        audit.analyse_scores([0.0, np.nan], [True, False], delta=DELTA, claimed_epsilon=1.0)
    with pytest.raises(ValueError, match="differ"):
        audit.analyse_scores([0.0, 1.0], [True], delta=DELTA, claimed_epsilon=1.0)


# ============================================================================== the CI audit
def _check_positive(r):
    claimed = r.claimed_epsilon
    assert not r.flagged, r.summary()
    assert r.eps_gdp_lower <= claimed and r.eps_cp_lower <= claimed, r.summary()
    assert r.eps_gdp_lower >= 0.9 * claimed, r.summary()  # the audit has the power to be tight
    assert abs(r.eps_gdp_fit / claimed - 1) <= 0.05, r.summary()
    assert r.eps_cp_lower >= 0.5 * claimed, r.summary()
    assert r.info["max_contribution_error"] <= 1e-5  # every canary contributed C (or 0)
    assert r.info["observations"] == TRIALS * 256


@pytest.mark.parametrize("noise", ["project", "fused-update"])
def test_gaussian_mechanism_audit(noise):
    """Clip + sum through DPEngine, noise through dpprims' Gaussian kernel ("project") or the
    fused noise + SGD update kernel the trainer runs ("fused-update")."""
    fn = audit.project_noise(11) if noise == "project" else audit.fused_update_noise(12)
    r = audit.audit_gaussian_mechanism(noise_multiplier=SIGMA, max_grad_norm=C, delta=DELTA, noise_fn=fn,
                                       trials=TRIALS, seed=3)
    print(r.summary())
    _check_positive(r)


def test_negative_control_too_little_noise_is_flagged():
    """Noise drawn at 0.8 sigma while the accountant claims sigma: true eps 5.68 vs claimed 4.38."""
    r = audit.audit_gaussian_mechanism(noise_multiplier=SIGMA, max_grad_norm=C, delta=DELTA, trials=TRIALS,
                                       noise_fn=audit.scaled_noise(audit.project_noise(13), 0.8), seed=4)
    print(r.summary())
    assert r.flagged and r.eps_gdp_lower > r.claimed_epsilon * 1.1, r.summary()


def test_negative_control_weak_clipping_is_flagged():
    """Contributions of 1.25 C (a clipping bug) with the right noise: flagged."""
    def clip_125(A, V, mask, c):
        return 1.25 * audit.torch_engine_clip_sum(A, V, mask, c)

    r = audit.audit_gaussian_mechanism(noise_multiplier=SIGMA, max_grad_norm=C, delta=DELTA, trials=TRIALS,
                                       clip_sum_fn=clip_125, seed=5)
    print(r.summary())
    assert r.flagged and r.eps_gdp_lower > r.claimed_epsilon * 1.1, r.summary()


# ============================================================================== trainer (slow)
@pytest.mark.slow
def test_trainer_audit():
    """Whole Trainer (Poisson sampling, engine, fused noise + SGD): the lower bounds stay below the
    accountant's epsilon, membership is detectable (the audit is not vacuous), and the released
    noise on the canary coordinates has exactly std sigma C / (q N) per step."""
    r = audit.audit_dpsgd_training(seed=0)
    print(r.summary(), r.info)
    assert not r.flagged, r.summary()
    assert r.eps_cp_lower <= r.claimed_epsilon and r.eps_gdp_lower <= r.claimed_epsilon
    assert r.mu_lower > 0.0, r.summary()
    lo, hi = r.info["out_std_ratio_interval"]
    assert lo <= 1.0 <= hi, r.info


@pytest.mark.slow
def test_trainer_audit_negative_control():
    """The trainer with 0.8 of the noise: the calibration interval excludes 1."""
    r = audit.audit_dpsgd_training(seed=0, noise_scale_bug=0.8)
    print(r.summary(), r.info)
    lo, hi = r.info["out_std_ratio_interval"]
    assert hi < 1.0, r.info
