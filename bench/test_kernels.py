"""Kernel microbenchmarks: every dpprims kernel at the layer shapes of ResNet-18/50 (read off
dpprims.models by forward hooks, see shapes.py), Linear at T = 1 and T = 512, GroupNorm,
Embedding, clip factors and the fused noise + optimizer update; each against what Opacus
computes (materialised per-example gradients) and the non-private weight gradient.

    python -m pytest bench -q                                   # GPU: full; CPU: smoke
    python -m pytest bench -q --bench-size=full --bench-models=r18-32 --bench-modes=bf16
    python -m pytest bench -q --benchmark-disable               # CPU smoke (tiny, untimed)

See conftest.py for the options and _micro.py for what each implementation is.
"""
from __future__ import annotations

import pytest

from _micro import Mode, SUITES, make_row, time_impl
from shapes import LinearShape, layer_shapes, param_count

# Linear cases beyond the models' fc layers: T = 1 (a wide dense layer) and T = 512 (sequence
# models: attention projections and MLP in / out at d = 768).
LINEAR_SYNTHETIC = {
    "full": [LinearShape(256, 1, 4096, 4096), LinearShape(16, 512, 768, 768), LinearShape(16, 512, 768, 3072),
             LinearShape(16, 512, 3072, 768)],
    "smoke": [LinearShape(3, 1, 20, 12), LinearShape(2, 9, 24, 20)],
}
EMBEDDING = {"full": [dict(B=16, T=512, V=32000, P=768)], "smoke": [dict(B=2, T=7, V=50, P=16)]}
CLIP = {"full": [dict(B=4096)], "smoke": [dict(B=5)]}
UPDATE_SMOKE = [dict(n=5000)]


def _impl_names(suite: str, shape) -> list[str]:
    if suite == "conv":
        return ["dp-norm-direct", "dp-norm-ghost", "dp-clipped-wgrad", "opacus-materialise", "nonprivate-wgrad"]
    if suite == "linear":
        norms = ["dp-norm-outer"] if shape.T == 1 else ["dp-norm-direct", "dp-norm-ghost"]
        return norms + ["dp-clipped-wgrad", "opacus-materialise", "nonprivate-wgrad"]
    if suite == "groupnorm":
        return ["dp-affine-grads+clipped-sum", "opacus-materialise", "nonprivate-wgrad"]
    if suite == "embedding":
        return ["dp-norm", "dp-clipped-grad", "opacus-materialise", "nonprivate-wgrad"]
    if suite == "clip":
        return ["dp-clip-factors", "torch-clip-factors"]
    if suite == "update":
        return ["dp-noisy-update-sgd-momentum", "dp-noisy-update-adam", "torch-noise+sgd-momentum-unfused", "torch-copy"]
    raise ValueError(suite)


def _cases(b) -> list[tuple]:
    """(suite, model, layer, count, shape, mode) for the selected configuration."""
    smoke = b.size != "full"
    out = []

    def cap(rows):
        return rows if b.max_shapes is None else rows[: b.max_shapes]

    per_model = {m: layer_shapes(m, smoke=smoke) for m in b.models}
    for mode in b.modes:
        if "conv" in b.suites:
            for m in b.models:
                out += [("conv", m, name, count, s, mode) for name, s, count in cap(per_model[m]["conv"])]
        if "linear" in b.suites:
            for m in b.models:
                out += [("linear", m, name, count, s, mode) for name, s, count in per_model[m]["linear"]]
            out += [("linear", "synthetic", s.label(), 1, s, mode) for s in LINEAR_SYNTHETIC[b.size]]
        if "groupnorm" in b.suites:
            for m in b.models:
                out += [("groupnorm", m, name, count, s, mode) for name, s, count in cap(per_model[m]["groupnorm"])]
        if "embedding" in b.suites:
            out += [("embedding", "synthetic", "embedding", 1, s, mode) for s in EMBEDDING[b.size]]
    # dtype-independent suites: fp32 only
    if "clip" in b.suites:
        out += [("clip", "synthetic", "clip-factors", 1, s, "fp32-ieee") for s in CLIP[b.size]]
    if "update" in b.suites:
        shapes = UPDATE_SMOKE if smoke else [dict(n=param_count(m)) for m in dict.fromkeys(
            ["r18-32" if m.startswith("r18") else "r50-224" for m in b.models])]
        out += [("update", "synthetic", f"params-{s['n']}", 1, s, "fp32-ieee") for s in shapes]
    return out


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    b = metafunc.config._dpprims_bench
    params, ids = [], []
    for suite, model, layer, count, shape, mode in _cases(b):
        label = shape.label() if hasattr(shape, "label") else "-".join(f"{k}{v}" for k, v in shape.items())
        for impl in _impl_names(suite, shape):
            params.append((suite, model, layer, count, shape, mode, impl))
            ids.append(f"{suite}-{model}-{layer}-{label}-{mode}-{impl}")
    metafunc.parametrize("case", params, ids=ids)


