"""The run report: what the runs show, the plan's verdict and the phase to run next, with figures.

    python -m trm.report                          # every run under runs/ -> runs/report/
    python -m trm.report runs/E0v2 runs/E1v2 runs/E_diag1 --out docs/report
    python -m trm.report runs --wandb ENTITY/PROJECT   # also the runs of a wandb project (online)

Reads run directories (``config.yaml``, ``summary.json``, ``metrics.jsonl``; a folder of run
directories is read whole) and writes ``report.md``, ``curves.png`` (learning curves of the runs
side by side) and ``gallery.png`` (held-out tasks of the run with the best held-out pass@2: its
demonstrations, the truth and its two best predictions, in the ARC palette) to ``--out``.

- *Status*: a run is complete (its schedule done), early-stopped (an ``early_stop`` rule ended it:
  a result, a failing one), partial (stopped before its planned steps: ``max_steps``, a smoke run,
  a killed run) or unfinished (no ``summary.json``). Partial and unfinished runs are listed but
  never enter a row or the verdict unless ``--include-partial``.
- *Rows*: one per experiment, preset and test-time adaptation, seeds aggregated (mean ± half
  their range when there are several): train exact accuracy with another task's and with the
  empty context, the context reliance, held-out pass@1/pass@2 (per test set on the family
  benchmark), steps, wall time, encoder diagnostics and, for encoder runs, the plan's success level
  against E0v2 of the same preset. An evaluation of a run's weights with ``eval.adapt`` is a row of
  its own (compare it with the run's) and stays out of the verdict.
- *Verdict*: the plan's decision tree (README, "Research workflow"), per preset, over the rows: the branch
  taken, why, and the phase to run next; a success whose context reliance is near zero is flagged.

Success levels (the plan's "what success looks like", on eval/train/exact_accuracy): *minimal
success* when it matches E0v2 (within MATCH of E0v2's mean), *good* at 80 % or more, *partial*
above 50 %, *failure* otherwise. E0v2 itself succeeds at 90 % (the plan's expectation).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from trm.checkpoint import write_text_atomic
from trm.config import conditioner_of, stopped_early, upgrade
from trm.errors import InputError

E0V2_SUCCESS, MATCH, GOOD, PARTIAL = 0.9, 0.05, 0.8, 0.5
# The conditioner each of the plan's experiments states: the control E0v2 is the puzzle-embedding
# TRM, every other one the demo encoder. A run of another conditioner under a plan name is a row of
# its own and never stands for that experiment in the verdict.
CONTROL, CONTROL_CONDITIONER, PLAN_CONDITIONER = "E0v2", "puzzle_embedding", "demo_encoder"
RELIANCE_FLOOR = 0.1  # below: the model scores about as well with another task's context
PHASE3 = ("E4_lower_lr", "E5_grad_clip", "E6_combined", "E7_attention")
PHASE2 = ("E2_lpn", "E3_lpn_var")
ARC_PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00", "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF",
               "#870C25")  # fmt: skip

# (column, metric, format) of the rows; per-set columns are added for the family benchmark.
COLUMNS = [
    ("train exact", "eval/train/exact_accuracy", "{:.1%}"),
    ("wrong context", "eval/train/exact_accuracy_wrong_context", "{:.1%}"),
    ("null context", "eval/train/exact_accuracy_null_context", "{:.1%}"),
    ("reliance", "eval/train/context_reliance", "{:+.2f}"),
    ("held-out exact", "eval/test/exact_accuracy", "{:.1%}"),
    ("held-out reliance", "eval/test/context_reliance", "{:+.2f}"),
    ("held-out pass@1", "ARC/pass@1", "{:.1%}"),
    ("held-out pass@2", "ARC/pass@2", "{:.1%}"),
    ("objective before", "eval/test/adapt_objective_before", "{:.3f}"),
    ("objective after", "eval/test/adapt_objective_after", "{:.3f}"),
    ("adaptation ms per task", "eval/test/adapt_ms_per_task", "{:.0f}"),
    ("context norm", "encoder/output_norm", "{:.3g}"),
    ("cross-task cosine", "encoder/cross_puzzle_cosine", "{:.3f}"),
    ("grad/encoder_norm", "grad/encoder_norm", "{:.3g}"),
    ("steps", "step", "{:.0f}"),
    ("wall time (min)", "time/train_minutes", "{:.1f}"),
]
# Learning-curve panels: (title, metric, a second metric drawn dashed).
CURVES = [
    ("training loss", "train/lm_loss", None),
    ("train exact accuracy (evaluation)", "eval/train/exact_accuracy", None),
    ("held-out pass@2", "ARC/pass@2", None),
    ("context norm", "encoder/output_norm", None),
    ("cross-task cosine of contexts", "encoder/cross_puzzle_cosine", None),
    ("gradient norm (dashed: encoder)", "grad/total_norm", "grad/encoder_norm"),
]


# Reading runs --------------------------------------------------------------------------------------


def _read(path: Path, kind: str):
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror})") from None
    try:
        value = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise InputError(f"{path}: not valid {kind.upper()} ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: does not hold a {kind.upper()} mapping")
    return value


def run_dirs(paths: list[Path]) -> list[Path]:
    """The run directories named, a folder of them standing for all it holds."""
    found = []
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: no such run directory")
        if (p / "config.yaml").is_file() or (p / "summary.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(d for d in p.iterdir() if (d / "config.yaml").is_file())
        else:
            raise InputError(f"{p}: not a run directory (no config.yaml)")
    return found


def load(run_dir: Path) -> dict:
    """A run's config keys, summary and status. Raises InputError naming a damaged file."""
    cfg = _read(run_dir / "config.yaml", "yaml") if (run_dir / "config.yaml").is_file() else {}
    summary = _read(run_dir / "summary.json", "json") if (run_dir / "summary.json").is_file() else {}
    return make_run(run_dir.name, run_dir, cfg, summary)


