"""Transformers through the torch DPEngine: DPMultiheadAttention (vs nn.MultiheadAttention), the
converter on nn.TransformerEncoderLayer / DecoderLayer / nn.Transformer, nn.RMSNorm, and the
small transformer of dpprims.models.

References are independent of the code under test: the ORIGINAL torch modules (stock
nn.MultiheadAttention, F.rms_norm) in a float64 per-example autograd loop, with gradients mapped to
the DP module's parameter names (in_proj_weight -> q/k/v_proj), and Opacus' per-sample gradients.
"""
import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _paths import plain_torch_path

from dpprims.torch import DPEngine, DPMultiheadAttention, convert_multihead_attention

F64 = torch.float64


def _rel(got, want, floor=1e-30):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(floor)) if want.numel() else 0.0


def _assert_rel(got, want, tol, what, floor=1e-30):
    """max |got - want| <= tol * max(max |want|, floor); ``floor`` for parameters whose exact
    gradient is 0 (an attention key bias: softmax is shift-invariant) or tiny."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = _rel(got, want, floor)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _perturb(model, scale=0.3):
    """Non-trivial values everywhere (zero biases and unit norm weights hide bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _dp_names(model):
    """{DP parameter name: f(grads of the original model) -> that parameter's gradient} for a
    model whose nn.MultiheadAttention modules the converter will replace."""
    out = {}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        pre = prefix + "." if prefix else ""
        if leaf in ("in_proj_weight", "in_proj_bias"):
            kind = "weight" if leaf == "in_proj_weight" else "bias"
            for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{pre}{proj}.{kind}"] = (name, lambda g, j=j: g.chunk(3)[j])
        elif leaf in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            out[f"{pre}{leaf[:6]}.weight"] = (name, lambda g: g)
        elif leaf in ("bias_k", "bias_v"):
            out[f"{pre}{leaf}.weight"] = (name, lambda g: g.reshape(-1, 1))
        else:
            out[name] = (name, lambda g: g)
    return out


def _loop(model, batch_fn, B, C, mask=None):
    """Micro-batch oracle in float64 on the ORIGINAL model: per example, autograd.grad of its
    loss, flat clipping, sum. ``batch_fn(m, i) -> loss of example i``. Returns ({name: clipped
    sum}, norms [B]) with original parameter names."""
    m64 = copy.deepcopy(model).double()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros_like(p) for n, p in named}
    norms = []
    for i in range(B):
        gs = torch.autograd.grad(batch_fn(m64, i), [p for _, p in named], allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)]
        n = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        norms.append(n)
        c = 0.0 if (mask is not None and not mask[i]) else min(1.0, C / (float(n) + 1e-6))
        for (name, _), g in zip(named, gs):
            sums[name] += c * g
    return sums, torch.stack(norms)


def _check_against_original(original, converted, loss_fn, B, C, tol, mask=None):
    """Engine on ``converted`` (fp32) vs the float64 loop on ``original``; same weights."""
    names = _dp_names(original)
    want, want_norms = _loop(original, lambda m, i: loss_fn(m, slice(i, i + 1), torch.float64).sum(), B, C, mask)
    engine = DPEngine(converted, C)
    norms = engine.backward(loss_fn(converted, slice(0, B), torch.float32), mask=mask)
    _assert_rel(norms, want_norms, tol, "norms")
    scale = max(float(g.abs().max()) for g in want.values())  # the whole clipped sum's size
    # floor: a parameter whose exact gradient cancels (attention's key bias: softmax ignores a
    # shift of the scores, so each example's key-bias gradient is 0) carries only fp32 roundoff;
    # allow it 4 fp32 ulps of the sum's size, and 1e-3 of it at least (the BLAS of the machine
    # sets the roundoff: 2.6e-8 * scale on an AMD EPYC host where 1e-3 alone allowed 2e-8)
    floor = max(1e-3, 4 * 2.0 ** -24 / tol) * scale
    for name, p in converted.named_parameters():
        if p.requires_grad:
            src, f = names[name]
            _assert_rel(p.grad, f(want[src]), tol, name, floor=floor)
    return engine


