"""Independent fp64 references for the fuzz suite, and the error bound every comparison uses.

The references are written from the math here; none calls fastft's own `*_reference` functions (those
are the ops' torch backends, which the suite tests too). Gradients come from torch autograd on these fp64
functions.

Tolerance rule (decided once, from the arithmetic; never tuned to make a test pass)
-----------------------------------------------------------------------------------
An op's result is a sum of products. For each output element we compute, in fp64, its *magnitude*
`mag`: the same sum with every term replaced by its absolute value (|x|·|W|ᵀ + |b| + |s|·(|x|·|A|ᵀ)·|B|ᵀ
for a linear layer; P·|V| and friends for attention, see `attention_with_magnitudes`). Cancellation cannot
make the error larger than a multiple of `mag`, however small the result itself is. Then

    |out − ref| <= (n_round · u(dtype) + 8 · Σ sqrt(L) · u(fp32)) · mag  +  n_round · s(dtype)

- u(dtype): unit roundoff (2⁻²⁴ fp32, 2⁻¹¹ fp16, 2⁻⁸ bf16). Inputs are exact in their dtype; every
  rounding of an intermediate or of the output to the compute dtype adds at most u·|value| <= u·mag.
  n_round counts those roundings on the longest path of either backend (stated at each call site).
- L: each reduction length on that path (K, N, M, rank, keys), accumulated in fp32. 8·sqrt(L)·u is
  Higham & Mary's probabilistic bound on summation error with λ = 8 (failure odds below 1e-13 per element).
- s(dtype): the spacing of subnormals (2⁻²⁴ for fp16), for roundings into the subnormal range. Ops whose
  fp32 intermediates can underflow (attention's P = exp(s − lse)) add `flush_floor`, far below anything a
  real defect produces (~1e-30 absolute).
A comparison passes when the largest ratio |out − ref| / bound is <= 1; `record` keeps the worst ratio
per (op, dtype) for the report (FASTFT_FUZZ_REPORT=path writes them as JSON at the end of the session).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
LAMBDA = 8.0

# The QLoRA paper's NF4 table (quantiles of N(0, 1) normalised to [-1, 1]), copied from the paper/bitsandbytes.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# (op, dtype name) -> {"examples": n comparisons, "worst": max ratio, "where": what}
STATS: dict = defaultdict(lambda: {"comparisons": 0, "worst": 0.0, "where": ""})
EXAMPLES: dict = defaultdict(int)  # op -> examples run


def bound(mag: torch.Tensor, dtype: torch.dtype, n_round: int, lengths, extra_rel: float = 0.0,
          abs_floor: float = 0.0) -> torch.Tensor:
    """extra_rel: a further relative error an op states at its call site (attention: the softmax's response
    to fp32 score rounding, see `softmax_shift`); abs_floor: a further absolute one (see `flush_floor`)."""
    u, u32 = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float32]
    acc = LAMBDA * u32 * sum(math.sqrt(max(1, int(n))) for n in lengths)
    return (n_round * u + acc + extra_rel) * mag + n_round * SUBNORMAL[dtype] + abs_floor


FP32_MIN_NORMAL = 2.0**-126


def flush_floor(n_terms: int, weight: float) -> float:
    """Absolute error from fp32 intermediates below 2⁻¹²⁶, which GPUs flush to zero (exp2.approx.ftz) and CPU
    BLAS may treat as zero (denormals-are-zero): each of `n_terms` flushed values is off by < 2⁻¹²⁶ and reaches
    the result multiplied by at most `weight` (the largest magnitude it is later multiplied by)."""
    return FP32_MIN_NORMAL * n_terms * weight


def softmax_shift(score_mag: float, head_dim: int) -> float:
    """Relative error of P from fp32 scores: each score s = c·q·k is off by δs <= (8·sqrt(D) + 2)·u32·c·|q|·|k|
    (the dot's accumulation, the scale and log2(e) products, exp2), and P_j = exp(s_j − lse) by up to
    2·max δs relative (δlse is a P-weighted mean of the δs)."""
    return 2.0 * (LAMBDA * math.sqrt(head_dim) + 2.0) * UNIT_ROUNDOFF[torch.float32] * float(score_mag)


def check(op: str, what: str, out, ref: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, n_round: int,
          lengths, extra_rel: float = 0.0, abs_floor: float = 0.0) -> float:
    """Assert |out − ref| <= bound elementwise (see the module docstring); returns and records the worst ratio."""
    assert out is not None, f"{op} {what}: no gradient returned"
    assert tuple(out.shape) == tuple(ref.shape), f"{op} {what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{op} {what}: NaN/Inf in the result"
    if ref.numel() == 0:
        return 0.0
    b = bound(mag.double(), dtype, n_round, lengths, extra_rel, abs_floor)
    err = (out64 - ref.double()).abs()
    ratio = float((err / b).max())
    record(op, dtype, ratio, what)
    if not ratio <= 1.0:
        i = int((err / b).argmax())
        raise AssertionError(f"{op} {what} ({dtype}): error {err.reshape(-1)[i]:.3e} exceeds the bound "
                             f"{b.reshape(-1)[i]:.3e} by {ratio:.2f}x (ref {ref.reshape(-1)[i]:.4e}, "
                             f"out {out64.reshape(-1)[i]:.4e}, mag {mag.reshape(-1)[i]:.3e})")
    return ratio


def record(op: str, dtype: torch.dtype, ratio: float, what: str) -> None:
    s = STATS[(op, str(dtype).replace("torch.", ""))]
    s["comparisons"] += 1
    if ratio > s["worst"]:
        s["worst"], s["where"] = ratio, what


def count_example(op: str) -> None:
    EXAMPLES[op] += 1


# ----------------------------------------------------------------------------------------------
# Linear layers

def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def lora_math(x, W, b, A, B, s, keep=None, p=0.0):
    """y = x·Wᵀ + b + s·((keep∘x)/(1−p))·Aᵀ·Bᵀ, in whatever dtype the inputs are (fp64 here)."""
    y = x @ W.transpose(0, 1)
    if b is not None:
        y = y + b
    if A is not None:
        xin = x if keep is None else x * keep / (1.0 - p)
        y = y + s * ((xin @ A.transpose(0, 1)) @ B.transpose(0, 1))
    return y


def linear_with_grads(x, W, b, A, B, s, dy, *, keep=None, p=0.0, grad_w=True, weight_mag=None):
    """fp64 (y, grads, mags): grads and mags are dicts over x, weight, bias, lora_A, lora_B (those present).

    mags: the same multilinear function at |inputs| (and |dy| for gradients), keep (0/1) and 1/(1−p) unchanged;
    `weight_mag` replaces |W| where W is itself a computed sum (a dequantized NF4 weight).
    """
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    keep64 = None if keep is None else keep.to(torch.float64)

    def run(vals, scaling, dy_):
        vals = {n: (None if t is None else t.clone().requires_grad_(n != "weight" or grad_w)) for n, t in vals.items()}
        y = lora_math(vals["x"], vals["weight"], vals["bias"], vals["lora_A"], vals["lora_B"], scaling, keep64, p)
        leaves = [n for n in names if vals[n] is not None and vals[n].requires_grad]
        grads = torch.autograd.grad(y, [vals[n] for n in leaves], dy_, allow_unused=True)
        return y.detach(), {n: (torch.zeros_like(vals[n]) if g is None else g) for n, g in zip(leaves, grads)}

    vals = dict(zip(names, map(f64, (x, W, b, A, B))))
    y, grads = run(vals, float(s), f64(dy))
    absvals = {n: (None if t is None else t.abs()) for n, t in vals.items()}
    if weight_mag is not None:
        absvals["weight"] = f64(weight_mag)
    ymag, gmags = run(absvals, abs(float(s)), f64(dy).abs())
    return y, grads, ymag, gmags


def nf4_dequantize_f64(qweight) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, W_mag) in fp64 from an NF4Weight's stored fields (bitsandbytes layout: element 2i in the high nibble of
    byte i, absmax per block of `blocksize` elements, optionally itself 8-bit coded: code2[q]·absmax2[block] +
    offset). W_mag = |code|·(|code2[q]·absmax2| + |offset|): the magnitude of the terms the kernels sum in fp32."""
    n = math.prod(qweight.shape)
    packed = qweight.packed.cpu().to(torch.int64)
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]
    values = torch.tensor(NF4_TABLE, dtype=torch.float64)[nibbles]
    if qweight.absmax2 is not None:
        q = qweight.absmax.cpu().to(torch.int64)
        blocks2 = torch.arange(q.numel()) // qweight.nested_blocksize
        prod = qweight.code2.cpu().double()[q] * qweight.absmax2.cpu().double()[blocks2]
        absmax, absmag = prod + float(qweight.offset), prod.abs() + abs(float(qweight.offset))
    else:
        absmax = qweight.absmax.cpu().double()
        absmag = absmax.abs()
    block = torch.arange(n) // qweight.blocksize
    shape = tuple(qweight.shape)
    W, W_mag = (values * absmax[block]).view(shape), (values.abs() * absmag[block]).view(shape)
    return W.to(qweight.device), W_mag.to(qweight.device)


