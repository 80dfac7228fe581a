"""The per-layer norm-method choice of the plain-torch (CPU) path: a time model.

On the Triton backends the kernels' flop model decides (``dpprims.kernels.linear.norm_flops``).
The plain-torch path runs different code (framework GEMMs, an explicit im2col, oneDNN's conv
weight gradient), whose speed depends on more than flops: a batched GEMM with a short
reduction dimension runs at a fraction of the peak rate, and copies are memory-bound. This
module models the time of the whole clipping work of one layer (norm pass + clipped sum) for
each method and picks the fastest:

* ``ghost``: the Gram matrices U U^T and G G^T per example ([T, T] each, reductions over d and
  p), then the clipped sum as ONE framework weight gradient of (c * G) and x (2*B*T*d*p flops).
  A conv forms U^T U one of two ways (:func:`conv_gram_costs` picks): from the explicit im2col
  (2*T^2*d flops), or "shifted" from the Gram matrix of the padded input over its N positions
  (2*N^2*C_in/g flops, no im2col) summed over the kernel's taps (shifted diagonal blocks,
  K*T^2 adds), which wins at small spatial sizes (ResNet-18's layer3/4 3x3 convs);
* ``direct``: the per-example weight gradients G_i^T U_i a chunk at a time (reduction over T),
  square-summed and dropped; then the same clipped weight gradient;
* ``instantiate``: as direct, but the per-example gradients are kept (B*p*d fp32 values per
  group, capped by :data:`INSTANTIATE_MAX_BYTES`) and the clipped sum is the reduction
  sum_i c_i G_i (one GEMV over B), which replaces the second GEMM (shared/DESIGN.md section 1);
* ``outer`` (Linear, T = 1): ||a_i||^2 ||g_i||^2, then the clipped GEMM.

Model: a GEMM with reduction length K runs at ``GEMM_FLOPS * K / (K + GEMM_K_HALF)`` (a short
reduction cannot amortise its loads); a copy or a reduction moves bytes at ``BANDWIDTH``. The
constants were measured on the project's 2-core CPU machines (torch 2.13, fp32, 2 threads;
``python -m dpprims.torch.handlers.cpu_cost`` re-measures them on the current machine):
batched GEMMs of ResNet-18 shapes at 67-82 GFLOP/s for K >= 256, 41 GFLOP/s at K = 64,
15 GFLOP/s at K = 16; a GEMV over 64 MiB at 8 GB/s. The choice is deterministic (no timing at run time), so the same model always gets the
same plan; ``DPEngine(norm_method=...)`` overrides it per layer. Privacy does not depend on the
choice: every method computes the same per-example norm (up to fp32 summation order) and the
clipped sum of the same per-example gradients.
"""
from __future__ import annotations

GEMM_FLOPS = 7.5e10
GEMM_K_HALF = 48.0
BANDWIDTH = 6e9
# Per layer: the per-example gradients an "instantiate" layer keeps between the norm pass and
# the clipped sum (every instantiate layer of a model holds its buffer at the same time).
INSTANTIATE_MAX_BYTES = 64 << 20
CPU_METHODS = ("ghost", "direct", "instantiate")


def _gemm_s(flops: float, K: float) -> float:
    return flops / (GEMM_FLOPS * K / (K + GEMM_K_HALF))


def _copy_s(nbytes: float) -> float:
    return nbytes / BANDWIDTH