# --------------------------------------------------------------------------------------------
# DPMultiheadAttention computes nn.MultiheadAttention's function
# --------------------------------------------------------------------------------------------
B_, L_, S_, E_, H_ = 3, 5, 7, 12, 3
_MASKS = ["none", "bool2d", "float3d", "kpm-bool", "kpm-float+float2d", "causal"]
_CASES = [  # (batch_first, kdim/vdim, bias, add_bias_kv, add_zero_attn)
    (True, None, True, False, False), (False, None, True, False, False), (True, (5, 9), False, False, False),
    (False, (5, 9), True, True, True), (True, None, True, True, False), (True, None, False, False, True),
]


def _masks(kind, B, L, S, H, dtype):
    am = kpm = None
    if kind == "bool2d":
        am = torch.rand(L, S) < 0.3
        am[:, 0] = False
    elif kind == "float3d":
        am = torch.randn(B * H, L, S, dtype=dtype)
    elif kind == "kpm-bool":
        kpm = torch.rand(B, S) < 0.4
        kpm[:, 0] = False
    elif kind == "kpm-float+float2d":
        kpm = torch.randn(B, S, dtype=dtype)
        am = torch.randn(L, S, dtype=dtype)
    elif kind == "causal":
        am = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    return am, kpm


@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)],
                         ids=["sdpa", "weights-avg", "weights-per-head"])
@pytest.mark.parametrize("case", _CASES, ids=["bf", "seqfirst", "kv-nobias", "seqfirst-kv-biaskv-zero",
                                              "biaskv", "nobias-zero"])
def test_dp_attention_equals_torch(case, need_weights, average):
    bf, kv, bias, bias_kv, zero = case
    kdim, vdim = kv or (None, None)
    mha = _perturb(nn.MultiheadAttention(E_, H_, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero, kdim=kdim,
                                         vdim=vdim, batch_first=bf).double())
    dp = DPMultiheadAttention.from_torch(mha)
    for kind in _MASKS:
        S = L_ if kind == "causal" else S_
        q = torch.randn(B_, L_, E_, dtype=F64, requires_grad=True)
        k = torch.randn(B_, S, kdim or E_, dtype=F64, requires_grad=True)
        v = torch.randn(B_, S, vdim or E_, dtype=F64, requires_grad=True)
        qkv = (q, k, v) if bf else tuple(t.transpose(0, 1) for t in (q, k, v))
        am, kpm = _masks(kind, B_, L_, S, H_, F64)
        kw = dict(key_padding_mask=kpm, need_weights=need_weights, attn_mask=am,
                  average_attn_weights=average, is_causal=kind == "causal")
        (o1, w1), (o2, w2) = mha(*qkv, **kw), dp(*qkv, **kw)
        assert o1.shape == o2.shape and torch.isfinite(o1).all()
        _assert_rel(o2, o1, 1e-12, f"output [{kind}]")
        if need_weights:
            _assert_rel(w2, w1, 1e-12, f"attention weights [{kind}]")
        else:
            assert w1 is None and w2 is None
        go = torch.randn_like(o1)
        g1 = torch.autograd.grad(o1, (q, k, v), go)
        g2 = torch.autograd.grad(o2, (q, k, v), go)
        for name, a, b in zip("qkv", g2, g1):
            _assert_rel(a, b, 1e-12, f"input gradient d{name} [{kind}]")


