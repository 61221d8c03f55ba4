"""Command-line entry: Hydra composition, validation, launch."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from trm.config import ConfigError, TrainConfig, validate

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
    if raw.get("run_name") is None:
        parts = [p for p in (choices.get("experiment"), choices.get("preset")) if p] or ["run"]
        raw["run_name"] = "-".join(parts) + f"-{datetime.now():%Y%m%d-%H%M%S}"
    return validate(raw, schema), raw


def run(config_name: str, schema: type[TrainConfig]) -> None:
    """Compose ``config/<config_name>.yaml`` with the command line and train."""
    sys.argv = [sys.argv[0]] + normalise_overrides(sys.argv[1:])

    @hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        from trm.train import train

        try:
            config, raw = resolve(cfg, schema, dict(HydraConfig.get().runtime.choices))
        except ConfigError as e:
            sys.exit(f"error: {e}")
        train(config, raw)

    _main()


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