def make_run(name: str, path: Path | None, cfg: dict, summary: dict) -> dict:
    """What the report knows of a run: its summary, a few config keys, adaptation and status."""
    adapt = (cfg.get("eval") or {}).get("adapt") or {}
    run = {"name": name, "path": path, "experiment": cfg.get("experiment") or "-",
           "conditioner": conditioner_of(upgrade(cfg)) if cfg else summary.get("conditioner", "-"),
           "preset": cfg.get("preset") or "-", "seed": cfg.get("seed"), **summary}  # fmt: skip
    if "time/train_seconds" in summary:
        run["time/train_minutes"] = summary["time/train_seconds"] / 60
    if adapt.get("target", "none") != "none":
        run["adaptation"] = describe(adapt)
    run["status"] = status(run, cfg)
    return run


def describe(adapt: dict) -> str:
    """``eval.adapt`` in a few words: 'all, 10 steps, lr 0.001, 4 copies'."""
    copies = adapt.get("augmentations") or 1
    return (f"{adapt['target']}, {adapt.get('steps')} steps, lr {adapt.get('lr')}"
            + (f", {copies} copies" if adapt["target"] in ("encoder", "all") and copies > 1 else ""))  # fmt: skip


def status(run: dict, cfg: dict) -> str:
    """complete | early-stopped | evaluation (weights scored without training) | partial | unfinished."""
    if "step" not in run:
        return "unfinished"
    if stopped_early(run):
        return "early-stopped"
    if cfg.get("max_steps") == 0 and cfg.get("init_from"):
        return "evaluation"
    total = run.get("total_steps")
    if total is not None:
        return "complete" if run["step"] >= total else "partial"
    return "partial" if cfg.get("max_steps") else "complete"  # summaries written before total_steps


def from_wandb(project: str) -> list[dict]:
    """The runs of a wandb project (``entity/project``), as :func:`load` gives them (online)."""
    import wandb

    return [make_run(r.name, None, dict(r.config),
                     {k: v for k, v in r.summary.items() if isinstance(v, (int, float, str))})
            for r in wandb.Api().runs(project)]  # fmt: skip


# Rows and verdict ------------------------------------------------------------------------------------


def plan_name(experiment: str) -> tuple[str, str]:
    """(the plan's experiment, benchmark): ``E1v2_families`` is E1v2 on the family benchmark."""
    if experiment.endswith("_families"):
        return experiment.removesuffix("_families"), "families"
    return experiment, "arc"