def test_dp_attention_unbatched_roundtrip_dropout_and_errors():
    mha = _perturb(nn.MultiheadAttention(E_, H_, dropout=0.25, add_bias_kv=True).double())
    dp = DPMultiheadAttention.from_torch(mha)
    assert dp.training and dp.dropout == 0.25
    x = torch.randn(L_, E_, dtype=F64)  # unbatched
    mha.eval(), dp.eval()
    for nw in (True, False):
        (o1, w1), (o2, w2) = mha(x, x, x, need_weights=nw), dp(x, x, x, need_weights=nw)
        _assert_rel(o2, o1, 1e-12, "unbatched output")
        assert o2.shape == (L_, E_) and (w1 is None) == (w2 is None)
    back = dp.to_torch()
    for (n1, p1), (n2, p2) in zip(mha.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # dropout is applied in training mode only, on the attention weights: outputs vary by seed
    dp.train()
    xb = torch.randn(2, L_, E_, dtype=F64).transpose(0, 1)
    a, b = dp(xb, xb, xb, need_weights=False)[0], dp(xb, xb, xb, need_weights=False)[0]
    assert not torch.allclose(a, b)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        dp(xb, xb, xb, is_causal=True)
    with pytest.raises(ValueError, match="divisible"):
        DPMultiheadAttention(10, 3)


# --------------------------------------------------------------------------------------------
# the converter on torch's transformer modules
# --------------------------------------------------------------------------------------------
def _encoder(norm_first, layers=2, E=16, H=4, dropout=0.0):
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=24, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_converter_encoder_equals_original_incl_fast_path(norm_first):
    torch.manual_seed(0)
    enc = _perturb(_encoder(norm_first), 0.1)
    conv = convert_multihead_attention(copy.deepcopy(enc))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in conv.modules())
    assert sum(isinstance(m, DPMultiheadAttention) for m in conv.modules()) == 2 and not conv.use_nested_tensor
    x = torch.randn(5, 7, 16)
    kpm = torch.zeros(5, 7, dtype=torch.bool)
    kpm[1, 4:] = kpm[3, 2:] = True  # left-aligned padding: the original takes the nested fast path
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    for train in (True, False):
        enc.train(train), conv.train(train)
        for kw in (dict(), dict(src_key_padding_mask=kpm), dict(mask=mask, is_causal=True)):
            with torch.no_grad():  # eval + no_grad: torch's fused encoder (and nested tensors)
                want, got = enc(x, **kw), conv(x, **kw)
            keep = ~kpm if "src_key_padding_mask" in kw else torch.ones(5, 7, dtype=torch.bool)
            _assert_rel(got[keep], want[keep], 2e-5, f"train={train} {sorted(kw)}")
    # dropout (the attention's and the layer's) is carried over; in eval mode it is off in both
    enc_d = _encoder(norm_first, dropout=0.2)
    conv_d = convert_multihead_attention(copy.deepcopy(enc_d))
    assert all(m.self_attn.dropout == 0.2 and m.dropout.p == 0.2 for m in conv_d.layers)
    enc_d.eval(), conv_d.eval()
    _assert_rel(conv_d(x), enc_d(x), 2e-5, "eval mode with dropout 0.2")


def test_converter_transformer_decoder_and_shared_modules():
    torch.manual_seed(0)
    model = _perturb(nn.Transformer(d_model=12, nhead=3, num_encoder_layers=1, num_decoder_layers=2,
                                    dim_feedforward=20, dropout=0.0, batch_first=True), 0.1).eval()
    conv = convert_multihead_attention(copy.deepcopy(model))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in conv.modules())
    src, tgt = torch.randn(3, 6, 12), torch.randn(3, 5, 12)
    tmask = nn.Transformer.generate_square_subsequent_mask(5)
    _assert_rel(conv(src, tgt, tgt_mask=tmask), model(src, tgt, tgt_mask=tmask), 2e-5, "nn.Transformer")
    shared = nn.MultiheadAttention(8, 2, batch_first=True)
    holder = nn.ModuleDict(dict(a=shared, b=shared))
    convert_multihead_attention(holder)
    assert holder["a"] is holder["b"] and isinstance(holder["a"], DPMultiheadAttention)
    assert isinstance(convert_multihead_attention(nn.MultiheadAttention(8, 2)), DPMultiheadAttention)


def test_engine_refuses_attention_and_converter_refuses_seq_first_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, batch_first=True))
    with pytest.raises(ValueError, match=r"convert_multihead_attention\(model\)") as e:
        DPEngine(model, 1.0)
    assert "'1.self_attn'" in str(e.value)
    DPEngine(convert_multihead_attention(model), 1.0)  # accepted once converted
    with pytest.raises(ValueError, match="batch_first=False"):
        convert_multihead_attention(nn.TransformerEncoderLayer(8, 2))
    frozen_in = nn.MultiheadAttention(8, 2)
    frozen_in.in_proj_weight.requires_grad_(False)  # out_proj still trains, functionally: refused
    with pytest.raises(ValueError, match="MultiheadAttention"):
        DPEngine(nn.Sequential(nn.Linear(8, 8), frozen_in), 1.0)


