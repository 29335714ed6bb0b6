"""Compile the NF4 and loss-row Triton kernels (default), the LoRA/DoRA/IA3 ones (argument `lora`; `lora-fold [all]`
only the folded LoRA GEMM; `lora-split` the split path's rank kernels with every config; `lora-wide` only the
int64-offset variants), the layer kernels (`layers`) or the attention forward/backward (`attention`) for sm_90 on a
machine without a GPU (triton's own ptxas), as `python -m`.

Catches what the CPU interpreter cannot: triton's GPU lowering, the inline PTX, register spills and shared
memory of every launch config the tuner may pick, that the GEMM-bound kernels use Hopper's warpgroup MMA and that
a warp-specialized config really is.
Prints one line per kernel; exits 1 on any failure.
Run without TRITON_INTERPRET (tests/test_nf4_sm90_compile.py starts it in a subprocess).
"""
import itertools
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

from fastft.kernels import (bottleneck_adapter, column_dot, cross_entropy, dora_row_norm, lora_gemm, nf4_dequant,
                            nf4_gemm, rank_ops)

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def build(fn, signature, constexprs, aligned, options):
    """Compile `fn` for sm_90 as a launch with such arguments compiles it. Triton's JIT (runtime/jit.py,
    native_specialize_impl, 3.6 and 3.7 alike) makes every int argument equal to 1 a constexpr and gives ints divisible
    by 16 and 16-byte aligned pointers tt.divisibility 16: `signature` spells an argument the launches pass as 1 (the
    unit strides of the ops' row-major operands, tests/launch_specializations.py) as 1; every pointer and the ints in
    `aligned` (model widths, their strides) get the divisibility."""
    constexprs = {**{k: 1 for k, v in signature.items() if v == 1}, **constexprs}
    divisible = [n for n, v in signature.items() if n not in constexprs and (n in aligned or str(v).startswith("*"))]
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    return triton_compile(src, target=TARGET, options=options)


