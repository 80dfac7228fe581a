"""Per-example clipped gradient sums for a Flax model built from dpprims.jax layers.

    model = MLP()                                          # flax.linen, dpprims.jax.Dense inside
    loss_fn = dpprims.jax.make_loss_fn(model, lambda logits, batch:
        optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))   # per-example [B]
    grads, norms = dpprims.jax.clipped_grad(loss_fn, params, (x, y), max_grad_norm=1.0, mask=mask)

How: the DP layers ``sow`` their inputs and ``perturb`` their outputs with zero variables.
``clipped_grad`` runs ``jax.grad`` of the summed per-example losses w.r.t. those perturbations
ONLY (the parameters are constants of the differentiated function), which yields every layer's
output gradient B_i and the input-gradient chain, but never a weight gradient: XLA does not
compute the non-private weight-gradient GEMMs at all. The activations come back as auxiliary
outputs. The fused kernels (``dpprims.bindings.jax``) then compute per-layer per-example
squared norms, the clip factors, and per layer the clipped sum (c * B)^T A (Book-Keeping).

Guarantee (noise aside): the returned pytree (shaped like ``params``) is sum_i c_i g_i over the
rows of the batch, with g_i the gradient of example i's loss w.r.t. ``params`` and c_i its clip
factor (dpprims.kernels.clip), so every example's contribution to the whole model's gradient
has L2 norm <= max_grad_norm (flat: min(1, C/(n_i + 1e-6)); automatic: C/(n_i + gamma)).
No noise, no normalisation: add both once per logical batch (DESIGN.md section 1).

Edge cases, all privacy-relevant:

* ``mask`` ([B], bool or 0/1): rows with mask 0 are padding and contribute exactly nothing,
  whatever their values (a fixed physical batch + mask keeps every compiled shape constant).
* an example whose norm is not finite (inf/NaN anywhere in its activations, output gradients
  or loss) contributes nothing: c_i = 0, and its rows are selected away in every clipped sum,
  never multiplied by 0. Its entry of the returned ``norms`` is non-finite: count them with
  ``(~jnp.isfinite(norms)) & mask`` (``return_aux=True`` gives the count).
* ``max_grad_norm``: a float or a one-element array (a runtime value under jit: a new clip norm
  does not recompile). NaN or negative is an error where it is concrete; C = 0 gives zero
  gradients; C = inf (flat only) disables clipping and voids the DP guarantee.
* B = 0 (empty physical batch) is valid and returns zeros.
* the loss must be per example ([B], one entry per row; a mean over the batch would scale every
  output gradient by 1/B and with it the clip norm, so a scalar loss is an error).
* every parameter used in the forward must belong to a dpprims.jax layer: parameters of any
  other module that takes part in the forward (flax's own nn.Dense, a custom ``self.param``)
  raise, naming the module, because their gradient could not be clipped. Parameters of DP layers
  that the forward does not reach get zero gradients (their per-example gradients are 0).
  Using a DP layer's parameters outside its own call (weight tying through ``self.variables``)
  is not detected: don't.
* a DP layer called several times in one forward: its per-example gradient is the sum over
  calls (supported for Dense, GroupNorm, LayerNorm, Embed; Conv raises).
* models must not mix examples (no BatchNorm): the per-example gradient is then not defined.
* inside ``jax.shard_map``: with the default ``check_vma=True`` the zero perturbations are
  device-invariant, so JAX sums their gradients (the output gradients B_i) across devices and
  per-example norms mix examples of different devices. Use
  ``dpprims.distributed.make_sharded_clipped_sum``, which runs clipped_grad with
  ``check_vma=False``, or pass ``check_vma=False`` yourself.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpprims.bindings.jax.clip import check_gamma, check_max_grad_norm, clip_factors

from .handlers import HANDLERS
from .layers import ACTIVATIONS, PERTURBATIONS, DPLayer

NORM_METHODS = ("auto", "ghost", "direct")

LAST_PLAN: list = []
"""Per-layer plan of the last traced ``clipped_grad`` (layer, kind, T, d, p, method, flops)."""


def _default_inputs(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"]
    raise ValueError("make_loss_fn: cannot tell the model input in the batch; pass inputs=lambda batch: ...")


class DPLoss:
    """``loss_fn(params, perturbations, batch, rngs=None) -> (losses [B], activations)``.

    Built by :func:`make_loss_fn`: applies ``model`` to ``inputs(batch)`` with the
    perturbations and the activation collection mutable, and returns the per-example losses
    ``loss(outputs, batch)`` [B] with the sown activations. ``init_perturbations(params, batch)``
    gives the zero perturbations for this batch shape (no FLOPs: ``jax.eval_shape``).

    A hand-written loss_fn works too if it follows the same contract (apply with
    ``{"params": params, "perturbations": perturbations}`` and ``mutable=["dp_inputs"]``,
    return (losses [B], the "dp_inputs" collection)) and clipped_grad gets ``perturbations=``.
    """

    def __init__(self, model: nn.Module, loss: Callable, inputs: Callable | None = None,
                 apply_kwargs: dict | None = None) -> None:
        self.model = model
        self.loss = loss
        self.inputs = inputs or _default_inputs
        self.apply_kwargs = dict(apply_kwargs or {})

    def __call__(self, params, perturbations, batch, rngs=None):
        variables = {"params": params}
        if perturbations is not None:
            variables[PERTURBATIONS] = perturbations
        kw = dict(self.apply_kwargs)
        if rngs is not None:
            kw["rngs"] = rngs
        out, state = self.model.apply(variables, self.inputs(batch), mutable=[ACTIVATIONS], **kw)
        return self.loss(out, batch), state.get(ACTIVATIONS, {})

    def init_perturbations(self, params, batch, rngs=None):
        kw = dict(self.apply_kwargs)
        if rngs is not None:
            kw["rngs"] = rngs

        def shapes(p, b):
            _, state = self.model.apply({"params": p}, self.inputs(b), mutable=[PERTURBATIONS, ACTIVATIONS], **kw)
            return state.get(PERTURBATIONS, {})

        s = jax.eval_shape(shapes, params, batch)
        return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), s)

    def apply(self, params, batch, **kwargs):
        """The model's outputs on ``batch`` (plain forward, no DP bookkeeping)."""
        return self.model.apply({"params": params}, self.inputs(batch), **{**self.apply_kwargs, **kwargs})


