"""DPEngine: per-example clipped gradient sums for a PyTorch model in one forward + one backward.

    engine = DPEngine(model, max_grad_norm=1.0)
    loss = F.cross_entropy(model(x), y, reduction="none")   # per-example losses [B]
    norms = engine.backward(loss, mask=mask)                 # .grad = sum_i c_i g_i

Guarantee (what the engine promises, noise aside): after ``engine.backward`` every trainable
parameter's ``.grad`` holds (adds) sum_i c_i g_i over the examples of the batch, with g_i the
gradient of example i's loss and c_i its clip factor (kernels/clip.py), so each example's
contribution to the whole model's gradient has L2 norm <= max_grad_norm. Nothing else reaches
``.grad``: no noise, no normalisation (the trainer adds both once per logical batch).

Edge cases, all privacy-relevant and tested:

* ``mask`` (bool or 0/1, [B]): rows with mask 0 are padding and contribute nothing.
* an example with a non-finite gradient norm contributes nothing; the count is reported in
  ``last_stats["nonfinite"]`` and summed in ``nonfinite_total`` (device tensors: reading them
  syncs, so the engine never does it per physical batch; the trainer logs them per step).
* loss reduction: pass per-example losses [B] (recommended), or a scalar that is their sum
  (``loss_reduction="sum"``), or their mean over the B rows of the physical batch, padding
  included (``loss_reduction="mean"``: output gradients are multiplied back by B). A scalar
  loss whose autograd node says "mean" (``.mean()``, or a torch loss with reduction="mean")
  while the engine expects "sum" is an error, not a silent 1/B scaling of the clip norm.
* every module with trainable parameters must be one the engine can clip; anything else
  (BatchNorm, which mixes examples; custom modules with their own parameters) raises when the
  engine is built, naming the module and what to do.
* if autograd ever produces a gradient for a parameter the engine owns (the weight was used
  outside its module's forward, e.g. tied or functional use), backward raises: that gradient
  would be non-private.
* a backward through the wrapped model outside ``engine.backward`` (``loss.backward()``,
  ``torch.autograd.grad``) leaves output gradients in the DP layers; the next
  ``engine.backward`` raises instead of mixing that batch's examples into its own.
* B = 0 (empty physical batch) is a valid step: it contributes 0.
"""
from __future__ import annotations

import math

import torch

from dpprims.bindings.torch import _backend
from dpprims.bindings.torch.linear import check_max_grad_norm, clip_factors, clip_factors_torch

from .handlers import HANDLERS, handler_for

_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
_NORM_METHODS = ("auto", "ghost", "direct", "instantiate")
_CLIPPED_SUMS = ("exact", "auto", "rounded")