def resource_usage(kernel) -> dict:
    """The cubin's resource usage, as cuobjdump prints it: {"STACK": bytes a thread spills, "REG": registers a
    thread}, the largest over the cubin's functions (0 where absent)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    words = [w for line in out.splitlines() for w in line.split()]
    return {field: max([int(w.split(":")[1]) for w in words if w.startswith(field + ":")] or [0])
            for field in ("STACK", "REG")}


def tensor_core_ops(ptx: str) -> str:
    """The tensor-core instruction the kernel uses: wgmma (Hopper's warpgroup MMA, HGMMA in the SASS), mma.sync (HMMA,
    about half the rate on sm_90) or none. Read from the PTX, which ptxas lowers one to one (and which is free: the
    SASS dump costs ~0.4 s a kernel)."""
    return next((op for op in ("wgmma", "mma.sync") if op in ptx), "none")


def warp_specialized(ptx: str) -> bool:
    """Whether the kernel was split into producer and consumer warpgroups: they rebalance registers with
    setmaxnreg (USETMAXREG in the SASS)."""
    return "setmaxnreg" in ptx


# The GEMM-bound kernels: their dots must lower to wgmma on sm_90 (a layout or tile change that falls back to
# mma.sync halves their peak and nothing on the CPU would show it). The skinny rank-R reductions and row kernels
# are bandwidth-bound (R flops a byte) and may use mma.sync.
WGMMA_KERNELS = {"_lora_gemm_kernel", "_nf4_lora_gemm_kernel", "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                 "_attn_bwd_dq_kernel"}


# Spills a variant outside attention (KNOWN_ATTENTION_SPILLS) may have, bytes a thread on sm_90, keyed by (triton
# major.minor, the start of its printed name): ceilings, printed as KNOWN. Both are a tuner's alternatives, not the
# untimed default, and appeared once the check compiled as launched (2026-12-05); no twin config is clean in every
# variant under both tritons (8 B come and go with a warp or a stage), and nothing is timed on a GPU yet.
KNOWN_SPILLS: dict = {
    # the fp16 adapter's dz: 2 local stores before the MMA loop, 1 load after it (none inside)
    ("3.6", "rank_project fp16 -> fp32 (adapter dz) {'BLOCK_M': 16, 'BLOCK_K': 256} warps=4 stages=4"): 8,
    # the fold path's dA + dB: 4 local loads/stores in each step of the dA loop (the bf16 32x128 4-warp tile)
    ("3.7", "rank_reduce_pair R=16 dropout=False {'BLOCK_M': 32, 'BLOCK_N': 128} warps=4 stages=4"): 8,
}
VERSION = ".".join(triton.__version__.split(".")[:2])


def _check(what, kernel_fn, sig, consts, aligned, options, *, spill_limit: int | None = 0) -> int:
    """Compile one variant and print its shared memory and spills; 1 on failure (compile error, shared memory over
    the limit, or more spill bytes than `spill_limit` — None: spills are reported, not failed — or KNOWN_SPILLS'
    ceiling), else 0."""
    known = next((b for (v, name), b in KNOWN_SPILLS.items() if v == VERSION and what.startswith(name)), None)
    if known is not None and spill_limit is not None:
        print(f"KNOWN {what}: may spill up to {known} B (KNOWN_SPILLS)")
        spill_limit = max(spill_limit, known)
    try:
        k = build(kernel_fn, sig, consts, aligned, options)
    except Exception as err:  # noqa: BLE001 - report every failure, then fail
        print(f"FAILED {what}: {err}\n{err.__cause__!r}")
        return 1
    ptx = k.asm["ptx"]
    usage, smem, mma = resource_usage(k), k.metadata.shared, tensor_core_ops(ptx)
    stack = usage["STACK"]
    print(f"ok {what} smem={smem} stack={stack} regs={usage['REG']} mma={mma}"
          + (" warp-specialized" if warp_specialized(ptx) else ""))
    if smem > SMEM_LIMIT or (spill_limit is not None and stack > spill_limit):
        print(f"FAILED {what}: shared memory {smem} (limit {SMEM_LIMIT}) or register spills {stack} B")
        return 1
    if kernel_fn.fn.__name__ in WGMMA_KERNELS and mma != "wgmma":
        print(f"FAILED {what}: its dots lower to {mma}, not warpgroup MMA (wgmma)")
        return 1
    if consts.get("WARP_SPECIALIZE") and not warp_specialized(ptx):  # e.g. 8 warps: the flag is silently ignored
        print(f"FAILED {what}: WARP_SPECIALIZE=True compiled to a kernel that is not warp-specialized")
        return 1
    if consts.get("DQ_REDUCE") and "cp.reduce.async.bulk.tensor" not in ptx:
        print(f"FAILED {what}: DQ_REDUCE=True compiled without a TMA reduce-add (per-element atomics spill at D=128)")
        return 1
    return 0


def split_config(cfg: dict, drop=("PER_SM", "SPLIT_K"), **options) -> tuple[dict, dict]:
    """(constexprs, compile options) of a tuner config: its num_warps/num_stages (3 where absent) become options (on
    top of `options`), the host-only keys in `drop` go, the rest are constexprs."""
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    return cfg, dict(options, num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages", 3))


def _check_configs(what, kernel_fn, sig, configs, consts, aligned, *, drop=("PER_SM", "SPLIT_K"), options=None,
                   spill_limit: int | None = 0) -> int:
    """_check every launch config of a tuner list (split_config: a config's num_warps/num_stages become compile
    options, with `options`; the host-only keys in `drop` go; the rest are constexprs on top of `consts`)."""
    failures = 0
    for cfg in configs:
        cfg, options = split_config(cfg, drop, **(options or {}))
        failures += _check(f"{what} {cfg} warps={options['num_warps']} stages={options['num_stages']}", kernel_fn,
                           sig, {**consts, **cfg}, aligned, options, spill_limit=spill_limit)
    return failures


# Signatures as the ops launch the kernels (tests/launch_specializations.py records it): operands are row-major
# (ops.shared.as_rows, contiguous weights and rank factors), so each has a unit stride (1: a constexpr at launch),
# and the model widths and the other strides are multiples of 16 (`*_ALIGNED`; token counts, seeds and grid sizes
# are not). A non-unit stride (a strided weight view handed to an op) compiles another kernel, not checked here.
LORA_GEMM_SIG = dict(a_ptr="*bf16", b_ptr="*bf16", l_ptr="*bf16", t_ptr="*bf16", bias_ptr="*bf16", c_ptr="*bf16",
                     col_scale_ptr="*fp32", k_scale_ptr="*fp32", p_ptr="*bf16", M="i32", N="i32", K="i32",
                     stride_am="i32", stride_ak=1, stride_bn="i32", stride_bk="i32", stride_lm="i32",
                     stride_tn="i32", stride_tr="i32", stride_cm="i32", stride_pk="i32", stride_pr="i32",
                     p_drop="fp32", seed="i32", num_programs="i32", fold_scale="fp32")
LORA_GEMM_ALIGNED = ["N", "K", "stride_am", "stride_bn", "stride_bk", "stride_lm", "stride_tn", "stride_tr",
                     "stride_cm", "stride_pk", "stride_pr"]


def _lora_gemm_sig(b_nk: bool) -> dict:
    """W, the rank factors and p are row-major: unit along K in the forward (B_NK: W [N,K], B [N,R], A [R,K]),
    along N in dx (W [K,N], A [R,N] and B [K,R] there: the launcher swaps their strides)."""
    return dict(LORA_GEMM_SIG, **dict.fromkeys(("stride_bk", "stride_tr", "stride_pk") if b_nk else
                                               ("stride_bn", "stride_tn", "stride_pr"), 1))


# rank_project: x·Aᵀ (forward) reads A [R,K] (unit K stride), dy·B reads B.t() (unit R stride): PROJECT_W_UNIT
PROJECT_SIG = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", M="i32", K="i32", k_per_split="i32",
                   stride_xm="i32", stride_xk=1, stride_wr="i32", stride_wk="i32", stride_os="i32",
                   stride_om="i32", scale="fp32", p_drop="fp32", seed="i32")
PROJECT_W_UNIT = {"x·Aᵀ": "stride_wk", "dy·B": "stride_wr"}
PROJECT_ALIGNED = ["K", "k_per_split", "stride_xm", "stride_wr", "stride_wk", "stride_os", "stride_om"]
REDUCE_SIG = dict(l_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32", M="i32", N="i32", rows_per_split="i32",
                  stride_lm="i32", stride_ym="i32", stride_yn=1, p_drop="fp32", seed="i32")
REDUCE_ALIGNED = ["N", "rows_per_split", "stride_lm", "stride_ym"]
# the pair reduction (dA + dB in one launch): ya = x, yb = dy with unit column strides
PAIR_SIG = dict(la_ptr="*bf16", ya_ptr="*bf16", parta_ptr="*fp32", lb_ptr="*bf16", yb_ptr="*bf16", partb_ptr="*fp32",
                M="i32", NA="i32", NB="i32", tiles_a="i32", rows_per_split="i32", stride_lam="i32", stride_yam="i32",
                stride_yan=1, stride_lbm="i32", stride_ybm="i32", stride_ybn=1, p_drop="fp32", seed="i32")
PAIR_ALIGNED = ["NA", "NB", "rows_per_split", "stride_lam", "stride_yam", "stride_lbm", "stride_ybm"]
DEQUANT_SIG = dict(packed_ptr="*u8", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32", code_ptr="*fp32",
                   out_ptr="*bf16", numel="i32", nbytes="i32", offset="fp32")
DEQUANT_ALIGNED = ["packed_ptr", "absmax_ptr", "out_ptr", "numel", "nbytes"]
COLUMN_DOT_SIG = dict(a_ptr="*bf16", b_ptr="*bf16", part_ptr="*fp32", M="i32", N="i32", rows_per_split="i32",
                      stride_am="i32", stride_an=1, stride_bm="i32", stride_bn=1)
COLUMN_DOT_ALIGNED = ["N", "rows_per_split", "stride_am", "stride_bm"]
DOWN_ACT_SIG = dict(h_ptr="*bf16", d_ptr="*bf16", bias_ptr="*fp32", z_ptr="*bf16", p_ptr="*bf16", M="i32", N="i32",
                    stride_hm="i32", stride_hn=1, stride_dr="i32", stride_dn=1)
DOWN_ACT_ALIGNED = ["N", "stride_hm", "stride_dr"]
# up_residual: the forward's t is U [N,R] (unit R stride), the backward's dh = dy + dp·D reads D.t() (unit N stride)
UP_RESIDUAL_SIG = dict(res_ptr="*bf16", l_ptr="*bf16", t_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16", M="i32",
                       N="i32", stride_rm="i32", stride_rn=1, stride_lm="i32", stride_tn="i32", stride_tr="i32",
                       stride_om="i32")
UP_RESIDUAL_T_UNIT = {"forward": "stride_tr", "dh": "stride_tn"}
UP_RESIDUAL_ALIGNED = ["N", "stride_rm", "stride_lm", "stride_tn", "stride_tr", "stride_om"]


def runtime_strides(sig: dict, *names: str) -> dict:
    """sig with `names` back to runtime i32: the WIDE launches of the any-strides launchers, which only a column
    stride other than 1 takes (runtime.wide_columns)."""
    return dict(sig, **dict.fromkeys(names, "i32"))


def _lora_gemm_consts(**flags) -> dict:
    """The dense LoRA GEMM's constexprs: bf16 on sm_90, no bias/tail/scales/dropout/fold unless `flags` say so."""
    return dict(dict(HAS_BIAS=False, TAIL_DROPOUT=False, B_NK=True, HAS_TAIL=True, HAS_COL_SCALE=False,
                     HAS_K_SCALE=False, FOLD=False, USE_TMA=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=16,
                     WIDE=False), **flags)


