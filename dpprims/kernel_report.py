"""What the GPU would run: capture every kernel launch of a DP step and compile it for sm_90/sm_80.

No GPU is needed. Three steps:

1. **Capture** (:func:`record_torch_launches`, :func:`record_jax_launches`): the REAL bindings run
   one DP step on shape-only data (torch ``meta`` tensors; ``jax.eval_shape``) and every Triton
   launch is recorded instead of run: kernel, grid, arguments (meta tensors / scalars), the
   constexprs and num_warps the launch spec chose, the layer and the binding op that launched
   it. The hook sits at the one place every launch passes through, Triton's
   ``JITFunction.run`` (torch) and ``bindings/jax/_call._launch_jax_triton`` (JAX), so no binding
   carries report code and the capture follows any change of a kernel's argument list.
   Specs are computed as on a GPU (``TRITON_INTERPRET`` is off while capturing; ``interpreting()``
   would otherwise pick interpreter block sizes) for the architecture being reported
   (``kernels._launch.DEFAULT_ARCH`` is set to it: meta tensors have no device capability).
2. **Specialise and compile** (:func:`compile_launch`): the signature, constexprs and
   specialisation attributes are derived from the captured arguments by Triton's own binder
   (pointer dtypes -> ``*bf16``, ints -> ``i32``/``i64``, ints equal to 1 -> constexpr,
   16-divisible ints and pointers -> ``tt.divisibility``), exactly as ``JITFunction.run`` would on
   a GPU, then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. Meta
   tensors have data_ptr 0, i.e. every buffer counts as 16-byte aligned (true of allocator
   blocks; a misaligned view would compile a less-vectorised variant on a GPU).
3. **Read the binary** (:func:`analyse`): registers, local memory (spills) and static shared
   memory from ``cuobjdump -res-usage`` (the cuobjdump inside Triton's wheel), spill
   instructions (STL/LDL) and tensor-core vs FMA instructions from the SASS (HGMMA/HMMA vs
   FFMA) and the PTX (wgmma/mma vs fma.rn.f32), dynamic shared memory from Triton's metadata,
   occupancy (CTAs per SM from registers, shared memory and warps).

Costs (:func:`launch_cost`) and the roofline estimate (:func:`roofline_s`) are ESTIMATES FROM
COMPILED CODE, NOT MEASUREMENTS: executed MMA flops of the tiles the launch computes (padding
included), bytes = every buffer argument read or written once (a lower bound: tiles re-read from
L2 are not counted; the split-K epilogue's read of the slices' partials is counted as DRAM
traffic of the kernel), at the peaks of :data:`PEAKS`. The compute time is divided by
the busy fraction of the GPU (CTAs spread over the SMs, each SM at a share of its peak set by its
resident warps), the memory time by the share of DRAM bandwidth the SMs in use can draw: the
model of the split-K choice, dpprims.kernels.linear.busy_fraction / dram_fraction.

Needs a process in which dpprims.kernels was imported WITHOUT ``TRITON_INTERPRET`` (kernels must
be ``JITFunction``s, not interpreter objects); tests run it in a subprocess.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

# --------------------------------------------------------------------------------------------
# peak tables (public datasheet numbers; dense, no sparsity)
# --------------------------------------------------------------------------------------------
PEAKS = {
    90: dict(gpu="H100 SXM5 (sm_90)", sms=132, tc_bf16=989.4e12, tc_tf32=494.7e12, fma_fp32=66.9e12,
             dram_bps=3.35e12, smem_per_sm=228 * 1024, smem_per_cta_max=227 * 1024, regs_per_sm=65536,
             max_warps_per_sm=64, max_ctas_per_sm=32),
    80: dict(gpu="A100 SXM4 80GB (sm_80)", sms=108, tc_bf16=312e12, tc_tf32=156e12, fma_fp32=19.5e12,
             dram_bps=2.039e12, smem_per_sm=164 * 1024, smem_per_cta_max=163 * 1024, regs_per_sm=65536,
             max_warps_per_sm=64, max_ctas_per_sm=32),
}
# The two ASSUMPTIONS of the occupancy model (warps an SM needs for its peak, the most DRAM
# bandwidth one SM draws) live with the split-K choice that uses the same model:
# dpprims.kernels.linear.SATURATING_WARPS and SM_DRAM_SHARE (imported where used).
ESTIMATE_LABEL = "estimate from compiled code, not a measurement"

_TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One recorded kernel launch. ``args``/``kwargs`` are what the binding passed to
    ``kernel[grid](...)`` (torch meta tensors for buffers); ``framework`` is "torch" or "jax"."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    layer: str
    op: str
    framework: str = "torch"

    @property
    def name(self) -> str:
        return kernel_name(self.kernel)

    def bound(self) -> dict:
        """kernel parameter name -> value (positional and keyword arguments together)."""
        names = list(self.kernel.arg_names)
        out = dict(zip(names, self.args))
        out.update({k: v for k, v in self.kwargs.items() if k in names})
        return out

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


_label = threading.local()


@contextlib.contextmanager
def layer_label(name: str):
    """Launches inside the block are attributed to layer ``name``."""
    old = getattr(_label, "layer", "")
    _label.layer = name
    try:
        yield
    finally:
        _label.layer = old


def _current_layer() -> str:
    return getattr(_label, "layer", "")


def _caller_op(depth: int = 2) -> str:
    """Name of the innermost bindings/ function on the stack (the op that launched)."""
    f = sys._getframe(depth)
    while f is not None:
        path = f.f_code.co_filename.replace("\\", "/")
        if ("/bindings/" in path and not path.endswith("/_call.py")
                and f.f_code.co_name not in ("kernel", "<lambda>", "_launch", "launch", "call", "fn")):
            return f"{path.rsplit('/bindings/', 1)[1][:-3].replace('/', '.')}.{f.f_code.co_name}"
        f = f.f_back
    return "?"


def _check_compiled_kernels() -> None:
    from triton.runtime.jit import JITFunction

    import dpprims.kernels.linear as kl

    if not isinstance(kl._linear_norm_direct_kernel, JITFunction):
        raise RuntimeError("dpprims.kernel_report needs the compiled kernels: dpprims.kernels was imported "
                           "with TRITON_INTERPRET=1 (interpreter objects cannot be compiled for a GPU). "
                           "Run it in a fresh process without TRITON_INTERPRET.")


@contextlib.contextmanager
def _gpu_specs(arch: int):
    """Launch specs as on a GPU of compute capability ``arch`` while inside the block."""
    from dpprims.kernels import _launch

    old_env = os.environ.get("TRITON_INTERPRET")
    old_arch = _launch.DEFAULT_ARCH
    os.environ["TRITON_INTERPRET"] = "0"
    _launch.DEFAULT_ARCH = int(arch)
    try:
        yield
    finally:
        _launch.DEFAULT_ARCH = old_arch
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env


def _torch_custom_ops():
    import importlib
    import pkgutil

    from torch._library.custom_ops import CustomOpDef

    import dpprims.bindings.torch as pkg

    ops = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for v in vars(mod).values():
            if isinstance(v, CustomOpDef):
                ops[id(v)] = v
    return list(ops.values())


@contextlib.contextmanager
def record_torch_launches(arch: int = 90):
    """Run torch bindings on ``meta`` tensors inside the block; yields the list of
    :class:`Launch` they make. Nothing runs: launches are recorded, outputs stay meta.

    How: meta tensors report backend "triton"; each dpprims custom op's meta (fake) kernel is
    pointed at the op's real implementation, so the real launch code (spec, argument list,
    strides) runs on meta tensors; ``JITFunction.run`` records instead of launching."""
    from triton.runtime.jit import JITFunction

    from dpprims.bindings.torch import _backend

    _check_compiled_kernels()
    launches: list[Launch] = []
    orig_run = JITFunction.run
    orig_backend_for = _backend.backend_for

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        for a in args:
            if hasattr(a, "device") and a.device.type != "meta":
                raise RuntimeError(f"record_torch_launches: {kernel_name(self)} got a {a.device} tensor; "
                                   "only meta tensors can be captured")
        g = tuple(int(x) for x in (grid(kwargs) if callable(grid) else grid))
        launches.append(Launch(self, g, tuple(args), dict(kwargs), _current_layer(), _caller_op(), "torch"))
        return None

    def backend_for(t):
        return "triton" if t.device.type == "meta" else orig_backend_for(t)

    import torch

    # autocast has no "meta" device type: the handlers' autocast queries answer "off" there
    orig_is_autocast, orig_autocast = torch.is_autocast_enabled, torch.autocast

    def is_autocast_enabled(*a):
        return False if a and a[0] == "meta" else orig_is_autocast(*a)

    def autocast(device_type, *a, **k):
        return contextlib.nullcontext() if device_type == "meta" else orig_autocast(device_type, *a, **k)

    ops = _torch_custom_ops()
    fakes = {id(op): op._abstract_fn for op in ops}
    JITFunction.run = run
    _backend.backend_for = backend_for
    torch.is_autocast_enabled, torch.autocast = is_autocast_enabled, autocast
    for op in ops:
        op._abstract_fn = op._init_fn
    try:
        with _gpu_specs(arch):
            yield launches
    finally:
        JITFunction.run = orig_run
        _backend.backend_for = orig_backend_for
        torch.is_autocast_enabled, torch.autocast = orig_is_autocast, orig_autocast
        for op in ops:
            op._abstract_fn = fakes[id(op)]


@contextlib.contextmanager
def record_jax_launches(arch: int = 90):
    """Inside the block, dpprims JAX ops take the "jax-triton" path and record their launch
    (the :class:`~dpprims.bindings.jax._call.Arranged` argument list jax-triton would receive)
    instead of calling jax-triton; outputs are zeros of the right shapes. Use under
    ``jax.eval_shape`` so that no array is materialised. Array arguments are recorded as
    torch meta tensors of the same shape/dtype (JAX buffers are dense row-major)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from dpprims.bindings.jax import _call

    _check_compiled_kernels()
    launches: list[Launch] = []
    orig = _call._launch_jax_triton

    def to_meta(v):
        if _call._is_array(v) and getattr(v, "shape", None) is not None and not (
                isinstance(v, np.generic) or (isinstance(v, np.ndarray) and v.ndim == 0)):
            dt = _call._torch_dtype(v.dtype)
            return torch.empty(tuple(int(s) for s in v.shape), dtype=dt, device="meta")
        if isinstance(v, (np.generic, np.ndarray)):  # numpy scalars: jax-triton passes Python values
            return v.item()
        return v

    def fake_launch(arr, *_aliases, **_kw):
        args = [to_meta(v) for _, v in arr.args]
        outs = [torch.empty(tuple(s.shape), dtype=_call._torch_dtype(s.dtype), device="meta")
                for s in arr.out_shapes]
        kwargs = {k: to_meta(v) for k, v in arr.metaparams.items()}
        kwargs["num_warps"] = arr.num_warps
        launches.append(Launch(arr.kernel, tuple(arr.grid), tuple(args + outs), kwargs, _current_layer(),
                               _caller_op(), "jax"))
        return [jnp.zeros(s.shape, s.dtype) for s in arr.out_shapes]

    _call._launch_jax_triton = fake_launch
    cc = getattr(_call, "use_compute_capability", None)  # the binding's own "compile for" switch
    try:
        with _call.use_path("jax-triton"), _gpu_specs(arch), (cc(int(arch)) if cc else contextlib.nullcontext()):
            yield launches
    finally:
        _call._launch_jax_triton = orig