# --------------------------------------------------------------------------------------------
# per-example clipped sums through the engine vs the original modules
# --------------------------------------------------------------------------------------------
class AttnNet(nn.Module):
    """Linear -> self-attention (+ cross-attention on a second input with kdim/vdim) -> head."""

    def __init__(self, E=12, H=3, k=4, bias_kv=True, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(5, E)
        self.attn = nn.MultiheadAttention(E, H, add_bias_kv=bias_kv, add_zero_attn=True, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(E, H, kdim=6, vdim=7, bias=False, batch_first=batch_first)
        self.head = nn.Linear(E, k)

    def forward(self, x, ctx_k, ctx_v, kpm):
        z = torch.tanh(self.inp(x))
        if not self.batch_first:  # the attention layers take [L, B, E]; dims outside stay batch-first
            a = self.attn(z.transpose(0, 1), z.transpose(0, 1), z.transpose(0, 1), key_padding_mask=kpm)[0]
            c = self.cross(a, ctx_k.transpose(0, 1), ctx_v.transpose(0, 1), need_weights=False)[0]
            z = z + c.transpose(0, 1)
        else:
            a = self.attn(z, z, z, key_padding_mask=kpm)[0]
            z = z + self.cross(a, ctx_k, ctx_v, need_weights=False)[0]
        return self.head(z.mean(1))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_engine_attention_matches_loop_on_original(batch_first):
    torch.manual_seed(0)
    B = 6
    original = _perturb(AttnNet(batch_first=batch_first))
    x, ck, cv = torch.randn(B, 5, 5), torch.randn(B, 4, 6), torch.randn(B, 4, 7)
    kpm = torch.rand(B, 5) < 0.3
    kpm[:, 0] = False
    y = torch.randint(0, 4, (B,))
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)  # one padding row

    def loss_fn(m, s, dt):
        return F.cross_entropy(m(x[s].to(dt), ck[s].to(dt), cv[s].to(dt), kpm[s]), y[s], reduction="none")

    converted = convert_multihead_attention(copy.deepcopy(original))
    engine = _check_against_original(original, converted, loss_fn, B, C=0.7, tol=2e-5, mask=mask)
    kinds = {r["layer"]: r for r in engine.plan()}
    assert kinds["attn.bias_k"]["T"] == 1 and kinds["attn.bias_k"]["d"] == 1
    assert kinds["attn.q_proj"]["T"] == 5 and kinds["cross.k_proj"]["d"] == 6


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_engine_encoder_layer_matches_loop_on_original(norm_first):
    torch.manual_seed(1)
    B, T, E = 5, 6, 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, E)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                E, 2, dim_feedforward=12, dropout=0.0, batch_first=True, norm_first=norm_first), 2)
            self.head = nn.Linear(E, 3)

        def forward(self, ids, kpm):
            return self.head(self.enc(self.emb(ids), src_key_padding_mask=kpm)[:, 0])

    original = _perturb(Net(), 0.2)
    ids = torch.randint(0, 9, (B, T))
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[0, 4:] = kpm[2, 3:] = True
    y = torch.randint(0, 3, (B,))

    def loss_fn(m, s, dt):
        return F.cross_entropy(m(ids[s], kpm[s]), y[s], reduction="none")

    converted = convert_multihead_attention(copy.deepcopy(original))
    with plain_torch_path():
        _check_against_original(original, converted, loss_fn, B, C=0.5, tol=2e-5)