class DPEngine:
    """Per-example clipping for a torch model; see the module docstring for the guarantee.

    Args:
        model: the nn.Module; its supported layers are wrapped in place (``detach()`` undoes it).
        max_grad_norm: the clip norm C (>= 0; inf only with flat clipping).
        clipping: "flat" (min(1, C/(n+1e-6))) or "automatic" (C/(n+gamma)).
        gamma: stability constant of automatic clipping.
        norm_method: "auto" (per layer, cheapest by the cost model of the backend that runs:
            the kernels' flop model on the Triton backends, the time model of
            dpprims.torch.handlers.cpu_cost on the plain-torch CPU path), "ghost", "direct",
            "instantiate", or a dict {module name: method} overriding single layers ("auto"
            for the rest). "instantiate" keeps the per-example weight gradients of a Conv /
            Linear layer for its clipped sum (plain-torch path; under a memory cap, else
            "direct"; the Triton backends run "direct" for it). The norms, and so privacy, do
            not depend on the method.
        loss_reduction: "sum" or "mean" for scalar losses (see module docstring).
        precision: tl.dot precision for fp32 operands: "ieee" (default) or "tf32x3" (near-fp32
            on tensor cores). Plain TF32 is refused: its rounding can push a clipped
            contribution past max_grad_norm.
        clipped_sum: design of the half-precision clipped weight-gradient sums of Linear and
            Conv layers with T > 1 (docs/PRIVACY.md): "exact" (design (a) everywhere, c_i applied
            to each example's fp32 tile after the MMA, no utility cost), "auto" (default; design (c) for
            bf16/fp16 operands with T < kernels.linear.ROUNDED_ROWS_MAX_T: one GEMM over the
            B*T rows with c_i g_t rounded onto the input dtype, and clip factors that charge
            the rounding, c_i = min(1, (C - alpha_i) / (n_i + rho_i)); every contribution stays
            <= C and c_i is a little smaller, by rho_i / n_i, reported as
            ``last_stats["rounding_slack"]``; an example whose rho_i exceeds
            ``rounding_slack_max`` n_i, or alpha_i that times C, e.g. one whose positions
            cancel, is routed to design (a) in those layers instead and keeps the plain factor:
            counted in ``last_stats["exact_routed"]``), or "rounded" (design (c) at every T > 1
            for every example, no routing; tests and benchmarks). The
            same for Conv1d/Conv2d layers (T = H_out W_out; single-call layers). Only the Triton
            backends use (c); fp32 operands, T = 1, fp16 with automatic clipping, and the
            plain-torch path keep designs (a)/(b). ``plan()`` shows each layer's design.
        rounding_slack_max: the largest utility cost design (c) may impose on one example under
            clipped_sum="auto" (its factor shrinks by at most 1 / (1 + rounding_slack_max)).
    """

    def __init__(self, model: torch.nn.Module, max_grad_norm: float, *, clipping: str = "flat",
                 gamma: float = 0.01, norm_method="auto", loss_reduction: str = "sum",
                 precision: str = "ieee", clipped_sum: str = "auto",
                 rounding_slack_max: float = 2.0 ** -4) -> None:
        self.max_grad_norm = check_max_grad_norm(max_grad_norm, clipping)
        self.clipping = clipping
        self.gamma = float(gamma)
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a positive finite number, got {gamma!r}")
        if isinstance(norm_method, str):
            if norm_method not in _NORM_METHODS:
                raise ValueError(f"norm_method must be one of {_NORM_METHODS} or a dict, got {norm_method!r}")
            self._norm_default, self._norm_overrides = norm_method, {}
        else:
            self._norm_default, self._norm_overrides = "auto", dict(norm_method)
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        if precision not in ("ieee", "tf32x3"):
            raise ValueError(f"precision must be 'ieee' or 'tf32x3' (plain tf32 can let a clipped "
                             f"contribution exceed max_grad_norm), got {precision!r}")
        self.precision = precision
        if clipped_sum not in _CLIPPED_SUMS:
            raise ValueError(f"clipped_sum must be one of {_CLIPPED_SUMS}, got {clipped_sum!r}")
        self.clipped_sum = clipped_sum
        if not (rounding_slack_max >= 0):
            raise ValueError(f"rounding_slack_max must be >= 0, got {rounding_slack_max!r}")
        self.rounding_slack_max = float(rounding_slack_max)
        self.exact_route = None  # [B] bool during accumulate_clipped: examples routed to design (a)
        self.model = model
        self.handlers = self._build_handlers(model)
        unknown = set(self._norm_overrides) - {h.name for h in self.handlers}
        if unknown:
            raise ValueError(f"norm_method names layers the engine does not clip: {sorted(unknown)}")
        for name, method in self._norm_overrides.items():
            if method not in _NORM_METHODS:
                raise ValueError(f"norm_method for {name!r} must be one of {_NORM_METHODS}, got {method!r}")
        self._hooks = []
        for h in self.handlers:
            h.install()
            for pname, p in h.module.named_parameters(recurse=False):
                if p.requires_grad:
                    self._hooks.append(p.register_hook(self._leak_guard(f"{h.name}.{pname}" if h.name else pname)))
        self.nonfinite_total = 0
        self.last_stats: dict = {}

    # -- construction ----------------------------------------------------------------------
    def _build_handlers(self, model: torch.nn.Module) -> list:
        handlers, owner = [], {}
        for name, module in model.named_modules():
            label = name or "<root>"
            if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
                # Even frozen: the forward renormalises the looked-up weight rows in place, so
                # the weights would change, without noise, depending on the private batch.
                raise ValueError(
                    f"DPEngine: Embedding {label!r} has max_norm={module.max_norm}: its forward rewrites "
                    "the weight rows of the tokens in the batch in place (a data-dependent, noiseless "
                    "change), even when frozen. Use max_norm=None.")
            if isinstance(module, torch.nn.MultiheadAttention) and any(p.requires_grad for p in module.parameters()):
                raise ValueError(
                    f"DPEngine: module {label!r} (MultiheadAttention) uses its weights functionally "
                    "(packed in_proj_weight, out_proj inside F.multi_head_attention_forward), so its "
                    "per-example gradients cannot be clipped. Replace it by dpprims.torch.DPMultiheadAttention "
                    "(same function and weights, built from Linear layers), e.g. "
                    "model = dpprims.torch.convert_multihead_attention(model); this also covers "
                    "nn.TransformerEncoderLayer / DecoderLayer / nn.Transformer.")
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if isinstance(module, _BN_TYPES):
                raise ValueError(
                    f"DPEngine: module {label!r} ({type(module).__name__}) has trainable parameters and "
                    "mixes examples through batch statistics, which breaks per-example clipping (DP). "
                    "Replace it by GroupNorm, e.g. dpprims.models.convert_batchnorm_to_groupnorm(model), "
                    "or freeze it (requires_grad_(False)) and keep it in eval mode.")
            cls = handler_for(module)
            if cls is None:
                raise ValueError(
                    f"DPEngine: module {label!r} ({type(module).__name__}) has trainable parameters "
                    f"{[n for n, _ in params]} that dpprims cannot clip per example. Supported layers: "
                    f"{_supported_names()}. Freeze these parameters (requires_grad_(False)) or "
                    "rebuild the module from supported layers.")
            for n, p in params:
                if id(p) in owner:
                    raise ValueError(
                        f"DPEngine: parameter {label}.{n} is the same tensor as {owner[id(p)]} (tied "
                        "weights); per-example norms of tied parameters are not supported yet.")
                owner[id(p)] = f"{label}.{n}"
            handlers.append(cls(name, module, self))
        if not handlers:
            raise ValueError("DPEngine: the model has no trainable parameters")
        return handlers

    def _leak_guard(self, pname: str):
        def hook(grad):
            if grad is None:  # the DP layer's own backward reports "no gradient" as None
                return None
            raise RuntimeError(
                f"DPEngine: autograd computed a gradient for {pname!r} outside its DP layer (the "
                "parameter is used functionally or shared with another module). That gradient "
                "would not be clipped per example; use the module's forward instead.")
        return hook

    def norm_method_for(self, name: str) -> str:
        return self._norm_overrides.get(name, self._norm_default)

    # -- the step --------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Backward of ``loss`` with per-example clipping; returns per-example norms [B] (fp32).

        ``loss``: per-example losses [B], or a scalar (see ``loss_reduction``).
        ``mask``: optional [B] (bool or 0/1); 0 marks padding rows that contribute nothing.
        """
        total, per_example_B, mean = self._total_loss(loss)
        self._refuse_stale_captures()
        total.backward()
        try:
            # layers whose backward ran this step (a layer outside the loss's graph has none)
            active = [(h, h.batch_size()) for h in self.handlers]
            active = [(h, b) for h, b in active if b is not None]
            present = {h.name: b for h, b in active}
            if not present:
                raise RuntimeError("DPEngine.backward: no DP layer took part in this loss's backward "
                                   "(was the forward run under torch.no_grad, or with another model?)")
            if len(set(present.values())) != 1:
                raise RuntimeError(f"DPEngine.backward: layers saw different batch sizes {present}")
            B = next(iter(present.values()))
            if per_example_B is not None and per_example_B != B:
                raise ValueError(f"loss has {per_example_B} per-example entries but the layers saw B = {B}")
            scale = float(B) if mean else 1.0
            sq = None
            for h, _ in active:
                s = h.sq_norms(B)
                sq = s if sq is None else sq + s  # (handlers return fresh fp32 [B] tensors)
            device = sq.device  # the layers' device (the handlers' norms live there)
            if scale != 1.0:
                sq = sq * (scale * scale)
            # design (c) layers: rho_i = sqrt(sum_l (u S_i^l)^2), alpha_i = sqrt(sum_l (alpha_i^l)^2)
            # (Minkowski over layers, docs/PRIVACY.md); rho scales with G like the norm
            slacks = [sl for sl in (h.rounding_slack(B) for h, _ in active) if sl is not None]
            slack = None
            if slacks:
                rho = torch.stack([r.float() for r, _ in slacks]).square().sum(0).sqrt() * scale
                alpha = torch.stack([a.float() for _, a in slacks]).square().sum(0).sqrt()
                slack = torch.stack([rho, alpha])
            if mask is not None:
                mask = torch.as_tensor(mask, device=device)
                if mask.shape != (B,):
                    raise ValueError(f"mask must have shape [B] = [{B}], got {tuple(mask.shape)}")
            C = self._clip_norm_tensor(device)
            route = None
            if slack is not None and self.clipped_sum == "auto":
                # per-example routing: where the slack would cost more than rounding_slack_max
                # of the factor (cancelling positions), the example takes design (a) in the (c)
                # layers (the handlers run both kernels, each with the other's rows zeroed) and
                # needs no slack; non-finite slack stays (c_i = 0)
                finite = torch.isfinite(slack).all(0)
                r = self.rounding_slack_max
                route = finite & ((slack[0] > r * sq.sqrt()) | (slack[1] > r * self.max_grad_norm))
                slack = torch.where(route.unsqueeze(0), 0.0, slack)
                if route.device.type == "meta":
                    # shape-only capture (dpprims.kernel_report): record the common case, no
                    # example routed, i.e. without the design-(a) launch that would skip every
                    # example (on a GPU it runs, costing about a launch: no host sync here)
                    route = None
            auto = self.clipping == "automatic"
            if B > 0 and _backend.record("clip_factors", sq) == "torch" and not torch.compiler.is_compiling():
                # the op's own plain-torch code, without its custom-op dispatch (~100 us a step)
                c, norms = clip_factors_torch(sq, mask, C, auto, self.gamma, slack)
            else:
                c, norms = clip_factors(sq, mask, C, auto, self.gamma, slack)
            c_eff = c * scale if scale != 1.0 else c
            self.exact_route = route
            try:
                for h, _ in active:
                    h.accumulate_clipped(c_eff)
            finally:
                self.exact_route = None
            # Step statistics stay on the device (no host sync per physical batch); callers
            # read them with int(...) when they log.
            # (norms are square roots: never -inf, so ~(n < inf) is exactly "inf or NaN", one
            # comparison where isfinite costs four ops)
            if mask is None:  # every row is valid: two reductions, no [B] mask to build
                valid = None
                nonfinite = (~(norms < math.inf)).sum()
                clipped = (norms > self.max_grad_norm).sum()
            else:
                valid = mask != 0
                nonfinite = (~(norms < math.inf) & valid).sum()
                clipped = ((norms > self.max_grad_norm) & valid).sum()
            self.nonfinite_total = self.nonfinite_total + nonfinite
            self.last_stats = dict(batch_size=B, nonfinite=nonfinite, clipped=clipped,
                                   backends=dict(_backend.LAST_BACKEND))
            if slack is not None:
                if valid is None:
                    valid = torch.ones(B, dtype=torch.bool, device=device)
                # mean over the valid examples with 0 < n_i < inf of rho_i / n_i: how much
                # smaller design (c) made the clip factors of the examples it clipped
                ok = valid & torch.isfinite(norms) & (norms > 0)
                ratio = torch.where(ok, slack[0] / torch.where(ok, norms, 1.0), 0.0)
                self.last_stats["rounding_slack"] = ratio.sum() / ok.sum().clamp(min=1)
                self.last_stats["exact_routed"] = (route & valid).sum() if route is not None else valid.new_zeros(())
            return norms
        finally:
            self._kept_rows = None
            for h in self.handlers:
                h.state.clear()

    def _refuse_stale_captures(self) -> None:
        """Privacy-relevant: a DP layer whose backward already ran (an output gradient is there
        before this backward starts) was reached by a backward outside DPEngine.backward, e.g.
        ``loss.backward()`` or ``torch.autograd.grad`` through the wrapped model. Those layers
        return no weight gradient, and their captures would be combined with this step's as if
        the layer had been called twice: example i of the other batch mixed into example i of
        this one. Refused (RuntimeError naming the layer); every capture is dropped so the next
        forward starts clean."""
        for h in self.handlers:
            if any(cap.grad_out is not None for cap in h.state.captures):
                for other in self.handlers:
                    other.state.clear()
                raise RuntimeError(
                    f"DPEngine.backward: layer {h.name or '<root>'!r} holds an output gradient from a backward "
                    "that ran outside DPEngine.backward (loss.backward() or torch.autograd.grad through the "
                    "wrapped model). Its examples would be mixed into this step's per-example gradients, so "
                    "the step is refused and the layers' captures are dropped. Run backwards through the "
                    "wrapped model with engine.backward only (other backwards: after engine.detach()).")

    def kept_rows(self, c: torch.Tensor):
        """For the plain-torch clipped sums: None when every c_i != 0, else the indices of the
        examples with c_i != 0 (padding and non-finite examples are indexed away, never
        multiplied: 0 * NaN = NaN). Computed once per backward for the clip factors ``c`` of
        that backward (a host read, free on the CPU path), shared by the layers."""
        memo = self.__dict__.get("_kept_rows")
        if memo is not None and memo[0] is c:
            return memo[1]
        keep = c != 0
        idx = None if bool(keep.all()) else keep.nonzero().squeeze(1)
        self._kept_rows = (c, idx)
        return idx

    def _clip_norm_tensor(self, device) -> torch.Tensor:
        """max_grad_norm as the one-element fp32 tensor clip_factors takes, built once per (device,
        value) (read-only: the clip ops never write it; keyed by the value, so assigning
        ``engine.max_grad_norm`` later still takes effect)."""
        cache = self.__dict__.setdefault("_clip_norm_cache", {})
        key = (device, float(self.max_grad_norm))
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.tensor([self.max_grad_norm], device=device, dtype=torch.float32)
        return t

    def _total_loss(self, loss: torch.Tensor):
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise ValueError("DPEngine.backward needs a loss tensor that requires grad")
        if loss.dim() == 1:
            return loss.sum(), loss.shape[0], False
        if loss.dim() != 0:
            raise ValueError(f"loss must be per-example [B] or a scalar, got shape {tuple(loss.shape)}")
        detected = _detect_mean(loss)
        if detected and self.loss_reduction == "sum":
            raise ValueError(
                "DPEngine.backward: the scalar loss is a mean over the batch but the engine was built "
                "with loss_reduction='sum'. Pass per-example losses (reduction='none'), or build the "
                "engine with loss_reduction='mean'.")
        return loss, None, self.loss_reduction == "mean"

    # -- inspection ------------------------------------------------------------------------
    def plan(self) -> list:
        """Per-layer plan of the last backward: layer, kind, T, d, p, method, flops and bytes of
        the norm pass vs the weight-gradient GEMM, and for Linear / Conv layers ``clipped_sum``, the
        design of the clipped sum ("segments" (a), "rank1" (b), "rounded" (c); None for layers
        not yet run)."""
        return [h.plan() or dict(layer=h.name, kind=h.kind) for h in self.handlers]

    def format_plan(self) -> str:
        """The plan as a table: per layer T, d, p, method, and the norm pass against the
        weight-gradient GEMM it sits beside, in GFLOP and MB, with the totals; on the
        plain-torch CPU path also the modelled milliseconds of the chosen method (norm pass +
        clipped sum, dpprims.torch.handlers.cpu_cost)."""
        rows = self.plan()
        head = (f"{'layer':<24}{'kind':<10}{'T':>6}{'d':>7}{'p':>6}  {'method':<12}"
                f"{'norm GF':>9}{'wgrad GF':>9}{'norm MB':>9}{'wgrad MB':>9}{'GF ratio':>9}{'CPU ms':>9}  sum")
        lines = [head]
        tot = dict(norm_flops=0, weight_grad_flops=0, norm_bytes=0, weight_grad_bytes=0)
        for r in rows:
            if "method" not in r:
                lines.append(f"{r['layer']:<24}{r['kind']:<10}  (not run yet)")
                continue
            for k in tot:
                tot[k] += r.get(k, 0)
            lines.append(f"{r['layer']:<24}{r['kind']:<10}{r['T']:>6}{r['d']:>7}{r['p']:>6}  {r['method']:<12}"
                         f"{r['norm_flops'] / 1e9:>9.3f}{r['weight_grad_flops'] / 1e9:>9.3f}"
                         f"{r.get('norm_bytes', 0) / 1e6:>9.2f}{r.get('weight_grad_bytes', 0) / 1e6:>9.2f}"
                         f"{r['norm_flops'] / max(1, r['weight_grad_flops']):>9.3f}"
                         + (f"{r['cpu_ms'][r['method']]:>9.2f}" if r['method'] in r.get('cpu_ms', {}) else f"{'-':>9}")
                         + f"  {_DESIGN_LABEL.get(r.get('clipped_sum'), '-')}")
        lines.append(f"{'total':<24}{'':<10}{'':>6}{'':>7}{'':>6}  {'':<12}"
                     f"{tot['norm_flops'] / 1e9:>9.3f}{tot['weight_grad_flops'] / 1e9:>9.3f}"
                     f"{tot['norm_bytes'] / 1e6:>9.2f}{tot['weight_grad_bytes'] / 1e6:>9.2f}"
                     f"{tot['norm_flops'] / max(1, tot['weight_grad_flops']):>9.3f}")
        return "\n".join(lines)

    def detach(self) -> torch.nn.Module:
        """Restore the model's own forwards and remove the engine's hooks."""
        for h in self.handlers:
            h.uninstall()
            h.state.clear()
        for hk in self._hooks:
            hk.remove()
        self._hooks.clear()
        return self.model


# plan()/format_plan(): the clipped-sum design of each Linear / Conv layer (docs/PRIVACY.md)
_DESIGN_LABEL = {"segments": "(a)", "rank1": "(b)", "rounded": "(c)"}


def _detect_mean(loss: torch.Tensor) -> bool:
    fn = loss.grad_fn
    if fn is None:
        return False
    if type(fn).__name__.startswith("MeanBackward"):
        return True
    return getattr(fn, "_saved_reduction", None) == 1  # at::Reduction::Mean


def _supported_names() -> list:
    return sorted({t.__name__ for h in HANDLERS for t in h.module_types})