# --------------------------------------------------------------------------------------------
# specialise + compile
# --------------------------------------------------------------------------------------------
_binders: dict = {}


def _binder(kernel, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    key = (id(kernel), arch)
    if key not in _binders:
        target = GPUTarget("cuda", int(arch), 32)
        backend = make_backend(target)
        _binders[key] = (target, backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    return _binders[key]


@dataclass(frozen=True)
class Build:
    """One distinct compilation: what ``JITFunction.run`` would key its cache on."""

    kernel_name: str
    arch: int
    signature: tuple       # ((param, type), ...)
    constexprs: tuple      # ((param, value), ...)
    attrs: tuple           # ((param, attrs), ...)
    num_warps: int
    num_stages: int

    def short(self) -> str:
        ptrs = ",".join(f"{k}:{v}" for k, v in self.signature if v.startswith("*"))
        cx = ",".join(f"{k}={v}" for k, v in self.constexprs if not k.startswith("stride"))
        return f"{self.kernel_name}[{ptrs}][{cx}] w{self.num_warps} s{self.num_stages}"


def specialise(launch: Launch, arch: int):
    """(Build, compile inputs) of a launch: Triton's own binder on the captured arguments."""
    target, backend, binder = _binder(launch.kernel, arch)
    kw = dict(launch.kwargs)
    kw.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kw)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kw, bound, specialization, options)
    names = list(launch.kernel.arg_names)
    cx = tuple((names[k[0]] if len(k) == 1 else str(k), _plain(v)) for k, v in sorted(constexprs.items()))
    at = tuple((names[k[0]] if len(k) == 1 else str(k), str(v)) for k, v in sorted(attrs.items()) if v)
    b = Build(launch.name, int(arch), tuple(signature.items()), cx, at, int(options.num_warps),
              int(options.num_stages))
    return b, (signature, constexprs, attrs, options, target)


