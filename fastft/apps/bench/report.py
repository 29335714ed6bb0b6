"""The method table's files: results JSON (raw rows + environment + settings), a markdown table and a PNG
plot (tokens/s and peak memory per method, fastft beside each peer), each written atomically.

    python -m fastft.apps.bench.report RESULTS.json [OUT_DIR]   # the table and plot again from a results file
(a GPU run can bring back only the JSON; the rest is drawn here).
"""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

from fastft.apps.bench.config import PROMPT_METHODS, RANKED_METHODS
from fastft.apps.bench.harness import fmt, fmt_gib, write_json
from fastft.apps.bench.peers import IMPLEMENTATIONS
from fastft.apps.bench.shapes import DESCRIPTIONS
from fastft.apps.bench.targets import check_targets
from fastft.files import atomic_write

STEM = "bench_methods"
COLORS = {"fastft": "tab:red", "peft": "tab:blue", "liger": "tab:green", "unsloth": "tab:purple"}
LEGEND = {"fastft": "fastft", "peft": "peft (peft+bnb for qlora, transformers for full)", "liger": "peft+Liger",
          "unsloth": "Unsloth"}
COLUMNS = ("method", "implementation", "status", "compile", "tokens/s", "step ms", "peak GiB", "trainable",
           "× peer tokens/s", "× peer memory", "note")


FORMATS = ("json", "md", "png")


def write_report(result: dict, out_dir: str | Path, formats=FORMATS) -> dict[str, Path]:
    """Write <out_dir>/bench_methods.<format> for each of `formats`; returns their paths. Without matplotlib
    the PNG is left out (said on stderr)."""
    out = Path(out_dir)
    paths = {}
    if "json" in formats:
        paths["json"] = write_json(out / f"{STEM}.json", result)
    if "md" in formats:
        paths["md"] = atomic_write(out / f"{STEM}.md", markdown(result))
    if "png" in formats:
        if importlib.util.find_spec("matplotlib") is None:
            print("fastft bench: matplotlib is not installed, so no plot (python -m fastft.apps.bench.report "
                  f"{out / f'{STEM}.json'} draws it where it is)", file=sys.stderr)
        else:
            paths["png"] = atomic_write(out / f"{STEM}.png", plot_png(result))
    return paths


def _compile(row: dict) -> str:
    """The row's torch.compile mode, "off" when eager (results written before the option have no field)."""
    return row.get("compile", "off")


def _peer_row(rows: list[dict], method: str, compile: str = "off") -> dict | None:
    """The peft row a row is compared with: same method, compiled the same way."""
    return next((r for r in rows if r["method"] == method and r["peer"] == "peft" and r["status"] == "ok"
                 and _compile(r) == compile), None)


def table_rows(result: dict) -> list[dict]:
    """The markdown rows, grouped by method (runs are ordered by when they can run, not by method)."""
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in result["rows"]))}
    out = []
    for r in sorted(result["rows"], key=lambda r: (order[r["method"]], IMPLEMENTATIONS.index(r["peer"]),
                                                   _compile(r) != "off")):
        ok = r["status"] == "ok"
        peer = _peer_row(result["rows"], r["method"], _compile(r)) if ok and r["peer"] != "peft" else None
        out.append({
            "method": r["method"], "implementation": r["implementation"], "status": r["status"],
            "compile": _compile(r) + (f" ({r['compile_backend']})" if r.get("compile_backend") else ""),
            "tokens/s": fmt(r.get("tokens_per_s"), ",.0f") if ok else "—",
            "step ms": fmt(r.get("step_ms"), ".1f") if ok else "—",
            "peak GiB": fmt_gib(r.get("peak_gib")) if ok else "—",
            "trainable": fmt(r.get("trainable_params"), ",d") if ok else "—",
            "× peer tokens/s": fmt(r["tokens_per_s"] / peer["tokens_per_s"], ".2f") if peer else "",
            "× peer memory": (fmt(r["peak_gib"] / peer["peak_gib"], ".2f")   # CPU RSS deltas are too rough
                              if peer and peer.get("peak_gib") and r["memory_kind"].startswith("cuda") else ""),
            "note": _note(r).replace("|", "/")[:160],
        })
    return out


