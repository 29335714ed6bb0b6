"""The inline PTX of the byte-permute NF4 decode, executed by a tiny PTX interpreter on the CPU.

The GEMM's fastest decode is PTX (`prmt` lookups) that the Triton interpreter cannot run; this runs the exact
string the kernel embeds (mov/shr/and/or/prmt on .b32, as PTX defines them) for every byte value.
"""
import re
import struct

from fastft.kernels import nf4_dequant
from fastft.kernels.nf4_codes import NF4_CODE_VALUES

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 default mode: result byte k = byte (c >> 4k) & 7 of {b, a}; selector bit 3 replicates its sign."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = src[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def _run_ptx(asm: str, regs: dict) -> dict:
    regs = dict(regs)
    val = lambda tok: int(tok, 0) if re.match(r"^(0x[0-9a-fA-F]+|\d+)$", tok) else regs[tok]  # noqa: E731
    for stmt in asm.strip().strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *srcs = [a.strip() for a in args.split(",")]
        x = [val(s) for s in srcs]
        if op == "mov.b32":
            regs[dst] = x[0]
        elif op == "shr.b32":
            regs[dst] = (x[0] & MASK) >> x[1]
        elif op == "and.b32":
            regs[dst] = x[0] & x[1]
        elif op == "or.b32":
            regs[dst] = x[0] | x[1]
        elif op == "prmt.b32":
            regs[dst] = _prmt(*x)
        else:
            raise AssertionError(f"unexpected PTX op {op!r}")
    return regs


def _bf16(v: float) -> int:
    b = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def test_prmt_decode_gives_every_nf4_value():
    asm = nf4_dequant._prmt_lookup_asm()
    code = [_bf16(v) for v in NF4_CODE_VALUES]
    for b0 in range(256):  # every byte in every position: 4 bytes = b0, b0+1, b0+37, b0+200 (mod 256)
        data = [b0, (b0 + 1) % 256, (b0 + 37) % 256, (b0 + 200) % 256]
        word = data[0] | data[1] << 8 | data[2] << 16 | data[3] << 24
        r = _run_ptx(asm, {"$4": word})
        halves = lambda w: [w & 0xFFFF, w >> 16]  # noqa: E731 - element order in a register: low half first
        assert halves(r["$0"]) + halves(r["$1"]) == [code[d >> 4] for d in data]
        assert halves(r["$2"]) + halves(r["$3"]) == [code[d & 0xF] for d in data]


def test_the_prmt_self_check_is_not_run_or_remembered_while_a_cuda_graph_is_captured(monkeypatch):
    """Its read-back (.item()) is refused during a capture: it failed there, and the failure was remembered,
    dropping the fastest decode for the process. Now the captured call goes without it and the next call checks."""
    import torch

    from fastft.kernels import nf4_gemm

    monkeypatch.setattr(nf4_gemm, "capturing", lambda: True)
    monkeypatch.setattr(nf4_gemm, "random_nf4_operand", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    monkeypatch.setattr(nf4_gemm, "_PRMT_OK", {})
    assert nf4_gemm._prmt_checked(torch.device("cuda", 0), torch.bfloat16) is False
    assert nf4_gemm._PRMT_OK == {}
    nf4_gemm._PRMT_OK[(torch.device("cuda", 0), torch.bfloat16)] = True  # checked before the capture: kept
    assert nf4_gemm._prmt_checked(torch.device("cuda", 0), torch.bfloat16) is True