# ----------------------------------------------------------------------------------------------
# Attention

def visible_keys(n_q: int, n_k: int, causal: bool, window) -> torch.Tensor:
    """(n_q, n_k) bool, from the definition: query i sits at position i + (n_k − n_q) (bottom-right aligned);
    key j is visible when j <= pos (causal) and pos − w < j (window w), and without causal also j < pos + w."""
    pos = torch.arange(n_q, dtype=torch.int64)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, dtype=torch.int64)[None, :]
    ok = torch.ones(n_q, n_k, dtype=torch.bool)
    if causal:
        ok &= j <= pos
    if window is not None:
        ok &= j > pos - int(window)  # python ints: no overflow for any window
        if not causal:
            ok &= j < pos + int(window)
    return ok


def _attend(q, k, v, pk, pv, causal, scale, window, do):
    """One sequence: q (n_q, H, D), k/v (n_k, KV, D), prefix (P, KV, D) or None, do like q. fp64 throughout.
    Returns o, grads {q, k, v, prefix_k, prefix_v}, mags of the same."""
    n_q, H, D = q.shape
    n_k, KV = k.shape[0], k.shape[1]
    g = H // KV
    mask = visible_keys(n_q, n_k, causal, window).to(q.device)
    if pk is not None:
        mask = torch.cat([torch.ones(n_q, pk.shape[0], dtype=torch.bool, device=q.device), mask], dim=1)
        k, v = torch.cat([pk, k]), torch.cat([pv, v])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    kh, vh = kk.repeat_interleave(g, dim=1), vv.repeat_interleave(g, dim=1)  # (keys, H, D)
    s = torch.einsum("qhd,khd->hqk", qq, kh) * scale
    s = s.masked_fill(~mask, float("-inf"))
    seen = mask.any(1)[None, :, None]
    p = torch.where(seen, torch.softmax(torch.where(seen, s, 0.0), -1), 0.0)  # rows that see nothing: 0
    o = torch.einsum("hqk,khd->qhd", p, vh)
    dq, dk, dv = torch.autograd.grad(o, leaves, do)
    p = p.detach()
    # magnitudes: O = P·V;  dV = Pᵀ·dO;  dS = P∘(dP − δ), dP = dO·Vᵀ, δ = rowsum(dO∘O);  dQ = c·dS·K, dK = c·dSᵀ·Q
    qa, kha, vha, doa = q.abs(), kh.detach().abs(), vh.detach().abs(), do.abs()
    mo = torch.einsum("hqk,khd->qhd", p, vha)
    dp_abs = torch.einsum("qhd,khd->hqk", doa, vha)
    ds_abs = p * (dp_abs + (p * dp_abs).sum(-1, keepdim=True))
    mdq = scale * torch.einsum("hqk,khd->qhd", ds_abs, kha)
    mdk = (scale * torch.einsum("hqk,qhd->khd", ds_abs, qa)).unflatten(1, (KV, g)).sum(2)
    mdv = torch.einsum("hqk,qhd->khd", p, doa).unflatten(1, (KV, g)).sum(2)
    # scores: fp32 dot over D; their error shifts P by up to 2·max|δs| relative (covered via `score_mag`)
    score_mag = (scale * torch.einsum("qhd,khd->hqk", qa, kha)).masked_fill(~mask, 0.0)
    score_mag = score_mag.amax(-1) if score_mag.shape[-1] else score_mag.new_zeros(score_mag.shape[:-1])  # (H, n_q)
    P = 0 if pk is None else pk.shape[0]
    grads = dict(q=dq, k=dk[P:], v=dv[P:], prefix_k=dk[:P] if P else None, prefix_v=dv[:P] if P else None)
    mags = dict(q=mdq, k=mdk[P:], v=mdv[P:], prefix_k=mdk[:P] if P else None, prefix_v=mdv[:P] if P else None)
    return o.detach(), mo, grads, mags, score_mag


