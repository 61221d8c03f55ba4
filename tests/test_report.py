"""The run report (trm/report.py) on hand-made run folders."""

import json

import numpy as np
import pytest
import yaml

from trm.report import ARC_PALETTE, draw_grid, load, main, report, run_dirs, success_level, table


def make_run(root, name, experiment, exact=None, preset="cpu", seed=0, step=1000, total=1000, cfg=None, **summary):
    """A run folder as training leaves it: config.yaml and summary.json (with ``step`` of ``total``)."""
    folder = root / name
    folder.mkdir(parents=True)
    conditioner = "puzzle_embedding" if experiment.startswith("E0v2") else "demo_encoder"  # as the experiment states
    (folder / "config.yaml").write_text(yaml.safe_dump({"experiment": experiment, "preset": preset, "seed": seed,
                                                        "arch": {"conditioner": conditioner}, **(cfg or {})}))  # fmt: skip
    if exact is not None:
        summary["eval/train/exact_accuracy"] = exact
    summary.setdefault("stop_reason", "finished" if step >= total else f"max_steps={step}")
    (folder / "summary.json").write_text(json.dumps({"step": step, "total_steps": total, **summary}))
    return folder


def verdict(root, *args) -> str:
    """The verdict line of the CPU preset's section."""
    text, _ = report([load(d) for d in run_dirs([root])], *args)
    section = text.split("## Verdict (preset cpu)\n", 1)[1]
    return next(line for line in section.splitlines() if line.startswith("- ->"))


def test_success_levels_follow_the_plan():
    assert success_level(0.93, 0.96) == "minimal success (matches E0v2)"
    assert success_level(0.85, 0.96) == "good success"
    assert success_level(0.6, 0.96) == "partial success"
    assert success_level(0.3, 0.96) == "failure"
    assert success_level(0.87, None) == "minimal success (matches E0v2)"  # no E0v2: the plan's 90 %
    assert success_level(0.84, None) == "good success"
    assert success_level(None, 0.9) == "no result"


FAIL = 0.1
BRANCHES = [  # runs of one preset -> the verdict's first words
    ({"E1v2": 0.95}, "RUN PHASE 1"),
    ({"E0v2": 0.5}, "DEBUG BASELINE"),
    ({"E0v2": 0.96, "E1v2": 0.95}, "SUCCESS, PHASE 4: E1v2 matches"),
    ({"E0v2": 0.96, "E1v2": FAIL}, "RUN E_diag1"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.2}, "FIX THE ENCODER-TRM INTERFACE"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.95, "E5_grad_clip": FAIL}, "RUN PHASE 3 (E4_lower_lr, E6_combined, E7_attention)"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.95, "E5_grad_clip": 0.94}, "SUCCESS, PHASE 4: E5_grad_clip matches"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.95, "E4_lower_lr": FAIL, "E5_grad_clip": FAIL, "E6_combined": FAIL,
      "E7_attention": 0.6}, "RUN PHASE 2 (E2_lpn, E3_lpn_var)"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.95, "E4_lower_lr": FAIL, "E5_grad_clip": FAIL, "E6_combined": FAIL,
      "E7_attention": FAIL, "E3_lpn_var": 0.97}, "SUCCESS, PHASE 4: E3_lpn_var matches"),
    ({"E0v2": 0.96, "E1v2": FAIL, "E_diag1": 0.95, "E4_lower_lr": FAIL, "E5_grad_clip": FAIL, "E6_combined": FAIL,
      "E7_attention": FAIL, "E2_lpn": 0.85, "E3_lpn_var": FAIL}, "REDESIGN THE ENCODER"),
]  # fmt: skip


@pytest.mark.parametrize("accuracy, expected", BRANCHES)
def test_every_branch_of_the_decision_tree(tmp_path, accuracy, expected):
    for experiment, exact in accuracy.items():
        make_run(tmp_path, experiment, experiment, exact)
    make_run(tmp_path, "other-preset-E0v2", "E0v2", 0.2, preset="cpu_families")  # another verdict of its own
    assert verdict(tmp_path).startswith(f"- -> {expected}")