def stands_for(row: dict) -> str | None:
    """The plan experiment a row is, for the verdict: its plan name where it ran the conditioner
    that experiment states (:data:`PLAN_CONDITIONER`), else None."""
    wanted = CONTROL_CONDITIONER if row["plan"] == CONTROL else PLAN_CONDITIONER
    return row["plan"] if row["conditioner"] == wanted else None


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (experiment, conditioner, preset, adaptation): each metric's mean over the seeds,
    its spread (max - min) under ``<metric>~``, and the seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["experiment"], r["conditioner"], r["preset"], r.get("adaptation", ""))].append(r)
    rows = []
    for (experiment, conditioner, preset, adaptation), members in groups.items():
        row = {"experiment": experiment, "conditioner": conditioner, "preset": preset, "adaptation": adaptation,
               "seeds": [m["seed"] for m in members]}  # fmt: skip
        keys = {k for m in members for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in keys - {"seed"}:
            values = [m[k] for m in members if isinstance(m.get(k), (int, float))]
            row[k] = float(np.mean(values))
            if len(values) > 1:
                row[k + "~"] = float(np.max(values) - np.min(values))
        rows.append(row)
    for r in rows:
        r["plan"], r["benchmark"] = plan_name(r["experiment"])
    baseline = {(r["preset"], r["benchmark"]): r.get("eval/train/exact_accuracy") for r in rows
                if stands_for(r) == CONTROL and not r["adaptation"]}  # fmt: skip
    for r in rows:
        if stands_for(r) != CONTROL and not r["adaptation"]:
            r["success"] = success_level(r.get("eval/train/exact_accuracy"), baseline.get((r["preset"], r["benchmark"])))
    return sorted(rows, key=lambda r: (r["preset"], r["experiment"], r["conditioner"], r["adaptation"]))


def success_level(accuracy: float | None, baseline: float | None) -> str:
    """The plan's level of an encoder run's train exact accuracy against E0v2's."""
    if accuracy is None:
        return "no result"
    if accuracy >= (baseline if baseline is not None else E0V2_SUCCESS) - MATCH:
        return "minimal success (matches E0v2)"
    if accuracy >= GOOD:
        return "good success"
    if accuracy > PARTIAL:
        return "partial success"
    return "failure"


def decide(rows: list[dict]) -> list[str]:
    """The plan's decision tree over the rows of one preset and benchmark (adapted evaluations left out): the
    figures it read, then '-> VERDICT: why; next'. A success whose training-set context reliance
    is under RELIANCE_FLOOR is flagged: the core then recognises each task from its test input and
    ignores the context, so the run does not show that the context carries the task."""
    plan_rows = [r for r in rows if not r["adaptation"] and stands_for(r)]
    acc = {r["plan"]: r["eval/train/exact_accuracy"] for r in plan_rows if "eval/train/exact_accuracy" in r}
    by_name = {r["plan"]: r for r in plan_rows}

    def say(e: str) -> str:
        if e not in acc:
            return f"{e}: no result"
        reliance = by_name[e].get("eval/train/context_reliance")
        return f"{e}: {acc[e]:.1%}" + (f", context reliance {reliance:+.2f}" if reliance is not None else "")

    def caveat(e: str) -> str:
        reliance = by_name.get(e, {}).get("eval/train/context_reliance")
        if reliance is None or reliance >= RELIANCE_FLOOR:
            return ""
        return (f" But {e}'s context reliance is {reliance:+.2f}: the core scores as well with another task's "
                f"context, so {e} does not show that the context carries the task (see the held-out sets).")

    def succeeds(e: str) -> bool:
        return e in acc and success_level(acc[e], acc.get("E0v2")).startswith("minimal")

    out = [say("E0v2")]
    out += [f"{r['experiment']} ran the {r['conditioner']} conditioner, not the plan's "
            f"{CONTROL_CONDITIONER if r['plan'] == CONTROL else PLAN_CONDITIONER}: a row of its own, not read here"
            for r in rows if not r["adaptation"] and not stands_for(r) and r["plan"] in (CONTROL, "E1v2", "E_diag1", *PHASE3, *PHASE2)]  # fmt: skip
    if "E0v2" not in acc:
        return out + ["-> RUN PHASE 1: no complete E0v2 run; run E0v2, E1v2 and E_diag1 (in parallel) first."]
    if acc["E0v2"] < E0V2_SUCCESS:
        return out + [f"-> DEBUG BASELINE: E0v2 reaches {acc['E0v2']:.1%} < {E0V2_SUCCESS:.0%}: the original TRM does "
                      "not memorise its tasks, so no encoder result can be read; fix the baseline, stop the encoder "
                      "experiments."]  # fmt: skip
    out.append(say("E1v2"))
    if succeeds("E1v2"):
        return out + [f"-> SUCCESS, PHASE 4: E1v2 matches E0v2 ({acc['E1v2']:.1%} vs {acc['E0v2']:.1%}): the encoder "
                      "memorises like the puzzle embedding; train on the full task set and score held-out tasks."
                      + caveat("E1v2")]  # fmt: skip
    out.append(say("E_diag1"))
    if "E_diag1" not in acc:
        return out + ["-> RUN E_diag1: E1v2 does not match E0v2; the frozen-encoder diagnostic tells the interface "
                      "from the encoder."]  # fmt: skip
    if not succeeds("E_diag1"):
        return out + [f"-> FIX THE ENCODER-TRM INTERFACE: even a frozen encoder's output gives {acc['E_diag1']:.1%} vs "
                      f"E0v2's {acc['E0v2']:.1%}: the TRM cannot use the encoder's context (compare "
                      "encoder/output_norm with E0v2's puzzle-embedding context)."]  # fmt: skip
    why = (f"E1v2 does not match E0v2 ({acc.get('E1v2', 0):.1%} vs {acc['E0v2']:.1%}) while a frozen encoder does "
           f"({acc['E_diag1']:.1%}): the interface is sound and encoder training is the problem")  # fmt: skip
    done3 = [e for e in PHASE3 if e in acc]
    out += [say(e) for e in done3]
    if any(succeeds(e) for e in done3):
        best = max(done3, key=acc.get)
        return out + [f"-> SUCCESS, PHASE 4: {best} matches E0v2 ({acc[best]:.1%}); {why}, and its change fixes it."
                      + caveat(best)]  # fmt: skip
    if len(done3) < len(PHASE3):
        missing = ", ".join(e for e in PHASE3 if e not in acc)
        return out + [f"-> RUN PHASE 3 ({missing}): {why}; try the training hyperparameters." + caveat("E_diag1")]
    done2 = [e for e in PHASE2 if e in acc]
    out += [say(e) for e in done2]
    if any(succeeds(e) for e in done2):
        best = max(done2, key=acc.get)
        return out + [f"-> SUCCESS, PHASE 4: {best} matches E0v2 ({acc[best]:.1%}): the deeper LPN encoder learns "
                      "where the standard one did not." + caveat(best)]  # fmt: skip
    if len(done2) < len(PHASE2):
        missing = ", ".join(e for e in PHASE2 if e not in acc)
        return out + [f"-> RUN PHASE 2 ({missing}): no Phase 3 change helps; try the LPN encoders."]
    return out + ["-> REDESIGN THE ENCODER: neither the hyperparameters (Phase 3) nor the LPN encoders (Phase 2) "
                  "bring an encoder to E0v2's accuracy."]  # fmt: skip


# Markdown -------------------------------------------------------------------------------------------


def set_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Columns of the test sets the summaries name (the family benchmark's unseen_params and
    unseen_families): each set's exact accuracy, reliance, pass@2 and adaptation figures."""
    sets = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("ARC/") and k.count("/") == 2
                   and not k.endswith("~")})  # fmt: skip
    return [col for name in sets for col in (
        (f"{name} exact", f"eval/{name}/exact_accuracy", "{:.1%}"),
        (f"{name} reliance", f"eval/{name}/context_reliance", "{:+.2f}"),
        (f"{name} pass@2", f"ARC/{name}/pass@2", "{:.1%}"),
        (f"{name} objective after", f"eval/{name}/adapt_objective_after", "{:.3f}"),
        (f"{name} adaptation ms per task", f"eval/{name}/adapt_ms_per_task", "{:.0f}"),
    )]  # fmt: skip