def make_loss_fn(model: nn.Module, loss: Callable, *, inputs: Callable | None = None, **apply_kwargs) -> DPLoss:
    """The per-example loss of a flax ``model`` for :func:`clipped_grad`.

    Args:
        model: a ``flax.linen`` module whose trainable layers are dpprims.jax layers.
        loss: ``loss(outputs, batch) -> [B]`` per-example losses (sum reduction within an
            example, e.g. ``optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])``).
        inputs: ``inputs(batch) -> model input``; default ``batch[0]`` (tuple/list) or
            ``batch["x"]`` (dict).
        apply_kwargs: extra keyword arguments for ``model.apply`` (e.g. ``train=True``).
    """
    return DPLoss(model, loss, inputs, apply_kwargs)


def _get(tree, path):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree: dict, path, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _unfreeze(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def _param_owners(params) -> dict:
    """{module path: {param name: leaf}} for every leaf of a flax params tree."""
    owners: dict = {}

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, path + (k,))
            else:
                owners.setdefault(path, {})[k] = v

    walk(params, ())
    return owners


def clipped_grad(loss_fn, params, batch, *, max_grad_norm, mask=None, clipping: str = "flat",
                 gamma: float = 0.01, norm_method="auto", precision: str = "ieee", perturbations=None,
                 rngs=None, return_aux: bool = False):
    """sum_i c_i g_i (a pytree like ``params``) and the per-example norms n_i [B] (float32).

    See the module docstring for the guarantee and the edge cases.

    Args:
        loss_fn: a :class:`DPLoss` (``make_loss_fn(model, loss)``), or any function with its
            contract (then pass ``perturbations``).
        params: the model's ``params`` collection.
        batch: one physical batch (fixed shape); ``loss_fn`` picks the model input from it.
        max_grad_norm: the clip norm C (float or one-element array; traced under jit is fine).
        mask: optional [B] (bool or 0/1): 0 marks padding rows.
        clipping: "flat" (min(1, C/(n+1e-6))) or "automatic" (C/(n+gamma)).
        gamma: the stability constant of automatic clipping (static).
        norm_method: "auto" (per layer, cheapest by the kernels' cost model), "ghost", "direct",
            or {layer path "a/b": method} overriding single layers ("auto" for the rest).
        precision: tl.dot precision for fp32 operands: "ieee" (default), "tf32x3", "tf32".
        perturbations: the zero perturbations (default: ``loss_fn.init_perturbations``).
        rngs: forwarded to ``loss_fn`` (e.g. {"dropout": key}).
        return_aux: also return a dict with ``losses`` [B], ``nonfinite`` (count of valid rows
            with a non-finite norm) and ``clipped`` (count of valid rows with n_i > C).

    Returns:
        ``(grads, norms)``, or ``(grads, norms, aux)`` with ``return_aux=True``.
    """
    C = check_max_grad_norm(max_grad_norm, clipping)
    gamma = check_gamma(gamma)
    if isinstance(norm_method, str):
        if norm_method not in NORM_METHODS:
            raise ValueError(f"norm_method must be one of {NORM_METHODS} or a dict, got {norm_method!r}")
        default_method, overrides = norm_method, {}
    else:
        default_method, overrides = "auto", dict(norm_method)
        for k, v in overrides.items():
            if v not in NORM_METHODS:
                raise ValueError(f"norm_method for {k!r} must be one of {NORM_METHODS}, got {v!r}")
    params = _unfreeze(params)
    if perturbations is None:
        if not hasattr(loss_fn, "init_perturbations"):
            raise ValueError("clipped_grad: pass perturbations= (or build loss_fn with make_loss_fn)")
        perturbations = loss_fn.init_perturbations(params, batch, rngs) if rngs is not None else \
            loss_fn.init_perturbations(params, batch)
    rng_kw = {} if rngs is None else {"rngs": rngs}

    dp_layers: dict = {}
    called: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            m = context.module
            called.setdefault(tuple(m.path), type(m).__name__)
            if isinstance(m, DPLayer):
                dp_layers[tuple(m.path)] = m
        return next_fun(*args, **kwargs)

    def total(perts):
        with nn.intercept_methods(interceptor):
            losses, acts = loss_fn(params, perts, batch, **rng_kw)
        losses = jnp.asarray(losses)
        if losses.ndim != 1:
            raise ValueError(f"clipped_grad: loss_fn must return per-example losses [B], got shape {losses.shape} "
                             "(a mean over the batch would rescale the clip norm)")
        return jnp.sum(losses), (losses, acts)

    gperts, (losses, acts) = jax.grad(total, has_aux=True)(perturbations)
    B = losses.shape[0]
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != (B,):
            raise ValueError(f"mask must have shape [B] = [{B}], got {mask.shape}")

    # -- ownership: every parameter used in the forward belongs to a DP layer ----------------
    owners = _param_owners(params)
    bad = sorted(p for p in owners if p in called and p not in dp_layers)
    if bad:
        desc = ", ".join(f"{'/'.join(p) or '<root>'} ({called[p]}: {sorted(owners[p])})" for p in bad)
        raise ValueError(f"clipped_grad: modules with trainable parameters that dpprims cannot clip per example "
                         f"took part in the forward: {desc}. Build the model from dpprims.jax layers (Dense, "
                         "Conv, GroupNorm, LayerNorm, Embed).")
    names = {"/".join(p) for p in dp_layers}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"norm_method names layers that are not DP layers of this forward: {sorted(unknown)}")

    # -- norm pass ------------------------------------------------------------------------------
    sq = jnp.zeros((B,), jnp.float32)
    work, plan = [], []
    for path in sorted(dp_layers):
        layer_params = owners.get(path)
        if not layer_params:
            continue
        a = _get(acts, path)
        g = _get(gperts, path)
        if a is None or g is None or "inputs" not in a:
            raise RuntimeError(f"clipped_grad: DP layer {'/'.join(path)} left no activations or perturbation "
                               "gradients (was it applied under a flax transform such as nn.remat/nn.scan?)")
        saved = list(a["inputs"])
        outs = [g[f"out{k}"] for k in range(len(saved))]
        name = "/".join(path)
        module = dp_layers[path]
        handler = HANDLERS[module.dp_kind]
        method = overrides.get(name, default_method)
        s, state, p = handler.norms(name, module, saved, outs, layer_params, method, precision)
        sq = sq + s
        work.append((path, handler, state, layer_params))
        plan.append(p)
    LAST_PLAN[:] = plan

    c, norms = clip_factors(sq, mask, C, clipping=clipping, gamma=gamma)

    # -- clipped sums -----------------------------------------------------------------------------
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    for path, handler, state, layer_params in work:
        for pname, value in handler.clipped(state, c, layer_params).items():
            ref = layer_params[pname]
            _set(grads, path + (pname,), value.reshape(ref.shape).astype(ref.dtype))
    if not return_aux:
        return grads, norms
    valid = jnp.ones((B,), bool) if mask is None else (mask != 0)
    aux = dict(losses=losses, nonfinite=jnp.sum(valid & ~jnp.isfinite(norms)),
               clipped=jnp.sum(valid & (norms > C[0])))
    return grads, norms, aux

