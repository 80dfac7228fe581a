"""Cases, implementations and the summary of the kernel microbenchmarks (bench/test_kernels.py).

A *case* is one layer shape (read off the model by shapes.py) in one numeric *mode*; each case
is timed for several *implementations*:

    dp-*                dpprims' op (the compiled Triton kernel on a GPU; the interpreter on CPU)
    opacus-materialise  what Opacus does: its own grad sampler (einsum / unfold+einsum) writes the
                        per-example gradients, then the norms and the clipped sum as its
                        DPOptimizer computes them
    nonprivate-wgrad    the non-private weight gradient of the same layer through cuBLAS / cuDNN
                        (G^T A, torch.nn.grad.conv2d_weight, aten's GroupNorm / Embedding backward)

Modes: fp32-ieee (TF32 off everywhere, dpprims precision "ieee"), fp32-tf32 (TF32 on in
cuBLAS / cuDNN, dpprims precision "tf32"), bf16 (bf16 operands, fp32 accumulation and output).

Timing (GPU, --bench-size=full): triton.testing.do_bench - CUDA events, warm-up, the L2 cache
flushed before every call, median and 20/80% quantiles over ~rep_ms of calls. pytest-benchmark
also times a few host-synchronised calls (its own table). CPU (--bench-size=smoke): every
implementation runs once at tiny shapes, no timing.
"""
from __future__ import annotations

import time
from dataclasses import asdict

from _common import TARGETS, ensure_dpprims, is_oom, summarize_ms, target_status, targets_markdown, try_import

MODES = ("fp32-ieee", "fp32-tf32", "bf16")
SMOKE_MODES = ("fp32-ieee",)
CHECK_EXAMPLES = 4  # examples compared against the fp32 reference in every case


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------
class Mode:
    """Sets the torch TF32 flags for a mode (restored on exit) and gives dtype / dot precision."""

    def __init__(self, name: str):
        import torch

        if name not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {name!r}")
        self.name = name
        self.dtype = torch.bfloat16 if name == "bf16" else torch.float32
        # dpprims' tl.dot precision for fp32 operands: the fastest TF32 mode the bindings accept
        # ("tf32" if allowed, else "tf32x3", which keeps near-fp32 accuracy)
        self.precision = fastest_tf32_precision() if name == "fp32-tf32" else "ieee"
        self.tf32 = name == "fp32-tf32"

    def __enter__(self):
        import torch

        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        return self

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
        return False


def fastest_tf32_precision() -> str:
    ensure_dpprims()
    lin, _ = try_import("dpprims.bindings.torch.linear")
    allowed = getattr(lin, "_DOT_PRECISIONS", ("ieee", "tf32x3", "tf32"))
    return "tf32" if "tf32" in allowed else "tf32x3"


# --------------------------------------------------------------------------------------------
# per-suite implementations. Each builder returns (impls, info): impls maps an implementation
# name to a zero-argument callable; info has flops / bytes per implementation and a `check`
# callable returning the relative error of the dp ops against an fp32 reference.
# --------------------------------------------------------------------------------------------
def _rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return float((a - b).norm().item() / den) if den > 0 else float((a - b).norm().item())


def _opacus_clip_sum(grad_samples, c):
    """Opacus' DPOptimizer.clip_and_accumulate on per-example gradients: per-parameter norms,
    the per-example norm, and sum_i c_i g_i (grad samples cast to the fp32 parameter dtype)."""
    import torch

    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples], dim=1).norm(2, dim=1)
    sums = [torch.einsum("i,i...", c, g.to(torch.float32)) for g in grad_samples]
    return norms, sums