def attention_with_grads(q, k, v, do, *, causal=False, scale=None, cu_seqlens=None, prefix_k=None, prefix_v=None,
                         window=None):
    """fp64 (o, o_mag, grads, mags, score_mag) for flash_attention's arguments (dense or packed).

    score_mag: max over visible keys of scale·|q|·|k| per (query row), shaped like o without head_dim; the
    softmax's sensitivity to fp32 score rounding scales with it (see `attention_bound_terms`)."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else float(scale)
    q, k, v, do, pk, pv = map(f64, (q, k, v, do, prefix_k, prefix_v))
    if cu_seqlens is None:
        seqs = [(q[b], k[b], v[b], do[b], b) for b in range(q.shape[0])]
    else:
        cu = cu_seqlens.tolist()
        seqs = [(q[a:e], k[a:e], v[a:e], do[a:e], i) for i, (a, e) in enumerate(zip(cu[:-1], cu[1:]))]
    outs, omags, smags = [], [], []
    grads = {n: [] for n in ("q", "k", "v")}
    mags = {n: [] for n in ("q", "k", "v")}
    pgrads = {"prefix_k": None, "prefix_v": None}
    pmags = {"prefix_k": None, "prefix_v": None}
    for qs, ks, vs, dos, i in seqs:
        pki = pvi = None
        if pk is not None:
            j = 0 if pk.shape[0] == 1 else i
            pki, pvi = pk[j], pv[j]
        o, mo, g, m, sm = _attend(qs, ks, vs, pki, pvi, causal, scale, window, dos)
        outs.append(o), omags.append(mo), smags.append(sm.transpose(0, 1))
        for n in ("q", "k", "v"):
            grads[n].append(g[n]), mags[n].append(m[n])
        if pk is not None:
            for n in ("prefix_k", "prefix_v"):
                if pgrads[n] is None:
                    pgrads[n] = torch.zeros_like(pk if n == "prefix_k" else pv)
                    pmags[n] = torch.zeros_like(pgrads[n])
                pgrads[n][j] += g[n]
                pmags[n][j] += m[n]
    join = (lambda xs: torch.stack(xs)) if cu_seqlens is None else (lambda xs: torch.cat(xs))
    grads = {n: join(grads[n]) for n in grads} | pgrads
    mags = {n: join(mags[n]) for n in mags} | pmags
    return join(outs), join(omags), grads, mags, join(smags)


# Roundings to the compute dtype (see the module docstring): forward P cast for P·V, the output, and the fp32
# division by the row sum counted alike: 3. Backward: the saved O entering δ = rowsum(dO∘O), dS and P cast for the
# dots, the gradient itself: 4. The torch backend (fp32 math, one cast) rounds fewer.
ATTENTION_O_ROUND, ATTENTION_GRAD_ROUND = 3, 4


def check_attention(op: str, what: str, out, grads: dict, inputs: dict, do, kw: dict) -> None:
    """Checks flash_attention's output and the gradients in `grads` (names as in inputs: q, k, v, prefix_k,
    prefix_v) against the fp64 reference of `inputs` (flash_attention's tensors) called with kw (causal,
    softmax_scale, window, cu_seqlens), each element within the magnitude bound: near-cancelling gradients (a row
    seeing one key: dS = P·(dP − δ) is rounding noise around an exact 0) are bounded by their terms' size, not by
    the tensor's norm."""
    q, k = inputs["q"], inputs["k"]
    o64, omag, g64, gmag, score_mag = attention_with_grads(
        q, k, inputs["v"], do, causal=kw.get("causal", False), scale=kw.get("softmax_scale"),
        cu_seqlens=kw.get("cu_seqlens"), prefix_k=inputs.get("prefix_k"), prefix_v=inputs.get("prefix_v"),
        window=kw.get("window"))
    D, group = q.shape[-1], q.shape[-2] // k.shape[-2]
    P = inputs["prefix_k"].shape[1] if inputs.get("prefix_k") is not None else 0
    n_q, n_k = q.shape[-3], k.shape[-3]  # tokens per sequence (all packed tokens when varlen: an upper bound)
    shift = softmax_shift(score_mag.max().item() if score_mag.numel() else 0.0, D)
    dtype = q.dtype
    # P underflowing fp32 (tiny probabilities flushed to 0): o off by < 2⁻¹²⁶ per key times max|v|; a flushed
    # P or dS reaches dk/dq times scale·max|q| or |k| and (1 + |dP| + |δ|) <= 1 + 2·D·max|dO|·max|v|.
    c = kw.get("softmax_scale") or D**-0.5
    big = {n: float(t.detach().abs().max()) if t.numel() else 0.0 for n, t in inputs.items() if t is not None}
    big_do = float(do.abs().max()) if do.numel() else 0.0
    big_v = max(big["v"], big.get("prefix_v", 0.0))
    ds_weight = 1.0 + 2.0 * D * big_do * big_v
    weights = {"q": c * max(big["k"], big.get("prefix_k", 0.0)) * ds_weight, "k": c * big["q"] * ds_weight,
               "v": big_do, "prefix_k": c * big["q"] * ds_weight, "prefix_v": big_do}
    if out is not None:
        check(op, f"{what} o", out, o64, omag, dtype, ATTENTION_O_ROUND, (D, n_k + P), shift,
              flush_floor(n_k + P, big_v))
    for name, g in grads.items():
        rows = q.numel() // (D * q.shape[-2]) if name.startswith("prefix") else n_q  # a shared prefix: every row
        lengths = (D, n_k + P) if name == "q" else (D, rows * group)
        check(op, f"{what} d{name}", g, g64[name], gmag[name], dtype, ATTENTION_GRAD_ROUND, lengths, shift,
              flush_floor(max(lengths), weights[name]))