def _plain(v):
    v = getattr(v, "value", v)
    return v if isinstance(v, (int, float, bool, str)) or v is None else str(v)


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (triton CompiledKernel) of ``launch`` for sm_``arch``."""
    import triton
    from triton.compiler import ASTSource

    _, (signature, constexprs, attrs, options, target) = specialise(launch, arch)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


# --------------------------------------------------------------------------------------------
# reading the binary
# --------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in Triton's wheel ({path})")
    return path


_SASS_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_MMA_TYPES = re.compile(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*?\.f32\.(bf16|f16|tf32|e4m3|e5m2|s8)\b")


def analyse(compiled, arch: int) -> dict:
    """Registers, spills, shared memory, occupancy and instruction mix of a compiled kernel."""
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{res}")
    regs, stack, static_smem, local = (int(x) for x in m.groups())
    ops: dict[str, int] = {}
    for op in _SASS_OP.findall(sass):
        ops[op] = ops.get(op, 0) + 1
    mma_types = sorted(set(_MMA_TYPES.findall(ptx)))
    ptx_counts = dict(wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                      mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)),
                      fma_f32=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)))
    ptx_counts.update(split_epilogue_order(ptx))
    sass_counts = dict(HGMMA=ops.get("HGMMA", 0), HMMA=ops.get("HMMA", 0), FFMA=ops.get("FFMA", 0),
                       STL=ops.get("STL", 0), LDL=ops.get("LDL", 0))
    num_warps = int(md.num_warps)
    dyn_smem = int(md.shared)
    spill_stores = spill_loads = 0
    if local or stack or sass_counts["STL"] or sass_counts["LDL"]:
        # local memory is in use: ptxas -v tells register spills from a stack frame (e.g. the
        # cold slow path of libdevice's sin/cos keeps a small array there)
        spill_stores, spill_loads, stack = _ptxas_spills(ptx, arch)
    return dict(
        registers=regs, stack_bytes=stack, local_bytes=local, local_instructions=sass_counts["STL"] + sass_counts["LDL"],
        spill_store_bytes=spill_stores, spill_load_bytes=spill_loads, spills=bool(spill_stores or spill_loads),
        shared_bytes=max(dyn_smem, static_smem), static_shared_bytes=static_smem, dynamic_shared_bytes=dyn_smem,
        num_warps=num_warps, ptx=ptx_counts, sass=sass_counts, mma_operand_types=mma_types,
        tensor_cores=bool(ptx_counts["wgmma"] or ptx_counts["mma_sync"] or sass_counts["HGMMA"] or sass_counts["HMMA"]),
        occupancy=occupancy(arch, regs, max(dyn_smem, static_smem), num_warps),
    )


def split_epilogue_order(ptx: str) -> dict:
    """The memory ordering of the split-K epilogue (kernels/linear.py ``_store_split_tile``) as
    compiled: counts of gpu-scope acq_rel atomics, L2 (``.cg``) stores and loads, and
    ``split_epilogue_ordered``: every ``.cg`` store precedes a ``bar.sync`` that precedes the
    first acq_rel atomic, and every ``.cg`` load follows that atomic (None without an atomic)."""
    lines = ptx.split("\n")

    def idx(pat):
        return [i for i, l in enumerate(lines) if re.search(pat, l)]

    atoms = idx(r"\batom\.global\.gpu\.acq_rel\.")
    st, ld, bar = idx(r"\bst\.global\.cg\b"), idx(r"\bld\.global\.cg\b"), idx(r"\bbar\.sync\b")
    ordered = None
    if atoms:
        a = atoms[0]
        last_st = max(st) if st else -1
        ordered = bool(st and ld and last_st < a and any(last_st < b < a for b in bar) and min(ld) > a)
    return dict(atom_acq_rel_gpu=len(atoms), st_cg=len(st), ld_cg=len(ld), split_epilogue_ordered=ordered)


_PTXAS_V = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int, int]:
    """(spill store bytes, spill load bytes, stack frame bytes) from ``ptxas -v`` on the PTX, with
    the register-allocation flag Triton itself passes."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_tool("ptxas"), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    found = _PTXAS_V.findall(r.stderr + r.stdout)
    if not found:
        raise RuntimeError(f"cannot read ptxas -v output:\n{r.stderr}")
    return (sum(int(x[1]) for x in found), sum(int(x[2]) for x in found), max(int(x[0]) for x in found))


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> dict:
    """CTAs per SM allowed by registers (allocated per warp in 256-register units), shared
    memory (+1 KiB reserved per CTA) and warps, and the binding limit."""
    pk = PEAKS[arch]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = pk["regs_per_sm"] // (regs_per_warp * num_warps)
    need = smem + 1024
    by_smem = pk["smem_per_sm"] // need if smem <= pk["smem_per_cta_max"] else 0
    by_warps = pk["max_warps_per_sm"] // num_warps
    ctas = min(by_regs, by_smem, by_warps, pk["max_ctas_per_sm"])
    limit = min((("registers", by_regs), ("shared memory", by_smem), ("warps", by_warps),
                 ("CTA slots", pk["max_ctas_per_sm"])), key=lambda kv: kv[1])[0]
    return dict(ctas_per_sm=ctas, by_registers=by_regs, by_shared=by_smem, by_warps=by_warps, limited_by=limit,
                warps_per_sm=ctas * num_warps)