def conv_case(shape, mode: Mode, device: str):
    import torch

    ensure_dpprims()
    from dpprims.bindings.torch import conv as dconv
    from opacus.grad_sample.conv import compute_conv_grad_sample

    s = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s.B, s.C_in, s.H, s.W, device=device, generator=gen).to(mode.dtype)
    G = torch.randn(s.B, s.C_out, s.H_out, s.W_out, device=device, generator=gen).to(mode.dtype)
    c = torch.rand(s.B, device=device, generator=gen) * 0.9 + 0.1
    geo = (list(s.k), list(s.stride), list(s.padding), list(s.dilation), s.groups)
    layer = torch.nn.Conv2d(s.C_in, s.C_out, s.k, stride=s.stride, padding=s.padding, dilation=s.dilation,
                            groups=s.groups, bias=False, device=device, dtype=mode.dtype)
    wshape = tuple(layer.weight.shape)

    def opacus():
        gs = compute_conv_grad_sample(layer, [x], G)[layer.weight]
        return _opacus_clip_sum([gs], c)

    impls = {
        "dp-norm-direct": lambda: dconv.conv2d_weight_sq_norms(x, G, *geo, "direct", mode.precision),
        "dp-norm-ghost": lambda: dconv.conv2d_weight_sq_norms(x, G, *geo, "ghost", mode.precision),
        "dp-clipped-wgrad": lambda: dconv.conv2d_clipped_weight_grad(x, G, c, *geo, mode.precision),
        "opacus-materialise": opacus,
        "nonprivate-wgrad": lambda: torch.nn.grad.conv2d_weight(x, wshape, G, stride=s.stride, padding=s.padding,
                                                               dilation=s.dilation, groups=s.groups),
    }
    BTdp = s.B * s.T * s.D * s.P * s.groups
    esz = x.element_size()
    io = esz * (x.numel() + G.numel())
    info = {
        "T": s.T, "d": s.D, "p": s.P, "groups": s.groups,
        "flops": {"dp-norm-direct": 2 * BTdp, "dp-norm-ghost": 2 * s.B * s.T * s.T * (s.D + s.P) * s.groups,
                  "dp-clipped-wgrad": 2 * BTdp, "opacus-materialise": 2 * BTdp + 4 * s.B * s.D * s.P * s.groups,
                  "nonprivate-wgrad": 2 * BTdp},
        "bytes": {k: io for k in impls},
        "auto_method": _auto_conv(s),
    }
    info["bytes"]["opacus-materialise"] = io + 3 * 4 * s.B * s.D * s.P * s.groups  # write, re-read twice (fp32)

    def check():
        n = min(CHECK_EXAMPLES, s.B)
        xs, Gs, cs = x[:n].float(), G[:n].float(), c[:n]
        lay = torch.nn.Conv2d(s.C_in, s.C_out, s.k, stride=s.stride, padding=s.padding, dilation=s.dilation,
                              groups=s.groups, bias=False, device=device)
        with torch.backends.cudnn.flags(allow_tf32=False):
            gs = compute_conv_grad_sample(lay, [xs], Gs)[lay.weight].double()
        ref_sq = gs.reshape(n, -1).square().sum(1)
        ref_sum = torch.einsum("i,i...", cs.double(), gs)
        return {
            "dp-norm-direct": _rel_err(dconv.conv2d_weight_sq_norms(x[:n], G[:n], *geo, "direct", mode.precision), ref_sq),
            "dp-norm-ghost": _rel_err(dconv.conv2d_weight_sq_norms(x[:n], G[:n], *geo, "ghost", mode.precision), ref_sq),
            "dp-clipped-wgrad": _rel_err(dconv.conv2d_clipped_weight_grad(x[:n], G[:n], cs, *geo, mode.precision), ref_sum),
        }

    info["check"] = check
    return impls, info


def _auto_conv(s) -> str:
    mod, _ = try_import("dpprims.kernels.conv")
    if mod is not None and hasattr(mod, "choose_conv_norm_method"):
        return mod.choose_conv_norm_method(s.T, s.D, s.P, "auto")
    return "direct" if s.T * s.T * (s.D + s.P) >= s.T * s.D * s.P else "ghost"