def conv_gram_costs(B: int, T: int, D: int, groups: int, taps: int, padded_positions: int) -> dict:
    """Modelled seconds of forming every example's input Gram matrix U^T U ([T, T] per group)
    of a conv with ``taps`` = KH*KW kernel taps, d = D = C_in/g * taps, and ``padded_positions``
    N = H_p * W_p positions of the padded (and cropped) input, two ways:

    * "im2col": the explicit im2col (write + read) and the GEMM U^T U (2*T^2*d flops);
    * "shifted": a padded copy of x (write + read), the GEMM X^T X over all N positions
      (2*N^2*C_in/g flops) and, per tap, an add of the [T, T] block of it that the tap sees
      (K*T^2 values read and written).

    Measured on the 2-core machine, B = 32: ResNet-18's layer3 3x3 (256 x 8x8) 4.6 -> 1.6 ms,
    layer4 (512 x 4x4) 2.5 -> 0.7 ms, layer4's stride-2 3x3 1.5 -> 0.9 ms; the model keeps
    im2col where shifted loses (stride-2 convs of 16x16 inputs, 1x1 downsamples: N^2 >> K*T^2)."""
    B, T, D, g, K, N = (max(1, v) for v in (B, T, D, groups, taps, padded_positions))
    cin = max(1, D // K)
    im2col = _copy_s(2 * 4 * B * g * D * T) + _gemm_s(2 * B * g * T * T * D, D)
    shifted = (_copy_s(2 * 4 * B * g * cin * N) + _gemm_s(2 * B * g * N * N * cin, cin)
               + _copy_s(2 * 4 * B * g * K * T * T))
    return {"im2col": im2col, "shifted": shifted}


def layer_costs(B: int, T: int, D: int, P: int, groups: int = 1, *, conv: bool, taps: int | None = None,
                padded_positions: int | None = None) -> dict:
    """Modelled seconds of norm pass + clipped sum per method, for one layer of B examples
    with T positions, d = D, p = P per group (fp32). ``conv`` adds the im2col copies the conv
    path makes; with ``taps`` and ``padded_positions`` (a single-call conv, see
    :func:`conv_gram_costs`) its ghost cost is that of the cheaper input Gram. "instantiate" is
    absent when its buffer would exceed INSTANTIATE_MAX_BYTES."""
    B, T, D, P, g = max(1, B), max(1, T), max(1, D), max(1, P), max(1, groups)
    wgrad = _gemm_s(2 * B * T * D * P * g, B * T)  # the framework's clipped weight gradient
    im2col = _copy_s(2 * 4 * B * g * D * T) if conv else 0.0  # write + read of U
    per_ex = 4 * B * g * D * P  # bytes of all per-example gradients
    costs = {}
    if T == 1 and not conv:
        costs["outer"] = _copy_s(4 * B * (D + P)) + wgrad
    gram_u = im2col + _gemm_s(2 * B * g * T * T * D, D)
    if conv and taps and padded_positions:
        gram_u = min(conv_gram_costs(B, T, D, g, taps, padded_positions).values())
    gram = gram_u + _gemm_s(2 * B * g * T * T * P, P) + _copy_s(2 * 4 * 2 * B * g * T * T)
    costs["ghost"] = gram + wgrad
    build = im2col + _gemm_s(2 * B * T * D * P * g, T)
    if conv:
        # the conv direct/instantiate path builds per-example gradients by oneDNN's weight-
        # gradient conv (per example, or grouped with the batch as groups: no im2col) or by a
        # chunked im2col + batched GEMM (bindings/torch/conv.py: per_example_build_for)
        from dpprims.bindings.torch.conv import per_example_build_for  # (lazy: imports torch)

        c_in = g * (D // taps) if taps else g * D  # (without taps: not depthwise)
        if per_example_build_for(T, D, P, g, c_in) != "im2col":
            build = _gemm_s(2 * B * T * D * P * g, T)
    norm_direct = build + _copy_s(2 * per_ex)  # write, then square-sum
    costs["direct"] = norm_direct + wgrad
    if per_ex <= INSTANTIATE_MAX_BYTES:
        costs["instantiate"] = norm_direct + _copy_s(per_ex)  # the GEMV over the kept buffer
    return costs


def choose_cpu_method(B: int, T: int, D: int, P: int, groups: int = 1, *, conv: bool,
                      method: str = "auto", taps: int | None = None, padded_positions: int | None = None) -> str:
    """The plain-torch method of one layer: the user's ``method`` if forced ("ghost",
    "direct", "instantiate"; "instantiate" over the memory cap runs "direct"), else the
    cheapest by :func:`layer_costs`. Linear layers with T = 1 always use "outer" (ghost and
    direct both reduce to it)."""
    if method not in ("auto",) + CPU_METHODS:
        raise ValueError(f"norm_method must be 'auto' or one of {CPU_METHODS}, got {method!r}")
    costs = layer_costs(B, T, D, P, groups, conv=conv, taps=taps, padded_positions=padded_positions)
    if "outer" in costs:
        return "outer"
    if method != "auto":
        return method if method in costs else "direct"
    return min(costs, key=costs.get)


def measure(threads: int | None = None) -> dict:
    """Time the GEMMs and the GEMV the model stands for on this machine (a few seconds) and
    return measured vs modelled rates, so the constants can be checked or re-derived."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)

    def best(f, n=5):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    out = {"threads": torch.get_num_threads(), "gemm": []}
    for M, K, N in ((128, 256, 1152), (256, 64, 2304), (512, 16, 4608), (64, 1024, 576)):
        a, b = torch.randn(32, M, K), torch.randn(32, K, N)
        t = best(lambda: torch.bmm(a, b))
        flops = 2 * 32 * M * K * N
        out["gemm"].append(dict(M=M, K=K, N=N, measured_gflops=flops / t / 1e9,
                                modelled_gflops=flops / _gemm_s(flops, K) / 1e9))
    y, c = torch.randn(32, 1 << 19), torch.rand(32)
    t = best(lambda: c @ y)
    out["gemv_gbytes_per_s"] = dict(measured=4 * y.numel() / t / 1e9, modelled=BANDWIDTH / 1e9)
    return out


if __name__ == "__main__":  # pragma: no cover - a measuring tool
    import json

    print(json.dumps(measure(), indent=1))


__all__ = ["layer_costs", "conv_gram_costs", "choose_cpu_method", "CPU_METHODS", "INSTANTIATE_MAX_BYTES", "GEMM_FLOPS",
           "BANDWIDTH", "GEMM_K_HALF", "measure"]