def _check_lora_gemm(what, configs, *, spill_limit: int | None = 0, odd_widths: bool = False, **flags) -> int:
    """_check_configs of _lora_gemm_kernel with _lora_gemm_consts(**flags), launched as the ops launch it; odd_widths:
    at K and N not multiples of 16 (only the R-sized strides keep the divisibility: lo's rows, B's in the forward)."""
    consts = _lora_gemm_consts(**flags)
    aligned = (["stride_lm"] + (["stride_tn"] if consts["B_NK"] else [])) if odd_widths else LORA_GEMM_ALIGNED
    return _check_configs(what, lora_gemm._lora_gemm_kernel, _lora_gemm_sig(consts["B_NK"]), configs, consts,
                          aligned, spill_limit=spill_limit)


def lora_fold(every_config: bool = False) -> int:
    """The folded LoRA GEMM (x·Aᵀ / dy·B computed in the GEMM's own K loop), bf16, R = 16 and 64: forward and dx
    with descriptors, the pointer-load variant at R = 64 (the most registers), dx with a dropout tail, and the
    pair reduction for dA + dB; the first config of each list (the untimed default). every_config (argument
    `lora-fold all`, ~3 min): every config the tuner may pick, descriptors and pointer loads. No spills, shared
    memory within the limit."""
    failures = 0
    top = (lambda configs: configs) if every_config else (lambda configs: configs[:1])  # the untimed default
    max_rank = lora_gemm.FOLD_MAX_RANK
    for rank, b_nk, use_tma in itertools.product((16, max_rank), (True, False), (True, False)):
        if use_tma or every_config or rank == max_rank:
            failures += _check_lora_gemm(f"lora_gemm FOLD R={rank} b_nk={b_nk} dropout=False tma={use_tma}",
                                         top(lora_gemm.gemm_configs(use_tma, 2, rank)), HAS_BIAS=b_nk, B_NK=b_nk,
                                         FOLD=True, USE_TMA=use_tma, BLOCK_R=rank)
    for rank, (use_tma, aligned) in itertools.product((16, max_rank), ((True, True), (False, True), (False, False))):
        if use_tma or every_config:
            failures += _check_lora_gemm(f"lora_gemm FOLD R={rank} b_nk=False dropout=True tma={use_tma}"
                                         + ("" if aligned else " odd widths"),
                                         top(lora_gemm.dropout_dx_configs(use_tma, 2, rank, aligned)),
                                         odd_widths=not aligned, B_NK=False, TAIL_DROPOUT=True, FOLD=True,
                                         USE_TMA=use_tma, BLOCK_R=rank)
    # the fold path's dA + dB in one launch, with and without dropout (ya = x, yb = dy: unit column strides)
    for rank, dropout in itertools.product((16, max_rank), (False, True)):
        failures += _check_configs(f"rank_reduce_pair R={rank} dropout={dropout}", rank_ops._rank_reduce_pair_kernel,
                                   PAIR_SIG, top(rank_ops.pair_reduce_configs(2, dropout)),
                                   dict(DROPOUT=dropout, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=rank,
                                        WIDE=False),  # (WIDE, int64 offsets past 2**31 elements, may spill)
                                   PAIR_ALIGNED)
    return failures


def lora_split(every_config: bool = True) -> int:
    """The split LoRA path's own kernels, bf16, R = 16 and 64, dropout on and off: the rank projection (x·Aᵀ, and
    dy·B without dropout), the split-M reduction (dA, dB) and the dx GEMM with a dropout tail (descriptors and
    pointer loads); every config (argument `lora-split`, ~1 min) or the first of each list (inside `lora`). No
    spills, shared memory within the limit."""
    failures = 0
    top = (lambda configs: configs) if every_config else (lambda configs: configs[:1])
    for rank, dropout in itertools.product((16, 64), (False, True)):
        consts = dict(DROPOUT=dropout, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=rank)
        for product, unit in PROJECT_W_UNIT.items() if not dropout else [("x·Aᵀ", PROJECT_W_UNIT["x·Aᵀ"])]:
            failures += _check_configs(f"rank_project {product} R={rank} dropout={dropout}",
                                       rank_ops._rank_project_kernel, dict(PROJECT_SIG, **{unit: 1}),
                                       top(rank_ops.project_configs(2, dropout)), dict(consts, WIDE=False),
                                       PROJECT_ALIGNED)
        failures += _check_configs(f"rank_reduce R={rank} dropout={dropout}", rank_ops._rank_reduce_kernel, REDUCE_SIG,
                                   top(rank_ops.reduce_configs(2, dropout)), dict(consts, WIDE=False), REDUCE_ALIGNED)
        for use_tma, aligned in ((True, True), (False, True), (False, False)) if dropout else ():
            failures += _check_lora_gemm(f"lora_gemm dx dropout R={rank} tma={use_tma}"
                                         + ("" if aligned else " odd widths"),
                                         top(lora_gemm.gemm_configs(use_tma, 2, dropout=True, rank=rank,
                                                                    aligned=aligned)), odd_widths=not aligned,
                                         B_NK=False, TAIL_DROPOUT=True, USE_TMA=use_tma, BLOCK_R=rank)
    return failures


