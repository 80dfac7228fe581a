"""Fused noise + normalisation + optimizer update (kernels/update.py, bindings/torch/update.py):
torch.optim semantics with std = 0, the noise equals the standalone noise op's with std > 0,
torch path == kernel path, outputs poisoned with NaN, the user helper's checks."""
import contextlib

import pytest
import torch

from dpprims import noise as nz
from dpprims import noise_cpu as ncpu
from dpprims.bindings.torch import noise as N
from dpprims.bindings.torch import update as U
from _paths import one_torch_thread, plain_torch_path  # noqa: E402,F401 (fixture import registers it)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # single-threaded torch, as before

SEED = 987654321987654321
N_ELEM = 1237

CASES = {
    "sgd": ("sgd", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    "sgd-wd": ("sgd", dict(lr=0.05, weight_decay=0.01), torch.optim.SGD, dict(lr=0.05, weight_decay=0.01)),
    "sgd-momentum": ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.01), torch.optim.SGD,
                     dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": ("sgd", dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-3), torch.optim.SGD,
                     dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-3)),
    "adam": ("adam", dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2)),
    "adam-wd": ("adam", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05), torch.optim.Adam,
                dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)),
    "adamw": ("adamw", dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def _tol(device, dtype=torch.float32):
    """Against torch.optim: a few fp32 ulp on CPU; on a GPU, FMA contraction and torch's foreach
    kernels; bf16 on a GPU: one bf16 ulp (an fp32 ulp can flip a bf16 rounding)."""
    if dtype == torch.bfloat16 and device != "cpu":
        return dict(rtol=1e-2, atol=1e-2)
    return dict(rtol=2e-6, atol=2e-6) if device == "cpu" else dict(rtol=1e-5, atol=1e-5)


def _params(device, shapes=((N_ELEM,), (3, 7)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [3 * torch.randn(p.shape, generator=g).to(p.device) for p in params]


@pytest.mark.parametrize("case", list(CASES))
def test_std0_matches_torch_optim(case, device):
    """noise_std = 0: the fused step is torch.optim's step on grad / normaliser, 4 steps."""
    opt, kw, ref_cls, ref_kw = CASES[case]
    params = _params(device)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = ref_cls(ref_params, **ref_kw)
    state = {}
    normaliser = 7.0
    for step in range(1, 5):
        for p, q, g in zip(params, ref_params, _grads(params, step)):
            p.grad = g.clone()
            q.grad = g / normaliser
        out = U.add_noise_and_step(params, state=state, noise_std=0.0, normaliser=normaliser, seed=SEED,
                                   step=step, optimizer=opt, return_noisy_grads=True, **kw)
        ref.step()
        for g, q in zip(out, ref_params):
            torch.testing.assert_close(g, q.grad, rtol=0, atol=0)  # (grad + 0 * z) / N == grad / N
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **_tol(device), msg=f"{case} step {step}")
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in state:
            for buf, q in zip(state[name], ref_params):
                torch.testing.assert_close(buf, ref.state[q][name], **_tol(device))


@pytest.mark.parametrize("case", ["sgd-nesterov", "adam-wd", "adamw"])
def test_noise_equals_standalone_noise_op(case, device):
    """std > 0: the fused kernel's noisy gradient is (grad + std z) / N with z the noise op's for
    the same (seed, step, pair offset, rank), and the update is torch.optim's on that gradient."""
    opt, kw, ref_cls, ref_kw = CASES[case]
    params = _params(device)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = ref_cls(ref_params, **ref_kw)
    offsets, _ = nz.pair_offsets([p.numel() for p in params])
    state, std, normaliser, rank = {}, 1.3, 11.0, 5
    for step in (1, 2, 3):
        grads = _grads(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        out = U.add_noise_and_step(params, state=state, noise_std=std, normaliser=normaliser, seed=SEED,
                                   step=step, rank=rank, optimizer=opt, return_noisy_grads=True, **kw)
        for p, q, g, off, got in zip(params, ref_params, grads, offsets, out):
            z = N.gaussian_noise(p.numel(), std=1.0, seed=SEED, step=step, pair_offset=off, rank=rank,
                                 device=device).reshape(p.shape)
            expect = (g + std * z) / normaliser
            if device == "cpu":
                assert torch.equal(got, expect)
            else:
                torch.testing.assert_close(got, expect, **_tol(device))
            q.grad = got.clone()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **_tol(device))


@pytest.mark.parametrize("case", ["sgd", "sgd-nesterov", "adam-wd", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_equals_kernel(case, dtype, device):
    """Plain-torch fallback == kernel (bit for bit against the interpreter on CPU), params and
    optimizer state in fp32 and bf16, 3 steps with noise."""
    opt, kw, _, _ = CASES[case]
    results = []
    for backend in ("kernel", "torch", "torch-no-numba"):
        dev = device if backend == "kernel" else "cpu"
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in _params(dev)]
        state, outs = {}, []
        ctx = plain_torch_path() if backend != "kernel" else contextlib.nullcontext()
        with ctx, pytest.MonkeyPatch.context() as mp:
            if backend == "torch-no-numba":  # the plain torch ops (what runs without numba)
                mp.setenv("DPPRIMS_NOISE_CPU", "0")
            for step in (1, 2, 3):
                for p, g in zip(params, _grads(params, step)):
                    p.grad = g.to(dtype)
                outs += U.add_noise_and_step(params, state=state, noise_std=0.9, normaliser=5.0, seed=SEED,
                                             step=step, optimizer=opt, return_noisy_grads=True, **kw)
        bufs = [b for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") for b in state.get(k, [])]
        results.append([t.detach().cpu() for t in params + bufs + outs])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.dtype == b.dtype == dtype
            if device == "cpu":
                assert torch.equal(a, b), (a.float() - b.float()).abs().max()
            else:
                torch.testing.assert_close(a.float(), b.float(), **_tol(device, dtype))


@pytest.mark.skipif(not ncpu.available(), reason="numba is not installed: no fused CPU update")
@pytest.mark.parametrize("case", ["sgd-momentum", "sgd-nesterov", "adam-wd", "adamw"])
def test_fused_cpu_update_equals_plain_torch_across_chunks(case, monkeypatch):
    """The numba fused update (noise chunk by chunk, dpprims.noise_cpu) == the plain torch ops, bit
    for bit, on parameters spanning several noise chunks and starting mid-chunk, 2 steps."""
    opt, kw, _, _ = CASES[case]
    shapes = ((3, 5), (2 * ncpu.CHUNK_PAIRS + 37,), (7, 11, 13))
    results = []
    for eager in (False, True):
        params = _params("cpu", shapes=shapes, seed=3)
        state, outs = {}, []
        with plain_torch_path(), monkeypatch.context() as mp:
            if eager:
                mp.setenv("DPPRIMS_NOISE_CPU", "0")
            for step in (1, 2):
                for p, g in zip(params, _grads(params, step)):
                    p.grad = g
                outs += U.add_noise_and_step(params, state=state, noise_std=0.7, normaliser=9.0, seed=SEED, step=step,
                                             rank=2, optimizer=opt, return_noisy_grads=True, **kw)
        bufs = [b for k in ("momentum_buffer", "exp_avg", "exp_avg_sq") for b in state.get(k, [])]
        results.append([t.detach().clone() for t in params + bufs + outs])
    for a, b in zip(*results):
        assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_outputs_poisoned_with_nan_are_all_written(kind, device):
    """The noisy-gradient output starts as NaN; odd size: every element must be written, and
    param / state too (no NaN anywhere)."""
    n = 1001
    param = torch.randn(n, device=device)
    grad = torch.randn(n, device=device)
    s1 = torch.zeros(n, device=device)
    s2 = torch.zeros(n, device=device) if kind == "adam" else None
    seed, step = N.as_seed_tensor(SEED, device), N.as_step_tensor(1, device)
    hyper = U.make_hyper(noise_std=0.5, normaliser=3.0, optimizer=kind, lr=0.1, momentum=0.9, device=device)
    grad_out = torch.full((n,), float("nan"), device=device)
    spec_kind = U._ku.SGD if kind == "sgd" else U._ku.ADAM
    # launch directly with the poisoned output (the op allocates its own)
    from dpprims.kernels import update as ku

    spec = ku.noisy_update_spec(n, kind, has_state1=True, write_grad=True)
    if U.record("noisy_update", param) == "torch":
        U._update_torch(spec_kind, param, s1, s2, grad, seed, step, hyper, 3, 0, False, grad_out)
    else:
        ku._noisy_update_kernel[spec.grid](grad, param, s1, s2 if s2 is not None else param, seed, step, hyper, n, 3,
                                           nz.stream_word(0), param, s1, s2 if s2 is not None else param, grad_out,
                                           num_warps=spec.num_warps, **spec.constexprs)
    for t in (grad_out, param, s1) + ((s2,) if s2 is not None else ()):
        assert not torch.isnan(t).any()
    z = N.gaussian_noise(n, std=1.0, seed=SEED, step=1, pair_offset=3, device=device)
    torch.testing.assert_close(grad_out, (grad + 0.5 * z) / 3.0, rtol=1e-6, atol=1e-6)


def test_empty_batch_and_empty_parameter(device):
    """grad None (no example sampled) still gets noise and a step; a 0-element parameter is fine."""
    params = _params(device, shapes=((9,), (0,), (4,)))
    before = [p.detach().clone() for p in params]
    out = U.add_noise_and_step(params, state={}, noise_std=1.0, normaliser=2.0, seed=SEED, step=1, lr=1.0,
                               return_noisy_grads=True)
    assert out[1].numel() == 0
    offsets, _ = nz.pair_offsets([9, 0, 4])
    for i in (0, 2):
        z = N.gaussian_noise(params[i].numel(), std=1.0, seed=SEED, step=1, pair_offset=offsets[i], device=device)
        torch.testing.assert_close(out[i], z / 2.0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(params[i].detach(), before[i] - out[i], rtol=1e-6, atol=1e-6)


def test_fused_equals_non_fused_noise(device):
    params = _params(device, shapes=((5, 3), (N_ELEM,)))
    for p, g in zip(params, _grads(params, 1)):
        p.grad = g
    noisy = N.noisy_grads(params, noise_std=2.0, normaliser=4.0, seed=SEED, step=8, rank=2)
    fused = U.add_noise_and_step(params, state={}, noise_std=2.0, normaliser=4.0, seed=SEED, step=8, rank=2,
                                 lr=0.0, return_noisy_grads=True)
    for a, b in zip(noisy, fused):
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **_tol(device))


def test_helper_refuses_reused_noise_and_bad_arguments(device):
    params = _params(device, shapes=((6,),))
    state = {}
    U.add_noise_and_step(params, state=state, noise_std=1.0, normaliser=2.0, seed=1, step=3, lr=0.1)
    with pytest.raises(ValueError, match="never be reused"):
        U.add_noise_and_step(params, state=state, noise_std=1.0, normaliser=2.0, seed=1, step=3, lr=0.1)
    with pytest.raises(ValueError, match="changed"):
        U.add_noise_and_step(_params(device, shapes=((7,),)), state=state, noise_std=1.0, normaliser=2.0, seed=1,
                             step=4, lr=0.1)
    with pytest.raises(ValueError, match="step >= 1"):
        U.add_noise_and_step(params, state={}, noise_std=1.0, normaliser=2.0, seed=1, step=0, lr=0.1,
                             optimizer="adam")
    with pytest.raises(ValueError, match="normaliser"):
        U.add_noise_and_step(params, state={}, noise_std=1.0, normaliser=0.0, seed=1, step=1, lr=0.1)
    with pytest.raises(ValueError, match="nesterov"):
        U.add_noise_and_step(params, state={}, noise_std=1.0, normaliser=1.0, seed=1, step=1, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="contiguous"):
        p = torch.nn.Parameter(torch.randn(4, 6, device=device).t())
        p.grad = torch.randn(6, 4, device=device)
        U.add_noise_and_step([p], state={}, noise_std=1.0, normaliser=1.0, seed=1, step=1, lr=0.1)


def test_tensor_seed_and_step(device):
    """Device-array seed / step (CUDA-graph friendly) give the same result as Python ints."""
    a, b = _params(device, shapes=((33,),)), _params(device, shapes=((33,),))
    for p, q, g in zip(a, b, _grads(a, 1)):
        p.grad, q.grad = g, g.clone()
    U.add_noise_and_step(a, state={}, noise_std=1.0, normaliser=2.0, seed=SEED, step=5, lr=0.1, optimizer="adamw")
    U.add_noise_and_step(b, state={}, noise_std=1.0, normaliser=2.0, seed=N.as_seed_tensor(SEED, device),
                         step=torch.tensor([5], dtype=torch.int32, device=device), lr=0.1, optimizer="adamw")
    assert torch.equal(a[0].detach(), b[0].detach())


def test_update_ops_pass_opcheck():
    p, g = torch.randn(17), torch.randn(17)
    seed, step = N.as_seed_tensor(1, "cpu"), N.as_step_tensor(2, "cpu")
    hyper = U.make_hyper(noise_std=1.0, normaliser=2.0, optimizer="adam", lr=0.1)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.dpprims.noisy_sgd_update.default,
                          (p.clone(), torch.zeros(17), g, seed, step, hyper, 0, 0, True, True), test_utils=utils)
    torch.library.opcheck(torch.ops.dpprims.noisy_sgd_update.default,
                          (p.clone(), None, g, seed, step, hyper, 0, 0, False, False), test_utils=utils)
    torch.library.opcheck(torch.ops.dpprims.noisy_adam_update.default,
                          (p.clone(), torch.zeros(17), torch.zeros(17), g, seed, step, hyper, 0, 0, True, True),
                          test_utils=utils)
