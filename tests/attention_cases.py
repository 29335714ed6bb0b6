"""Shared helpers of the attention tests: random problems and the fp64 ground truth with all gradients."""
from __future__ import annotations

import torch

from fastft.ops.attention import attention_reference


def make_problem(*, batch=2, seqlen_q=37, seqlen_k=None, heads=4, kv_heads=2, head_dim=64, cu=None, prefix=0,
                 prefix_batch=1, dtype=torch.float32, device="cpu", layout="bshd"):
    """Random q/k/v (and prefix) as a dict of flash_attention keyword arguments.

    layout "bhsd": the tensors are transposed views of (B, H, S, D) storage, as transformers passes them.
    cu: packed document lengths' cumulative sums (list); q/k/v are then (T, H, D).
    """
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    g = dict(dtype=dtype, device=device)
    if cu is not None:
        total = cu[-1]
        q, k, v = (torch.randn(total, h, head_dim, **g) for h in (heads, kv_heads, kv_heads))
        n_seq = len(cu) - 1
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    else:
        if layout == "bhsd":
            q = torch.randn(batch, heads, seqlen_q, head_dim, **g).transpose(1, 2)
            k = torch.randn(batch, kv_heads, seqlen_k, head_dim, **g).transpose(1, 2)
            v = torch.randn(batch, kv_heads, seqlen_k, head_dim, **g).transpose(1, 2)
        else:
            q = torch.randn(batch, seqlen_q, heads, head_dim, **g)
            k = torch.randn(batch, seqlen_k, kv_heads, head_dim, **g)
            v = torch.randn(batch, seqlen_k, kv_heads, head_dim, **g)
        n_seq, cu_t = batch, None
    args = dict(q=q, k=k, v=v, cu_seqlens=cu_t)
    if prefix:
        pb = 1 if prefix_batch == 1 else n_seq
        args["prefix_k"] = torch.randn(pb, prefix, kv_heads, head_dim, **g)
        args["prefix_v"] = torch.randn(pb, prefix, kv_heads, head_dim, **g)
    return args


GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def grad_inputs(args):
    return [n for n in GRAD_NAMES if args.get(n) is not None]


def run_with_grads(fn, args, dout, **kw):
    """fn(**args, **kw) and the gradients of <out, dout> for every tensor input (q, k, v, prefix)."""
    args = dict(args)
    names = grad_inputs(args)
    for n in names:
        args[n] = args[n].detach().requires_grad_()
    out = fn(**args, **kw)
    grads = torch.autograd.grad(out, [args[n] for n in names], dout)
    return out, dict(zip(names, grads))


def reference_with_grads(args, dout, **kw):
    """The fp64 ground truth: attention_reference on fp64 copies, gradients by torch autograd."""
    args64 = {n: (t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for n, t in args.items()}
    return run_with_grads(attention_reference, args64, dout.double(), **kw)
