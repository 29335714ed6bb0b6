"""What a GPU run says about each opt-in candidate, read from the JSON `gpu_check.sh` brings back.

    mkdir r && tar -xzf results.tar.gz -C r && python benchmarks/candidates.py r

The rule (docs/gpu-results.md): a candidate is promoted only where its correctness check passed and its timing shows
the gain. Here, for the switches that replace the default path everywhere (FASTFT_LORA_OVERLAP,
FASTFT_QLORA_PREFETCH): its paired ratio to the base is lower than the default's by more than NOISE at some shape
and higher by no more than NOISE at any. For a kernel the tuner would time per shape (the split-K GEMVs): faster
than the tuner's own pick by more than NOISE somewhere (elsewhere the tuner passes it over; it costs only its
tuning time); the same for attention's backward candidates (checked and timed alone, not in the tuner's list), and
the tuner's fastest attention config a shape. Prints a markdown table; exits 0 (a verdict, not a test).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NOISE = 0.01  # paired ratios of one run move ~1% between rounds (docs/gpu-results.md, 2026-12-05)


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def switch_verdict(deltas: list[float], correct: bool) -> str:
    """The verdict on a switch from its ratio − the default's ratio at each shape (negative: faster)."""
    if not deltas:
        return "not measured"
    if not correct:
        return "keep opt-in: its correctness check failed"
    if max(deltas) > NOISE:
        return f"keep opt-in: slower by {max(deltas):+.3f} at a shape"
    if min(deltas) < -NOISE:
        return f"promote (default on): {min(deltas):+.3f} at best, never slower beyond noise"
    return "keep opt-in: within noise everywhere"


def overlap(lora: dict | None) -> list[dict]:
    """FASTFT_LORA_OVERLAP from gpu_lora.py's rows: "fastft fused, overlapped dA/dB" against "fastft fused"."""
    if lora is None:
        return []
    rows = {(r.get("shape"), r.get("r"), r.get("method")): r for r in lora.get("rows", [])}
    raised = [f"{shape} r{rank}: {r['error']}" for (shape, rank, method), r in rows.items()
              if method == "fastft fused, overlapped dA/dB" and r.get("error")]
    deltas, detail = [], []
    for (shape, rank, method), row in rows.items():
        if method != "fastft fused, overlapped dA/dB":
            continue
        fused = rows.get((shape, rank, "fastft fused"))
        if fused and isinstance(row.get("ratio"), float) and isinstance(fused.get("ratio"), float):
            deltas.append(row["ratio"] - fused["ratio"])
            detail.append(f"{shape} r{rank} {fused['ratio']:.3f}→{row['ratio']:.3f}")
    correct = not (lora.get("correctness_failures") or lora.get("overlap_failures") or raised)
    return [dict(candidate="FASTFT_LORA_OVERLAP", verdict=switch_verdict(deltas, correct),
                 measured="; ".join(detail + raised + list(lora.get("overlap_failures") or []))
                 + f"; share beside the GEMM: {lora.get('overlap_share')}")]


def prefetch(nf4: dict | None) -> list[dict]:
    """FASTFT_QLORA_PREFETCH from gpu_nf4.py's prefetch rows (three layers a shape, bit-identity checked)."""
    rows = (nf4 or {}).get("prefetch") or []
    deltas, detail, correct = [], [], bool(rows)
    for r in rows:
        correct = correct and r.get("prefetch_identical") is True
        if isinstance(r.get("prefetch_x_base"), float) and isinstance(r.get("dequant_x_base"), float):
            deltas.append(r["prefetch_x_base"] - r["dequant_x_base"])
            detail.append(f"{r['shape']} {r['dequant_x_base']:.3f}→{r['prefetch_x_base']:.3f} "
                          f"(identical {r.get('prefetch_identical')}, beside a GEMM {r.get('decode_beside_gemm')})")
    return [dict(candidate="FASTFT_QLORA_PREFETCH", verdict=switch_verdict(deltas, correct),
                 measured="; ".join(detail))] if rows else []


def gemv_candidates(nf4: dict | None) -> list[dict]:
    """The split-K GEMVs (TABLE_DEEP_K4 / _K2, forced only) against the tuner's pick, per shape and batch."""
    rows = (nf4 or {}).get("gemv") or []
    checks = (nf4 or {}).get("correctness") or {}
    out = []
    for name in ("table_deep_k4", "table_deep_k2"):
        failed = [k for k, v in checks.items() if f"gemv {name} " in k and (v is None or v is False
                                                                           or (isinstance(v, float) and v > 1e-2))]
        wins, detail = [], []
        for r in rows:
            if r.get("batch", 1) > 8:  # above 8 rows the candidates launch TABLE's own kernel: a gap is noise
                continue
            mine, pick = r.get(f"{name}_us"), r.get("fastft_us")
            if isinstance(mine, float) and isinstance(pick, float):
                detail.append(f"{r['shape']} b{r['batch']} {pick:.1f}→{mine:.1f} µs")
                if mine < pick * (1 - NOISE):
                    wins.append(f"{r['shape']} b{r['batch']}")
        if not detail:
            continue
        if failed:
            verdict = f"leave out: correctness failed ({'; '.join(failed)})"
        elif wins:
            verdict = f"add to nf4_cuda.TUNER: faster at {', '.join(wins)}"
        else:
            verdict = "leave out: never faster than the tuner's pick beyond noise"
        out.append(dict(candidate=f"GEMV {name.upper()}", verdict=verdict, measured="; ".join(detail)))
    return out


def attention_configs(attention: dict | None) -> list[dict]:
    """Per shape (gpu_attention.py's "configs" rows, each config timed alone): the tuner's fastest config, and a
    backward candidate (a config checked and timed but not in the tuner's list) to add where it is faster than that
    by more than NOISE. A candidate that failed its correctness check has no timed row."""
    rows = [r for r in (attention or {}).get("rows", []) if r.get("section") == "configs" and "ms" in r]
    out = []
    for kernel in ("forward", "backward"):
        for shape in sorted({r["shape"] for r in rows if r["kernel"] == kernel}):
            here = [r for r in rows if r["kernel"] == kernel and r["shape"] == shape]
            tuned = sorted((r["ms"], r["config"]) for r in here if not r.get("candidate"))
            extra = sorted((r["ms"], r["config"]) for r in here if r.get("candidate"))
            if not tuned:
                continue
            best_ms, best = tuned[0]
            verdict = f"tuner's pick: {best}"
            if extra and extra[0][0] < best_ms * (1 - NOISE):
                verdict = f"add candidate {extra[0][1]} to the tuner's list: faster than its pick {best}"
            measured = f"{best_ms:.3f} ms" + (f"; best candidate {extra[0][1]} {extra[0][0]:.3f} ms" if extra else "")
            out.append(dict(candidate=f"attention {kernel} {shape}", verdict=verdict, measured=measured))
    return out


def verdicts(folder: Path) -> list[dict]:
    lora, nf4, attention = (_load(folder, n) for n in ("lora", "nf4", "attention"))
    return overlap(lora) + prefetch(nf4) + gemv_candidates(nf4) + attention_configs(attention)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python benchmarks/candidates.py FOLDER  (FOLDER: gpu_check.sh's results.tar.gz unpacked)",
              file=sys.stderr)
        return 2
    rows = verdicts(Path(argv[0]))
    if not rows:
        print(f"no lora.json, nf4.json or attention.json with candidate rows under {argv[0]}")
        return 0
    print("| candidate | verdict | measured |\n|---|---|---|")
    for r in rows:
        print(f"| {r['candidate']} | {r['verdict']} | {r['measured']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