def test_attention_norms_match_opacus():
    """Per-example norms and clipped sums against Opacus' DPMultiheadAttention + GradSampleModule
    (loaded with the same weights; Opacus' own layout: qlinear/klinear/vlinear). Opacus 1.6's
    DPMultiheadAttention is only right with batch_first=False (with True it reshapes [B*H, L, hd]
    to [B, L, E] without moving the heads), and its GradSampleModule takes one batch dim for the
    whole model: the twin runs sequence-first throughout, the dpprims model batch-first outside
    the attention."""
    from opacus import GradSampleModule
    from opacus.layers import DPMultiheadAttention as OpacusMHA

    torch.manual_seed(2)
    B, L, E = 6, 5, 12

    class Net(nn.Module):
        def __init__(self, attn, seq_first_outside):
            super().__init__()
            self.seq_first_outside = seq_first_outside
            self.inp = nn.Linear(4, E)
            self.attn = attn  # sequence-first ([L, B, E]) in both
            self.head = nn.Linear(E, 3)

        def forward(self, x, kpm):  # x [B, L, 4]
            if self.seq_first_outside:
                z = torch.tanh(self.inp(x.transpose(0, 1)))
                return self.head(self.attn(z, z, z, key_padding_mask=kpm)[0].mean(0, keepdim=True))[0]
            z = torch.tanh(self.inp(x)).transpose(0, 1)
            return self.head(self.attn(z, z, z, key_padding_mask=kpm)[0].mean(0))

    original = _perturb(Net(nn.MultiheadAttention(E, 3), False))
    op_attn = OpacusMHA(E, 3)
    op_attn.load_state_dict(copy.deepcopy(original.attn.state_dict()))
    twin = Net(op_attn, True)
    twin.inp.load_state_dict(original.inp.state_dict())
    twin.head.load_state_dict(original.head.state_dict())
    x, y = torch.randn(B, L, 4), torch.randint(0, 3, (B,))
    kpm = torch.rand(B, L) < 0.3
    kpm[:, 0] = False
    _assert_rel(twin(x, kpm), original(x, kpm), 1e-5, "opacus twin output")
    gsm = GradSampleModule(twin, loss_reduction="sum", batch_first=False)
    F.cross_entropy(gsm(x, kpm), y, reduction="sum").backward()
    per = {n: p.grad_sample.double() for n, p in gsm._module.named_parameters()}
    op_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    C = 0.8
    c = torch.clamp(C / (op_norms + 1e-6), max=1.0)
    op_sum = {n: torch.einsum("b,b...->...", c, g) for n, g in per.items()}

    model = convert_multihead_attention(original)
    engine = DPEngine(model, C)
    norms = engine.backward(F.cross_entropy(model(x, kpm), y, reduction="none"))
    _assert_rel(norms, op_norms, 1e-5, "norms vs opacus")
    scale = max(float(g.abs().max()) for g in op_sum.values())
    rename = {"q_proj": "qlinear", "k_proj": "klinear", "v_proj": "vlinear"}
    for name, p in model.named_parameters():
        for a, b in rename.items():
            name = name.replace(a, b)
        _assert_rel(p.grad, op_sum[name], 1e-5, f"{name} vs opacus", floor=1e-3 * scale)


# --------------------------------------------------------------------------------------------
# nn.RMSNorm
# --------------------------------------------------------------------------------------------
class RMSNet(nn.Module):
    """RMSNorm over the last dim (called twice: per-example grads add) and over (T, D)."""

    def __init__(self, T=5, D=6, eps=None):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.rms = nn.RMSNorm(D, eps=eps)
        self.rms2 = nn.RMSNorm((T, D), eps=1e-3)
        self.head = nn.Linear(T * D, 3)

    def forward(self, x):
        z = self.rms(torch.tanh(self.lin(x)))
        z = self.rms2(self.rms(z) * 1.5 + x)
        return self.head(z.flatten(1))


def _rms_loss(x, y):
    return lambda m, s, dt: F.cross_entropy(m(x[s].to(dt)), y[s], reduction="none")


@pytest.mark.parametrize("path,eps", [("triton-interpreter", None), ("torch", 1e-4)],
                         ids=["interp-epsNone", "torch-eps1e-4"])
def test_rmsnorm_matches_loop(path, eps):
    torch.manual_seed(3)
    model = _perturb(RMSNet(eps=eps), 0.5)
    x, y = torch.randn(7, 5, 6) * 2, torch.randint(0, 3, (7,))
    want_out = model(x)
    if path == "torch":
        with plain_torch_path():
            engine = _check_against_original(model, copy.deepcopy(model), _rms_loss(x, y), 7, C=0.6, tol=1e-5)
    else:
        engine = _check_against_original(model, copy.deepcopy(model), _rms_loss(x, y), 7, C=0.6, tol=1e-5)
        assert engine.last_stats["backends"]["layernorm_affine_grads"] == "triton-interpreter"
    plan = {r["layer"]: r for r in engine.plan()}
    assert plan["rms"]["kind"] == "rmsnorm" and plan["rms"]["T"] == 2 * 5 and plan["rms2"]["p"] == 30
    # forward through the engine is bit-identical to nn.RMSNorm
    assert torch.equal(engine.model(x), want_out)