# ----------------------------------------------------------------------------------------------
# Layer ops: RMSNorm, RoPE, gated linear units (elementwise / row-wise; grads by autograd on fp64)

def rms_norm_with_grads(h, w, eps, offset, dy, dh=None):
    """fp64 (y, dh_total, dw, mags) of y = (offset + w)·h/sqrt(mean(h²) + eps) for rows h (M, N) (the residual sum
    is formed by the caller); dh_total = ∂/∂h of <y, dy> (+ dh, the gradient arriving at the h output).
    mags: y: (|w| + |offset|)·|ĥ|; dh: r·((|w|+|o|)|dy| + |ĥ|·mean(|ĥ|(|w|+|o|)|dy|)) + |dh|; dw: Σ_rows |dy||ĥ|."""
    h, w, dy = f64(h).clone().requires_grad_(), f64(w).clone().requires_grad_(), f64(dy)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = (offset + w) * (h * r)
    gh, gw = torch.autograd.grad(y, [h, w], dy)
    if dh is not None:
        gh = gh + f64(dh)
    r, hh = r.detach(), (h * r).detach().abs()
    wa = w.detach().abs() + abs(offset)
    mag_y = wa * hh
    mag_dh = r * (wa * dy.abs() + hh * (hh * wa * dy.abs()).mean(-1, keepdim=True))
    if dh is not None:
        mag_dh = mag_dh + f64(dh).abs()
    return y.detach(), gh, gw, {"y": mag_y, "x": mag_dh, "weight": (dy.abs() * hh).sum(0)}


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def rope_with_grads(q, cos, sin, do):
    """fp64 (o, dq, o_mag, dq_mag) of o = q·cos + rotate_half(q)·sin, cos/sin already broadcast to q's shape."""
    q, c, s, do = f64(q).clone().requires_grad_(), f64(cos), f64(sin), f64(do)
    o = q * c + rotate_half(q) * s
    (dq,) = torch.autograd.grad(o, [q], do)
    qa, ca, sa, da = q.detach().abs(), c.abs(), s.abs(), do.abs()
    o_mag = qa * ca + rotate_half(qa).abs() * sa
    dq_mag = da * ca + rotate_half(da * sa).abs()  # the transpose of rotate_half moves |do·sin| the other way
    return o.detach(), dq, o_mag, dq_mag


GELU_K, GELU_C = math.sqrt(2.0 / math.pi), 0.044715