def linear_case(shape, mode: Mode, device: str):
    import torch

    ensure_dpprims()
    from dpprims.bindings.torch import linear as dlin
    from dpprims.kernels.linear import choose_norm_method
    from opacus.grad_sample.linear import compute_linear_grad_sample

    s = shape
    gen = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(s.B, s.T, s.D, device=device, generator=gen).to(mode.dtype)
    G = torch.randn(s.B, s.T, s.P, device=device, generator=gen).to(mode.dtype)
    if s.T == 1:
        A, G = A[:, 0], G[:, 0]
    c = torch.rand(s.B, device=device, generator=gen) * 0.9 + 0.1
    layer = torch.nn.Linear(s.D, s.P, bias=False, device=device, dtype=mode.dtype)

    def opacus():
        gs = compute_linear_grad_sample(layer, [A], G)[layer.weight]
        return _opacus_clip_sum([gs], c)

    norm_methods = ("outer",) if s.T == 1 else ("direct", "ghost")
    impls = {f"dp-norm-{m}": (lambda m=m: dlin.linear_weight_sq_norms(A, G, m, mode.precision)) for m in norm_methods}
    impls.update({
        "dp-clipped-wgrad": lambda: dlin.linear_clipped_weight_grad(A, G, c, mode.precision),
        "opacus-materialise": opacus,
        "nonprivate-wgrad": lambda: G.reshape(-1, s.P).t() @ A.reshape(-1, s.D),
    })
    BTdp = s.B * s.T * s.D * s.P
    esz = A.element_size()
    io = esz * (A.numel() + G.numel())
    flops = {"dp-norm-direct": 2 * BTdp, "dp-norm-ghost": 2 * s.B * s.T * s.T * (s.D + s.P),
             "dp-norm-outer": 2 * s.B * (s.D + s.P), "dp-clipped-wgrad": 2 * BTdp,
             "opacus-materialise": 2 * BTdp + 4 * s.B * s.D * s.P, "nonprivate-wgrad": 2 * BTdp}
    info = {"T": s.T, "d": s.D, "p": s.P, "groups": 1, "flops": {k: flops[k] for k in impls},
            "bytes": {k: io for k in impls}, "auto_method": choose_norm_method(s.T, s.D, s.P, "auto")}
    info["bytes"]["opacus-materialise"] = io + 3 * 4 * s.B * s.D * s.P

    def check():
        n = min(CHECK_EXAMPLES, s.B)
        As, Gs, cs = A[:n].double(), G[:n].double(), c[:n].double()
        gs = torch.einsum("n...i,n...j->nij", Gs, As)
        ref_sq, ref_sum = gs.reshape(n, -1).square().sum(1), torch.einsum("i,i...", cs, gs)
        out = {f"dp-norm-{m}": _rel_err(dlin.linear_weight_sq_norms(A[:n], G[:n], m, mode.precision), ref_sq)
               for m in norm_methods}
        out["dp-clipped-wgrad"] = _rel_err(dlin.linear_clipped_weight_grad(A[:n], G[:n], c[:n], mode.precision), ref_sum)
        return out

    info["check"] = check
    return impls, info


def groupnorm_case(shape, mode: Mode, device: str):
    import torch

    ensure_dpprims()
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample

    na, why = try_import("dpprims.bindings.torch.norm_affine")
    if na is None:
        raise ImportError(why)
    s = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(s.B, s.C, s.H, s.W, device=device, generator=gen).to(mode.dtype)
    G = torch.randn(s.B, s.C, s.H, s.W, device=device, generator=gen).to(mode.dtype)
    c = torch.rand(s.B, device=device, generator=gen) * 0.9 + 0.1
    layer = torch.nn.GroupNorm(s.groups, s.C, device=device, dtype=mode.dtype)
    HW = s.H * s.W
    _, mean, rstd = torch.ops.aten.native_group_norm(x, layer.weight, layer.bias, s.B, s.C, HW, s.groups, 1e-5)

    def dp():
        per_example, sq = na.groupnorm_affine_grads(x, G, mean, rstd, s.groups)
        return sq, na.clipped_rows_sum(per_example.reshape(s.B, -1), c)

    def opacus():
        gs = compute_group_norm_grad_sample(layer, [x], G)
        return _opacus_clip_sum([gs[layer.weight], gs[layer.bias]], c)

    impls = {
        "dp-affine-grads+clipped-sum": dp,
        "opacus-materialise": opacus,
        "nonprivate-wgrad": lambda: torch.ops.aten.native_group_norm_backward(
            G, x, mean, rstd, layer.weight, s.B, s.C, HW, s.groups, [False, True, True]),
    }
    io = x.element_size() * (x.numel() + G.numel())
    info = {"T": HW, "d": s.C, "p": 2, "groups": s.groups, "flops": {k: 4 * x.numel() for k in impls},
            "bytes": {k: io for k in impls}, "auto_method": "instantiate"}
    info["bytes"]["opacus-materialise"] = io + 2 * x.numel() * x.element_size()  # normalised copy + product

    def check():
        n = min(CHECK_EXAMPLES, s.B)
        xs, Gs = x[:n].double(), G[:n].double()
        xhat = torch.nn.functional.group_norm(xs, s.groups, eps=1e-5)
        ref = torch.cat([(xhat * Gs).sum((2, 3)), Gs.sum((2, 3))], dim=1)
        per_example, sq = na.groupnorm_affine_grads(x[:n], G[:n], mean[:n], rstd[:n], s.groups)
        return {"dp-affine-grads+clipped-sum": _rel_err(per_example.reshape(n, -1), ref)}

    info["check"] = check
    return impls, info


