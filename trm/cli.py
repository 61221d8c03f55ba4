"""Command-line entry: Hydra composition, validation, launch."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from trm.config import ConfigError, TrainConfig, validate
from trm.errors import InputError, Interrupted

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


def resolve(cfg: DictConfig, schema: type[TrainConfig], choices: dict | None = None) -> tuple[TrainConfig, dict]:
    """Validated config and its plain-dict form (saved as the run's config.yaml)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    choices = choices or {}
    for group in GROUPS_SELECTED_BY_NAME:
        raw[group] = choices.get(group)
    raw.setdefault("run_name", None)  # the run names it (trm.rundir.default_run_name)
    return validate(raw, schema), raw


# The two entry points, so that an experiment given to the wrong one is told where it belongs.
ENTRY_POINTS = {"cfg_pretrain": ("pretrain.py", "trm.config:TrainConfig"),
                "cfg_pretrain_encoder": ("pretrain_encoder.py", "encoders.config:EncoderTrainConfig")}  # fmt: skip


def _schema(path: str) -> type[TrainConfig]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _other_entry_point(config_name: str, overrides: list[str]) -> str | None:
    """The script of the other entry point when the command line composes and validates there."""
    for other, (script, schema) in ENTRY_POINTS.items():
        if other == config_name:
            continue
        try:
            compose(other, overrides, _schema(schema))
        except Exception:  # noqa: BLE001 - any failure: not the other entry point's either
            continue
        return script
    return None


def run(config_name: str, schema: type[TrainConfig]) -> None:
    """Compose ``config/<config_name>.yaml`` with the command line and train. A bad input, an
    interruption or a divergence ends with one line on stderr (``--debug`` or ``TRM_DEBUG=1``: the
    traceback)."""
    args = normalise_overrides([a for a in sys.argv[1:] if a != "--debug"])
    if "--debug" in sys.argv[1:]:
        os.environ["TRM_DEBUG"] = "1"
    sys.argv = [sys.argv[0]] + args

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        from trm.train import train

        try:
            try:
                config, raw = resolve(cfg, schema, dict(HydraConfig.get().runtime.choices))
            except ConfigError as e:
                script = _other_entry_point(config_name, [a for a in args if "=" in a])
                if script:
                    raise ConfigError(f"this configuration is for {script}: python {script} {' '.join(args)}") from e
                raise
            train(config, raw)
        except (InputError, FloatingPointError) as e:
            _fail(f"error: {e}", 1)
        except Interrupted as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted (before training started, or a second signal while stopping: the last checkpoint "
                  "is kept)", 130)  # fmt: skip

    _main()


def _fail(message: str, code: int) -> None:
    if os.environ.get("TRM_DEBUG"):
        raise
    print(message, file=sys.stderr)
    sys.exit(code)


def compose(config_name: str, overrides: list[str], schema: type[TrainConfig] = TrainConfig) -> tuple[TrainConfig, dict]:
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
    return resolve(cfg, schema, choices)
