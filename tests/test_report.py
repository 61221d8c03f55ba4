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