def _note(row: dict) -> str:
    """Why a row has no numbers, else what dynamo compiled and whether fastft patched the model."""
    if row.get("reason") or row.get("error"):
        return row.get("reason") or row.get("error")
    stats = row.get("compile_stats")
    parts = [f"{stats['graphs']} graphs, {stats['graph_breaks']} graph breaks"] if stats else []
    return "; ".join(parts + (["model patched by fastft.patch_model"] if row.get("patched") else []))


def _method_knobs(cfg: dict) -> str:
    """The rank and virtual tokens, where a benchmarked method uses them (an IA3 table named r and alpha)."""
    methods = set(cfg["methods"]) if "methods" in cfg else {"lora", "prefix"}  # a result without its list: both
    parts = []
    if methods & set(RANKED_METHODS):
        parts.append(f"LoRA/DoRA r={cfg['rank']} alpha={cfg['alpha']:g}; ")
    if methods & set(PROMPT_METHODS):
        parts.append(f"{cfg['num_virtual_tokens']} virtual tokens; ")
    return "".join(parts)


def _lr_and_seed(cfg: dict) -> str:
    """The learning rate and seed every row ran with (a results file written before them has neither)."""
    parts = [f"{key} {cfg[key]:g}" for key in ("lr", "seed") if key in cfg]
    return f" ({', '.join(parts)})" if parts else ""


def markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    v = env["versions"]
    what = cfg["model"] or f"random-init {cfg['shape']} ({DESCRIPTIONS.get(cfg['shape'], '')})"
    kinds = sorted({r["memory_kind"] for r in result["rows"] if r.get("memory_kind")})
    lines = [
        f"# fastft bench methods on {env['card']}",
        "",
        f"{what}; B{cfg['batch_size']}×S{cfg['seq_len']}, dtype {cfg['dtype_resolved']}, gradient checkpointing "
        f"{'on' if cfg['gradient_checkpointing'] else 'off'}; {cfg['steps']} timed steps after {cfg['warmup']} "
        f"warm-up; {_method_knobs(cfg)}optimizer {cfg.get('optimizer', 'adamw')} for every row{_lr_and_seed(cfg)}.",
        f"torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}, liger-kernel {v.get('liger-kernel')}, "
        f"unsloth {v.get('unsloth')}.",
        f"Peak memory: {'; '.join(kinds) or 'not measured'}. tokens/s = B·S / mean step time (forward, backward, "
        "AdamW step). Loss: fastft rows noted \"model patched\" and peft+Liger rows compute it fused, without the "
        "logits tensor; the other rows build the full logits. × peer: against the peft row of the same method "
        "(peft+bnb for qlora, plain transformers for full), compiled the same way. compile: off (eager) or the "
        "torch.compile mode (backend) of the model's forward and backward; compilation happens in the warm-up "
        "steps (one that compiles again warms up until a step compiles nothing, up to 3 steps more). Rows without "
        "numbers say why: diverged (the loss became NaN/inf), not compiled (dynamo ran the step partly eagerly), "
        "compiled while timed (a compilation among the timed steps), planned (not measured yet), unavailable, not "
        "installed, oom, error.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in table_rows(result)]
    lines += ["", "## Issue 8 targets", *check_targets(result), ""]
    return "\n".join(_incomplete_note(result) + lines)


def _incomplete_note(result: dict) -> list[str]:
    """A warning atop an unfinished table (results written before the field read as complete)."""
    if result.get("complete", True):
        return []
    left = sum(r["status"] == "planned" for r in result["rows"])
    return [f"> **Incomplete**: {left} of {len(result['rows'])} runs not measured yet (still running, or stopped: "
            "the same command resumes it).", ""]


def plot_png(result: dict) -> bytes:
    buf = io.BytesIO()
    plot_figure(result).savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_figure(result: dict):
    """Tokens/s and (on CUDA) peak GiB: per method a group of bars, one per implementation. CPU memory is left
    out, as the table leaves out its ratio: an RSS delta sampled every 10 ms is too rough to compare."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows, cfg = result["rows"], result["config"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # peers not installed at all get no bar slot (the table says so)
    modes = list(dict.fromkeys(sorted((_compile(r) for r in rows), key=lambda m: m != "off")))
    impls = [(i, m) for i in IMPLEMENTATIONS for m in modes
             if any(r["peer"] == i and _compile(r) == m and r["status"] != "not installed" for r in rows)]
    panels = [("tokens_per_s", "tokens/s")]
    if any(r.get("memory_kind", "").startswith("cuda") for r in rows if r["status"] == "ok"):
        panels.append(("peak_gib", "peak memory (GiB)"))
    fig = Figure(figsize=(max(7.0, 0.45 * len(methods) * max(2, len(impls)) + 2), 3.5 * len(panels) + 0.5),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
    width = 0.8 / max(1, len(impls))
    legend = []  # drawn from the implementations' colours: a panel without a bar of one gave matplotlib's default
    for ax, (key, ylabel) in zip(axes, panels):
        for k, (impl, mode) in enumerate(impls):
            xs, ys = [], []
            for i, method in enumerate(methods):
                r = next((r for r in rows if r["method"] == method and r["peer"] == impl and _compile(r) == mode),
                         None)
                x = i - 0.4 + width * (k + 0.5)
                if r is None:
                    continue
                if r["status"] == "ok" and r.get(key) is not None:
                    xs.append(x)
                    ys.append(r[key])
                else:   # no bar: say why under the axis
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="gray")
            compiled = mode != "off"   # compiled runs: the implementation's colour, hatched
            backend = next((r.get("compile_backend") for r in rows if r["peer"] == impl and _compile(r) == mode
                            and r.get("compile_backend")), None)
            style = {"facecolor": COLORS[impl], "hatch": "//" if compiled else None,
                     "edgecolor": "white" if compiled else None}
            ax.bar(xs, ys, width=width, **style)
            if ax is axes[0]:
                legend.append(Patch(**style, label=(f"{impl}, compiled ({mode}" + (f", {backend})" if backend
                                                                                   else ")")) if compiled
                                    else LEGEND[impl]))
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    low, high = axes[0].get_ylim()
    axes[0].set_ylim(low, low + (high - low) * 1.3)  # headroom: the legend above the tallest bar, not over it
    axes[-1].set_xticks(range(len(methods)), methods)
    axes[-1].set_xlabel("fine-tuning method")
    # one column per implementation: its compiled entry under its eager one
    if legend:
        axes[0].legend(handles=legend, fontsize=8, ncols=max(1, len({impl for impl, _ in impls})))
    what = cfg["model"] or cfg["shape"]
    # two lines: one would be wider than a figure of a few methods (clipped at both edges)
    fig.suptitle(f"fastft bench: {what}, B{cfg['batch_size']}×S{cfg['seq_len']}, {cfg['dtype_resolved']}, "
                 f"{result['environment']['card']}\n(n/a: unavailable, failed, diverged or not compiled"
                 + (")" if len(panels) > 1 else "; peak memory not plotted on the CPU: see the table)"), fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> int:
    from fastft.apps.redraw import redraw_main

    return redraw_main(argv, module="fastft.apps.bench.report", command="fastft bench", file_name=f"{STEM}.json",
                       draws="the markdown table and the PNG plot",
                       fields={"config": dict, "environment": dict, "rows": list},
                       write=lambda result, out_dir: write_report(result, out_dir, formats=("md", "png")))


if __name__ == "__main__":
    sys.exit(main())