def cell(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        return "-"
    text = fmt.format(row[key])
    if key + "~" in row:
        text += " ± " + fmt.format(row[key + "~"] / 2).lstrip("+")
    return text


def table(rows: list[dict]) -> str:
    columns = COLUMNS[:8] + set_columns(rows) + COLUMNS[8:]
    columns = [c for c in columns if any(c[1] in r for r in rows)]  # no column that no row has
    head = ["experiment", "conditioner", "preset", "adaptation", "seeds", "success level"] + [c for c, _, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        seeds = ",".join(str(s) for s in r["seeds"])
        cells = [r["experiment"], r["conditioner"], r["preset"], r["adaptation"] or "-", seeds, r.get("success", "-")]
        lines.append("| " + " | ".join(cells + [cell(r, key, fmt) for _, key, fmt in columns]) + " |")
    return "\n".join(lines)


def run_list(runs: list[dict]) -> str:
    lines = ["| run | experiment | conditioner | preset | seed | status | steps | stop reason |", "|" + " --- |" * 8]
    for r in runs:
        steps = f"{r['step']:.0f} of {r['total_steps']:.0f}" if "total_steps" in r else str(r.get("step", "-"))
        lines.append(f"| {r['name']} | {r['experiment']} | {r['conditioner']} | {r['preset']} | {r['seed']} | {r['status']} | "
                     f"{steps} | {r.get('stop_reason', '-')} |")  # fmt: skip
    return "\n".join(lines)


# Figures ---------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot drawing to files (no display needed), imported only when a figure is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(runs: list[dict], out: Path) -> Path | None:
    """Learning curves of the runs with a metrics.jsonl, one line each, one panel per metric."""
    plt = _pyplot()

    series = {r["name"]: read_metrics(r["path"] / "metrics.jsonl") for r in runs if r.get("path")}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, key, dashed) in zip(axes.flat, CURVES):
        for i, (name, rows) in enumerate(series.items()):
            colour = f"C{i % 10}"
            for k, style in ((key, "-"), (dashed, "--")):
                points = [(row["step"], row[k]) for row in rows if k and isinstance(row.get(k), (int, float))]
                if points:
                    ax.plot(*zip(*points), style, color=colour, label=name if style == "-" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "train/lm_loss" or key.startswith("grad/"):
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut by a kill is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def draw_grid(ax, grid: np.ndarray | None, title: str = "") -> None:
    """An ARC grid in the standard palette, cell edges in grey; None draws an empty panel."""
    from matplotlib.colors import ListedColormap

    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    if grid is None:
        ax.axis("off")
        return
    if grid.size == 0:  # an empty prediction
        return
    h, w = grid.shape
    ax.imshow(grid, cmap=ListedColormap(ARC_PALETTE), vmin=0, vmax=9, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, w, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, h, 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="minor", length=0)


def gallery(tasks: list[dict], out: Path, title: str, demos_shown: int = 3) -> Path:
    """One row per task: up to ``demos_shown`` demonstration pairs, the test input, the truth and
    the two best predictions (marked right or wrong). ``tasks``: dicts with name, demos
    [(input, output)], input, truth, attempts [grid, ...] (numpy grids)."""
    plt = _pyplot()

    cols = 2 * demos_shown + 4
    fig, axes = plt.subplots(len(tasks), cols, figsize=(1.6 * cols, 1.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for j in range(demos_shown):
            pair = task["demos"][j] if j < len(task["demos"]) else (None, None)
            draw_grid(row[2 * j], pair[0], f"{task['name']}\ndemo {j + 1} in" if j == 0 else f"demo {j + 1} in")
            draw_grid(row[2 * j + 1], pair[1], "out")
        draw_grid(row[-4], task["input"], "test input")
        draw_grid(row[-3], task["truth"], "truth")
        for k in range(2):
            guess = task["attempts"][k] if k < len(task["attempts"]) else None
            right = guess is not None and task["truth"] is not None and np.array_equal(guess, task["truth"])
            draw_grid(row[-2 + k], guess, f"attempt {k + 1}: " + ("right" if right else "wrong"))
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "gallery.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def predicted_tasks(run_dir: Path, count: int) -> list[dict]:
    """``count`` held-out tasks of a run (the original versions) with its two best predictions,
    from its latest checkpoint's EMA weights, on the CPU, with the test-time adaptation its
    evaluations used."""
    import torch

    from trm.data.dataset import ArcSplit
    from trm.data.grids import decode_grid
    from trm.evaluate import grid_from_key, predict_examples, ranked_grids, select_examples
    from trm.predict import load_run

    model, cfg = load_run(str(run_dir), torch.device("cpu"))
    split = ArcSplit(cfg.data.resolved_path(), "test")
    idx = select_examples(split, 1, groups=count)
    idx = idx[np.unique(split.example_task(idx), return_index=True)[1]]  # the first test input of each task
    records = predict_examples(model, split, idx, 16, torch.device("cpu"), contextlib.nullcontext,
                               model.conditioner.demos, cfg.eval.adapt)  # fmt: skip
    ranked = ranked_grids(records)
    size, out = split.grid_size, []
    for i in idx:
        task, pair = int(split.example_task(np.asarray([i]))[0]), int(split.example_pair[i])
        pool_rows = [r for r in split.demo_rows(np.asarray([i]))[0] if r >= 0]
        demos_ = [(decode_grid(split.demo_inputs[r], size), decode_grid(split.demo_labels[r], size)) for r in pool_rows]
        attempts = [grid_from_key(g) for g in ranked.get((task, pair), [])[:2]]
        out.append({"name": split.tasks[task].split(":")[-1][:24], "demos": demos_, "input": decode_grid(split.inputs[i], size),
                    "truth": decode_grid(split.labels[i], size), "attempts": attempts})  # fmt: skip
    return out


# Command line ----------------------------------------------------------------------------------------


def report(runs: list[dict], include_partial: bool = False) -> tuple[str, list[dict]]:
    """The markdown report of ``runs`` and the rows it holds."""
    used = [r for r in runs if r["status"] in ("complete", "early-stopped", "evaluation")
            or (include_partial and r["status"] == "partial")]  # fmt: skip
    left_out = [r for r in runs if r not in used]
    rows = aggregate(used)
    parts = ["## Results", "", table(rows) if rows else "(no complete run)", ""]
    for preset, benchmark in sorted({(r["preset"], r["benchmark"]) for r in rows}):
        where = ("preset " + preset if preset != "-" else "full size") + (", family benchmark" if benchmark == "families" else "")
        parts += [f"## Verdict ({where})", ""]
        parts += [f"- {line}" for line in decide([r for r in rows if (r["preset"], r["benchmark"]) == (preset, benchmark)])]
        parts += [""]
    parts += ["## Runs", "", run_list(runs), ""]
    if left_out:
        hint = "; --include-partial counts the partial ones" if any(r["status"] == "partial" for r in left_out) else ""
        parts += ["Left out of the rows and the verdict" + hint + ": "
                  + ", ".join(f"{r['name']} ({r['status']})" for r in left_out), ""]  # fmt: skip
    return "\n".join(parts), rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trm.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="*", type=Path, help="run directories, or folders of them (default: runs)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="where report.md and the PNGs go")
    p.add_argument("--include-partial", action="store_true", help="count runs stopped before their planned steps")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this wandb project (online)")
    p.add_argument("--gallery", type=Path, help="the run whose held-out predictions to draw (default: best pass@2)")
    p.add_argument("--gallery-tasks", type=int, default=6)
    a = p.parse_args(argv)
    try:
        runs = [load(d) for d in run_dirs(a.runs or [Path("runs")])]
        if a.wandb:
            runs += from_wandb(a.wandb)
        if not runs:
            raise InputError(f"no run directory (with config.yaml) in {', '.join(map(str, a.runs or ['runs']))}")
        text, rows = report(runs, a.include_partial)
        a.out.mkdir(parents=True, exist_ok=True)
        figures = []
        if (path := curves([r for r in runs if r["status"] not in ("unfinished", "evaluation")], a.out)) is not None:
            figures.append(path)
        best = a.gallery or max((r for r in runs if r.get("path") and r["status"] != "unfinished" and "ARC/pass@2" in r),
                                key=lambda r: r["ARC/pass@2"], default={}).get("path")  # fmt: skip
        if best is not None:
            figures.append(gallery(predicted_tasks(Path(best), a.gallery_tasks), a.out,
                                   f"{Path(best).name}: held-out tasks, its two best predictions"))  # fmt: skip
        text += "\n" + "\n".join(f"![{f.stem}]({f.name})" for f in figures) + "\n"
        write_text_atomic(a.out / "report.md", text)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(text)
    print(f"written: {a.out / 'report.md'}" + "".join(f", {f}" for f in figures))


if __name__ == "__main__":
    main()
