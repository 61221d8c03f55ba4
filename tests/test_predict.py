"""python -m trm.predict: ARC Prize submission files from a trained run."""

import json

import numpy as np
import pytest

from trm.cli import compose
from trm.data.tasks import ArcTask, Pair, load_source
from trm.evaluate import Prediction, grid_key
from trm.predict import FALLBACK, main, pass_at_2, submission
from trm.train import train

from helpers import tiny_overrides


def g(rows):
    return np.asarray(rows, np.uint8)


def P(task, pair, grid, q=0.5):
    return Prediction(task=task, pair=pair, grid=grid_key(g(grid)), answer=b"", q_halt_prob=q)


TASKS = [ArcTask("src:t0", (Pair(g([[1]]), g([[2]])),), (Pair(g([[1]]), g([[2]])), Pair(g([[3]]), g([[4]])))),
         ArcTask("src:t1", (Pair(g([[1]]), g([[2]])),), (Pair(g([[5]]), None),))]  # fmt: skip


def test_submission_takes_the_two_most_voted_non_empty_grids_in_task_order():
    records = [P(0, 0, [[2]]), P(0, 0, [[2]]), P(0, 0, [[7]], q=0.9), P(0, 0, [[8]], q=0.1),  # 2 votes, then a tie
               P(0, 1, np.zeros((0, 0))), P(0, 1, np.zeros((0, 0))), P(0, 1, [[4, 4]]),  # the empty grid never submitted
               P(1, 0, np.zeros((0, 0)))]  # fmt: skip
    out = submission(TASKS, records)
    assert out == {"t0": [{"attempt_1": [[2]], "attempt_2": [[7]]}, {"attempt_1": [[4, 4]], "attempt_2": FALLBACK}],
                   "t1": [{"attempt_1": FALLBACK, "attempt_2": FALLBACK}]}  # fmt: skip


def test_pass_at_2_by_hand_over_the_tasks_with_answers():
    predicted = {"t0": [{"attempt_1": [[9]], "attempt_2": [[2]]}, {"attempt_1": [[4, 4]], "attempt_2": [[0]]}],
                 "t1": [{"attempt_1": [[0]], "attempt_2": [[0]]}]}  # fmt: skip
    assert pass_at_2(TASKS, predicted) == (0.5, 1)  # t0: 1 of 2 test inputs; t1 has no answer


@pytest.mark.parametrize("entry", ["pretrain", "encoder"])
def test_predict_writes_a_submission_for_tasks_with_and_without_answers(tiny_dataset, tmp_path, capsys, entry):
    overrides = tiny_overrides(tiny_dataset, tmp_path / "run", "max_steps=4")
    if entry == "encoder":

        overrides = [o.replace("experiment=E0v2", "experiment=E1v2") for o in overrides] + ["data.split=trm"]
        train(*compose("cfg_pretrain_encoder", overrides))
    else:
        train(*compose("cfg_pretrain", overrides))
    task = next(t for t in load_source("arc-agi-1/evaluation") if t.max_side <= 6)
    folder = tmp_path / "tasks"
    folder.mkdir()
    pairs = lambda ps, answers: [{"input": p.input.tolist(), **({"output": p.output.tolist()} if answers else {})} for p in ps]  # noqa: E731
    for name, answers in (("known", True), ("unknown", False)):
        (folder / f"{name}.json").write_text(json.dumps({"train": pairs(task.demos, True), "test": pairs(task.tests, answers)}))
    out = tmp_path / "submission.json"
    # Adaptation on: the context for the puzzle embedding, every weight per task for the encoder model.
    adapt = ["--adapt-target", "all", "--adapt-copies", "2", "--adapt-lr", "0.001"] if entry == "encoder" else []
    main([str(tmp_path / "run"), str(folder), "--out", str(out), "--augmentations", "3", "--adapt-steps", "2", *adapt])
    result = json.loads(out.read_text())
    assert sorted(result) == ["known", "unknown"]
    for entries in result.values():
        assert len(entries) == len(task.tests)
        for e in entries:
            assert sorted(e) == ["attempt_1", "attempt_2"]
            for grid in e.values():
                assert grid and all(len(row) == len(grid[0]) and all(0 <= c <= 9 for c in row) for row in grid)
    printed = capsys.readouterr().out
    assert f"{out}: 2 tasks" in printed and "pass@2" in printed and "over the 1 tasks with answers" in printed
    before = out.read_bytes()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), str(folder), "--out", str(out)])
    assert out.read_bytes() == before and "is never replaced" in capsys.readouterr().err


def test_a_challenges_file_without_solutions_loads_for_prediction_only(tmp_path):
    from trm.data.tasks import ArcDataError

    task = {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[3]]}]}
    path = tmp_path / "arc-agi_test_challenges.json"
    path.write_text(json.dumps({"abc": task}))
    with pytest.raises(ArcDataError, match="solutions file"):
        load_source(str(path))
    (loaded,) = load_source(str(path), need_answers=False)
    assert loaded.tests[0].output is None and loaded.tests[0].input.tolist() == [[3]]
