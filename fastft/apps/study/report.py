"""The study's report: markdown tables, PNG plots and a headline paragraph, all from results.json's cells.

Scores are each task's headline metric (accuracy; macro-F1 on the unbalanced SMS, TREC and BBC), in
percent, mean ± sample standard deviation over seeds. Every file is written atomically.

    python -m fastft.apps.study.report RESULTS.json [OUT_DIR]   # report.md and plots/ again from results.json
"""
from __future__ import annotations

import importlib.util
import io
import math
from collections import Counter, defaultdict
from pathlib import Path

from fastft.apps.study.cell import WARMUP_STEPS
from fastft.files import atomic_write

MODEL_NAMES = {"minilm": "MiniLM-L6 (22.7M, encoder + head)", "smollm2": "SmolLM2-135M (decoder, label words)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def aggregate(cells: list[dict]) -> dict:
    """(model, regime, task, method, implementation) → scores over seeds, costs, or why there is no score."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["regime"], c["task"], c["method"], c["implementation"])].append(c)
    out = {}
    for key, members in groups.items():
        done = [c for c in members if c["status"] == "done"]
        if not done:
            first = members[0]
            out[key] = {"status": first["status"], "reason": first.get("reason", ""), "n": 0}
            continue
        score, score_std = _mean_std([100 * c["test_metric"] for c in done])
        out[key] = {"status": "done", "n": len(done), "metric": done[0]["metric"], "score": score,
                    "std": score_std, "by_seed": {c["seed"]: 100 * c["test_metric"] for c in done},
                    "accuracy": _mean_std([100 * c["test_accuracy"] for c in done])[0],
                    "macro_f1": _mean_std([100 * c["test_macro_f1"] for c in done])[0],
                    "trainable": done[0]["trainable_parameters"], "total": done[0]["total_parameters"],
                    "tokens_per_second": _mean_std([c["tokens_per_second"] for c in done])[0],
                    "peak_memory_gib": max(c["peak_memory_gib"] for c in done),
                    "peak_memory_kind": done[0]["peak_memory_kind"],
                    "step_seconds_median": _mean_or_none([c.get("step_seconds_median") for c in done]),
                    "wall_seconds": _mean_std([c["wall_seconds"] for c in done])[0],
                    "incomplete": len(done) < len(members)}
    return out


def _mean_or_none(values: list) -> float | None:
    """The mean, or None when some cell lacks the value (results written before it was recorded)."""
    return None if None in values else sum(values) / len(values)


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


# two-sided 95% quantiles of Student's t by degrees of freedom (1-10; beyond, 2.0: within 0.23 of it to df 30)
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def anchor_rows(groups: dict) -> list[dict]:
    """fastft against peft's own implementation of the same method, on the seeds both scored (a seed draws the
    sample, the initialisation and the batch order of both, so the two are compared seed by seed). Flagged when
    they differ by more than noise: with several seeds a paired t-test at 5% on the per-seed differences (the
    mean difference beyond t·sd/√n, and beyond 1 point), with one seed > 3 points."""
    rows = []
    for (model, regime, task, method, impl), g in sorted(groups.items()):
        if impl != "fastft" or g["status"] != "done":
            continue
        peft = groups.get((model, regime, task, method, "peft"))
        if not peft or peft["status"] != "done":
            continue
        seeds = sorted(set(g["by_seed"]) & set(peft["by_seed"]))
        if not seeds:
            continue
        ours, theirs = [g["by_seed"][s] for s in seeds], [peft["by_seed"][s] for s in seeds]
        diff, diff_std = _mean_std([a - b for a, b in zip(ours, theirs)])
        n = len(seeds)
        threshold = max(_T_975.get(n - 1, 2.0) * diff_std / math.sqrt(n), 1.0) if n > 1 else 3.0
        rows.append({"model": model, "regime": regime, "task": task, "method": method,
                     "fastft": sum(ours) / n, "peft": sum(theirs) / n, "diff": diff, "threshold": threshold,
                     "seeds": n, "flagged": abs(diff) > threshold})
    return rows


def _score_cell(g: dict | None) -> str:
    if g is None:
        return ""
    if g["status"] != "done":
        return g["status"]
    text = f"{g['score']:.1f} ± {g['std']:.1f}" if g["n"] > 1 else f"{g['score']:.1f}"
    if g["metric"] == "macro_f1":  # accuracy beside the F1 of an unbalanced task
        text += f" (acc {g['accuracy']:.1f})"
    return text + ("*" if g["incomplete"] else "")


def _rows_of(groups, model, regime):
    methods = []
    for (m, r, _, method, impl) in groups:
        if m == model and r == regime and (method, impl) not in methods:
            methods.append((method, impl))
    return sorted(methods, key=lambda x: (x[0], x[1] != "fastft"))


def _label(method: str, impl: str) -> str:
    return method if impl == "fastft" else f"{method} (peft)"


def method_means(groups: dict, model: str, regime: str, tasks: list[str]) -> dict:
    """(method, impl) → mean score over tasks, only where every task has a score."""
    means = {}
    for method, impl in _rows_of(groups, model, regime):
        scores = [groups.get((model, regime, t, method, impl)) for t in tasks]
        if all(s and s["status"] == "done" for s in scores):
            means[(method, impl)] = sum(s["score"] for s in scores) / len(scores)
    return means


def accuracy_table(groups, tasks_info, model, regime) -> str:
    tasks = [t for t in tasks_info if any(k[0] == model and k[1] == regime and k[2] == t for k in groups)]
    metric = {t: "F1" if tasks_info[t]["metric"] == "macro_f1" else "acc" for t in tasks}
    means = method_means(groups, model, regime, tasks)
    lines = ["| method | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | mean |",
             "|---|" + "---|" * (len(tasks) + 1)]
    for method, impl in _rows_of(groups, model, regime):
        mean = means.get((method, impl))
        lines.append(f"| {_label(method, impl)} | " + " | ".join(
            _score_cell(groups.get((model, regime, t, method, impl))) for t in tasks) +
            f" | {'' if mean is None else f'{mean:.1f}'} |")
    def floor(t):
        majority = tasks_info[t]["majority"]
        if tasks_info[t]["metric"] == "macro_f1":
            return f"{100 * majority['macro_f1']:.1f} (acc {100 * majority['accuracy']:.1f})"
        return f"{100 * majority['accuracy']:.1f}"

    lines.append("| majority class | " + " | ".join(floor(t) for t in tasks) + " | |")
    return "\n".join(lines)


def majority_check(groups, tasks_info, model, regime) -> str:
    """For each method: the tasks on which its mean score beats always predicting the majority class."""
    lines = ["| method | beats the majority class on | does not |", "|---|---|---|"]
    for method, impl in _rows_of(groups, model, regime):
        done = {k[2]: g for k, g in groups.items() if k[:2] == (model, regime) and k[3:] == (method, impl)
                and g["status"] == "done"}
        if not done:
            continue
        floor = {t: 100 * tasks_info[t]["majority"][tasks_info[t]["metric"]] for t in done}
        wins = [t for t, g in done.items() if g["score"] > floor[t]]
        lines.append(f"| {_label(method, impl)} | {', '.join(wins) or 'none'} | "
                     f"{', '.join(t for t in done if t not in wins) or '—'} |")
    return "\n".join(lines)


def cost_table(groups, model, regime) -> str:
    lines = ["| method | trainable params | % of model | tokens/s | median step (ms) | peak memory (GiB) | "
             "wall s / cell |", "|---|---|---|---|---|---|---|"]
    for method, impl in _rows_of(groups, model, regime):
        done = [g for k, g in groups.items() if k[:2] == (model, regime) and k[3:] == (method, impl)
                and g["status"] == "done"]
        if not done:
            continue
        n = len(done)
        trainable = sum(g["trainable"] for g in done) / n
        share = 100 * trainable / (sum(g["total"] for g in done) / n)
        share_text = f"{share:.1f}" if share >= 1 else f"{share:.2g}"
        median = _mean_or_none([g.get("step_seconds_median") for g in done])
        lines.append(f"| {_label(method, impl)} | {_fmt_count(trainable)} | {share_text} | "
                     f"{sum(g['tokens_per_second'] for g in done) / n:,.0f} | "
                     f"{'' if median is None else f'{1000 * median:.0f}'} | "
                     f"{max(g['peak_memory_gib'] for g in done):.2f} | "
                     f"{sum(g['wall_seconds'] for g in done) / n:.1f} |")
    return "\n".join(lines)


def unscored_table(cells: list[dict]) -> str:
    """Every cell without a score (unavailable, failed, diverged), also where other seeds of its group scored (the
    tables mark those *): one row per model, method, implementation, status and reason, with its tasks."""
    tasks = defaultdict(set)
    for c in cells:
        if c["status"] != "done":
            reason = (c.get("reason") or "").strip().split("\n")[0][:200].replace("|", "/")
            tasks[(c["model"], c["method"], c["implementation"], c["status"], reason)].add(c["task"])
    lines = ["| model | method | implementation | status | reason | tasks |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(key)} | {', '.join(sorted(names))} |" for key, names in sorted(tasks.items())]
    return "\n".join(lines)


def _tops(scores: dict) -> list:
    """The keys whose score is the highest as the report prints it (one decimal): a tie names them all."""
    shown = {k: float(f"{v:.1f}") for k, v in scores.items()}
    top = max(shown.values())
    return [k for k, v in shown.items() if v == top]


def headline(groups: dict, tasks_info: dict) -> str:
    """One paragraph per (model, regime): the best method on average, per-task winners, and its cost against
    full fine-tuning and against the cheapest method that scores within 2 points of it."""
    sentences = []
    for model, regime in sorted({k[:2] for k in groups}):
        tasks = [t for t in tasks_info if (model, regime, t) in {k[:3] for k in groups}]
        means = {k: v for k, v in method_means(groups, model, regime, tasks).items() if k[1] == "fastft"}
        if not means:
            continue
        cost = {m: [g for k, g in groups.items() if k[:2] == (model, regime) and k[3:] == m and g["status"] == "done"]
                for m in means}
        trainable = {m: sum(g["trainable"] for g in cost[m]) / len(cost[m]) for m in means}
        speed = {m: sum(g["tokens_per_second"] for g in cost[m]) / len(cost[m]) for m in means}
        tied = _tops(means)
        best = min(tied, key=trainable.get)  # of methods tied on average, the one described: the cheapest
        text = (f"**{MODEL_NAMES.get(model, model)}, {regime}:** {' and '.join(m[0] for m in tied)} "
                f"score{'s' * (len(tied) == 1)} best on average ({means[best]:.1f} over {len(tasks)} "
                f"task{'s' * (len(tasks) > 1)}, {'' if len(tied) == 1 else best[0] + ': '}"
                f"{_fmt_count(trainable[best])} trainable parameters, {speed[best]:,.0f} tokens/s)")
        winners = []
        for t in tasks:
            scored = {m: groups[(model, regime, t) + m]["score"] for m in means}
            top = _tops(scored)
            winners.append(f"{' and '.join(m[0] for m in top)} on {t} ({scored[top[0]]:.1f})")
        text += "; per task: " + ", ".join(winners) + "."
        full = ("full", "fastft")
        if best != full and full in means:
            text += (f" Full fine-tuning scores {means[full]:.1f} with {trainable[full] / trainable[best]:.0f}× the "
                     f"trainable parameters at {speed[full] / speed[best]:.2f}× the tokens/s.")
        close = [m for m in means if means[m] >= means[best] - 2.0 and m != best]
        if close:
            cheapest = min(close, key=trainable.get)
            if trainable[cheapest] < trainable[best]:
                text += (f" {cheapest[0]} comes within 2 points ({means[cheapest]:.1f}) with "
                         f"{_fmt_count(trainable[cheapest])} trainable parameters.")
        baseline = [t for t in tasks if means and groups[(model, regime, t) + best]["score"] <=
                    100 * tasks_info[t]["majority"][tasks_info[t]["metric"]]]
        if baseline:
            text += f" It does not beat the majority class on {', '.join(baseline)}."
        sentences.append(text)
    if not sentences:
        return "No cell has finished yet."
    flagged = [r for r in anchor_rows(groups) if r["flagged"]]
    anchors = len(anchor_rows(groups))
    if anchors:
        sentences.append(f"peft's own implementation agrees with fastft's within noise in {anchors - len(flagged)} of "
                         f"{anchors} comparisons" + ("; see the flagged rows below." if flagged else "."))
    return "\n\n".join(sentences)


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no display): imported when a plot is drawn, since matplotlib is not
    a dependency of fastft (write_report leaves the plots out without it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, buffer.getvalue())


def _label_offsets(points: list[tuple[float, float]], log_x: bool) -> list[int]:
    """Vertical offset (points) of each point's label: labels of points that (nearly) coincide — a method and
    its peft anchor, LoRA and DoRA — stack downwards instead of printing over one another."""
    xs = [math.log10(x) if log_x and x > 0 else x for x, _ in points]
    ys = [y for _, y in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    offsets = []
    for i in range(len(points)):
        near = sum(abs(xs[i] - xs[j]) < 0.06 * span_x and abs(ys[i] - ys[j]) < 0.04 * span_y for j in range(i))
        offsets.append(3 - 9 * near)
    return offsets


def _scatter(groups, tasks_info, x_key: str, x_label: str, log_x: bool, path: Path) -> None:
    """Mean score over tasks against a cost, one point per method: filled fastft, hollow peft, a marker per
    regime; the legend names both."""
    from matplotlib.lines import Line2D

    models = sorted({k[0] for k in groups})
    fig, axes = _pyplot().subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        handles, points = [], []   # points: (x, score, label, peft, marker)
        for regime, marker in zip(sorted({k[1] for k in groups if k[0] == model}), "os^"):
            handles.append(Line2D([], [], marker=marker, color="C0", linestyle="none", label=regime))
            tasks = [t for t in tasks_info if (model, regime, t) in {k[:3] for k in groups}]
            for (method, impl), mean in method_means(groups, model, regime, tasks).items():
                done = [g for k, g in groups.items() if k[:2] == (model, regime) and k[3:] == (method, impl)]
                points.append((sum(g[x_key] for g in done) / len(done), mean, _label(method, impl),
                               impl == "peft", marker))
        offsets = _label_offsets([(x, y) for x, y, *_ in points], log_x) if points else []
        for (x, y, label, peft, marker), dy in zip(points, offsets):
            ax.scatter(x, y, marker=marker, facecolors="none" if peft else None,
                       edgecolors="C0" if peft else None, color=None if peft else "C0")
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, dy), textcoords="offset points",
                        color="dimgray" if peft else "black")
        handles += [Line2D([], [], marker="o", color="C0", linestyle="none", label="fastft"),
                    Line2D([], [], marker="o", markerfacecolor="none", color="C0", linestyle="none", label="peft")]
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("mean test score over tasks (%)\neach task's metric: accuracy or macro-F1")
        ax.set_title(MODEL_NAMES.get(model, model), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7)
    _save_figure(fig, path)


def _bars(groups, tasks_info, model, regime, path: Path) -> None:
    tasks = [t for t in tasks_info if (model, regime, t) in {k[:3] for k in groups}]
    methods = [m for m in _rows_of(groups, model, regime)
               if any(groups.get((model, regime, t) + m, {}).get("status") == "done" for t in tasks)]
    fig, ax = _pyplot().subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        values = [groups.get((model, regime, t) + m, {}) for t in tasks]
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [v.get("score", 0) for v in values], width,
               yerr=[v.get("std", 0) for v in values], label=_label(*m), capsize=2)
        for x, v in zip(xs, values):   # no bar: say why (diverged, failed, unavailable)
            if v and v["status"] != "done":
                ax.text(x, 1, v["status"], ha="center", va="bottom", fontsize=6, rotation=90, color="gray")
    for j, t in enumerate(tasks):
        floor = 100 * tasks_info[t]["majority"][tasks_info[t]["metric"]]
        ax.hlines(floor, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="dashed", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("test score (%) — dashed: majority class")
    ax.set_title(f"{MODEL_NAMES.get(model, model)}, {regime}", fontsize=9)
    ax.set_ylim(0, 105)
    if methods:   # none scored (all diverged or failed): no legend to draw
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def _steps_by_regime() -> str:
    from fastft.apps.study.runner import STEPS_DEFAULT

    return "per regime (" + ", ".join(f"{k} {v}" for k, v in STEPS_DEFAULT.items()) + ")"


def _tasks_section(tasks_info: dict) -> str:
    """The tasks table; its test columns (size, balance, majority class) describe the test rows the cells are
    tested on (the first --max-test rows of the split when capped)."""
    lines = ["| task | headline metric | train | dev | test (tested rows) | duplicates dropped | "
             "test balance (tested rows) | majority class (tested rows) |", "|---|---|---|---|---|---|---|---|"]
    for name, t in tasks_info.items():
        s = t["sizes"]
        # results.json files written before "tested" existed: the whole test split
        tested = t.get("tested") or {"examples": s["test"], "balance": t["balance"]["test"]}
        size = f"{tested['examples']} of {s['test']}" if tested["examples"] < s["test"] else str(s["test"])
        balance = ", ".join(f"{k} {v}" for k, v in tested["balance"].items())
        lines.append(f"| {name} | {t['metric']} | {s['train']} | {s['dev']} | {size} | "
                     f"{t['duplicates_dropped']} | {balance} | {t['majority']['label']} "
                     f"({100 * t['majority']['accuracy']:.1f}% acc) |")
    seed = next(iter(tasks_info.values()))["split_seed"] if tasks_info else ""
    return (f"Fixed stratified splits, split seed {seed} (test 20% up to 1,000 rows, dev 10% up to 500); "
            "the study's seeds draw the 32-per-class sample, the initialisation and the batch order. The test "
            "columns describe the test rows every cell is tested on (\"N of M\": --max-test rows, each class its "
            "share).\n\n"
            + "\n".join(lines))


def devices_line(cells: list[dict]) -> str:
    """' Cells ran on: …' — each device with its cell count (a resumed study may mix devices' older cells)."""
    names = Counter((c.get("provenance") or {}).get("device_name") or c.get("device_name") for c in cells
                    if c["status"] == "done")
    names.pop(None, None)
    if not names:
        return ""
    return " Cells ran on: " + "; ".join(f"{name} ({n} cells)" for name, n in names.most_common()) + "."


def _incomplete_note(results: dict) -> list[str]:
    """A warning under the first lines of a study stopped midway (results.json written before `complete` was
    kept read as complete)."""
    if results.get("complete", True):
        return []
    return ["", f"> **Incomplete**: {len(results['cells'])} of {results.get('planned_cells', '?')} cells run (still "
                "running, or stopped: the same `fastft study` command resumes, reading the finished cells back)."]


def write_report(results: dict, output_dir) -> dict[str, Path]:
    """report.md and plots/*.png (when matplotlib is installed) from the combined results; returns the paths
    written."""
    out = Path(output_dir)
    plots = importlib.util.find_spec("matplotlib") is not None
    tasks_info, cells, config = results["tasks"], results["cells"], results["config"]
    groups = aggregate(cells)
    written = {}
    if plots:
        (out / "plots").mkdir(parents=True, exist_ok=True)
        for key, label, log_x in (("trainable", "trainable parameters (log)", True),
                                  ("tokens_per_second", "training tokens/s", False)):
            name = "score_vs_params" if key == "trainable" else "score_vs_tokens_per_second"
            _scatter(groups, tasks_info, key, label, log_x, out / "plots" / f"{name}.png")
            written[name] = out / "plots" / f"{name}.png"
    env = results.get("environment", {})
    parts = ["# fastft study", "",
             f"Device: {env.get('device_name', '?')} (torch {env.get('torch', '?')}, "
             f"{env.get('threads', '?')} threads). "
             f"Seeds: {config['seeds']}; batch {config['batch_size']}; max length {config['max_length']}; "
             f"steps {config['steps'] or _steps_by_regime()}; dev evaluations per cell {config['evals']}"
             + (f"; dev capped at {config['max_dev']} rows" if config.get("max_dev") else "")
             + (f"; test capped at {config['max_test']} rows" if config.get("max_test") else "") + "."
             + devices_line(cells),
             *_incomplete_note(results),
             "", "## Headline", "", headline(groups, tasks_info), "", "## Tasks", "", _tasks_section(tasks_info)]
    for model, regime in sorted({k[:2] for k in groups}):
        name = f"{model}-{regime}"
        if plots:
            _bars(groups, tasks_info, model, regime, out / "plots" / f"tasks_{name}.png")
            written[f"tasks_{name}"] = out / "plots" / f"tasks_{name}.png"
        parts += ["", f"## {MODEL_NAMES.get(model, model)} — {regime}", "",
                  "Test score (%) of the dev-selected checkpoint, mean ± std over seeds (* some seeds missing, "
                  "see the cells without a score); "
                  "macro-F1 tasks show the accuracy beside.", "",
                  accuracy_table(groups, tasks_info, model, regime), "",
                  "Cost (means over tasks and seeds; peak memory: the largest):", "",
                  cost_table(groups, model, regime), "", majority_check(groups, tasks_info, model, regime)]
        parts += ["", f"![per task](plots/tasks_{name}.png)"] if plots else []
    parts += ["", "## Score against cost", ""]
    parts += (["![score vs trainable parameters](plots/score_vs_params.png)",
               "![score vs tokens/s](plots/score_vs_tokens_per_second.png)"] if plots else
              ["No plots: matplotlib is not installed (`pip install matplotlib`, then `python -m "
               "fastft.apps.study.report results.json` redraws this report with them)."])
    anchors = anchor_rows(groups)
    parts += ["", "## fastft against peft's own implementation", ""]
    if anchors:
        parts += ["Means over the seeds both implementations scored; flagged where the difference passes a paired "
                  "t-test at 5% over those seeds and 1 point (3 points with one seed).", ""]
        parts += ["| model | regime | task | method | fastft | peft | diff | noise threshold | seeds | flag |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        parts += [f"| {r['model']} | {r['regime']} | {r['task']} | {r['method']} | {r['fastft']:.1f} | "
                  f"{r['peft']:.1f} | {r['diff']:+.1f} | {r['threshold']:.1f} | {r['seeds']} | "
                  f"{'**differs**' if r['flagged'] else 'ok'} |"
                  for r in anchors]
    else:
        parts.append("No method has finished with both implementations.")
    if any(c["status"] != "done" for c in cells):
        parts += ["", "## Cells without a score", "", unscored_table(cells)]
    peak_kinds = sorted({g["peak_memory_kind"] for g in groups.values() if g["status"] == "done"})
    parts += ["", f"Peak memory: {', '.join(peak_kinds) or 'n/a'}, of the training steps (evaluation's is "
              "eval_peak_memory_gib in cells/*.json). Tokens/s counts real (non-padding) training tokens over the "
              f"time of forward, backward and optimizer steps after the first {WARMUP_STEPS} (kernel compilation and "
              "autotuning; dev evaluation excluded); the median step time leaves out the later autotuning at new "
              "padded lengths too. Raw results: results.json and cells/*.json.", ""]
    atomic_write(out / "report.md", "\n".join(parts))
    written["report"] = out / "report.md"
    if plots:  # an earlier plan's plots (other models or regimes) would sit beside this report, which shows none
        for stale in set((out / "plots").glob("tasks_*.png")) - set(written.values()):
            stale.unlink(missing_ok=True)
    return written


def main(argv: list[str] | None = None) -> int:
    from fastft.apps.redraw import redraw_main

    return redraw_main(argv, module="fastft.apps.study.report", command="fastft study", file_name="results.json",
                       draws="report.md and the plots", fields={"config": dict, "tasks": dict, "cells": list},
                       write=write_report)


if __name__ == "__main__":
    import sys

    sys.exit(main())
