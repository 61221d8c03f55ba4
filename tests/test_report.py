import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from report import decide, grade  # noqa: E402


def runs(**acc):
    return [{"experiment": e, "eval/train/exact_accuracy": a} for e, a in acc.items()]


def test_grades_follow_the_plan():
    assert [grade(a) for a in (0.95, 0.85, 0.6, 0.1, None)] == ["success", "good", "partial", "failure", "no result"]


def test_decision_tree_branches():
    assert "DEBUG BASELINE" in decide(runs(E0v2=0.5))[-1]
    assert "SUCCESS" in decide(runs(E0v2=0.96, E1v2=0.93))[-1]
    assert "INTERFACE" in decide(runs(E0v2=0.96, E1v2=0.1, E_diag1=0.2))[-1]
    assert "remaining" in decide(runs(E0v2=0.96, E1v2=0.1, E_diag1=0.95, E5_grad_clip=0.5))[-1]
    assert "Phase 3" in decide(runs(E0v2=0.96, E1v2=0.1, E_diag1=0.95, E5_grad_clip=0.97))[-1]
    every = dict(E0v2=0.96, E1v2=0.1, E_diag1=0.95, E4_lower_lr=0.1, E5_grad_clip=0.1, E6_combined=0.1,
                 E7_attention=0.1, E2_lpn=0.2, E3_lpn_var=0.1)
    assert "REDESIGN" in decide(runs(**every))[-1]
    # The best of several seeds counts.
    assert "SUCCESS" in decide(runs(E0v2=0.96) + runs(E1v2=0.2) + runs(E1v2=0.91))[-1]


def test_a_success_without_context_reliance_is_flagged():
    ok = runs(E0v2=0.96, E1v2=0.95)
    ok[1]["eval/train/context_reliance"] = 0.6
    assert "SUCCESS" in decide(ok)[-1] and "does not show" not in decide(ok)[-1]
    ok[1]["eval/train/context_reliance"] = 0.02
    verdict = decide(ok)[-1]
    assert "SUCCESS" in verdict and "E1v2's context reliance is +0.02" in verdict
    frozen = runs(E0v2=0.96, E1v2=0.1, E_diag1=0.95)
    frozen[2]["eval/train/context_reliance"] = 0.0
    assert "E_diag1's context reliance is +0.00" in decide(frozen)[-1]
    frozen[2]["eval/train/context_reliance"] = 0.5
    assert "does not show" not in decide(frozen)[-1]


def test_table_shows_reliance_and_each_test_set():
    from report import table

    run = {"name": "r", "experiment": "E1v2_families", "preset": "cpu_families", "seed": 0,
           "eval/train/exact_accuracy": 0.9, "eval/train/exact_accuracy_wrong_context": 0.25,
           "eval/train/context_reliance": 0.65, "ARC/unseen_params/pass@2": 0.8, "eval/unseen_params/context_reliance": 0.7,
           "ARC/unseen_families/pass@2": 0.0}  # fmt: skip
    head, _, row = ([c.strip() for c in line.strip("|").split("|")] for line in table([run]).splitlines())
    cells = dict(zip(head, row))
    assert cells["train reliance"] == "+0.65" and cells["train exact, wrong context"] == "25.0%"
    assert cells["unseen_params pass@2"] == "80.0%" and cells["unseen_families pass@2"] == "0.0%"
    assert cells["unseen_params reliance"] == "+0.70" and "unseen_families exact" not in cells  # no run has it


def test_an_adapted_evaluation_is_a_row_of_its_own_and_stays_out_of_the_verdict(tmp_path):
    import json

    import yaml

    from report import load, table

    for name, adapt, summary in (
        ("P4", {"target": "none", "steps": 0, "lr": 0.01}, {"eval/train/exact_accuracy": 0.95, "ARC/pass@1": 0.02, "ARC/pass@2": 0.03}),
        ("P4-adapt20", {"target": "context", "steps": 20, "lr": 0.2},
         {"eval/train/exact_accuracy": 0.99, "ARC/pass@1": 0.1, "ARC/pass@2": 0.15, "eval/test/adapt_objective_before": 0.7,
          "eval/test/adapt_objective_after": 0.5}),
        ("P4-all10", {"target": "all", "steps": 10, "lr": 0.001, "augmentations": 4},
         {"eval/train/exact_accuracy": 0.99, "ARC/pass@2": 0.4, "eval/test/adapt_ms_per_task": 812.4}),
    ):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"experiment": "E0v2", "seed": 0, "eval": {"adapt": adapt}}))
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    runs = [load(tmp_path / name) for name in ("P4", "P4-adapt20", "P4-all10")]
    head, _, plain, adapted, tuned = ([c.strip() for c in line.strip("|").split("|")] for line in table(runs).splitlines())
    plain, adapted, tuned = dict(zip(head, plain)), dict(zip(head, adapted)), dict(zip(head, tuned))
    assert tuned["adaptation"] == "all, 10 steps, lr 0.001, 4 copies" and tuned["adaptation ms per task"] == "812"
    assert plain["adaptation"] == "-" and adapted["adaptation"] == "context, 20 steps, lr 0.2"
    assert (plain["held-out pass@2"], adapted["held-out pass@2"]) == ("3.0%", "15.0%")
    assert adapted["held-out pass@1"] == "10.0%" and (adapted["objective before"], adapted["objective after"]) == ("0.700", "0.500")
    assert decide(runs)[0] == "E0v2: success (95.0%)"  # the adapted evaluation is not E0v2's training result