def test_a_smoke_run_never_decides_unless_asked(tmp_path):
    make_run(tmp_path, "smoke", "E0v2", 0.1, step=5, total=1000)
    text, rows = report([load(d) for d in run_dirs([tmp_path])])
    assert not rows and "| smoke | E0v2 | puzzle_embedding | cpu | 0 | partial | 5 of 1000 | max_steps=5 |" in text
    assert "Left out" in text and "smoke (partial)" in text
    assert verdict(tmp_path, True).startswith("- -> DEBUG BASELINE")  # --include-partial
    make_run(tmp_path, "full", "E0v2", 0.97)
    make_run(tmp_path, "E1v2", "E1v2", 0.3)
    assert verdict(tmp_path).startswith("- -> RUN E_diag1")  # the complete E0v2 decides, the smoke run not


def test_an_early_stopped_run_is_a_result(tmp_path):
    make_run(tmp_path, "E0v2", "E0v2", 0.97)
    make_run(tmp_path, "E1v2", "E1v2", 0.04, step=500, stop_reason="early stop: eval/train/exact_accuracy = 0.04 < 0.2")
    make_run(tmp_path, "E_diag1", "E_diag1", 0.1)
    _, rows = report([load(d) for d in run_dirs([tmp_path])])
    assert {r["experiment"]: r.get("success") for r in rows}["E1v2"] == "failure"
    assert verdict(tmp_path).startswith("- -> FIX THE ENCODER-TRM INTERFACE")


def test_seeds_make_one_row_with_mean_and_spread(tmp_path):
    make_run(tmp_path, "E0v2", "E0v2", 0.96)
    for seed, exact in ((0, 0.8), (1, 0.9)):
        make_run(tmp_path, f"E1v2-s{seed}", "E1v2", exact, seed=seed, **{"time/train_seconds": 600.0 * (seed + 1)})
    text, rows = report([load(d) for d in run_dirs([tmp_path])])
    head, _, *lines = [[c.strip() for c in line.strip("|").split("|")] for line in table(rows).splitlines()]
    row = dict(zip(head, next(line for line in lines if line[0] == "E1v2")))
    assert row["seeds"] == "0,1" and row["train exact"] == "85.0% ± 5.0%" and row["wall time (min)"] == "15.0 ± 5.0"
    assert row["success level"] == "good success"


def test_a_success_without_context_reliance_is_flagged(tmp_path):
    make_run(tmp_path, "E0v2", "E0v2", 0.96)
    make_run(tmp_path, "E1v2", "E1v2", 0.95, **{"eval/train/context_reliance": 0.02})
    line = verdict(tmp_path)
    assert line.startswith("- -> SUCCESS") and "E1v2's context reliance is +0.02" in line


def test_family_runs_get_their_own_verdict_against_their_own_baseline(tmp_path):
    make_run(tmp_path, "E0v2_families", "E0v2_families", 0.93, preset="cpu_families")
    make_run(tmp_path, "E1v2_families", "E1v2_families", 0.02, preset="cpu_families",
             **{"ARC/unseen_params/pass@2": 0.0, "ARC/unseen_families/pass@2": 0.0})  # fmt: skip
    text, rows = report([load(d) for d in run_dirs([tmp_path])])
    assert "## Verdict (preset cpu_families, family benchmark)" in text
    assert "- -> RUN E_diag1" in text and {r["experiment"]: r.get("success") for r in rows}["E1v2_families"] == "failure"
    assert "unseen_params pass@2" in table(rows)


def test_an_adapted_evaluation_is_a_row_of_its_own_and_stays_out_of_the_verdict(tmp_path):
    make_run(tmp_path, "P4", "E0v2", 0.95, **{"ARC/pass@1": 0.02, "ARC/pass@2": 0.03})
    make_run(tmp_path, "P4-all10", "E0v2", 0.99, step=0, cfg={"init_from": "runs/P4", "max_steps": 0,
             "eval": {"adapt": {"target": "all", "steps": 10, "lr": 0.001, "augmentations": 4}}},
             **{"ARC/pass@2": 0.4, "eval/test/adapt_ms_per_task": 812.4})  # fmt: skip
    text, rows = report([load(d) for d in run_dirs([tmp_path])])
    head, _, *lines = [[c.strip() for c in line.strip("|").split("|")] for line in table(rows).splitlines()]
    plain, tuned = (dict(zip(head, line)) for line in lines)
    assert plain["adaptation"] == "-" and tuned["adaptation"] == "all, 10 steps, lr 0.001, 4 copies"
    assert (plain["held-out pass@2"], tuned["held-out pass@2"], tuned["adaptation ms per task"]) == ("3.0%", "40.0%", "812")
    assert "| P4-all10 | E0v2 | puzzle_embedding | cpu | 0 | evaluation |" in text
    assert "- E0v2: 95.0%" in text  # the adapted evaluation's 99 % is not E0v2's training result


