"""Experiment trackers (output.report_to): TensorBoard, Weights & Biases and MLflow through accelerate's
tracker classes, so each one is started, fed and closed the way accelerate does it for every other
project. metrics.jsonl is written whatever this says; the trackers get the same numbers.

- tensorboard: event files in <output_dir>/tensorboard.
- wandb: a run named `output.run_name` in project WANDB_PROJECT (default "cpt"); its local files
  under <output_dir>/wandb. Offline (WANDB_MODE=offline) needs no account; online needs WANDB_API_KEY
  or `wandb login`, checked before the model loads.
- mlflow: MLFLOW_TRACKING_URI when set, else a local file store in <output_dir>/mlruns (MLflow's
  file store is in maintenance mode and refuses to open unless MLFLOW_ALLOW_FILE_STORE is set, which
  cpt then sets for this process).

    cpt train examples/quickstart.yaml output.report_to=[tensorboard,mlflow]
    python -m pytest tests/test_track.py -q
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from cpt.config import Config, ConfigError

log = logging.getLogger("cpt")

_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
PROJECT = "cpt"


def wanted(cfg: Config) -> list[str]:
    return [name for name in cfg.output.report_to if name != "none"]


def run_name(cfg: Config) -> str:
    return cfg.output.run_name or Path(cfg.output.output_dir).resolve().name


def check_trackers(cfg: Config) -> None:
    """Before the model loads: every tracker named is installed, and wandb can log in or runs offline."""
    for name in wanted(cfg):
        if importlib.util.find_spec(_PACKAGE[name]) is None:
            extra = " (or mlflow-skinny)" if name == "mlflow" else ""
            raise ConfigError(f"output.report_to: {name} is not installed: pip install {_PACKAGE[name]}{extra}, "
                              f"or remove {name} from output.report_to")
    if "wandb" in wanted(cfg) and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
        if not os.environ.get("WANDB_API_KEY") and not _netrc_has("api.wandb.ai"):
            raise ConfigError("output.report_to: wandb has no account to log to: set WANDB_API_KEY or run `wandb login`, "
                              "or set WANDB_MODE=offline to keep the run's files locally (wandb sync uploads them later)")


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Trackers:
    """The run's trackers (main process only): `start` once, `log` per metrics line, `finish` at the end."""

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, out
        self.trackers: list[Any] = []

    def start(self) -> None:
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        names = wanted(self.cfg)
        name = run_name(self.cfg)
        for kind in names:
            try:
                if kind == "tensorboard":
                    tracker = TensorBoardTracker("tensorboard", str(self.out))
                elif kind == "wandb":
                    self.out.mkdir(parents=True, exist_ok=True)
                    tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=name, dir=str(self.out))
                else:
                    if not os.environ.get("MLFLOW_TRACKING_URI"):
                        import mlflow

                        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                        mlflow.set_tracking_uri((self.out / "mlruns").resolve().as_uri())
                    tracker = MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=name)
                tracker.start()
            except Exception as e:  # a tracker that cannot start must not cost the run
                log.warning("output.report_to: %s could not start (%s: %s); metrics go to metrics.jsonl", kind,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            if kind != "tensorboard":  # TensorBoard's hparams would open a second run folder; config.yaml is there
                try:
                    tracker.store_init_configuration(_flat(self.cfg.to_dict()))
                except Exception as e:
                    log.warning("output.report_to: %s did not take the config (%s)", kind, e)
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        flat = {k: v for k, v in _flat(values).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(flat, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as e:
                log.warning("output.report_to: %s did not close cleanly (%s)", tracker.name, e)
        self.trackers = []


def _flat(d: dict, prefix: str = "") -> dict:
    """{'lr': {'adapter': 1e-4}} -> {'lr/adapter': 1e-4}; lists and None as text (trackers take scalars)."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
