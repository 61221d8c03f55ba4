"""The conditioning seam: a conditioner defined outside the project plugs in without a change to
any module; the model imports no data or loop code; each default is written once; runs written
before ``arch.conditioner`` existed still resume, start other runs, predict and report."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from encoders.config import EncoderArchConfig
from trm import checkpoint
from trm.cli import compose
from trm.config import NAMES, TrainConfig
from trm.data.dataset import ArcSplit
from trm.data.families import FamilyOptions
from trm.data.tasks import load_source
from trm.model.conditioning import CONDITIONERS, Conditioner, Conditioning, ParamGroup, register_conditioner
from trm.model.layers import linear, rms_norm
from trm.report import load
from trm.rundir import flatten
from trm.train import build_model, train

from helpers import ROOT, final_state, read_rows, tiny_overrides

LR_SCALE = 0.5


class ColourTransitions(Conditioner):
    """A conditioner the project does not know: each demonstration pair as the counts of its
    (input colour, output colour) cell transitions, mapped to a vector; the task's context the mean
    of its pairs' vectors, mapped to the context positions. Its weights train at LR_SCALE x lr."""

    arch_schema = EncoderArchConfig  # pretrain_encoder.py's arch keys
    demos = "padded"

    def __init__(self, arch, metadata):
        super().__init__()
        self.arch, self.vocab = arch, metadata["vocab_size"]
        self.pair = linear(self.vocab * self.vocab, 16)
        self.to_context = linear(16, arch.puzzle_emb_len * arch.hidden_size)

    def param_groups(self):
        return [ParamGroup("transitions_lr", list(self.parameters()), lr_scale=LR_SCALE)]

    def encode_dense(self, demo_inputs, demo_labels):
        counts = torch.einsum("...lv,...lw->...vw", F.one_hot(demo_inputs.long(), self.vocab).float(),
                              F.one_hot(demo_labels.long(), self.vocab).float())  # fmt: skip
        return self.pair(counts.flatten(-2) / demo_inputs.shape[-1])  # (..., D, 16)

    def context_of_pairs(self, pairs, mask):
        m = mask.unsqueeze(-1).to(pairs.dtype)
        task = (pairs * m).sum(-2) / m.sum(-2).clamp_min(1)
        context = self.to_context(task).view(-1, self.arch.puzzle_emb_len, self.arch.hidden_size)
        return Conditioning(rms_norm(context))

    def forward(self, batch):
        return self.context_of_pairs(self.encode_dense(batch["demo_inputs"], batch["demo_labels"]), batch["demo_mask"])


@pytest.fixture(scope="module")
def transitions():
    if "colour_transitions" not in CONDITIONERS:
        register_conditioner("colour_transitions")(ColourTransitions)
    yield
    del CONDITIONERS["colour_transitions"]


def encoder_overrides(tiny_dataset, run_dir, *extra):
    """A tiny run of pretrain_encoder.py (the tiny dataset is built in trm mode)."""
    common = [o.replace("experiment=E0v2", "experiment=E1v2") for o in tiny_overrides(tiny_dataset, run_dir)]
    return common + ["data.split=trm", *extra]


def test_a_conditioner_defined_here_trains_evaluates_adapts_and_predicts(transitions, tiny_dataset, tmp_path, capsys):
    from trm.predict import main as predict

    run_dir = tmp_path / "run"
    cfg, raw = compose("cfg_pretrain_encoder", encoder_overrides(tiny_dataset, run_dir, "arch.conditioner=colour_transitions"))
    summary = train(cfg, raw)
    assert summary["conditioner"] == "colour_transitions" and raw["arch"]["conditioner"] == "colour_transitions"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["arch"]["conditioner"] == "colour_transitions"

    # Its parameter group is the optimiser's: trained, at its own learning rate, warmed up as the core.
    rows = [r for r in read_rows(run_dir) if "train/lr" in r]
    assert rows and all(r["train/transitions_lr"] == pytest.approx(LR_SCALE * r["train/lr"]) for r in rows)
    torch.manual_seed(cfg.seed)  # the initial weights, as the loop draws them
    untrained = build_model(cfg, ArcSplit(tiny_dataset[0], "train").meta).state_dict()
    trained = final_state(run_dir)["model"]
    assert not torch.equal(trained["conditioner.pair.weight"], untrained["conditioner.pair.weight"])

    # Evaluation with the reliance passes.
    for key in ("eval/train/exact_accuracy_wrong_context", "eval/train/exact_accuracy_null_context",
                "eval/train/context_reliance", "eval/test/context_reliance", "ARC/pass@2"):  # fmt: skip
        assert key in summary, key

    # Test-time adaptation of the context, and fine-tuning of every weight per task through its dense encoding.
    for target, lr in (("context", "0.1"), ("all", "0.001")):
        scored = tmp_path / f"adapt-{target}"
        cfg, raw = compose("cfg_pretrain_encoder", encoder_overrides(
            tiny_dataset, scored, "arch.conditioner=colour_transitions", f"init_from={run_dir}", "max_steps=0",
            "eval.reliance=false", f"eval.adapt.target={target}", "eval.adapt.steps=2", f"eval.adapt.lr={lr}"))  # fmt: skip
        adapted = train(cfg, raw)
        assert adapted["eval/test/adapt_objective_after"] <= adapted["eval/test/adapt_objective_before"] + 1e-9

    # trm.predict on task files, from the run's checkpoint.
    task = next(t for t in load_source("arc-agi-1/evaluation") if t.max_side <= 6)
    folder = tmp_path / "tasks"
    folder.mkdir()
    pairs = lambda ps: [{"input": p.input.tolist(), "output": p.output.tolist()} for p in ps]  # noqa: E731
    (folder / "task.json").write_text(json.dumps({"train": pairs(task.demos), "test": pairs(task.tests)}))
    out = tmp_path / "submission.json"
    predict([str(run_dir), str(folder), "--out", str(out), "--augmentations", "2", "--adapt-steps", "1",
             "--adapt-target", "all", "--adapt-lr", "0.001"])  # fmt: skip
    assert len(json.loads(out.read_text())["task"]) == len(task.tests) and "pass@2" in capsys.readouterr().out