def embedding_case(shape, mode: Mode, device: str):
    """shape: dict(B, T, V, P)."""
    import torch

    ensure_dpprims()
    from opacus.grad_sample.embedding import compute_embedding_grad_sample

    emb, why = try_import("dpprims.bindings.torch.embedding")
    if emb is None:
        raise ImportError(why)
    B, T, V, P = shape["B"], shape["T"], shape["V"], shape["P"]
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, V, (B, T), device=device, generator=gen)
    G = torch.randn(B, T, P, device=device, generator=gen).to(mode.dtype)
    c = torch.rand(B, device=device, generator=gen) * 0.9 + 0.1
    layer = torch.nn.Embedding(V, P, device=device, dtype=mode.dtype)

    def opacus():
        gs = compute_embedding_grad_sample(layer, [ids], G)[layer.weight]
        return _opacus_clip_sum([gs], c)

    impls = {
        "dp-norm": lambda: emb.embedding_sq_norms(ids, G, None, mode.precision),
        "dp-clipped-grad": lambda: emb.embedding_clipped_grad(ids, G, c, V, None, mode.precision),
        "opacus-materialise": opacus,
        "nonprivate-wgrad": lambda: torch.ops.aten.embedding_dense_backward(G, ids, V, -1, False),
    }
    io = G.numel() * G.element_size() + ids.numel() * 8
    info = {"T": T, "d": V, "p": P, "groups": 1,
            "flops": {"dp-norm": 2 * B * T * T * P, "dp-clipped-grad": 2 * B * T * P, "opacus-materialise": 2 * B * V * P,
                      "nonprivate-wgrad": 2 * B * T * P},
            "bytes": {k: io for k in impls}, "auto_method": "ghost"}
    info["bytes"]["opacus-materialise"] = io + 3 * 4 * B * V * P

    def check():
        n = min(CHECK_EXAMPLES, B)
        gs = torch.zeros(n, V, P, dtype=torch.float64, device=device)
        gs.index_put_((torch.arange(n, device=device)[:, None].expand(n, T), ids[:n]), G[:n].double(), accumulate=True)
        ref_sq, ref_sum = gs.reshape(n, -1).square().sum(1), torch.einsum("i,i...", c[:n].double(), gs)
        return {"dp-norm": _rel_err(emb.embedding_sq_norms(ids[:n], G[:n], None, mode.precision), ref_sq),
                "dp-clipped-grad": _rel_err(emb.embedding_clipped_grad(ids[:n], G[:n], c[:n], V, None, mode.precision), ref_sum)}

    info["check"] = check
    return impls, info


def clip_factors_case(shape, mode: Mode, device: str):
    import torch

    ensure_dpprims()
    from dpprims.bindings.torch.linear import clip_factors

    B = shape["B"]
    gen = torch.Generator(device=device).manual_seed(0)
    sq = torch.rand(B, device=device, generator=gen) * 4
    mask = torch.ones(B, dtype=torch.bool, device=device)
    C = torch.tensor([1.0], device=device)

    def torch_ref():
        n = sq.sqrt()
        return torch.where(torch.isfinite(n) & mask, torch.clamp(C / (n + 1e-6), max=1.0), 0.0), n

    impls = {"dp-clip-factors": lambda: clip_factors(sq, mask, C, False, 0.01), "torch-clip-factors": torch_ref}
    info = {"T": 1, "d": 1, "p": 1, "groups": 1, "flops": {k: 4 * B for k in impls}, "bytes": {k: 13 * B for k in impls},
            "auto_method": "-"}

    def check():
        return {"dp-clip-factors": _rel_err(clip_factors(sq, mask, C, False, 0.01)[0], torch_ref()[0])}

    info["check"] = check
    return impls, info


