"""Command-line entry: Hydra composition, validation, launch."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from pydantic import BaseModel

from trm.config import ConfigError, TrainConfig, conditioner_of, load_conditioners, validate
from trm.errors import InputError, Interrupted
from trm.rundir import default_run_name, flatten

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "config")
GROUPS_SELECTED_BY_NAME = ("experiment", "preset")  # listed in the defaults, chosen with `name=value`
KEYS_ADDED = ("run_name",)  # absent from the config, added with `+name=value`


def normalise_overrides(args: list[str]) -> list[str]:
    """Let both spellings of the plan's command lines work: ``experiment=E0v2`` and
    ``+experiment=E0v2`` (likewise ``preset``), ``+run_name=X`` and ``run_name=X``."""
    out = []
    for a in args:
        key = a.split("=", 1)[0]
        if key.lstrip("+") in GROUPS_SELECTED_BY_NAME and key.startswith("+") and not key.startswith("++"):
            a = a.lstrip("+")
        elif key in KEYS_ADDED:
            a = "+" + a
        out.append(a)
    return out


# The two entry points: the script, and whether it trains the conditioners that read the task's
# demonstrations (Conditioner.reads_demonstrations) or those learned per puzzle.
ENTRY_POINTS = {"cfg_pretrain": ("pretrain.py", False), "cfg_pretrain_encoder": ("pretrain_encoder.py", True)}


def resolve(cfg: DictConfig, config_name: str, choices: dict | None = None,
            args: list[str] | None = None) -> tuple[TrainConfig, dict]:  # fmt: skip
    """Validated config and its plain-dict form (saved as the run's config.yaml). A conditioner
    that the entry point ``config_name`` does not train is refused first, naming the command that
    trains it (``args``: the command line's overrides)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    choices = choices or {}
    for group in GROUPS_SELECTED_BY_NAME:
        raw[group] = choices.get(group)
    raw.setdefault("run_name", None)  # the run names it (trm.rundir.default_run_name)
    check_entry_point(config_name, raw, args)
    return validate(raw), raw


def check_entry_point(config_name: str, raw: dict, args: list[str] | None) -> None:
    """Refuse, in one line, a conditioner that this entry point does not train (an unknown one is
    left to validation, which lists the valid names)."""
    from trm.model.conditioning import CONDITIONERS

    load_conditioners()
    name = conditioner_of(raw)
    script, reads_demonstrations = ENTRY_POINTS[config_name]
    if name not in CONDITIONERS or CONDITIONERS[name].reads_demonstrations == reads_demonstrations:
        return
    other = next(s for s, reads in ENTRY_POINTS.values() if reads != reads_demonstrations)
    source = f"experiment {raw['experiment']}" if raw.get("experiment") else "this configuration"
    command = " ".join(args) if args is not None else f"experiment={raw.get('experiment')}"
    raise ConfigError(f"{source} uses arch.conditioner={name}, which {other} trains, not {script}: "
                      f"python {other} {command}")  # fmt: skip


def run(config_name: str) -> None:
    """Compose ``config/<config_name>.yaml`` with the command line and train. A bad input, an
    interruption or a divergence ends with one line on stderr (``--debug`` or ``TRM_DEBUG=1``: the
    traceback). ``--help`` lists the experiments, presets and every key with its description.

    A sweep (``-m seed=0,1 experiment=E1v2,E_diag1``) names each run after the values swept
    (``E1v2-seed=1-<date>-<time>``, or ``<run_name>-seed=1`` with ``+run_name``); a job that fails
    says so and the others still run; the sweep then exits 1 naming the failed jobs."""
    args = normalise_overrides([a for a in sys.argv[1:] if a != "--debug"])
    if "--debug" in sys.argv[1:]:
        os.environ["TRM_DEBUG"] = "1"
    if "--help" in args or "-h" in args:
        try:
            print(help_text(config_name, [a for a in args if "=" in a]))
        except InputError as e:
            _fail(f"error: {e}", 1)
        return
    sys.argv = [sys.argv[0]] + [a if a != "--hydra-help" else "--help" for a in args]
    swept = swept_keys(args)
    failed: list[str] = []

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        from trm.train import train

        hydra_cfg = HydraConfig.get()
        sweeping = hydra_cfg.mode == RunMode.MULTIRUN
        job = ",".join(hydra_cfg.overrides.task)
        try:
            config, raw = resolve(cfg, config_name, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task))
            if sweeping:
                for key, value in sweep_run_name(raw, list(hydra_cfg.overrides.task), swept).items():
                    raw[key] = value
                    setattr(config, key, value)
            train(config, raw)
        except (InputError, FloatingPointError) as e:
            _fail(f"error: {e}", 1, job if sweeping else None, failed)
        except Interrupted as e:
            _fail(str(e), e.exit_code)  # the whole sweep stops with a signal
        except KeyboardInterrupt:
            _fail("interrupted (before training started, or a second signal while stopping: the last checkpoint "
                  "is kept)", 130)  # fmt: skip
        except Exception as e:  # a bug in one job of a sweep: the others still run
            if not sweeping or os.environ.get("TRM_DEBUG"):
                raise
            traceback.print_exc()
            _fail(f"error: {type(e).__name__}: {e}", 1, job, failed)

    _main()
    if failed:
        print(f"sweep: {len(failed)} job(s) failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def _fail(message: str, code: int, job: str | None = None, failed: list[str] | None = None) -> None:
    """One line on stderr; exit, except for a job of a sweep, which is recorded and the sweep goes on."""
    if os.environ.get("TRM_DEBUG") and job is None:
        raise
    print(message if job is None else f"job {job}: {message}", file=sys.stderr)
    if job is None:
        sys.exit(code)
    failed.append(job)


def swept_keys(args: list[str]) -> list[str]:
    """The keys a command line sweeps (``seed=0,1``, ``lr=range(...)``, ``experiment=A,B``), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("hydra/")])
    except Exception:  # noqa: BLE001 - Hydra reports a malformed override itself
        return []
    return [o.key_or_group for o in overrides if o.is_sweep_override()]


def sweep_run_name(raw: dict, job_overrides: list[str], swept: list[str]) -> dict[str, str]:
    """Where a sweep job's run goes, named after its swept values (a swept experiment names
    itself): ``{"run_dir": "<run_dir>-seed=1"}`` when run_dir is given, else ``{"run_name":
    "<run_name>-seed=1"}``, or without a run_name ``"<experiment>[-<preset>]-seed=1-<date>-<time>"``."""
    values = dict(o.lstrip("+").split("=", 1) for o in job_overrides if "=" in o)
    suffix = "-".join(f"{k}={values[k]}" for k in swept if k in values and k not in GROUPS_SELECTED_BY_NAME)
    add = lambda base: "-".join(p for p in (base, suffix) if p).replace("/", "_")  # noqa: E731
    if raw.get("run_dir"):
        return {"run_dir": str(Path(raw["run_dir"]).with_name(add(Path(raw["run_dir"]).name)))}
    if raw.get("run_name"):
        return {"run_name": add(raw["run_name"])}
    return {"run_name": default_run_name(raw, suffix.replace("/", "_"))}


def help_text(config_name: str, overrides: list[str]) -> str:
    """The experiments, presets and other config groups, then every key with its value under
    ``overrides`` and its one-line description from the schema (``arch``: its conditioner's)."""
    script = ENTRY_POINTS[config_name][0]
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in sorted(Path(CONFIG_DIR).iterdir()) if p.is_dir()}
    lines = [f"usage: python {script} [experiment=NAME] [preset=NAME] [KEY=VALUE ...] [-m KEY=A,B ...] [--debug]",
             "       torchrun --nproc-per-node 4 " + script + " experiment=NAME +run_name=NAME", ""]  # fmt: skip
    lines += [f"{name}=...: {', '.join(options)}" for name, options in groups.items()]
    lines += ["", "Keys (value with the overrides given; KEY=VALUE changes one; --hydra-help: Hydra's own help):"]
    try:
        cfg, raw = compose(config_name, overrides)
    except HydraException as e:  # an unknown experiment or preset: Hydra's message, on one line
        raise InputError(" ".join(line.strip() for line in str(e).split("Config search path")[0].splitlines() if line.strip()))
    values = flatten(raw)
    rows = [(key, values.get(key, "-"), description) for key, description in schema_keys(TrainConfig, arch=type(cfg.arch))]
    width = min(44, max(len(f"{k} = {v}") for k, v, _ in rows))
    lines += [f"  {f'{k} = {v}':<{width}}  # {d}" for k, v, d in rows]
    return "\n".join(lines)


def schema_keys(schema, prefix: str = "", arch: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """(dotted key, description) of every leaf of a config schema, nested configs expanded (``arch``
    with the given schema, a conditioner's, instead of the core's alone)."""
    out = []
    for name, field in schema.model_fields.items():
        kind = arch if (name == "arch" and arch is not None and not prefix) else field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += schema_keys(kind, f"{prefix}{name}.")
        else:
            out.append((prefix + name, field.description or ""))
    return out


def compose(config_name: str, overrides: list[str]) -> tuple[TrainConfig, dict]:
    """Compose and validate a config as the command line would, without running (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = hydra_compose(config_name, overrides=normalise_overrides(overrides), return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
    return resolve(cfg, config_name, choices, overrides)