def test_the_model_imports_no_data_or_loop_module():
    code = ("import sys, trm.model.trm, trm.model.puzzle_embedding, trm.model.published; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('trm', 'encoders'))))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "trm.model.trm" in loaded
    assert [m for m in loaded if m not in ("trm", "trm.model", "trm.registry") and not m.startswith("trm.model.")] == []


@pytest.mark.parametrize("entry, arch, chosen", [
    ("cfg_pretrain", None, {}),
    ("cfg_pretrain_encoder", EncoderArchConfig, {"data.split": "heldout"}),  # its data: evaluation tasks held out
])  # fmt: skip
def test_the_yaml_of_each_entry_point_holds_the_schema_defaults(entry, arch, chosen):
    """Every key the schema has is listed in the entry point's YAML with the schema's default (or
    the entry point's declared choice), and the YAML holds no key the schema lacks; so a default
    is never changed in one place only."""
    _, raw = compose(entry, [])
    listed = flatten({k: v for k, v in raw.items() if k not in NAMES})
    defaults = flatten((TrainConfig(arch=arch()) if arch else TrainConfig()).model_dump())
    defaults.pop("data.families")  # data=families holds those (below)
    assert sorted(listed) == sorted(defaults)
    assert {k: v for k, v in listed.items() if v != defaults[k]} == chosen


def test_the_family_options_yaml_holds_their_schema_defaults():
    _, raw = compose("cfg_pretrain", ["data=families"])
    assert raw["data"]["families"] == FamilyOptions().model_dump()


# Runs written before arch.conditioner existed ------------------------------------------------------


def written_before_the_seam(run_dir):
    """Turn a run directory into what the code before ``arch.conditioner`` wrote: no conditioner
    key, the encoder's learning-rate keys at the top level, checkpoints without the model's
    metadata, a summary without the conditioner."""

    def old(config):
        config = {**config, "arch": dict(config["arch"])}
        config["arch"].pop("conditioner")
        for key in ("encoder_lr_scale", "encoder_lr_warmup_steps"):
            if key in config["arch"]:
                config[key] = config["arch"].pop(key)
        return config

    (run_dir / "config.yaml").write_text(yaml.safe_dump(old(yaml.safe_load((run_dir / "config.yaml").read_text())), sort_keys=False))
    for folder in checkpoint.checkpoints(run_dir / "checkpoints"):
        state = torch.load(folder / "state.pt", weights_only=False)
        del state["metadata"]
        state["config"] = old(state["config"])
        torch.save(state, folder / "state.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["conditioner"]
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("entry", ["cfg_pretrain", "cfg_pretrain_encoder"])
def test_a_run_written_before_the_seam_resumes_starts_runs_predicts_and_reports(tiny_dataset, tmp_path, entry):
    from trm.predict import load_run

    run_dir = tmp_path / "old"
    overrides = (encoder_overrides if entry.endswith("encoder") else tiny_overrides)(tiny_dataset, run_dir)
    train(*compose(entry, overrides + ["max_steps=3"]))
    written_before_the_seam(run_dir)
    conditioner = "demo_encoder" if entry.endswith("encoder") else "puzzle_embedding"

    assert load(run_dir)["conditioner"] == conditioner  # the report
    model, cfg = load_run(str(run_dir), torch.device("cpu"))  # predict's loading
    assert cfg.arch.conditioner == conditioner and model.conditioner.name == conditioner
    started = train(*compose(entry, [o.replace(f"run_dir={run_dir}", f"run_dir={tmp_path / 'new'}") for o in overrides]
                             + [f"init_from={run_dir}", "max_steps=0"]))  # fmt: skip
    assert started["step"] == 0
    resumed = train(*compose(entry, overrides))  # the same command without max_steps: resumes at step 3
    assert resumed["step"] == final_state(run_dir)["step"] > 3
    steps = [r["step"] for r in read_rows(run_dir) if "train/lm_loss" in r]
    assert steps[0] == 2 and steps == sorted(set(steps)) and steps[-1] == resumed["step"]  # one history, no restart