def test_rmsnorm_matches_opacus_frozen_and_empty_batch():
    from opacus import GradSampleModule

    torch.manual_seed(4)
    model = _perturb(RMSNet(), 0.5)
    x, y = torch.randn(6, 5, 6), torch.randint(0, 3, (6,))
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    per = {n: p.grad_sample.double() for n, p in gsm._module.named_parameters()}
    op_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per.values()))
    engine = DPEngine(model, 1e9)  # no clipping: the sums are plain sums of per-sample gradients
    norms = engine.backward(F.cross_entropy(model(x), y, reduction="none"))
    _assert_rel(norms, op_norms, 1e-5, "norms vs opacus")
    for name, p in model.named_parameters():
        _assert_rel(p.grad, per[name].sum(0), 1e-5, f"{name} vs opacus")
    engine.detach()
    # frozen RMSNorm weight: not wrapped, no gradient; B = 0 is a step contributing 0
    frozen = RMSNet()
    frozen.rms.weight.requires_grad_(False)
    eng = DPEngine(frozen, 1.0)
    assert "rms" not in {h.name for h in eng.handlers}
    eng.backward(F.cross_entropy(frozen(x), y, reduction="none"))
    assert frozen.rms.weight.grad is None and frozen.rms2.weight.grad is not None
    frozen.zero_grad(set_to_none=True)
    eng.backward(F.cross_entropy(frozen(x[:0]), y[:0], reduction="none"))
    assert torch.count_nonzero(frozen.rms2.weight.grad) == 0


def test_rmsnorm_autocast_bf16_and_bad_shape():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(6, 6), nn.RMSNorm(6), nn.Linear(6, 3))
    x = torch.randn(4, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = m(x)
    DPEngine(m, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)  # bf16 input, fp32 weight: torch.rms_norm's own mixed-dtype path
    assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match=r"RMSNorm\[6\] needs"):
        m[1](torch.randn(6, requires_grad=True))


# --------------------------------------------------------------------------------------------
# the small transformer of dpprims.models
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_small_transformer_matches_loop(norm):
    from dpprims.models import get_model

    torch.manual_seed(6)
    model = _perturb(get_model("transformer", num_classes=4, in_channels=2, input_size=(6, 4), patch=2, dim=8,
                               depth=1, heads=2, norm=norm), 0.1)
    assert model.seq_len == 6 and not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    x, y = torch.rand(5, 2, 6, 4), torch.randint(0, 4, (5,))
    ref = copy.deepcopy(model)
    with plain_torch_path():
        _check_against_original(ref, model, lambda m, s, dt: F.cross_entropy(m(x[s].to(dt)), y[s], reduction="none"),
                                5, C=0.4, tol=2e-5)
    # patches: row-major over the grid, channel-major inside a patch
    t = ref.tokens(x)
    assert t.shape == (5, 6, 8) and torch.equal(t[:, 1], x[:, :, 0:2, 2:4].reshape(5, 8))
    tok = get_model("transformer", num_classes=3, vocab_size=11, max_len=9, dim=8, depth=1, heads=2)
    assert tok(torch.randint(0, 11, (2, 9))).shape == (2, 3)
    with pytest.raises(ValueError, match="input_size"):
        get_model("transformer")


def test_cli_trains_the_transformer(capsys):
    """`dpprims train --model transformer` wires the image size through to the model (a few
    steps on sklearn digits; the measured full run is in the model's docstring / report)."""
    import json

    from dpprims.cli import main

    with plain_torch_path():  # the interpreter would make even 3 steps slow
        assert main(["train", "--model", "transformer", "--data", "digits", "--width", "8", "--epochs", "0.4",
                     "--no-progress", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "transformer" and out["steps"] >= 1 and 0.0 <= out["test_accuracy"] <= 1.0
    assert np.isfinite(out["epsilon"]) and out["epsilon"] > 0