def wide_variants() -> int:
    """The int64-offset (WIDE) variants, taken only when an operand spans 2**31 elements or more
    (runtime.wide_offsets, wide_columns): the pointer-load LoRA GEMM reading such a weight (forward, dx, folded at
    R = 64, dx with a dropout tail), the split-M rank reductions, and the launchers that take column-strided operands
    (rank projection, column dot, the bottleneck adapter's two kernels: WIDE only with a column stride other than 1,
    compiled as a runtime stride), bf16, the first config of each list. They must compile and fit shared memory;
    spills are reported, not failed (at that scale int32 offsets would be wrong, not slow)."""
    failures = 0
    for name, configs, flags in [
            ("forward", lora_gemm.gemm_configs(False, 2), dict(HAS_BIAS=True)),
            ("dx", lora_gemm.gemm_configs(False, 2), dict(B_NK=False)),
            ("fold forward R=64", lora_gemm.gemm_configs(False, 2, 64), dict(FOLD=True, BLOCK_R=64)),
            ("dx dropout R=64", lora_gemm.gemm_configs(False, 2, 0, True, 64),
             dict(B_NK=False, TAIL_DROPOUT=True, BLOCK_R=64))]:
        failures += _check_lora_gemm(f"lora_gemm WIDE {name} tma=False", configs[:1], USE_TMA=False, WIDE=True,
                                     spill_limit=None, **flags)
    for rank, dropout in itertools.product((16, 64), (False, True)):
        consts = dict(DROPOUT=dropout, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=rank, WIDE=True)
        failures += _check_configs(f"rank_reduce WIDE R={rank} dropout={dropout}", rank_ops._rank_reduce_kernel,
                                   REDUCE_SIG, rank_ops.reduce_configs(2, dropout)[:1], consts, REDUCE_ALIGNED,
                                   spill_limit=None)
        failures += _check_configs(f"rank_project WIDE R={rank} dropout={dropout}", rank_ops._rank_project_kernel,
                                   runtime_strides(PROJECT_SIG, "stride_xk"), rank_ops.project_configs(2, dropout)[:1],
                                   consts, PROJECT_ALIGNED, spill_limit=None)
    failures += _check_configs("column_dot WIDE", column_dot._column_dot_kernel,
                               runtime_strides(COLUMN_DOT_SIG, "stride_an", "stride_bn"), column_dot._configs()[:1],
                               dict(WIDE=True), COLUMN_DOT_ALIGNED, spill_limit=None)
    failures += _check_configs("adapter down_act WIDE", bottleneck_adapter._down_act_kernel,
                               runtime_strides(DOWN_ACT_SIG, "stride_hn"), bottleneck_adapter._down_configs()[:1],
                               dict(ACT="relu", HAS_BIAS=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64,
                                    WIDE=True), DOWN_ACT_ALIGNED, spill_limit=None)
    failures += _check_configs("adapter up_residual WIDE", bottleneck_adapter._up_residual_kernel,
                               runtime_strides(UP_RESIDUAL_SIG, "stride_rn"), bottleneck_adapter._up_configs()[:1],
                               dict(HAS_BIAS=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64, WIDE=True),
                               UP_RESIDUAL_ALIGNED, spill_limit=None)
    return failures


def lora_family() -> int:
    """The dense LoRA GEMM of plain LoRA and with the DoRA/IA3 scales (every variant the methods launch) with the first
    bf16 config of the descriptor list (the DoRA forward with every config) and of the pointer-load list (every GPU
    before sm_90, and sm_90's for unaligned operands), the folded LoRA GEMM (lora_fold), the column-dot reduction,
    DoRA's row norm and the bottleneck adapter's kernels."""
    failures = lora_fold() + lora_split(every_config=False) + wide_variants()
    # (B_NK, HAS_TAIL, HAS_COL_SCALE, HAS_K_SCALE): DoRA fwd / dx, LoRA fwd / dx, IA3 output-scale fwd / dx,
    # input-scale fwd / dx
    variants = [(True, True, True, False), (False, True, False, True), (True, True, False, False),
                (False, True, False, False), (True, False, True, False), (False, False, False, True),
                (True, False, False, True), (False, False, True, False)]
    # descriptors; pointer loads at aligned widths (every GPU before sm_90) and at widths that are not multiples of
    # 16 (sm_90's pointer path; lora_gemm.widths_aligned picks another list there)
    for use_tma, aligned in ((True, True), (False, True), (False, False)):
        configs = lora_gemm.gemm_configs(use_tma, 2, aligned=aligned)
        for i, (b_nk, tail, col, ks) in enumerate(variants):
            failures += _check_lora_gemm(f"lora_gemm b_nk={b_nk} tail={tail} col_scale={col} k_scale={ks} "
                                         f"tma={use_tma}" + ("" if aligned else " odd widths"),
                                         configs if i == 0 and use_tma else configs[:1], odd_widths=not aligned,
                                         HAS_BIAS=True, B_NK=b_nk, HAS_TAIL=tail, HAS_COL_SCALE=col, HAS_K_SCALE=ks,
                                         USE_TMA=use_tma)
    failures += _check_configs("column_dot", column_dot._column_dot_kernel, COLUMN_DOT_SIG, column_dot._configs(),
                               dict(WIDE=False), COLUMN_DOT_ALIGNED)
    # W [N, K] row-major (unit K stride)
    sig = dict(w_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", part_ptr="*fp32", N="i32", K="i32",
               cols_per_split="i32", scaling="fp32", stride_wn="i32", stride_wk=1)
    for R in (16, 128):
        failures += _check_configs(f"dora row_sq_norm R={R}", dora_row_norm._row_sq_norm_kernel, sig,
                                   dora_row_norm._configs(), dict(R=R, UPCAST=False, DOT_PRECISION="tf32"),
                                   ["N", "K", "cols_per_split", "stride_wn"])
    for act, aligned in itertools.product(bottleneck_adapter.ACTIVATIONS, (True, False)):  # hidden size N % 16 or not
        failures += _check_configs(f"adapter down_act {act}" + ("" if aligned else " odd widths"),
                                   bottleneck_adapter._down_act_kernel, DOWN_ACT_SIG,
                                   bottleneck_adapter._down_configs(aligned)[:2],
                                   dict(ACT=act, HAS_BIAS=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64,
                                        WIDE=False), DOWN_ACT_ALIGNED if aligned else [])
    for product, unit in UP_RESIDUAL_T_UNIT.items():
        failures += _check_configs(f"adapter up_residual {product}", bottleneck_adapter._up_residual_kernel,
                                   dict(UP_RESIDUAL_SIG, **{unit: 1}), bottleneck_adapter._up_configs(),
                                   dict(HAS_BIAS=True, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64,
                                        WIDE=False), UP_RESIDUAL_ALIGNED)
    # the fp16 adapter backward's dz = dy·U (U.t(): unit R stride), written in fp32 (no subnormal dz)
    sig = dict(PROJECT_SIG, x_ptr="*fp16", w_ptr="*fp16", out_ptr="*fp32", stride_wr=1)
    failures += _check_configs("rank_project fp16 -> fp32 (adapter dz)", rank_ops._rank_project_kernel, sig,
                               rank_ops.project_configs(2), dict(DROPOUT=False, UPCAST=False,
                                                                 DOT_PRECISION="tf32", BLOCK_R=64, WIDE=False),
                               PROJECT_ALIGNED)
    return failures