def update_case(shape, mode: Mode, device: str):
    """Fused noise + normalisation + optimizer update (kernels/update.py) over ``n`` fp32
    parameters, launched from its framework-neutral launch spec, against a torch copy of the
    same bytes' worth (the bandwidth ceiling) and torch's unfused noise + foreach SGD step."""
    import torch

    ensure_dpprims()
    ku, why = try_import("dpprims.kernels.update")
    if ku is None:
        raise ImportError(why)
    from dpprims import noise as dnoise

    n = shape["n"]
    gen = torch.Generator(device=device).manual_seed(0)
    f32 = dict(device=device, dtype=torch.float32)
    grad = torch.randn(n, **f32, generator=gen)
    param = torch.randn(n, **f32, generator=gen)
    buf = torch.randn(n, **f32, generator=gen)
    m1 = torch.randn(n, **f32, generator=gen)
    v2 = torch.rand(n, **f32, generator=gen)
    src = torch.randn(n, **f32, generator=gen)
    dst = torch.empty_like(src)
    seed = torch.tensor(dnoise.seed_words(1234), dtype=torch.int32, device=device)
    step = torch.tensor([1], dtype=torch.int32, device=device)
    sw = dnoise.stream_word(0)

    def hyper(opt):
        return torch.tensor(ku.hyper_values(std=1.0, normaliser=256.0, lr=0.1, momentum=0.9, optimizer=opt), **f32)

    h_sgd, h_adam = hyper("sgd"), hyper("adam")

    # the registered torch ops (dpprims.bindings.torch.update) when present; else the kernel
    # launched from its launch spec exactly as that binding does
    upd, _ = try_import("dpprims.bindings.torch.update")
    ops = getattr(torch.ops, "dpprims", None)
    has_ops = upd is not None and ops is not None and hasattr(ops, "noisy_sgd_update") and hasattr(ops, "noisy_adam_update")

    def launch_sgd():
        if has_ops:
            return ops.noisy_sgd_update(param, buf, grad, seed, step, h_sgd, 0, 0, False, False)
        spec = ku.noisy_update_spec(n, "sgd", has_state1=True)
        ku._noisy_update_kernel[spec.grid](grad, param, buf, buf, seed, step, h_sgd, n, 0, sw,
                                           param, buf, buf, param, **spec.constexprs, num_warps=spec.num_warps)

    def launch_adam():
        if has_ops:
            return ops.noisy_adam_update(param, m1, v2, grad, seed, step, h_adam, 0, 0, False, False)
        spec = ku.noisy_update_spec(n, "adam")
        ku._noisy_update_kernel[spec.grid](grad, param, m1, v2, seed, step, h_adam, n, 0, sw,
                                           param, m1, v2, param, **spec.constexprs, num_warps=spec.num_warps)

    p_t = torch.nn.Parameter(param.clone())
    p_t.grad = grad.clone()
    opt = torch.optim.SGD([p_t], lr=0.1, momentum=0.9, foreach=True)

    def torch_unfused():
        with torch.no_grad():
            z = torch.randn(n, **f32)
            p_t.grad.add_(z, alpha=1.0).div_(256.0)
            opt.step()

    impls = {"dp-noisy-update-sgd-momentum": launch_sgd, "dp-noisy-update-adam": launch_adam,
             "torch-noise+sgd-momentum-unfused": torch_unfused, "torch-copy": lambda: dst.copy_(src)}
    info = {"T": 1, "d": n, "p": 1, "groups": 1,
            # counted bytes: each array read once, each output written once (fp32)
            "bytes": {"dp-noisy-update-sgd-momentum": 4 * 5 * n, "dp-noisy-update-adam": 4 * 7 * n,
                      "torch-noise+sgd-momentum-unfused": 4 * 5 * n, "torch-copy": 4 * 2 * n},
            "flops": {k: 0 for k in impls}, "auto_method": "-", "check": None,
            "dp_launch": "torch.ops.dpprims.noisy_*_update" if has_ops else "kernel launched from its launch spec"}
    return impls, info