def test_a_damaged_or_missing_run_is_named_in_one_line(tmp_path, capsys):
    good = make_run(tmp_path, "E0v2", "E0v2", 0.96)
    (good / "summary.json").write_text('{"step": 10, "eval/train/exa')  # cut by a kill
    with pytest.raises(SystemExit) as exit_:
        main([str(good), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1
    assert f"error: {good / 'summary.json'}: not valid JSON" in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope")])
    assert f"error: {tmp_path / 'nope'}: no such run directory" in capsys.readouterr().err


def test_report_writes_markdown_and_learning_curves(tmp_path, capsys):
    for name, exact in (("E0v2", 0.96), ("E1v2", 0.3)):
        folder = make_run(tmp_path / "runs", name, name, exact)
        rows = [{"step": s, "train/lm_loss": 2.0 / s, "eval/train/exact_accuracy": exact * s / 30} for s in (10, 20, 30)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    written = (tmp_path / "out" / "report.md").read_text()
    assert "## Verdict (preset cpu)" in written and "![curves](curves.png)" in written
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RUN E_diag1" in capsys.readouterr().out


def test_grids_are_drawn_in_the_arc_palette():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(10, dtype=np.uint8).reshape(2, 5)
    fig, ax = plt.subplots(figsize=(5, 2), dpi=100)
    draw_grid(ax, grid)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    height = image.shape[0]
    for (r, c), colour in np.ndenumerate(grid):
        x, y = ax.transData.transform((c, r))  # the cell's centre, in pixels from the bottom left
        expected = tuple(int(ARC_PALETTE[colour][i : i + 2], 16) for i in (1, 3, 5))
        assert tuple(image[int(height - y), int(x)]) == expected
    plt.close(fig)


def test_runs_of_a_wandb_project_join_the_local_ones(tmp_path, monkeypatch, capsys):
    """--wandb reads each online run's config and summary (the API faked here: no network)."""
    import sys
    import types

    class Run:
        def __init__(self, name, experiment, exact):
            self.name, self.config = name, {"experiment": experiment, "preset": "cpu", "seed": 0,
                                              "arch": {"encoder_type": "standard"}}  # written before arch.conditioner
            self.summary = {"step": 10, "total_steps": 10, "eval/train/exact_accuracy": exact, "_wandb": {"runtime": 3}}

    api = types.SimpleNamespace(runs=lambda project: [Run("E1v2-online", "E1v2", 0.95)] if project == "me/proj" else [])
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=lambda: api))
    make_run(tmp_path / "runs", "E0v2", "E0v2", 0.97)
    main([str(tmp_path / "runs"), "--wandb", "me/proj", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| E1v2-online | E1v2 | demo_encoder | cpu | 0 | complete | 10 of 10 |" in out and "SUCCESS, PHASE 4: E1v2 matches" in out


def test_a_run_of_another_conditioner_under_the_controls_name_is_its_own_row_and_not_the_control(tmp_path):
    """An encoder run named E0v2 (``pretrain_encoder.py experiment=E0v2 arch.conditioner=demo_encoder``,
    or one written before the entry points refused it) beside the real control."""
    make_run(tmp_path, "E0v2", "E0v2", 0.96)
    make_run(tmp_path, "E0v2-encoder", "E0v2", 0.30, cfg={"arch": {"conditioner": "demo_encoder"}})
    make_run(tmp_path, "E1v2", "E1v2", 0.95)
    text, rows = report([load(d) for d in run_dirs([tmp_path])])
    e0v2 = {r["conditioner"]: r for r in rows if r["experiment"] == "E0v2"}
    assert set(e0v2) == {"puzzle_embedding", "demo_encoder"}
    assert e0v2["puzzle_embedding"]["eval/train/exact_accuracy"] == 0.96 and "success" not in e0v2["puzzle_embedding"]
    assert e0v2["demo_encoder"]["success"] == "failure"  # judged against the control, like any encoder run
    assert "| E0v2 | demo_encoder | cpu | - | 0 | failure | 30.0% |" in text
    assert "E0v2 ran the demo_encoder conditioner, not the plan's puzzle_embedding" in text
    assert verdict(tmp_path) == "- -> SUCCESS, PHASE 4: E1v2 matches E0v2 (95.0% vs 96.0%): the encoder memorises like " \
                                "the puzzle embedding; train on the full task set and score held-out tasks."