def compile_loss_rows() -> int:
    """The cross-entropy / KL row kernels at the GPU launch config, every feature on; no spills allowed."""
    failures = 0
    block, warps = cross_entropy._block_v(128256)
    ce_sig = dict(x_ptr="*bf16", stride_x="i32", labels_ptr="*i64", scale_ptr="*fp32", scale_stride="i32",
                  loss_ptr="*fp32", V="i32", ignore_index="i32", smoothing="fp32", softcap="fp32")
    kl_sig = dict(s_ptr="*bf16", stride_s="i32", t_ptr="*bf16", stride_t="i32", labels_ptr="*i64", scale_ptr="*fp32",
                  scale_stride="i32", loss_ptr="*fp32", V="i32", ignore_index="i32", inv_temp="fp32")
    cases = [("ce", cross_entropy._ce_rows_kernel, ce_sig, dict(HAS_SOFTCAP=cap, HAS_SMOOTHING=cap, COMPUTE_GRAD=True))
             for cap in (False, True)]
    cases += [("kl", cross_entropy._kl_rows_kernel, kl_sig, dict(HAS_LABELS=True, REVERSE=rev, COMPUTE_GRAD=True))
              for rev in (False, True)]
    # the row stride and V (128256) are multiples of 16; scale is one value (stride 0) or one per row (stride 1)
    for (name, fn, sig, consts), scale_stride in itertools.product(cases, (0, 1)):
        failures += _check(f"{name}_rows {consts} BLOCK_V={block} warps={warps} scale_stride={scale_stride}", fn,
                           dict(sig, scale_stride="i32" if scale_stride == 0 else 1), dict(BLOCK_V=block, **consts),
                           ["stride_x", "stride_s", "stride_t", "V", "scale_stride"], dict(num_warps=warps))
    return failures


def _attention_signature(fn, fp32_ptrs=(), i32_ptrs=("cu_ptr",)) -> dict:
    """Signature of an attention kernel from its argument names: *_ptr tensors bf16 (or as listed), the two
    scales fp32, every other runtime argument (strides, sizes, bounds) i32."""
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            continue
        if name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32_ptrs else "*i32" if name in i32_ptrs else "*bf16"
        else:
            sig[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    return sig


# Register spills an attention kernel's main config may have (bytes a thread, sm_90), keyed by (triton
# major.minor, kernel, head_dim): a ceiling, printed as KNOWN on every run. None under triton 3.7 since issue 10:
# the backward at D=128 spilled 640 B (dK/dV) and 88 B (dQ) until its key/row tiles went through descriptors
# (pointer tiles kept their 64-bit row offsets live from load to store) and its dK/dV blocks became 128 keys x 32
# rows over 8 warps. Triton 3.6 (the GPU machine's) spills a little in the varlen dK/dV of those same configs
# (the batch layout does not), all of it outside the MMA loops: in the SASS every local load/store sits before
# the first HGMMA or after the last (prologue offsets, epilogue). Clean under both: 1 stage (no load pipelining)
# or, at D=128, 128 keys x 16 rows; neither is measured against the main config on a GPU yet, so the ceilings stay.
KNOWN_ATTENTION_SPILLS: dict = {("3.6", "bwd dkdv", 64): 8, ("3.6", "bwd dkdv", 128): 40}


def _attention_aligned(sig: dict, varlen: bool, prefix: bool) -> list[str]:
    """The attention arguments a launch passes as multiples of 16 (head_dim 64 or 128): every q/k/v/o/gradient/prefix
    stride (multiples of head_dim; 0 for a varlen batch or a shared prefix), the mask bounds of a causal launch
    without a window (left = UNBOUNDED = 2**30, right = 0), the lse batch stride of varlen (0) and n_prefix without a
    prefix (0). Not the sequence lengths, head counts, GQA group (1 would be a constexpr: MHA) or lse head stride."""
    return [n for n in sig if n.startswith("stride_") and n not in ("stride_lb", "stride_lh")] + [
        "left", "right"] + (["stride_lb"] if varlen else []) + ([] if prefix else ["n_prefix"])


def _unique(configs: list[dict]) -> list[dict]:
    return [c for i, c in enumerate(configs) if c not in configs[:i]]


def attention_kernels(every_config: bool = False) -> int:
    """FlashAttention forward, backward dK/dV and dQ and the delta pre-pass for head_dim 64 and 128, bf16, on sm_90
    with descriptors: the main config of each list (the first: the untimed default and the usual winner) in the
    causal batch layout and varlen with a prefix, must compile, fit shared memory and not spill (beyond
    KNOWN_ATTENTION_SPILLS). every_config (argument `attention all`, ~2 min): also every other config the
    tuner may pick or a GPU run may promote (the candidates), with descriptors and from the pointer-only lists
    (head dims without descriptors), which must compile and fit shared memory (their spills are reported)."""
    from fastft.kernels import attention_bwd, attention_fwd

    failures = 0
    fwd_sig = _attention_signature(attention_fwd._attn_fwd_kernel, fp32_ptrs=("lse_ptr",))
    dkdv_sig = _attention_signature(attention_bwd._attn_bwd_dkdv_kernel, fp32_ptrs=("lse_ptr", "delta_ptr", "dq_ptr"))
    dq_sig = _attention_signature(attention_bwd._attn_bwd_dq_kernel, fp32_ptrs=("lse_ptr", "delta_ptr"))
    delta_sig = _attention_signature(attention_bwd._attn_bwd_delta_kernel, fp32_ptrs=("delta_ptr",))
    jobs = []
    for head_dim in (64, 128):
        common = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, UPCAST=False, DOT_PRECISION="tf32")
        # (VARLEN, prefix): the batch layout for every config; varlen with a prefix for the main one
        # the pointer-only lists after the descriptor ones (`all`): i counts on, so they are never "main"
        fwd_configs = attention_fwd.forward_configs(torch.bfloat16, head_dim, True)
        if every_config:
            fwd_configs = _unique(fwd_configs + attention_fwd.forward_configs(torch.bfloat16, head_dim, False))
        for i, cfg in enumerate(fwd_configs if every_config else fwd_configs[:1]):
            cfg = dict(cfg)
            warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
            for varlen, prefix in ((False, False),) + (((True, True),) if i == 0 else ()):
                jobs.append((f"attention fwd D={head_dim} varlen={varlen} prefix={prefix} {cfg} warps={warps} "
                             f"stages={stages}", attention_fwd._attn_fwd_kernel, fwd_sig,
                             dict(common, VARLEN=varlen, HAS_PREFIX=prefix, **cfg),
                             dict(num_warps=warps, num_stages=stages), i == 0))
        bwd_configs = attention_bwd.backward_configs(torch.bfloat16, head_dim, True)
        if every_config:
            bwd_configs = _unique(attention_bwd.backward_configs(torch.bfloat16, head_dim, True, candidates=True)
                                  + attention_bwd.backward_configs(torch.bfloat16, head_dim, False))
        for i, cfg in enumerate(bwd_configs if every_config else bwd_configs[:1]):
            for varlen, prefix in ((False, False),) + (((True, True),) if i == 0 else ()):
                tag = f"D={head_dim} varlen={varlen} prefix={prefix} {cfg}"
                jobs.append((f"attention bwd dkdv {tag}", attention_bwd._attn_bwd_dkdv_kernel, dkdv_sig,
                             dict(common, VARLEN=varlen, PREFIX=False, ATOMIC_DQ=cfg["ATOMIC_DQ"],
                                  DQ_REDUCE=cfg["DQ_REDUCE"], USE_TMA=cfg["USE_TMA"], BLOCK_M=cfg["BLOCK_M"],
                                  BLOCK_N=cfg["BLOCK_N"]),
                             dict(num_warps=cfg["WARPS"], num_stages=cfg["STAGES"]), i == 0))
                if prefix:  # the prefix keys' own dK/dV launch (no masks, fp32 gradients)
                    jobs.append((f"attention bwd dkdv {tag} prefix-keys", attention_bwd._attn_bwd_dkdv_kernel,
                                 dict(dkdv_sig, dk_ptr="*fp32", dv_ptr="*fp32"),
                                 dict(common, VARLEN=varlen, PREFIX=True, ATOMIC_DQ=cfg["ATOMIC_DQ"],
                                      DQ_REDUCE=cfg["DQ_REDUCE"], USE_TMA=cfg["USE_TMA"], BLOCK_M=cfg["BLOCK_M"],
                                      BLOCK_N=cfg["BLOCK_N"]),
                                 dict(num_warps=cfg["WARPS"], num_stages=cfg["STAGES"]), i == 0))
                if not cfg["ATOMIC_DQ"]:
                    jobs.append((f"attention bwd dq {tag}", attention_bwd._attn_bwd_dq_kernel, dq_sig,
                                 dict(common, VARLEN=varlen, HAS_PREFIX=prefix, USE_TMA=cfg["USE_TMA"],
                                      BLOCK_M=cfg["BLOCK_M2"], BLOCK_N=cfg["BLOCK_N2"]),
                                 dict(num_warps=cfg["DQ_WARPS"], num_stages=cfg["DQ_STAGES"]), i == 0))
        jobs.append((f"attention bwd delta D={head_dim}", attention_bwd._attn_bwd_delta_kernel, delta_sig,
                     dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=64, VARLEN=False),
                     dict(num_warps=4), True))
    for what, fn, sig, consts, options, main_config in jobs:
        kernel, head_dim = " ".join(what.split()[1:3]), consts["HEAD_DIM"]
        allowed = KNOWN_ATTENTION_SPILLS.get((VERSION, kernel, head_dim), 0) if main_config else None
        if allowed:
            print(f"KNOWN {what}: may spill up to {allowed} B (KNOWN_ATTENTION_SPILLS)")
        failures += _check(what + (" (main)" if main_config else ""), fn, sig, consts,
                           _attention_aligned(sig, consts["VARLEN"], "prefix=True" in what), options,
                           spill_limit=allowed)
    return failures