def glu_with_grads(gate, up, dy, gelu: bool):
    """fp64 (y, d_gate, d_up, mags) of act(gate)·up, act = silu or gelu_tanh.
    mags: the activation and its derivative with every term of their formulas at its absolute value
    (silu' = σ(1 + g(1 − σ)) → σ(1 + |g|(1 − σ)); gelu: ½|g|(1 + |t|), ½(1 + |t|) + ½|g|(1 − t²)|u'|)."""
    g, u, dy = f64(gate).clone().requires_grad_(), f64(up).clone().requires_grad_(), f64(dy)
    if gelu:
        a = 0.5 * g * (1.0 + torch.tanh(GELU_K * (g + GELU_C * g**3)))
    else:
        a = g * torch.sigmoid(g)
    y = a * u
    dg, du = torch.autograd.grad(y, [g, u], dy)
    g, u, a = g.detach(), u.detach(), a.detach()
    if gelu:
        t = torch.tanh(GELU_K * (g + GELU_C * g**3))
        a_mag = 0.5 * g.abs() * (1.0 + t.abs())
        da_mag = 0.5 * (1.0 + t.abs()) + 0.5 * g.abs() * (1.0 - t * t) * GELU_K * (1.0 + 3 * GELU_C * g * g)
    else:
        sg = torch.sigmoid(g)
        a_mag = a.abs()
        da_mag = sg * (1.0 + g.abs() * (1.0 - sg))
    mags = {"y": a_mag * u.abs(), "gate": dy.abs() * u.abs() * da_mag, "up": dy.abs() * a_mag}
    return y.detach(), dg, du, mags


# ----------------------------------------------------------------------------------------------
# Fused linear losses (cross-entropy, KL, sequence log-probs): row losses of logits z = h·Wᵀ + b.
#
# The bound follows the logits' error through the loss by the mean value theorem. Each logit the op makes is
# off by at most e = (n·u + λ·sqrt(H)·u32)·(|h|·|W|ᵀ + |b|) (`logit_error`). Along the segment between the
# exact and the computed logits, softmax probabilities change by a factor within exp(±2Δ), Δ = max_j e_j of
# the row, so with ρ = expm1(2Δ + 2·r) (r: the row's own fp32 arithmetic, below) a row loss with gradient
# p − (target) is off by <= (1 + ρ)·Σ p·e + Σ |target|·e, and its gradient p − target by <= ρ·p elementwise.
# fp32 row arithmetic (exp, log, the length-V sums): r = (8 + λ·sqrt(V))·u32·(1 + max|z| + |lse|) absolute.

def logit_error(h, W, b, dtype, n_round: int, scale: float = 1.0):
    """(z, e): fp64 logits of (T, H) rows times `scale`, and the bound on the op's error in each."""
    h, W, b = f64(h), f64(W), f64(b)
    z = h @ W.t() + (0 if b is None else b)
    mz = h.abs() @ W.abs().t() + (0 if b is None else b.abs())
    e = (n_round * UNIT_ROUNDOFF[dtype] + LAMBDA * UNIT_ROUNDOFF[torch.float32] * math.sqrt(max(1, h.shape[-1])))
    return z * scale, (e * mz + n_round * SUBNORMAL[dtype]) * abs(scale)


def _row_fp32(z, lse):
    V = z.shape[-1]
    r32 = (8.0 + LAMBDA * math.sqrt(max(1, V))) * UNIT_ROUNDOFF[torch.float32]
    return r32, r32 * (1.0 + z.abs().amax(-1) + lse.abs())


def ce_rows(z, e, labels, ignore_index, label_smoothing=0.0, softcap=None):
    """Per row of exact logits z (T, V) with error bounds e: (loss, dloss/dz, loss_err, dz_mag, dz_err).
    loss = lse(z̃) − (1−ε)·z̃_y − ε/V·Σ z̃ with z̃ = c·tanh(z/c) (softcap c; 1-Lipschitz, so e bounds z̃ too);
    rows whose label is ignore_index are 0 with 0 gradient."""
    T, V = z.shape
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)
    zt = z if softcap is None else softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(zt, -1) if V else z.new_zeros(T)
    p = torch.softmax(zt, -1)
    eps = float(label_smoothing)
    target = (1 - eps) * torch.nn.functional.one_hot(y, V).double() + eps / V
    loss = (lse - (target * zt).sum(-1)).where(valid, 0.0)
    dsc = 1.0 if softcap is None else 1.0 - (zt / softcap) ** 2
    dz = ((p - target) * dsc).where(valid[:, None], 0.0)
    r32, row_abs = _row_fp32(zt, lse)
    rho = torch.expm1(2 * e.amax(-1) + 2 * row_abs)[:, None]
    loss_err = ((1 + rho[:, 0]) * (p * e).sum(-1) + (target * e).sum(-1) + row_abs).where(valid, 0.0)
    dz_mag = (p + target).where(valid[:, None], 0.0)
    # the softcap factor 1 − tanh² moves by at most (4/(3√3))/c per unit of logit error
    cap = 0.0 if softcap is None else (4 / (3 * math.sqrt(3))) / softcap * e
    dz_err = (rho * p + cap * dz_mag + r32 * dz_mag).where(valid[:, None], 0.0)
    return loss, dz, loss_err, dz_mag, dz_err