SUITES = {"conv": conv_case, "linear": linear_case, "groupnorm": groupnorm_case, "embedding": embedding_case,
          "clip": clip_factors_case, "update": update_case}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def time_impl(fn, *, full: bool, cuda: bool, rep_ms: int, benchmark=None, graphs: bool = True) -> dict:
    """Full size on a GPU: the device time of ``fn`` replayed from a CUDA graph (no launch or
    Python overhead; L2 flushed before each replay), and beside it triton.testing.do_bench's
    eager timing (CUDA events around the Python call, L2 flushed: includes launch overhead
    wherever the GPU waits for the host). The graph time is the row's ``median_ms`` when the
    capture works, else the eager one (``timer`` says which). pytest-benchmark then times five
    host-synchronised calls for its own table. Smoke: one call, not timed."""
    if full and cuda:
        import torch
        import triton.testing

        eager = summarize_ms(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="all"))
        stats = dict(eager)
        stats["timer"] = "cuda-events, eager call (triton.testing.do_bench, L2 flushed)"
        stats["eager_median_ms"] = eager["median_ms"]
        if graphs:
            try:
                g = graph_times(fn, rep_ms)
                stats.update(g)
                stats["timer"] = "cuda-graph replay, cuda-events, L2 flushed (eager do_bench in eager_median_ms)"
                stats["graph_median_ms"] = g["median_ms"]
            except Exception as e:  # noqa: BLE001 - not capturable: keep the eager numbers
                stats["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                torch.cuda.synchronize()
        if benchmark is not None:
            def synced():
                fn()
                torch.cuda.synchronize()

            benchmark.pedantic(synced, rounds=5, warmup_rounds=1, iterations=1)
        return stats
    t0 = time.perf_counter()
    if benchmark is not None:
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    else:
        fn()
    return dict(median_ms=None, p20_ms=None, p80_ms=None, n=1, timer="smoke: one call, not timed",
                wall_ms_one_call=(time.perf_counter() - t0) * 1e3)


_L2_FLUSH = {}


def graph_times(fn, rep_ms: int) -> dict:
    """Capture ``fn`` in a CUDA graph and time its replays with CUDA events, flushing L2 (a
    256 MB write) before each replay outside the timed region."""
    import torch

    if "buf" not in _L2_FLUSH:
        _L2_FLUSH["buf"] = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    flush = _L2_FLUSH["buf"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(3):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) / 3, 1e-3)
    n = int(min(1000, max(10, rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    out = summarize_ms([s.elapsed_time(e) for s, e in zip(starts, ends)])
    del graph
    return out


# --------------------------------------------------------------------------------------------
# recorder and summary
# --------------------------------------------------------------------------------------------
class Recorder:
    """Collects one row per (case, implementation) and writes the summary at session end."""

    def __init__(self, size: str, cuda: bool):
        self.size = size
        self.cuda = cuda
        self.rows: list[dict] = []
        self._cases: dict = {}

    def add(self, row: dict) -> None:
        self.rows.append(row)

    # per-case cache: inputs and implementations built once, shared by the implementation tests
    def case(self, key, build):
        if key not in self._cases:
            self._cases.clear()  # one case alive at a time: frees device memory
            try:
                self._cases[key] = ("ok", build())
            except Exception as e:  # noqa: BLE001 - becomes a 'skipped'/'oom' row
                self._cases[key] = ("oom" if is_oom(e) else "error", e)
        return self._cases[key]

    def clear(self):
        self._cases.clear()

    def summary(self) -> dict:
        return summarize_rows(self.rows, smoke=self.size != "full" or not self.cuda)


def _ms(row):
    return row.get("median_ms") if row and row.get("status") == "ok" else None


def summarize_rows(rows: list[dict], *, smoke: bool) -> dict:
    """Per-case ratios, per-model sums (each shape weighted by its layer count) and the kernel
    targets. Ratios are computed only between implementations timed in the same run."""
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    cases = []
    for key, impls in by_case.items():
        entry = {}
        for k in ("suite", "model", "layer", "count", "shape", "mode", "T", "d", "p", "auto_method"):
            entry[k] = next((r[k] for r in impls.values() if r.get(k) is not None), None)
        suite = entry["suite"]
        if suite in ("conv", "linear"):
            norm = impls.get(f"dp-norm-{entry['auto_method']}")
            clipped = impls.get("dp-clipped-wgrad")
            opac, nonp = _ms(impls.get("opacus-materialise")), _ms(impls.get("nonprivate-wgrad"))
            n_ms, c_ms = _ms(norm), _ms(clipped)
            norms = {k[len("dp-norm-"):]: _ms(v) for k, v in impls.items() if k.startswith("dp-norm-")}
            timed = {k: v for k, v in norms.items() if v is not None}
            entry.update(norm_ms=n_ms, clipped_ms=c_ms, opacus_ms=opac, nonprivate_ms=nonp,
                         best_norm_method=min(timed, key=timed.get) if timed else None,
                         dp_total_ms=(n_ms + c_ms) if n_ms is not None and c_ms is not None else None)
            entry["norm_tflops"] = (norm or {}).get("tflops")
            entry["clipped_tflops"] = (clipped or {}).get("tflops")
            entry["nonprivate_tflops"] = (impls.get("nonprivate-wgrad") or {}).get("tflops")
            entry["speedup_vs_opacus"] = (opac / entry["dp_total_ms"]) if opac and entry["dp_total_ms"] else None
            entry["clipped_over_nonprivate"] = (c_ms / nonp) if c_ms and nonp else None
            entry["norm_over_nonprivate"] = (n_ms / nonp) if n_ms and nonp else None
            entry["dp_total_over_nonprivate"] = (entry["dp_total_ms"] / nonp) if entry["dp_total_ms"] and nonp else None
        elif suite == "update":
            gbs = {k: v.get("gbs") for k, v in impls.items() if v.get("status") == "ok"}
            copy = gbs.get("torch-copy")
            entry["gbs"] = gbs
            entry["fraction_of_copy_bw"] = {k: (v / copy if v and copy else None) for k, v in gbs.items() if k != "torch-copy"}
        else:
            ms = {k: _ms(v) for k, v in impls.items()}
            entry["ms"] = ms
            dp = sum(v for k, v in ms.items() if k.startswith("dp-") and v is not None) or None
            opac, nonp = ms.get("opacus-materialise"), ms.get("nonprivate-wgrad")
            entry["speedup_vs_opacus"] = (opac / dp) if dp and opac else None
            entry["dp_over_nonprivate"] = (dp / nonp) if dp and nonp else None
        cases.append(entry)

    # per (model, mode): sums over the model's conv + linear layers, weighted by count
    models: dict = {}
    for e in cases:
        if e["suite"] not in ("conv", "linear") or e.get("model") in (None, "synthetic"):
            continue
        m = models.setdefault((e["model"], e["mode"]), dict(model=e["model"], mode=e["mode"], norm_ms=0.0, clipped_ms=0.0,
                                                           nonprivate_ms=0.0, opacus_ms=0.0, complete=True, layers=0))
        m["layers"] += e["count"]
        for k in ("norm_ms", "clipped_ms", "nonprivate_ms", "opacus_ms"):
            if e.get(k) is None:
                m["complete"] = False
            else:
                m[k] += e["count"] * e[k]
    model_rows = []
    targets = []
    for (model, mode), m in sorted(models.items()):
        ok = m["complete"] and m["nonprivate_ms"] > 0
        m["norm_over_nonprivate"] = m["norm_ms"] / m["nonprivate_ms"] if ok else None
        m["clipped_over_nonprivate"] = m["clipped_ms"] / m["nonprivate_ms"] if ok else None
        m["speedup_vs_opacus"] = m["opacus_ms"] / (m["norm_ms"] + m["clipped_ms"]) if ok and m["norm_ms"] + m["clipped_ms"] > 0 else None
        model_rows.append(m)
        where = f"{model} {mode} (conv+linear layers)"
        reason = None if ok else "some layer of the model was not measured"
        if model.startswith("r18"):
            targets.append(target_status("norm_pass", m["norm_over_nonprivate"], where, reason=reason, smoke=smoke))
        targets.append(target_status("clipped_wgrad", m["clipped_over_nonprivate"], where, reason=reason, smoke=smoke))
    for e in cases:
        if e["suite"] == "update":
            for k, f in e["fraction_of_copy_bw"].items():
                if k.startswith("dp-"):
                    targets.append(target_status("noisy_update_bw", f, f"{k} n={e['d']}", smoke=smoke,
                                                 reason=None if f is not None else "not timed"))
    have = {t["target"] for t in targets}
    for name, t in TARGETS.items():
        if t["scope"] == "kernels" and name not in have:
            targets.append(target_status(name, None, "-", reason="no case of this target was selected or measured"))
    for name, t in TARGETS.items():
        if t["scope"] == "e2e":
            targets.append(target_status(name, None, "-", reason="end-to-end target: see bench/e2e.py results"))
    return dict(cases=cases, models=model_rows, targets=targets)


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def markdown(summary: dict, rows: list[dict]) -> str:
    out = []
    cases = summary["cases"]
    conv = [e for e in cases if e["suite"] in ("conv", "linear")]
    if conv:
        out.append("### Conv / Linear layers (times in ms; ratios from the same run)\n")
        out.append("| model | layer (x count) | mode | T / d / p | norm method (auto / best) | dp norm | dp clipped wgrad "
                   "| Opacus materialise | non-private wgrad | TFLOP/s norm / clipped / non-private | speedup vs Opacus "
                   "| clipped / non-private | norm / non-private |")
        out.append("| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for e in conv:
            out.append(f"| {e.get('model')} | {e.get('layer')} (x{e.get('count')}) | {e['mode']} | {e['T']} / {e['d']} / {e['p']} "
                       f"| {e['auto_method']} / {e.get('best_norm_method') or '-'} | {_f(e['norm_ms'])} | {_f(e['clipped_ms'])} "
                       f"| {_f(e['opacus_ms'])} | {_f(e['nonprivate_ms'])} "
                       f"| {_f(e['norm_tflops'], '{:.0f}')} / {_f(e['clipped_tflops'], '{:.0f}')} / {_f(e['nonprivate_tflops'], '{:.0f}')} "
                       f"| {_f(e['speedup_vs_opacus'], '{:.2f}x')} "
                       f"| {_f(e['clipped_over_nonprivate'], '{:.2f}')} | {_f(e['norm_over_nonprivate'], '{:.2f}')} |")
    if summary["models"]:
        out.append("\n### Per model (sum over conv + linear layers, weighted by layer count)\n")
        out.append("| model | mode | layers | dp norm ms | dp clipped ms | non-private wgrad ms | Opacus ms | norm / non-private "
                   "| clipped / non-private | speedup vs Opacus |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for m in summary["models"]:
            out.append(f"| {m['model']} | {m['mode']} | {m['layers']} | {_f(m['norm_ms'] if m['complete'] else None)} "
                       f"| {_f(m['clipped_ms'] if m['complete'] else None)} | {_f(m['nonprivate_ms'] if m['complete'] else None)} "
                       f"| {_f(m['opacus_ms'] if m['complete'] else None)} | {_f(m['norm_over_nonprivate'], '{:.2f}')} "
                       f"| {_f(m['clipped_over_nonprivate'], '{:.2f}')} | {_f(m['speedup_vs_opacus'], '{:.2f}x')} |")
    other = [e for e in cases if e["suite"] not in ("conv", "linear")]
    if other:
        out.append("\n### Other kernels (ms, or GB/s for the update)\n")
        out.append("| suite | case | mode | results |")
        out.append("| --- | --- | --- | --- |")
        for e in other:
            if e["suite"] == "update":
                res = ", ".join(f"{k}: {_f(v, '{:.0f}')} GB/s" for k, v in e["gbs"].items())
                res += "; fraction of copy: " + ", ".join(f"{k}: {_f(v, '{:.2f}')}" for k, v in e["fraction_of_copy_bw"].items())
            else:
                res = ", ".join(f"{k}: {_f(v)}" for k, v in e["ms"].items())
                res += f"; speedup vs Opacus {_f(e.get('speedup_vs_opacus'), '{:.2f}x')}"
            out.append(f"| {e['suite']} | {e.get('layer') or e.get('shape')} | {e['mode']} | {res} |")
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        out.append("\n### Not measured\n")
        out.append("| case | impl | status | reason |")
        out.append("| --- | --- | --- | --- |")
        for r in bad:
            out.append(f"| {r['case']} | {r['impl']} | {r['status']} | {r.get('reason', '')} |")
    errs = [(r["case"], r["impl"], r.get("check_rel_err")) for r in rows if r.get("check_rel_err") is not None]
    if errs:
        worst = max(errs, key=lambda t: t[2])
        out.append(f"\nLargest relative error of a dp op against the fp64 reference (first {CHECK_EXAMPLES} examples): "
                   f"{worst[2]:.2e} ({worst[0]} {worst[1]}).")
    out.append("\n### Targets\n")
    out.append(targets_markdown(summary["targets"]))
    return "\n".join(out)


def make_row(*, suite, model, layer, count, shape, mode, impl, info, stats=None, status="ok", reason=None) -> dict:
    label = shape.label() if hasattr(shape, "label") else "-".join(f"{k}{v}" for k, v in shape.items())
    case = f"{suite}|{model}|{layer}|{label}|{mode}"
    row = dict(case=case, suite=suite, model=model, layer=layer, count=count, shape=label,
               shape_dict=asdict(shape) if hasattr(shape, "__dataclass_fields__") else dict(shape),
               mode=mode, impl=impl, status=status)
    if reason:
        row["reason"] = reason
    if info:
        row.update({k: info[k] for k in ("T", "d", "p", "groups", "auto_method", "dp_precision", "dp_launch") if k in info})
        row["flops"] = info["flops"].get(impl)
        row["bytes"] = info["bytes"].get(impl)
    if stats:
        row.update(stats)
        ms = stats.get("median_ms")
        if ms:
            if row.get("flops"):
                row["tflops"] = row["flops"] / (ms * 1e-3) / 1e12
            if row.get("bytes"):
                row["gbs"] = row["bytes"] / (ms * 1e-3) / 1e9
    return row
