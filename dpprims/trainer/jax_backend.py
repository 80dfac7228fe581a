"""The JAX backend of the trainer: dpprims.jax.clipped_grad for the clipped sums, then the
fused noise + normalise + optimizer update (bindings/jax/update.py), both under jax.jit with
the fixed physical batch shape (one compile for the whole run).

Same contract as the torch backend (dpprims.trainer.loop): clipped sums accumulate over the
physical batches of a logical batch; ``noisy_step`` adds sigma*C*z once, divides by the public
q*N, and steps SGD/Adam/AdamW with torch.optim's semantics. The noise comes from the same
counter-based Philox generator as the torch side, keyed by (seed, step, leaf range, rank).
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from dpprims.plan import DPPlan

OPTIMIZERS = ("sgd", "adam", "adamw")


def _bf16(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _bf16_loss(dpj):
    """A DPLoss whose forward runs in bf16 (params and inputs cast inside): activations and
    output gradients are bf16, the clipped sums come back in the fp32 of the master params
    (the kernels accumulate in fp32), and the loss itself is computed in fp32."""

    class BF16Loss(dpj.DPLoss):
        def __call__(self, params, perturbations, batch, rngs=None):
            return super().__call__(_bf16(params), perturbations, (_bf16(batch[0]),) + tuple(batch[1:]), rngs)

        def init_perturbations(self, params, batch, rngs=None):
            return super().init_perturbations(_bf16(params), (_bf16(batch[0]),) + tuple(batch[1:]), rngs)

    return BF16Loss


def _xent(logits, batch):
    y = batch[1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


class JaxBackend:
    """Trainer backend for a flax model built from dpprims.jax layers.

    Args:
        model: a flax.linen module (e.g. ``dpprims.models.jax_resnet.get_jax_model(name)``).
        params: its initial ``params`` collection.
        plan: the DPPlan.
        channels_last: transpose NCHW image batches to NHWC (the JAX models' layout).
        optimizer, lr, momentum, weight_decay, betas, eps: as in torch.optim.
        clipping: "flat" | "automatic".
        precision: "fp32", or "bf16": forward and backward in bf16 on a bf16 copy of the fp32
            master params (like torch autocast); clipped sums, noise and update stay fp32.
        devices: data-parallel over this many local devices (1: no mesh). The clipped sums are
            psum-ed per physical batch (a sum of psums is the psum of the sum); the noise is
            drawn once per logical batch, on the summed result, whatever the device count.
    """

    framework = "jax"

    def __init__(self, model, params, plan: DPPlan, *, channels_last: bool = True, optimizer: str = "sgd",
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 eps: float = 1e-8, clipping: str = "flat", norm_method="auto", rank: int = 0,
                 precision: str = "fp32", devices: int = 1) -> None:
        import dpprims.jax as dpj
        from dpprims.bindings.jax.update import init_opt_state, noisy_update

        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.model, self.plan = model, plan
        self.params = params
        self.optimizer = optimizer
        self.rank = int(rank)
        momentum = float(momentum) if optimizer == "sgd" else 0.0
        self.opt_state = init_opt_state(params, optimizer, momentum=momentum)
        self.channels_last = channels_last
        self.noise_seed = 0
        self._acc = None
        self._stats = {"nonfinite": 0}
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        self.loss_fn = (_bf16_loss(dpj)(model, _xent) if precision == "bf16" else dpj.make_loss_fn(model, _xent))
        C = float(plan.max_grad_norm)

        def clip_step(params, acc, x, y, mask):
            grads, norms, aux = dpj.clipped_grad(self.loss_fn, params, (x, y), max_grad_norm=C, mask=mask,
                                                 clipping=clipping, norm_method=norm_method, return_aux=True)
            acc = jax.tree_util.tree_map(jnp.add, acc, grads)
            losses = jnp.where(mask, aux["losses"].astype(jnp.float32), 0.0)
            return acc, jnp.sum(losses), aux["nonfinite"]

        self.devices = int(devices)
        if self.devices > 1:
            # Data parallel over a 1-D mesh of local devices (JAX's single-controller model):
            # each physical batch's rows are split evenly across devices, every device clips its
            # own rows with the fused kernels, one psum sums the clipped sums, and the noise is
            # added once, after it, in noisy_step (dpprims.distributed.make_sharded_clipped_sum).
            from dpprims.distributed import data_mesh, make_sharded_clipped_sum

            if len(jax.devices()) < self.devices:
                raise ValueError(f"{self.devices} devices requested, JAX sees {len(jax.devices())} "
                                 "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
            if plan.physical_batch_size % self.devices:
                raise ValueError(f"physical_batch_size={plan.physical_batch_size} must be divisible by the "
                                 f"{self.devices} devices (each device gets an equal share of every batch)")
            self.mesh = data_mesh(jax.devices()[:self.devices])
            self._sharded = make_sharded_clipped_sum(self.loss_fn, self.mesh, max_grad_norm=C, clipping=clipping,
                                                     norm_method=norm_method)
        self._clip = jax.jit(clip_step)
        hyper = dict(noise_std=float(plan.noise_std), normaliser=float(plan.normaliser), optimizer=optimizer,
                     lr=float(lr), momentum=momentum, weight_decay=float(weight_decay), betas=tuple(betas),
                     eps=float(eps), rank=self.rank)

        def update(params, sums, opt_state, seed, step):
            return noisy_update(params, sums, opt_state, seed=seed, step=step, **hyper)

        self._update = jax.jit(update)
        if precision == "bf16":
            self._logits = jax.jit(lambda p, x: model.apply({"params": _bf16(p)}, _bf16(x)).astype(jnp.float32))
        else:
            self._logits = jax.jit(lambda p, x: model.apply({"params": p}, x))

    @classmethod
    def from_name(cls, name: str, data, plan: DPPlan, *, seed: int = 0, width: int | None = None,
                  precision: str = "fp32", **kwargs) -> "JaxBackend":
        """A backend for a named model of dpprims.models.jax_resnet.get_jax_model (the data's image
        size goes to the transformer's patch rule), initialised from ``seed``."""
        from dpprims.models.jax_resnet import get_jax_model

        model_kw = {} if width is None else {"width": width}
        model = get_jax_model(name, num_classes=data.num_classes, input_size=tuple(data.input_shape[1:]), **model_kw)
        x0 = cls._prepare(data.x_train[:1], channels_last=True)
        params = model.init(jax.random.PRNGKey(int(seed or 0)), x0)["params"]
        return cls(model, params, plan, precision=precision, **kwargs)

    @staticmethod
    def _prepare(x: np.ndarray, channels_last: bool):
        x = np.asarray(x, dtype=np.float32)
        if channels_last and x.ndim == 4:
            x = x.transpose(0, 2, 3, 1)
        return jnp.asarray(x)

    def set_noise_seed(self, seed: int) -> None:
        self.noise_seed = int(seed)

    def accumulate(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray):
        xb = self._prepare(x, self.channels_last)
        yb = jnp.asarray(np.asarray(y, dtype=np.int32))
        mb = jnp.asarray(np.asarray(mask, dtype=bool))
        acc = self._sums()
        if self.devices > 1:
            sums, stats = self._sharded(self.params, (xb[None], yb[None]), mb[None])
            self._acc = jax.tree_util.tree_map(jnp.add, acc, sums)
            loss_sum, nonfinite = stats["loss_sum"], stats["nonfinite"]
        else:
            self._acc, loss_sum, nonfinite = self._clip(self.params, acc, xb, yb, mb)
        self._stats["nonfinite"] += int(nonfinite)
        return float(loss_sum), int(np.asarray(mask).sum())

    def _sums(self):
        """The clipped sums of the current logical batch (zeros before its first physical batch)."""
        if self._acc is None:
            self._acc = jax.tree_util.tree_map(jnp.zeros_like, self.params)
        return self._acc

    def noisy_step(self, step: int) -> None:
        """g = (sum_i c_i g_i + sigma*C*z) / (q*N), then the optimizer step; ``step`` is 0-based
        (noise stream step + 1, never reused). The trainer always runs >= 1 physical batch, so
        the clipped sums exist (zeros for an empty logical batch) and are noised."""
        from dpprims.bindings.jax.noise import as_seed_array, as_step_array

        self.params, self.opt_state = self._update(self.params, self._sums(), self.opt_state,
                                                   as_seed_array(self.noise_seed), as_step_array(step + 1))
        self._acc = None

    def step_stats(self) -> dict:
        s, self._stats = self._stats, {"nonfinite": 0}
        return s

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512):
        total_loss, correct = 0.0, 0
        for s in range(0, len(x), batch_size):
            logits = self._logits(self.params, self._prepare(x[s:s + batch_size], self.channels_last))
            yb = jnp.asarray(np.asarray(y[s:s + batch_size], dtype=np.int32))
            total_loss += float(jnp.sum(_xent(logits, (None, yb))))
            correct += int(jnp.sum(jnp.argmax(logits, -1) == yb))
        n = max(len(x), 1)
        return total_loss / n, correct / n

    def state_dict(self) -> dict:
        to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
        return dict(params=to_np(self.params), opt_state=to_np(self.opt_state))

    def load_state_dict(self, state: dict) -> None:
        self.params = jax.tree_util.tree_map(jnp.asarray, state["params"])
        self.opt_state = jax.tree_util.tree_map(jnp.asarray, state["opt_state"])

    def kernel_paths(self) -> dict:
        from dpprims.bindings.jax import LAST_PATH

        return dict(LAST_PATH)

    def describe(self) -> dict:
        return dict(framework="jax", devices=[str(d) for d in jax.devices()], optimizer=self.optimizer,
                    jax=jax.__version__,
                    parameters=int(sum(np.prod(np.shape(p)) for p in jax.tree_util.tree_leaves(self.params))))
