"""The evaluation report: results.json (every number), report.md (tables) and PNG charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.evaluation.metrics import ATTRIBUTION_GROUP  # noqa: E402

DPI = 80


def write_report(results: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json"}
    files["json"].write_text(json.dumps(_finite(results), indent=2, sort_keys=False))
    files.update(charts(results, out))
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(markdown(results, {k: v.name for k, v in files.items() if v.suffix == ".png"}))
    return files


def write_partial(results: dict, out: Path) -> Path:
    """Every number measured so far, rewritten after each method: an evaluation runs for an hour,
    and one killed near its end should not take the finished methods with it."""
    path = Path(out) / "results.partial.json"
    path.write_text(json.dumps(_finite(results), indent=2, sort_keys=False, default=float))
    return path


def _generation_lines(results: dict) -> list[str]:
    """What each method writes: the style judge's attribution of its texts, and degeneration."""
    if "judge" not in results:
        return []
    ceiling = results["judge"]["ceiling"]["overall"]
    lines = [
        "",
        "## Generated texts (neutral prompts, sampled; judged by a character n-gram classifier)",
        "",
        f"The judge attributes the users' real held-out text at {_f(ceiling)} (its ceiling); the base model's "
        "texts, labelled with the user whose seeds drew them, are chance.",
        "",
        "| texts of | attributed to their user | repeated word 3-grams | looping | empty | texts |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for key, how in (("generations", ""), ("generations_penalized", ", with the penalties")):
        rows += [(f"base model{how}", results["base"].get(key))]
        rows += [(f"{name}{how}", m.get(key)) for name, m in results["methods"].items()]
    for name, g in rows:
        if g is None:
            continue
        d = g["degeneration"]
        lines.append(
            f"| {name} | {_f(g['attribution']['overall'])} | {_f(d['repeated_3gram'])} | {_f(d['looping'])} | "
            f"{_f(d['empty'])} | {d['texts']} |"
        )
    return lines


def _task_lines(results: dict) -> list[str]:
    """Voice and task: the request bank's answers, greedy and sampled, per method and strength."""
    base = results["base"].get("tasks")
    if base is None:
        return []
    ceiling = results.get("judge", {}).get("ceiling", {}).get("overall")
    lines = [
        "",
        "## Voice and task (the concrete request bank, core/evaluation/tasks.py)",
        "",
        f"Relevance is the share of answers naming the request's topic, and its ratio to the base model's; "
        f"voice is the judge's attribution of the answers (its ceiling on real held-out text: {_f(ceiling)}). "
        "Held-out perplexity ratios: the user's real text as the answer to a request derived from it "
        "(task), and to today's generic requests (chat).",
        "",
        "| answers of | decoding | degenerate | relevant | relevance / base | judge attribution | "
        "ppl ratio task | ppl ratio chat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("base model", None, base)]
    for name, m in results["methods"].items():
        if "tasks" in m:
            rows.append((name, m["overall"], m["tasks"]))
        for strength, tasks in m.get("tasks_by_strength", {}).items():
            rows.append((f"{name}, style strength {strength}", None, tasks))
    for name, overall, tasks in rows:
        for decoding in [d for d in tasks if d in base]:
            o, b = tasks[decoding]["overall"], base[decoding]["overall"]
            ratio = o["relevant"] / b["relevant"] if b["relevant"] else None
            ppl = (overall or {}).get("ratio_task"), (overall or {}).get("ratio_chat")
            lines.append(
                f"| {name} | {decoding} | {_f(o['degenerate'])} | {_f(o['relevant'])} | {_f(ratio)} | "
                f"{_f(o.get('judge_attribution'))} | {_f(ppl[0])} | {_f(ppl[1])} |"
            )
    return lines


def _finite(value):
    """NaN/inf become null so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _f(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown(results: dict, charts: dict[str, str]) -> str:
    base, methods = results["base"], results["methods"]
    env = results["environment"]
    lines = [
        "# Steer evaluation report",
        "",
        f"Base model `{env['base_model']}`; torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['cpu_threads']} CPU threads, CUDA: {env['cuda']}. Wall time {results.get('wall_seconds', 0):.0f} s.",
        f"Users: {len(results['data'])}; general-text rows: {results['general_rows']}; base general ppl "
        f"{_f(base['ppl_general'], 2)}.",
        "",
        "## Overall (mean over users; ratio = with adaptation / base model, lower is better)",
        "",
        "| method | ppl ratio plain | ppl ratio chat | attribution acc | calibrated attribution | "
        f"attribution, {ATTRIBUTION_GROUP} samples at a time | general ppl ratio | served params | artifact bytes | "
        "train s/user |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in methods.items():
        o = m["overall"]
        lines.append(
            f"| {name} | {_f(o['ratio_plain'])} | {_f(o['ratio_chat'])} | {_f(o['attribution_accuracy'])} | "
            f"{_f(o.get('attribution_accuracy_calibrated'))} | {_f(o.get('attribution_accuracy_grouped'))} | "
            f"{_f(o['ratio_general'])} | {o['served_params']:,} | {o['artifact_bytes']:,} | "
            f"{_f(o['train_seconds_per_user'], 1)} |"
        )
    lines += _generation_lines(results)
    lines += _task_lines(results)
    lines += ["", "## Per user", ""]
    header = "| user | base ppl plain | base ppl chat |" + "".join(
        f" {n} plain | {n} chat | {n} attr | {n} general |" for n in methods
    )
    lines += [header, "|" + "---|" * (3 + 4 * len(methods))]
    for user, b in base["per_user"].items():
        cells = [user, _f(b["ppl_plain"], 2), _f(b["ppl_chat"], 2)]
        for m in methods.values():
            p = m["per_user"][user]
            cells += [
                _f(p["ppl_plain"], 2),
                _f(p["ppl_chat"], 2),
                _f(p["attribution_accuracy"], 2),
                _f(p["ratio_general"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for sweep in results.get("sweeps", []):
        lines += [
            "",
            f"## Sweep: {sweep['name']}",
            "",
            "| value | method | train samples/user | ppl plain | ppl chat | attribution (calibrated) "
            "| general ppl ratio | train s/user |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in sweep["points"]:
            attribution = f"{_f(p.get('attribution_accuracy'), 2)} ({_f(p.get('attribution_accuracy_calibrated'), 2)})"
            lines.append(
                f"| {p['value']} | {p['method']} | {_f(p['train_samples'], 1)} | {_f(p['ppl_plain'], 2)} | "
                f"{_f(p['ppl_chat'], 2)} | {attribution} | {_f(p.get('ratio_general'))} | "
                f"{_f(p['train_seconds_per_user'], 1)} |"
            )
    if charts:
        lines += ["", "## Charts", ""] + [f"![{k}]({v})" for k, v in sorted(charts.items())]
    return "\n".join(lines) + "\n"


def charts(results: dict, out: Path) -> dict[str, Path]:
    files = {"ppl_by_method": _ppl_by_method(results, out / "ppl_by_method.png")}
    for name, m in results["methods"].items():
        files[f"confusion_{name}"] = _confusion(m["confusion"], name, out / f"confusion_{name}.png")
        if "confusion_calibrated" in m:
            files[f"confusion_{name}_calibrated"] = _confusion(
                m["confusion_calibrated"], f"{name}, calibrated", out / f"confusion_{name}_calibrated.png"
            )
    if any(results["curves"].values()):
        files["loss_curves"] = _loss_curves(results["curves"], out / "loss_curves.png")
    for sweep in results.get("sweeps", []):
        if sweep["points"]:
            files[f"sweep_{sweep['name']}"] = _sweep(sweep, out / f"ppl_by_{sweep['name']}.png")
    return files


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _ppl_by_method(results: dict, path: Path) -> Path:
    base = results["base"]["per_user"].values()
    names = ["base"] + list(results["methods"])
    plain = [_mean(b["ppl_plain"] for b in base)] + [m["overall"]["ppl_plain"] for m in results["methods"].values()]
    chat = [_mean(b["ppl_chat"] for b in base)] + [m["overall"]["ppl_chat"] for m in results["methods"].values()]
    general = [results["base"]["ppl_general"]] + [m["overall"]["ppl_general"] for m in results["methods"].values()]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(names))
    for k, (label, values) in enumerate(
        [("held-out plain", plain), ("held-out chat", chat), ("general text", general)]
    ):
        ax.bar([i + (k - 1) * 0.27 for i in x], values, width=0.27, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("perplexity (mean over users)")
    ax.set_title("Perplexity by method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _confusion(confusion: dict, name: str, path: Path) -> Path:
    users, matrix = confusion["users"], confusion["normalized"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * len(users), 1.0 + 0.45 * len(users)))
    ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(users)), users, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(users)), users, fontsize=7)
    ax.set_xlabel("predicted (lowest loss prefix)")
    ax.set_ylabel("true author")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    ax.set_title(f"Attribution ({name})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _loss_curves(curves: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, points in curves.items():
        if not points:
            continue
        line = ax.plot([p["step"] for p in points], [p["train_loss"] for p in points], label=f"{name} train", alpha=0.6)
        val = [p for p in points if p["val_loss"] is not None]
        if val:
            ax.plot(
                [p["step"] for p in val],
                [p["val_loss"] for p in val],
                "o--",
                color=line[0].get_color(),
                label=f"{name} val",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over users)")
    ax.set_title("Loss curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _sweep(sweep: dict, path: Path) -> Path:
    """Held-out perplexity (left axis) and the general-text ratio (right axis) per setting."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    general_ax = ax.twinx()
    by_method: dict[str, list] = {}
    for p in sweep["points"]:
        by_method.setdefault(p["method"], []).append(p)
    numeric = sweep["name"] in ("samples", "prefix_len")
    for name, points in by_method.items():
        xs = [p["train_samples"] if sweep["name"] == "samples" else p["value"] for p in points]
        xs = xs if numeric else [str(x) for x in xs]
        ax.plot(xs, [p["ppl_plain"] for p in points], "o-", label=f"{name} plain")
        ax.plot(xs, [p["ppl_chat"] for p in points], "s--", label=f"{name} chat")
        general = [p.get("ratio_general") for p in points]
        if all(g is not None for g in general):
            general_ax.plot(xs, general, "^:", color="grey", label=f"{name} general ratio")
    ax.set_xlabel("training samples per user" if sweep["name"] == "samples" else sweep["name"])
    ax.set_ylabel("held-out perplexity")
    general_ax.set_ylabel("general ppl / base", fontsize=8)
    ax.set_title(f"Perplexity by {sweep['name']}")
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = general_ax.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