def kl_rows(zs, es, zt, et, reverse: bool):
    """Per row of student / teacher logits (already /τ) with error bounds: (kl, dkl/dzs, kl_err, dz_mag, dz_err).
    forward: KL(p_t‖p_s), gradient p_s − p_t; reverse: KL(p_s‖p_t), gradient p_s∘(d − Σp_s·d), d = log p_s −
    log p_t. The teacher term of the forward's error: ∂KL/∂z_t = p_t∘(d_t − Σ p_t·d_t) with d_t = −d, bounded
    by (1 + ρ_t)·p_t·(|d| + max|d| + 4Δ) along the segment (and symmetrically for reverse)."""
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = ls.exp(), lt.exp()
    Ds, Dt = es.amax(-1, keepdim=True), et.amax(-1, keepdim=True)
    r32, abs_s = _row_fp32(zs, torch.logsumexp(zs, -1))
    _, abs_t = _row_fp32(zt, torch.logsumexp(zt, -1))
    row_abs = (abs_s + abs_t)[:, None]
    rho_s, rho_t = torch.expm1(2 * Ds + 2 * row_abs), torch.expm1(2 * Dt + 2 * row_abs)
    if not reverse:
        d = lt - ls
        kl = (pt * d).sum(-1)
        dz = ps - pt
        dmax = d.abs().amax(-1, keepdim=True)
        err = ((1 + rho_s) * ps * es + pt * es).sum(-1) + ((1 + rho_t) * pt * (d.abs() + dmax + 4 * Dt) * et).sum(-1)
        dz_mag = ps + pt
        dz_err = rho_s * ps + rho_t * pt + r32 * dz_mag
    else:
        d = ls - lt
        kl = (ps * d).sum(-1)
        dbar = (ps * d).sum(-1, keepdim=True)
        dz = ps * (d - dbar)
        dmax = d.abs().amax(-1, keepdim=True)
        err = ((1 + rho_s) * ps * (d.abs() + dmax + 4 * Ds) * es).sum(-1) + ((1 + rho_t) * pt * et + ps * et).sum(-1)
        pabs = (ps * d.abs()).sum(-1, keepdim=True)
        dz_mag = ps * (d.abs() + pabs)
        dz_err = rho_s * ps * (d - dbar).abs() + (1 + rho_s) * ps * (4 * (Ds + Dt) + rho_s * pabs) + r32 * dz_mag
    err = err * (1 + rho_s[:, 0]) * (1 + rho_t[:, 0]) + row_abs[:, 0] * (1 + dmax[:, 0])  # cross terms; fp32 log ratios
    return kl, dz, err, dz_mag, dz_err


def head_grads(h, W, w_rows, dz, dz_mag, dz_err):
    """Gradients of Σ_t w_t·loss_t through z = h·Wᵀ + b, given dloss/dz per row: {x, weight, bias} each as
    (exact, magnitude, absolute error inherited from dz_err)."""
    h, W, w = f64(h), f64(W), f64(w_rows)[:, None]
    G, Gm, Ge = w * dz, w.abs() * dz_mag, w.abs() * dz_err
    return {"x": (G @ W, Gm @ W.abs(), Ge @ W.abs()),
            "weight": (G.t() @ h, Gm.t() @ h.abs(), Ge.t() @ h.abs()),
            "bias": (G.sum(0), Gm.sum(0), Ge.sum(0))}


# ----------------------------------------------------------------------------------------------
# PEFT method ops: DoRA, IA3, bottleneck adapters

def grads_and_mags(fn, values: dict, dy, abs_values: dict | None = None):
    """fp64 (y, grads, y_mag, grad_mags) of y = fn(**values) for a function multilinear in the tensors that need
    a gradient (None-valued and non-tensor entries pass through): the magnitudes are the same function at
    |values| (or `abs_values`) with |dy|, so every summed term counts with its absolute value."""
    def run(vals, dy_):
        vals = {n: (t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t) for n, t in vals.items()}
        y = fn(**vals)
        names = [n for n, t in vals.items() if isinstance(t, torch.Tensor)]
        gs = torch.autograd.grad(y, [vals[n] for n in names], dy_, allow_unused=True)
        return y.detach(), {n: (torch.zeros_like(vals[n]) if g is None else g) for n, g in zip(names, gs)}

    vals = {n: (f64(t) if isinstance(t, torch.Tensor) else t) for n, t in values.items()}
    y, grads = run(vals, f64(dy))
    if abs_values is None:
        abs_values = {n: (t.abs() if isinstance(t, torch.Tensor) else (abs(t) if isinstance(t, float) else t))
                      for n, t in vals.items()}
    ymag, gmags = run(abs_values, f64(dy).abs())
    return y, grads, ymag, gmags


def dora_math(x, weight, bias, lora_A, lora_B, magnitude, scaling, row_norm, keep=None, p=0.0, mode="value"):
    """y = (m / ‖W + s·B·A‖_row)·(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b, the row norm a constant (detached, as DoRA does).
    With dropout (keep, 0/1, and p), peft's form: y = x·Wᵀ + b + (σ − 1)·(x_d·Wᵀ) + σ·s·(x_d·Aᵀ)·Bᵀ, x_d = keep∘x/(1−p).
    mode "mag" (called with |values|): |σ − 1| bounded by σ + 1, so every term counts with its absolute value;
    "sigma": only the terms σ multiplies, σ·z_d (called with |values| and m scaled by σ's relative error)."""
    sigma = magnitude / row_norm
    xd = x if keep is None else x * keep / (1.0 - p)
    zd = xd @ weight.t() + scaling * ((xd @ lora_A.t()) @ lora_B.t())
    if keep is None or mode == "sigma":
        y = sigma * zd
    else:
        base = (sigma + 1 if mode == "mag" else sigma - 1) * (xd @ weight.t())
        y = x @ weight.t() + base + sigma * scaling * ((xd @ lora_A.t()) @ lora_B.t())
    return y if bias is None else y + bias