# --------------------------------------------------------------------------------------------
# counted work and the roofline estimate
# --------------------------------------------------------------------------------------------
def _nbytes(t) -> int:
    return int(t.numel()) * int(t.element_size())


def launch_cost(launch: Launch) -> dict:
    """Counted work of one launch: ``mma_flops`` (the tiles' dot products as executed, padding
    included; 0 for kernels without tl.dot), ``flops_useful`` where the math is known, and
    ``bytes`` = every buffer argument once (distinct storages). Kernels not listed here get
    flops None (bytes only)."""
    b = launch.bound()
    name = launch.name
    g = launch.grid + (1,) * (3 - len(launch.grid))
    tensors = {}
    for v in list(launch.args) + list(launch.kwargs.values()):
        if hasattr(v, "element_size") and hasattr(v, "numel"):
            tensors[(v.untyped_storage()._cdata if v.device.type != "meta" else id(v))] = v
    nbytes = sum(_nbytes(t) for t in tensors.values())

    def c(k, default=None):
        v = b.get(k, default)
        return int(getattr(v, "value", v)) if v is not None else None

    flops = None
    useful = None
    scale = 0
    reduce_bytes = 0
    try:
        if name.endswith("_norm_direct_kernel"):
            T, BT, BD, BP = c("T"), c("BLOCK_T"), c("BLOCK_D"), c("BLOCK_P")
            flops = g[0] * g[1] * math.ceil(T / BT) * 2 * BT * BD * BP
            useful = 2 * g[0] * T * c("D") * c("P")
        elif name.endswith("_norm_ghost_kernel") and name != "_embedding_norm_ghost_kernel":
            T, BT, BD, BP, D, P = c("T"), c("BLOCK_T"), c("BLOCK_D"), c("BLOCK_P"), c("D"), c("P")
            n = g[1]
            flops = g[0] * n * (n + 1) // 2 * 2 * BT * BT * (math.ceil(D / BD) * BD + math.ceil(P / BP) * BP)
            useful = 2 * g[0] * T * T * (D + P)
        elif name == "_embedding_norm_ghost_kernel":
            T, BT, BP, P = c("T"), c("BLOCK_T"), c("BLOCK_P"), c("P")
            n = g[1]
            flops = g[0] * n * (n + 1) // 2 * 2 * BT * BT * math.ceil(P / BP) * BP
            useful = 2 * g[0] * T * T * P
        elif "_clipped_weight_grad" in name:
            B, T, D, P = c("B"), c("T", 1), c("D"), c("P")
            BK, BD, BP = c("BLOCK_K"), c("BLOCK_D"), c("BLOCK_P")
            groups = c("GROUPS", 1) or 1
            # example-at-a-time kernels (EXAMPLES_PER_SPLIT) pad each example's T to BLOCK_K
            k_blocks = B * math.ceil(T / BK) if "EXAMPLES_PER_SPLIT" in b else math.ceil(B * T / BK)
            flops = g[0] * g[1] * k_blocks * 2 * BK * BD * BP
            useful = 2 * B * T * D * P * groups
            if "EXAMPLES_PER_SPLIT" in b:
                # design (a): acc += c_i * W_i, one fp32 FMA per tile element per example, on
                # CUDA cores (counted apart: it does not run at the tensor-core peak)
                scale = g[0] * g[1] * B * 2 * BD * BP
            ws = b.get("ws_ptr")
            if g[2] > 1 and hasattr(ws, "numel"):
                # split-K epilogue (kernels/linear.py _store_split_tile): the last slice of each
                # tile reads the g[2] partials back (their writes, the workspace, and the output
                # are in ``bytes``), in the kernel; counted at DRAM (not as L2 hits)
                nbytes += 4 * int(ws.numel())
            elif g[2] > 1 and hasattr(b.get("out_ptr"), "numel"):
                # a binding that sums [g[2], P, D] partials after the kernel: that pass reads
                # them all and writes one [P, D]
                out = b["out_ptr"]
                reduce_bytes = 4 * (int(out.numel()) + int(out.numel()) // g[2])
        else:
            flops = 0
    except (TypeError, KeyError):  # a kernel whose parameters changed: bytes only
        flops = useful = None
    return dict(mma_flops=flops, flops_useful=useful, bytes=nbytes, fma_flops=scale, reduce_bytes=reduce_bytes)


def mma_peak(arch: int, info: dict, dtype: str) -> tuple[float, str]:
    """(flop/s, unit) a build's dots run at: tensor cores at the MMA operand type the PTX shows
    (tf32x3 counts 3 MMAs per dot), else fp32 FMA on CUDA cores."""
    pk = PEAKS[arch]
    if info["tensor_cores"]:
        types = info["mma_operand_types"]
        if any(t in ("bf16", "f16") for t in types):
            return pk["tc_bf16"], "tensor core bf16/fp16"
        if "tf32" in types:
            return pk["tc_tf32"], "tensor core tf32"
        return pk["tc_bf16"], "tensor core"
    return pk["fma_fp32"], "CUDA-core fp32 FMA"


def busy_fraction(arch: int, programs: int, ctas_per_sm: int, num_warps: int) -> float:
    """Fraction of the compute peak a grid keeps busy: the model the split-K choice uses
    (:func:`dpprims.kernels.linear.busy_fraction`; CTAs spread over the SMs, ``ctas_per_sm``
    at a time, an SM at min(1, resident warps / SATURATING_WARPS) of its peak). An estimate."""
    from dpprims.kernels.linear import busy_fraction as bf

    return bf(programs, PEAKS[arch]["sms"], max(1, ctas_per_sm), num_warps)


def dram_fraction(arch: int, programs: int) -> float:
    """Share of DRAM bandwidth a grid can draw (:func:`dpprims.kernels.linear.dram_fraction`)."""
    from dpprims.kernels.linear import dram_fraction as df

    return df(programs, PEAKS[arch]["sms"])


def roofline_s(arch: int, flops: float, nbytes: float, peak: float, programs: int, ctas_per_sm: int,
               fma_flops: float = 0, *, num_warps: int = 4, reduce_bytes: float = 0) -> dict:
    """max(compute, memory) seconds, plus a following memory-bound pass of ``reduce_bytes`` (the
    ordered sum of split-K partials the binding runs after the kernel, at full bandwidth).

    Compute at ``peak`` (plus ``fma_flops`` at the CUDA-core fp32 FMA peak, not overlapped with
    the MMAs: conservative) divided by :func:`busy_fraction`; memory at the DRAM bandwidth times
    :func:`dram_fraction`. An estimate."""
    pk = PEAKS[arch]
    busy = busy_fraction(arch, programs, ctas_per_sm, num_warps)
    t_c = ((flops or 0) / peak + (fma_flops or 0) / pk["fma_fp32"]) / max(busy, 1e-9)
    t_m = nbytes / (pk["dram_bps"] * dram_fraction(arch, programs))
    t_r = (reduce_bytes or 0) / pk["dram_bps"]
    return dict(seconds=max(t_c, t_m) + t_r, compute_s=t_c, memory_s=t_m, reduce_s=t_r,
                bound="compute" if t_c >= t_m else "memory", wave_busy_fraction=busy)


def nonprivate_wgrad_s(arch: int, flops: float, nbytes: float, dtype: str) -> float:
    """The non-private weight gradient of a layer at the same peaks: bf16/fp16 on tensor cores,
    fp32 at the fp32 FMA peak (torch's default matmul precision; cuDNN may use TF32 for fp32
    convs, which would make it faster)."""
    pk = PEAKS[arch]
    peak = pk["tc_bf16"] if dtype in ("bf16", "fp16") else pk["fma_fp32"]
    return max(flops / peak, nbytes / pk["dram_bps"])


# --------------------------------------------------------------------------------------------
# one report over a list of launches
# --------------------------------------------------------------------------------------------
def is_norm_kernel(name: str) -> bool:
    """Kernels of the norm pass (per-example squared norms, and the per-example bias / affine
    gradients they are computed from)."""
    return ("norm" in name and "clip" not in name) or name == "_conv2d_bias_grads_kernel"


def is_clipped_weight_kernel(name: str) -> bool:
    return "_clipped_weight_grad" in name or name == "_embedding_clipped_grad_kernel"


def multiplies_half(build: Build) -> bool:
    """True when the build feeds fp16/bf16 data to a dot product (it has tl.dot and a half
    pointer input); used by the CI check that such builds issue tensor-core instructions."""
    return any(v in ("*bf16", "*fp16") for _, v in build.signature)


def input_dtype(launch: Launch) -> str:
    for v in launch.args:
        if hasattr(v, "dtype") and getattr(v, "is_floating_point", lambda: False)():
            return _TORCH_DTYPE_NAMES.get(str(v.dtype).replace("torch.", ""), str(v.dtype))
    return "-"


def _compile_one(b: Build, ln: Launch) -> dict:
    try:
        return analyse(compile_launch(ln, b.arch), b.arch)
    except Exception as e:  # a kernel that does not compile is a finding, not a crash
        text = str(e).strip()
        return {"error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:500]}


def _pack(v):
    if hasattr(v, "dtype") and hasattr(v, "stride") and hasattr(v, "shape"):
        return ("tensor", tuple(v.shape), tuple(v.stride()), str(v.dtype).replace("torch.", ""))
    return ("value", v)


def _unpack(x):
    import torch

    if x[0] == "tensor":
        return torch.empty_strided(x[1], x[2], dtype=getattr(torch, x[3]), device="meta")
    return x[1]


def portable(ln: Launch) -> dict:
    """A launch as plain data (kernel by module and name, tensors by shape/strides/dtype)."""
    return dict(module=ln.kernel.fn.__module__, name=ln.name, grid=ln.grid, layer=ln.layer, op=ln.op,
                framework=ln.framework, args=[_pack(a) for a in ln.args],
                kwargs={k: _pack(v) for k, v in ln.kwargs.items()})


def from_portable(d: dict) -> Launch:
    import importlib

    kernel = getattr(importlib.import_module(d["module"]), d["name"])
    return Launch(kernel, tuple(d["grid"]), tuple(_unpack(a) for a in d["args"]),
                  {k: _unpack(v) for k, v in d["kwargs"].items()}, d["layer"], d["op"], d["framework"])


def _compile_portable(item) -> dict:
    d, arch = item
    try:
        ln = from_portable(d)
        b, _ = specialise(ln, arch)
    except Exception as e:  # e.g. the kernel's parameters changed since the capture
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    return _compile_one(b, ln)


def compile_builds(items: list, *, jobs: int = 1, progress=None) -> dict:
    """Compile distinct builds: ``items`` = [(Build, a Launch of it)], any mix of archs.
    Returns {build: analysis dict, or {"error": text} for a build that does not compile}."""
    out: dict = {}
    if jobs > 1 and len(items) > 1:
        # fresh processes ("spawn"): Python's ast module (Triton's front end) is not thread-safe
        # and forking a process that runs JAX threads can deadlock; launches travel as plain data
        import multiprocessing as mp

        payload = [(portable(ln), b.arch) for b, ln in items]
        with mp.get_context("spawn").Pool(min(jobs, len(items))) as pool:
            for i, info in enumerate(pool.imap(_compile_portable, payload)):
                out[items[i][0]] = info
                if progress:
                    progress(i + 1, len(items), items[i][0])
    else:
        for i, (b, ln) in enumerate(items):
            out[b] = _compile_one(b, ln)
            if progress:
                progress(i + 1, len(items), b)
    return out


def compile_all(launches: list[Launch], arch: int, *, cache: dict | None = None, jobs: int = 1,
                progress=None) -> tuple[list, dict]:
    """Specialise every launch, compile each distinct build once. Returns (rows, builds):
    rows[i] = (launch, build) and builds = {build: analysis dict or {"error": text}}."""
    cache = {} if cache is None else cache
    rows, todo = [], {}
    for ln in launches:
        b, _ = specialise(ln, arch)
        rows.append((ln, b))
        if b not in cache and b not in todo:
            todo[b] = ln
    cache.update(compile_builds(list(todo.items()), jobs=jobs, progress=progress))
    return rows, cache


def summarise(rows, builds: dict, arch: int) -> list[dict]:
    """Per launch: kernel, layer, op, spec, compiled facts, counted work and the estimate."""
    out = []
    for ln, b in rows:
        info = builds[b]
        cost = launch_cost(ln)
        dt = input_dtype(ln)
        r = dict(kernel=ln.name, layer=ln.layer, op=ln.op, framework=ln.framework, dtype=dt, grid=list(ln.grid),
                 programs=math.prod(ln.grid), constexprs={k: v for k, v in b.constexprs if not k.startswith("stride")},
                 num_warps=b.num_warps, num_stages=b.num_stages,
                 signature={k: v for k, v in b.signature if v != "constexpr"}, build=b.short(), **cost)
        if "error" in info:
            r["error"] = info["error"]
        else:
            peak, unit = mma_peak(arch, info, dt)
            est = roofline_s(arch, cost["mma_flops"] or 0, cost["bytes"], peak, r["programs"],
                             info["occupancy"]["ctas_per_sm"], cost["fma_flops"], num_warps=b.num_warps,
                             reduce_bytes=cost["reduce_bytes"])
            r.update(compiled={k: v for k, v in info.items()}, unit=unit, estimate=est)
        out.append(r)
    return out


def arg_dtypes(launch: Launch) -> dict:
    """param -> dtype name (tensors) or Python value (scalars), for the report."""
    out = {}
    for k, v in launch.bound().items():
        if hasattr(v, "dtype") and hasattr(v, "shape"):
            out[k] = f"{str(v.dtype).replace('torch.', '')}{list(v.shape)}"
        elif isinstance(v, (int, float, bool)):
            out[k] = v
    return out


__all__ = ["PEAKS", "ESTIMATE_LABEL", "Launch", "Build", "record_torch_launches", "record_jax_launches",
           "layer_label", "specialise", "compile_launch", "analyse", "occupancy", "launch_cost", "mma_peak",
           "roofline_s", "busy_fraction", "dram_fraction", "nonprivate_wgrad_s", "compile_all", "compile_builds", "portable", "from_portable", "summarise", "multiplies_half", "is_norm_kernel",
           "is_clipped_weight_kernel", "arg_dtypes", "kernel_name", "split_epilogue_order"]