def attention_dq_reduce() -> int:
    """The backward candidates whose dK/dV kernel adds dQ by TMA reduce-adds (attention_bwd DQ_REDUCE), D = 128, in
    the batch layout and varlen with a prefix (and the prefix keys' own launch): each must compile to warpgroup MMA
    and a TMA reduce-add; the 1-stage config must not spill (the 2-stage one's spills, outside the MMA loops, are
    reported). ~15 s: cheap enough for CI, where `attention all` is not."""
    from fastft.kernels import attention_bwd

    failures = 0
    sig = _attention_signature(attention_bwd._attn_bwd_dkdv_kernel, fp32_ptrs=("lse_ptr", "delta_ptr", "dq_ptr"))
    configs = [c for c in attention_bwd.backward_configs(torch.bfloat16, 128, True, candidates=True) if c["DQ_REDUCE"]]
    if not configs:
        print("FAILED attention dq-reduce: no DQ_REDUCE candidate at D=128")
        return 1
    for cfg in configs:
        for varlen, prefix, keys in ((False, False, False), (True, True, False), (True, True, True)):
            consts = dict(HEAD_DIM=128, BLOCK_D=128, UPCAST=False, DOT_PRECISION="tf32", VARLEN=varlen, PREFIX=keys,
                          ATOMIC_DQ=True, DQ_REDUCE=True, USE_TMA=True, BLOCK_M=cfg["BLOCK_M"],
                          BLOCK_N=cfg["BLOCK_N"])
            what = (f"attention bwd dkdv dq-reduce D=128 varlen={varlen} prefix={prefix}{' prefix-keys' if keys else ''}"
                    f" {cfg['BLOCK_N']}x{cfg['BLOCK_M']} warps={cfg['WARPS']} stages={cfg['STAGES']}")
            failures += _check(what, attention_bwd._attn_bwd_dkdv_kernel,
                               dict(sig, dk_ptr="*fp32", dv_ptr="*fp32") if keys else sig, consts,
                               _attention_aligned(sig, varlen, prefix),
                               dict(num_warps=cfg["WARPS"], num_stages=cfg["STAGES"]),
                               spill_limit=0 if cfg["STAGES"] == 1 else None)
    return failures


# An sm_90 SM (H100, H200): what the blocks resident on it share. Each block also holds 1 KB of shared memory for the
# system; registers are allocated a warp at a time, in units of 8 a thread.
SM_SMEM, SM_REGS, SM_THREADS, BLOCK_RESERVED_SMEM = 233472, 65536, 2048, 1024


def _usage(what, kernel_fn, sig, consts, aligned, options) -> dict | None:
    """{smem, regs, threads} of one compiled variant, printed; None (printed FAILED) where it fails to compile or
    spills."""
    try:
        k = build(kernel_fn, sig, consts, aligned, options)
    except Exception as err:  # noqa: BLE001 - report every failure, then fail
        print(f"FAILED {what}: {err}\n{err.__cause__!r}")
        return None
    usage = resource_usage(k)
    out = dict(smem=k.metadata.shared, regs=usage["REG"], threads=32 * options["num_warps"])
    print(f"{'ok' if not usage['STACK'] else 'FAILED'} {what} {out} stack={usage['STACK']}")
    return None if usage["STACK"] else out