def dora_row_norm_error(W, A, B, s, dtype, *, weight_mag=None):
    """(‖W + s·B·A‖_row exact, relative error bound of the op's σ = m/‖·‖). The op sums W'² = (W + s·B·A)² directly
    in fp32: A and B rounded to the compute dtype (the Triton path; the torch path keeps fp32), B·A an fp32 sum of
    r products, s·(B·A) and the add one rounding each — so each W'_nk is off by at most c·M_nk, M = |W| + |s|·|B|·|A|
    — then squares summed over K in fp32. With Cauchy–Schwarz, ‖W'‖² is off by 2c·‖W'‖·‖M‖ + c²‖M‖² + the sum's
    rounding; ‖·‖ at most keeps that relative error ρ, and σ = m/‖·‖ turns it into ρ(1 + 2ρ) (ρ ≤ ½) + a division.
    weight_mag: W is a dequantized NF4 weight (fp64 value of its fields): |W| is replaced by this magnitude, and the
    op's rounding of W to the compute dtype (one rounding and three fp32 ones in the dequantization) joins c."""
    W, A, B = f64(W), f64(A), f64(B)
    Wp = W + s * (B @ A)
    sq = (Wp * Wp).sum(1)
    W_abs = W.abs() if weight_mag is None else f64(weight_mag)
    M2 = ((W_abs + abs(s) * (B.abs() @ A.abs())) ** 2).sum(1)
    u32 = UNIT_ROUNDOFF[torch.float32]
    K, r = W.shape[1], A.shape[0]
    c = 2 * UNIT_ROUNDOFF[dtype] + LAMBDA * u32 * math.sqrt(max(r, 1)) + 2 * u32
    if weight_mag is not None:
        c += UNIT_ROUNDOFF[dtype] + 3 * u32
    ratio = M2 / sq  # inf where W' is exactly 0: no bound then
    rho = 2 * c * ratio.sqrt() + c * c * ratio + (LAMBDA * math.sqrt(max(K, 1)) + 4) * u32
    return sq.sqrt(), rho * (1 + 2 * rho) + 2 * u32


ACT_LIPSCHITZ = 1.13  # max |act'| over relu, tanh, silu (1.0998) and gelu_tanh (1.129)
ACT_CURVATURE = 1.0  # max |act''| over tanh (0.77), silu (0.5) and gelu_tanh (0.80); relu's is a jump at 0


def _act(name, p):
    if name == "relu":
        return torch.relu(p)
    if name == "tanh":
        return torch.tanh(p)
    if name == "silu":
        return p * torch.sigmoid(p)
    return 0.5 * p * (1.0 + torch.tanh(GELU_K * (p + GELU_C * p**3)))


def bottleneck_with_grads(h, D, bd, U, bu, activation, dy, pre_rel: float):
    """fp64 y = h + act(h·Dᵀ + b_d)·Uᵀ + b_u, its gradients, and for each (magnitude, absolute extra).

    The pre-activation p is off by <= pre_rel·mag_p (mag_p = |h|·|D|ᵀ + |b_d|, pre_rel = n·u + λ·sqrt(N)·u32 from
    the caller); act is ACT_LIPSCHITZ-Lipschitz, so z = act(p) counts with magnitude |z| + L·mag_p, and act'(p)
    with |act'| + ACT_CURVATURE·mag_p (smooth) — for relu, act' may flip wherever |p| <= pre_rel·mag_p, an
    absolute error of |dz| there, carried as the `extra` of the gradients downstream."""
    shape = tuple(h.shape)
    h, dy = h.reshape(-1, shape[-1]), dy.reshape(-1, shape[-1])
    vals = dict(h=h, D=D, bd=bd, U=U, bu=bu)
    v = {n: (None if t is None else f64(t).clone().requires_grad_()) for n, t in vals.items()}
    p = v["h"] @ v["D"].t() + (0 if v["bd"] is None else v["bd"])
    z = _act(activation, p)
    y = v["h"] + z @ v["U"].t() + (0 if v["bu"] is None else v["bu"])
    names = [n for n in vals if v[n] is not None]
    gs = dict(zip(names, torch.autograd.grad(y, [v[n] for n in names], f64(dy))))
    hA, DA, UA, dyA = (f64(t).abs() for t in (h, D, U, dy))
    p, z = p.detach(), z.detach()
    mag_p = hA @ DA.t() + (0 if bd is None else f64(bd).abs())
    zmag = z.abs() + ACT_LIPSCHITZ * mag_p
    pp = p.clone().requires_grad_()
    (da,) = torch.autograd.grad(_act(activation, pp).sum(), [pp])
    dzmag = dyA @ UA
    if activation == "relu":
        damag = da.abs()
        dp_extra = dzmag * (p.abs() <= pre_rel * mag_p).double()
    else:
        damag = da.abs() + ACT_CURVATURE * mag_p
        dp_extra = torch.zeros_like(p)
    dpmag = dzmag * damag
    zero = lambda t: torch.zeros_like(t)  # noqa: E731
    mags = {"h": (dyA + dpmag @ DA, dp_extra @ DA), "D": (dpmag.t() @ hA, dp_extra.t() @ hA),
            "bd": (dpmag.sum(0), dp_extra.sum(0)), "U": (dyA.t() @ zmag, zero(UA)), "bu": (dyA.sum(0), 0.0)}
    ymag = hA + zmag @ UA.t() + (0 if bu is None else f64(bu).abs())
    gs["h"] = gs["h"].view(shape)
    mags["h"] = tuple(t.view(shape) for t in mags["h"])
    return y.detach().view(shape), gs, ymag.view(shape), mags


# ----------------------------------------------------------------------------------------------
# lm_head modules (dense / NF4 weight, bias, LoRA adapters) and DPO, for the fused losses