def test_kernel(case, bench, benchmark):
    suite, model, layer, count, shape, mode_name, impl = case
    rec = bench.recorder
    common = dict(suite=suite, model=model, layer=layer, count=count, shape=shape, mode=mode_name, impl=impl)
    if mode_name == "bf16" and not bench.device == "cuda" and suite in ("conv", "linear", "embedding"):
        rec.add(make_row(**common, info=None, status="skipped", reason="bf16 dots are not run through the CPU interpreter"))
        pytest.skip("bf16 in the interpreter")
    benchmark.group = f"{suite}-{model}-{layer}-{mode_name}"
    with Mode(mode_name) as mode:
        key = (suite, model, layer, repr(shape), mode_name)
        status, built = rec.case(key, lambda: _build(suite, shape, mode, bench.device))
        if status != "ok":
            why = f"{type(built).__name__}: {built}"[:300]
            if status == "oom" or isinstance(built, ImportError):
                st = "oom" if status == "oom" else "skipped"
                rec.add(make_row(**common, info=None, status=st, reason=f"case not built: {why}"))
                pytest.skip(f"{st}: {why}")
            rec.add(make_row(**common, info=None, status="failed", reason=f"case not built: {why}"))
            raise built
        impls, info, checks = built
        fn = impls[impl]
        try:
            stats = time_impl(fn, full=bench.size == "full", cuda=bench.device == "cuda", rep_ms=bench.rep_ms,
                              benchmark=benchmark, graphs=bench.graphs)
        except Exception as e:  # noqa: BLE001
            from _common import is_oom

            if is_oom(e):
                rec.add(make_row(**common, info=info, status="oom", reason=str(e).splitlines()[0][:200]))
                pytest.skip(f"out of memory: {e}")
            rec.add(make_row(**common, info=info, status="failed", reason=f"{type(e).__name__}: {e}"[:300]))
            raise
        row = make_row(**common, info=info, stats=stats)
        if checks and impl in checks:
            row["check_rel_err"] = checks[impl]
        rec.add(row)
        benchmark.extra_info.update({k: row.get(k) for k in ("median_ms", "tflops", "gbs", "check_rel_err") if row.get(k)})


def _build(suite, shape, mode, device):
    impls, info = SUITES[suite](shape, mode, device)
    info["dp_precision"] = "bf16 operands" if mode.name == "bf16" else mode.precision
    check = info.pop("check", None)
    checks = None
    if check is not None:
        import torch

        checks = check()
        for k, v in checks.items():
            if not (v == v) or v > (5e-2 if mode.name == "bf16" else 1e-2):  # NaN or far off: a wrong kernel
                raise AssertionError(f"{suite} {k} disagrees with the fp64 reference: relative error {v:.3e}")
        if device == "cuda":
            torch.cuda.synchronize()
    return impls, info, checks