def co_resident(*blocks: dict) -> bool:
    """Whether these blocks fit on one sm_90 SM at once."""
    return (sum(b["smem"] + BLOCK_RESERVED_SMEM for b in blocks) <= SM_SMEM
            and sum(-(-b["regs"] // 8) * 8 * b["threads"] for b in blocks) <= SM_REGS
            and sum(b["threads"] for b in blocks) <= SM_THREADS)


def overlap_pairs() -> int:
    """The side streams' kernels beside the GEMMs. FASTFT_LORA_OVERLAP (fastft.ops.overlap): every dx GEMM config that
    leaves room (lora_gemm.gemm_configs with
    leave_room, descriptors, bf16: LoRA's, LoRA's with a dropout tail, DoRA's with its K scale) and a block of each
    reduction that runs beside it (rank_ops.BESIDE_GEMM: the pair and the single reduction, with and without dropout
    as the GEMM has it; DoRA's column dot) fit on one SM together, at padded ranks 16, 32 and 64 (the GEMM compiled
    at 16 and 64; a reduction pairs with it at the next rank up). Without that fit the side stream's blocks wait for
    the GEMM's to leave their SM and nothing overlaps. Then FASTFT_QLORA_PREFETCH's decode (prefetch_pairs)."""
    failures = 0
    gemm_ranks = (16, overlap_max_rank())
    gemms = {}  # (variant, R) -> [usage of each config]
    for (variant, flags), R in itertools.product(
            [("lora", dict(B_NK=False)), ("dropout", dict(B_NK=False, TAIL_DROPOUT=True)),
             ("dora", dict(B_NK=False, HAS_K_SCALE=True))], gemm_ranks):
        configs = lora_gemm.gemm_configs(True, 2, 0, variant == "dropout", R, True, leave_room=True)
        found = []
        for cfg, options in map(split_config, configs):
            found.append(_usage(f"dx GEMM ({variant}) R={R} {cfg} {options}", lora_gemm._lora_gemm_kernel,
                                _lora_gemm_sig(False), dict(_lora_gemm_consts(**flags, BLOCK_R=R), **cfg),
                                LORA_GEMM_ALIGNED, options))
        failures += found.count(None)
        gemms[variant, R] = [u for u in found if u is not None]
    cfg, options = split_config(rank_ops.BESIDE_GEMM)
    col, col_options = split_config(column_dot._configs()[0])  # DoRA's dm, R-free
    col_usage = _usage("column_dot beside the GEMM", column_dot._column_dot_kernel, COLUMN_DOT_SIG,
                       dict(WIDE=False, **col), COLUMN_DOT_ALIGNED, col_options)
    failures += col_usage is None
    for R, dropout in itertools.product((16, 32, 64), (False, True)):
        consts = dict(DROPOUT=dropout, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=R, WIDE=False, **cfg)
        sides = [_usage(f"rank_reduce_pair beside the GEMM R={R} dropout={dropout}", rank_ops._rank_reduce_pair_kernel,
                        PAIR_SIG, consts, PAIR_ALIGNED, options),
                 _usage(f"rank_reduce beside the GEMM R={R} dropout={dropout}", rank_ops._rank_reduce_kernel,
                        REDUCE_SIG, consts, REDUCE_ALIGNED, options)]
        failures += sides.count(None)
        if not dropout:
            sides.append(col_usage)
        gemm_R = min(r for r in gemm_ranks if r >= R)
        for variant in (("dropout",) if dropout else ("lora", "dora")):
            for gemm in gemms[variant, gemm_R]:
                for side in sides:
                    if side is not None and not co_resident(gemm, side):
                        print(f"FAILED beside the {variant} dx GEMM at R={R}: {gemm} and {side} do not fit one SM")
                        failures += 1
    return failures + prefetch_pairs(gemms["lora", 16])


def prefetch_pairs(roomy: list[dict]) -> int:
    """FASTFT_QLORA_PREFETCH (fastft.ops.qlora_prefetch): a block of the NF4 dequantize, each config a prefetch may take
    (nf4_dequant.beside_gemm_configs), fits on one SM beside a block of every LoRA GEMM config the dequant path may run
    (forward and dx, the descriptor list, and the roomy dx configs of the overlap)."""
    failures = 0
    decodes = []
    for cfg in nf4_dequant.beside_gemm_configs():
        cfg, options = split_config(cfg, **nf4_dequant.launch_options())
        decodes.append(_usage(f"nf4 dequantize beside the GEMM {cfg}", nf4_dequant._nf4_dequant_kernel, DEQUANT_SIG,
                              dict(BS=64, NBS=256, NESTED=True, BF16_BY_HAND=False, **cfg), DEQUANT_ALIGNED, options))
    gemms = list(roomy)
    for b_nk in (True, False):
        for cfg, options in map(split_config, lora_gemm.gemm_configs(True, 2)):
            gemms.append(_usage(f"GEMM b_nk={b_nk} {cfg} {options}", lora_gemm._lora_gemm_kernel,
                                _lora_gemm_sig(b_nk), dict(_lora_gemm_consts(B_NK=b_nk), **cfg), LORA_GEMM_ALIGNED,
                                options))
    failures += decodes.count(None) + gemms.count(None)
    for gemm, decode in itertools.product(gemms, decodes):
        if gemm is not None and decode is not None and not co_resident(gemm, decode):
            print(f"FAILED the dequantize beside the GEMM: {gemm} and {decode} do not fit one SM")
            failures += 1
    return failures


def overlap_max_rank() -> int:
    from fastft.ops import overlap
    return overlap.MAX_RANK


def main() -> int:
    if sys.argv[1:] == ["overlap"]:
        return 1 if overlap_pairs() else 0
    if sys.argv[1:] == ["lora"]:
        return 1 if lora_family() else 0
    if sys.argv[1:] == ["lora-wide"]:
        return 1 if wide_variants() else 0
    if sys.argv[1:] == ["lora-split"]:
        return 1 if lora_split() else 0
    if sys.argv[1:2] == ["lora-fold"]:
        return 1 if lora_fold(every_config=sys.argv[2:] == ["all"]) else 0
    if sys.argv[1:2] == ["attention"]:
        return 1 if attention_kernels(every_config=sys.argv[2:] == ["all"]) else 0
    if sys.argv[1:] == ["attention-dq-reduce"]:
        return 1 if attention_dq_reduce() else 0
    failures = compile_loss_rows()
    failures += _check_configs("dequant nested=True", nf4_dequant._nf4_dequant_kernel, DEQUANT_SIG,
                               nf4_dequant._configs() + nf4_dequant.candidate_configs(),
                               dict(BS=64, NBS=256, NESTED=True, BF16_BY_HAND=False), DEQUANT_ALIGNED,
                               options=nf4_dequant.launch_options(), spill_limit=None)
    # the forward never masks its tail (dropout acts on x·Aᵀ there); dx does when the LoRA has dropout. The main
    # configs (PRMT decode) may not spill; the others are tuner options, reported.
    sig = dict(a_ptr="*bf16", w_ptr="*u8", absmax_ptr="*u8", absmax2_ptr="*fp32", code2_ptr="*fp32",
               code_ptr="*fp32", l_ptr="*bf16", t_ptr="*bf16", bias_ptr="*bf16", c_ptr="*bf16", M="i32", N="i32",
               K="i32", WN="i32", WK="i32", stride_am="i32", stride_ak="i32", stride_lm="i32", stride_tn="i32",
               stride_tr="i32", stride_cm="i32", offset="fp32", p_drop="fp32", seed="i32")
    # as launched: a's rows and the rank factor t (B [N,R] forward, A [R,N] dx) have unit strides
    sig["stride_ak"] = 1
    for w_nk, dropout in [(True, False), (False, False), (False, True)]:
        for cfg in nf4_gemm.gemm_configs(2, dropout):
            failures += _check_configs(f"gemm w_nk={w_nk} dropout={dropout}", nf4_gemm._nf4_lora_gemm_kernel,
                                       dict(sig, **{"stride_tr" if w_nk else "stride_tn": 1}),
                                       [cfg], dict(BS=64, NBS=256, NESTED=True, HAS_TAIL=True, HAS_BIAS=False,
                                                   TAIL_DROPOUT=dropout, W_NK=w_nk, USE_TMA=True, UPCAST=False,
                                                   DOT_PRECISION="tf32", BLOCK_R=16, NUM_SMS=132),
                                       ["N", "K", "WN", "WK", "stride_am", "stride_lm", "stride_tn", "stride_tr",
                                        "stride_cm"],
                                       spill_limit=0 if cfg["DECODE"] == nf4_dequant.DECODE_PRMT else None)
    failures += layer_kernels()
    return 1 if failures else 0


def layer_kernels() -> int:
    """RMSNorm (hidden sizes up to 8192), RoPE (head_dim 64/128/256, up to 64 q heads), SwiGLU/GeGLU: bf16, no
    spills allowed."""
    from fastft.kernels import glu, rms_norm, rope

    failures = 0
    jobs = []
    for block_n, residual, cast in itertools.product([1024, 2048, 4096, 8192], [False, True], [False, True]):
        sig = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", h_ptr="*bf16", rstd_ptr="*fp32",
                   N="i32", stride_x="i32", stride_r="i32", stride_y="i32", stride_h="i32", eps="fp32", offset="fp32")
        consts = dict(HAS_RESIDUAL=residual, CAST_INPUT=cast, RTNE_X=False, RTNE_Y=False, BLOCK_N=block_n)
        jobs.append((f"rms_norm fwd N={block_n} residual={residual} cast_input={cast}", rms_norm._rms_norm_fwd_kernel,
                     sig, consts, ["N", "stride_x", "stride_r", "stride_y", "stride_h"], rms_norm._warps(block_n)))
    for block_n, dh in itertools.product([1024, 2048, 4096, 8192], [False, True]):
        sig = dict(dy_ptr="*bf16", h_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32", dh_in_ptr="*bf16", dx_ptr="*bf16",
                   dw_ptr="*fp32", M="i32", N="i32", stride_dy="i32", stride_h="i32", stride_dhi="i32",
                   stride_dx="i32", offset="fp32", rows_per_program="i32")
        consts = dict(HAS_DH=dh, NEED_DW=True, RTNE=False, BLOCK_N=block_n)
        jobs.append((f"rms_norm bwd N={block_n} dh={dh}", rms_norm._rms_norm_bwd_kernel, sig, consts,
                     ["N", "stride_dy", "stride_h", "stride_dhi", "stride_dx"], rms_norm._warps(block_n)))
    for half, hq, inverse in itertools.product([32, 64, 128], [8, 32, 64], [False, True]):
        hk = max(hq // 4, 1)
        names = ["q_ptr", "q_out", "k_ptr", "k_out"]
        sig = {**{n: "*bf16" for n in names}, "cos_ptr": "*bf16", "sin_ptr": "*bf16", "S": "i32", "HQ": "i32",
               "HK": "i32", "HALF": "i32"}
        for prefix in ("q", "qo", "k", "ko"):  # (B, S, H, D) rows: unit column strides, the others multiples of 16
            sig.update({f"{prefix}{d}": "i32" for d in "bsh"}, **{f"{prefix}d": 1})
        sig.update(cb="i32", cs="i32", cd=1)
        consts = dict(INVERSE=inverse, RTNE=False, BLOCK_HQ=hq, BLOCK_HK=hk, BLOCK_HALF=half)
        jobs.append((f"rope head_dim={2 * half} heads={hq}/{hk} inverse={inverse}", rope._rope_kernel, sig, consts,
                     [f"{p}{d}" for p in ("q", "qo", "k", "ko") for d in "bsh"] + ["cb", "cs", "HALF"],
                     rope.launch_warps(hq, hk, half)))
    for gelu, backward in itertools.product([False, True], [False, True]):
        if backward:
            fn = glu._glu_bwd_kernel
            sig = dict(dy_ptr="*bf16", gate_ptr="*bf16", up_ptr="*bf16", dg_ptr="*bf16", du_ptr="*bf16", N="i32",
                       stride_dy="i32", stride_g="i32", stride_u="i32", stride_dg="i32", stride_du="i32")
        else:
            fn = glu._glu_fwd_kernel
            sig = dict(gate_ptr="*bf16", up_ptr="*bf16", y_ptr="*bf16", N="i32", stride_g="i32", stride_u="i32",
                       stride_y="i32")
        jobs.append((f"glu gelu={gelu} backward={backward}", fn, sig, dict(GELU=gelu, RTNE=False, BLOCK=1024),
                     ["N"] + [n for n in sig if n.startswith("stride_")], 4))
    for what, fn, sig, consts, aligned, warps in jobs:
        failures += _check(f"{what} warps={warps}", fn, sig, consts, aligned, dict(num_warps=warps))
    return failures


if __name__ == "__main__":
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}", flush=True)
    sys.exit((1 if layer_kernels() else 0) if sys.argv[1:] == ["layers"] else main())