def _adapter_terms(h, keep, p, adapters):
    """[(h_d·Aᵀ, A, B, s)] with h_d = keep∘h/(1−p), the LoRA input after inverted dropout."""
    hd = h if keep is None else h * keep / (1.0 - p)
    return hd, [(hd @ A.t(), A, B, s) for A, B, s in adapters]


def head_logits(h, W, b, adapters=(), keep=None, p=0.0, W_mag=None):
    """fp64 (z, z_mag) of z = h·Wᵀ + b + Σ_a s_a·(h_d·A_aᵀ)·B_aᵀ for rows h (T, H); adapters [(A, B, s)];
    z_mag: the same with every factor at its absolute value (W_mag for a dequantized weight)."""
    h, W, b, keep = f64(h), f64(W), f64(b), f64(keep)
    Wm = W.abs() if W_mag is None else f64(W_mag)
    ads = [(f64(A), f64(B), float(s)) for A, B, s in adapters]
    _, terms = _adapter_terms(h, keep, p, ads)
    _, mterms = _adapter_terms(h.abs(), keep, p, [(A.abs(), B.abs(), abs(s)) for A, B, s in ads])
    z, zm = h @ W.t(), h.abs() @ Wm.t()
    if b is not None:
        z, zm = z + b, zm + b.abs()
    for (hA, _, B, s), (hAm, _, Bm, sm) in zip(terms, mterms):
        z, zm = z + s * hA @ B.t(), zm + sm * hAm @ Bm.t()
    return z, zm


def head_grads_lora(h, W, G, Gm, Ge, adapters=(), keep=None, p=0.0, W_mag=None):
    """Gradients of Σ G∘z through `head_logits`' z, given G = d(total)/dz (T, V) with its magnitude Gm and error
    bound Ge: {x, weight, bias, lora_A<a>, lora_B<a>} each (exact, magnitude, absolute error from Ge):
    dh = G·W + Σ s·((G·B)·A)∘keep/(1−p), dW = Gᵀ·h, db = Σ_t G, dA = s·(G·B)ᵀ·h_d, dB = s·Gᵀ·(h_d·Aᵀ)."""
    h, W, keep = f64(h), f64(W), f64(keep)
    Wm = W.abs() if W_mag is None else f64(W_mag)
    ads = [(f64(A), f64(B), float(s)) for A, B, s in adapters]

    def grads(G, h, W, ads):
        hd, terms = _adapter_terms(h, keep, p, ads)
        out = {"x": G @ W, "weight": G.t() @ h, "bias": G.sum(0)}
        for i, (hA, A, B, s) in enumerate(terms):
            GB = G @ B
            drop = (GB @ A) if keep is None else (GB @ A) * keep / (1.0 - p)
            out["x"] = out["x"] + s * drop
            out[f"lora_A{i}"], out[f"lora_B{i}"] = s * GB.t() @ hd, s * G.t() @ hA
        return out

    absads = [(A.abs(), B.abs(), abs(s)) for A, B, s in ads]
    exact = grads(f64(G), h, W, ads)
    mag, err = grads(f64(Gm), h.abs(), Wm, absads), grads(f64(Ge), h.abs(), Wm, absads)
    return {n: (exact[n], mag[n], err[n]) for n in exact}


def dpo_terms(rows_c, err_c, rows_r, err_r, ref_c, ref_r, beta: float):
    """DPO from per-token losses (B, S) of chosen / rejected (0 at ignored tokens) with their error bounds (the
    op sums fp32 token losses): π = −Σ_s loss, reward = β·(π − ref), Δ = reward_c − reward_r,
    loss = −mean_b log σ(Δ). Returns a dict of fp64 values with their error bounds ("*_err") and
    w = d loss/d ref_c = −d loss/d π_c = β·σ(−Δ)/B with its bound "w_err" (the op's σ(−Δ) from its own Δ:
    σ is ¼-Lipschitz; fp32 logsigmoid backward, mean, β products: 8·u32 relative)."""
    u32 = UNIT_ROUNDOFF[torch.float32]
    ref_c, ref_r = f64(ref_c), f64(ref_r)
    Bn = rows_c.shape[0]
    out = {}
    for side, rows, err, ref in (("c", rows_c, err_c, ref_c), ("r", rows_r, err_r, ref_r)):
        S = rows.shape[1]
        pi = -rows.sum(-1)
        pi_err = err.sum(-1) + LAMBDA * math.sqrt(max(1, S)) * u32 * rows.abs().sum(-1)
        out[f"reward_{side}"] = beta * (pi - ref)
        out[f"reward_{side}_err"] = abs(beta) * (pi_err + 3 * u32 * (pi.abs() + ref.abs()))
    delta = out["reward_c"] - out["reward_r"]
    delta_err = out["reward_c_err"] + out["reward_r_err"] + u32 * (out["reward_c"].abs() + out["reward_r"].abs())
    logsig = torch.nn.functional.logsigmoid(delta)
    out["loss"] = -logsig.mean()
    out["loss_mag"] = logsig.abs().mean()
    out["loss_err"] = (delta_err + 4 * u32 * (delta.abs() + 1)).mean() \
        + (LAMBDA * math.sqrt(max(1, Bn)) + 1) * u32 * out["loss_mag"]
    sig = torch.sigmoid(-delta)
    out["w"] = beta * sig / Bn
    out["w_err"] = abs(beta) / Bn * (delta_err / 4 + 8 * u32 * sig)
    return out
