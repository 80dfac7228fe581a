"""Layer shapes of the benchmark models, read off dpprims.models by forward hooks (never typed by
hand): every Conv2d, Linear and GroupNorm call of one forward pass, deduplicated, with the
number of layers of the model that share each shape (``count``, so per-model sums weight
each shape by how often it occurs).

    python bench/shapes.py            # prints the full-size tables
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ensure_dpprims  # noqa: E402

# model configs of the microbenchmarks: name -> (model name for get_model, input size, batch,
# num_classes). Smoke sizes shrink width, input and batch; the code path is the same.
MODEL_CONFIGS = {
    "r18-32": dict(model="resnet18-cifar", image=32, batch=256, num_classes=10),
    "r18-224": dict(model="resnet18", image=224, batch=64, num_classes=1000),
    "r50-32": dict(model="resnet50-cifar", image=32, batch=256, num_classes=10),
    "r50-224": dict(model="resnet50", image=224, batch=64, num_classes=1000),
}
SMOKE = dict(width=4, num_groups=2, image={"r18-32": 8, "r18-224": 16, "r50-32": 8, "r50-224": 16}, batch=3)


@dataclass(frozen=True)
class ConvShape:
    B: int
    C_in: int
    H: int
    W: int
    C_out: int
    H_out: int
    W_out: int
    k: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @property
    def T(self) -> int:
        return self.H_out * self.W_out

    @property
    def D(self) -> int:
        return self.C_in // self.groups * self.k[0] * self.k[1]

    @property
    def P(self) -> int:
        return self.C_out // self.groups

    def label(self) -> str:
        s = f"c{self.C_in}-{self.C_out}-k{self.k[0]}-s{self.stride[0]}-{self.H}px"
        return s + (f"-g{self.groups}" if self.groups != 1 else "")


@dataclass(frozen=True)
class LinearShape:
    B: int
    T: int
    D: int
    P: int

    def label(self) -> str:
        return f"lin-T{self.T}-{self.D}-{self.P}"


@dataclass(frozen=True)
class GroupNormShape:
    B: int
    C: int
    H: int
    W: int
    groups: int

    def label(self) -> str:
        return f"gn-c{self.C}-g{self.groups}-{self.H}px"


def _build(config: str, smoke: bool):
    ensure_dpprims()
    from dpprims.models import get_model

    cfg = MODEL_CONFIGS[config]
    kw = {}
    image, batch = cfg["image"], cfg["batch"]
    if smoke:
        kw = dict(width=SMOKE["width"], num_groups=SMOKE["num_groups"])
        image, batch = SMOKE["image"][config], SMOKE["batch"]
    model = get_model(cfg["model"], num_classes=cfg["num_classes"], **kw)
    return model, image, batch


def layer_shapes(config: str, smoke: bool = False) -> dict:
    """{"conv": [(name, shape, count)], "linear": [...], "groupnorm": [...]} of one forward of the
    config's model at its batch and input size, on the meta device (no memory, no compute)."""
    import torch

    model, image, batch = _build(config, smoke)
    model = model.to("meta")
    seen: dict = {"conv": {}, "linear": {}, "groupnorm": {}}
    hooks = []

    def add(kind, name, shape):
        entry = seen[kind].setdefault(shape, [name, 0])
        entry[1] += 1

    def conv_hook(mod, inp, out):
        x = inp[0]
        pad = mod.padding if not isinstance(mod.padding, str) else None
        if pad is None:
            raise ValueError(f"string padding {mod.padding!r} of {mod} is not handled by the benchmark")
        add("conv", names[mod], ConvShape(B=x.shape[0], C_in=x.shape[1], H=x.shape[2], W=x.shape[3],
                                          C_out=out.shape[1], H_out=out.shape[2], W_out=out.shape[3],
                                          k=tuple(mod.kernel_size), stride=tuple(mod.stride), padding=tuple(pad),
                                          dilation=tuple(mod.dilation), groups=mod.groups))

    def linear_hook(mod, inp, out):
        x = inp[0]
        T = 1 if x.dim() == 2 else int(torch.tensor(x.shape[1:-1]).prod())
        add("linear", names[mod], LinearShape(B=x.shape[0], T=T, D=x.shape[-1], P=out.shape[-1]))

    def gn_hook(mod, inp, out):
        x = inp[0]
        add("groupnorm", names[mod], GroupNormShape(B=x.shape[0], C=x.shape[1], H=x.shape[2], W=x.shape[3],
                                                    groups=mod.num_groups))

    names = {m: n for n, m in model.named_modules()}
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, torch.nn.GroupNorm):
            hooks.append(m.register_forward_hook(gn_hook))
    with torch.no_grad():
        model(torch.empty(batch, 3, image, image, device="meta"))
    for h in hooks:
        h.remove()
    return {k: [(name, shape, count) for shape, (name, count) in v.items()] for k, v in seen.items()}


def param_count(config: str, smoke: bool = False) -> int:
    model, _, _ = _build(config, smoke)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    for config in MODEL_CONFIGS:
        shapes = layer_shapes(config)
        print(f"== {config}: {param_count(config)} parameters")
        for kind, rows in shapes.items():
            for name, shape, count in rows:
                print(f"  {kind:<10} {name:<28} x{count:<3} {asdict(shape)}")


if __name__ == "__main__":
    main()
