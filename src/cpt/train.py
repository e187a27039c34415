"""The training loop: `Trainer.train` (the run: log, evaluate, save, stop) around `Trainer._step` (one
optimizer step from micro-batches to update).

Each optimizer step pulls `gradient_accumulation_steps` micro-batches, counts their real (non-ignored)
target tokens across all ranks, and divides every micro-batch's summed loss by that count, so the
step's gradient is the token mean however the tokens fall into micro-batches. Then it clips, checks
that loss and gradient are finite (skipping the update if not), steps, logs, evaluates and saves.
Speed features never appear here by name: the run plan's step hooks (cpt.speed.hooks) are called at
fixed points of the step, and reporting is the caller's.

    cpt train examples/quickstart.yaml train.max_steps=20
    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from cpt import checkpoint as ckpt
from cpt.build import ModelBundle
from cpt.config import Config, ConfigError, OutputConfig
from cpt.distributed import Parallel, build_accelerator, plain
from cpt.optim import build_optimizer, build_scheduler
from cpt.runtime import to_device
from cpt.speed.hooks import StepHooks
from cpt.track import Trackers

log = logging.getLogger("cpt")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    step: int = 0
    tokens_seen: int = 0  # tokens that carried loss (under sft: the answers)
    tokens_read: int = 0  # token positions the model read, padding included: what throughput counts
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    elapsed_s: float = 0.0
    data: dict = field(default_factory=dict)
    best_metric: Optional[float] = None  # output.metric_for_best_model at best_step (lower is better)
    best_step: Optional[int] = None
    loss_sum: float = 0.0  # of the finite steps' losses: the run's mean training loss
    loss_steps: int = 0


def total_steps(cfg: Config, data: Any, world_size: int) -> int:
    t = cfg.train
    if t.max_steps > 0:
        return t.max_steps
    if data.train.blocks_per_epoch is None:
        raise ConfigError("train.max_steps must be set when a data source is streamed (the stream's length is unknown)")
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    return max(1, math.ceil(t.num_train_epochs * data.train.blocks_per_epoch / per_step))


def resume_point(o: OutputConfig) -> Optional[Path]:
    """The checkpoint a run continues from (None: start fresh), or a ConfigError when output_dir holds
    another run that the settings do not allow us to continue or replace. Reads only; called before the
    model is loaded and again by the Trainer."""
    out = Path(o.output_dir)
    latest = ckpt.latest_checkpoint(out)
    if o.resume in (False, "false"):
        if ckpt.has_run_artifacts(out) and not o.overwrite_output_dir:
            raise ConfigError(f"output.output_dir {str(out)!r} holds another run's checkpoints or adapter; "
                              "set output.resume=auto to continue it, output.overwrite_output_dir=true to replace it, or choose another output_dir")
        return None
    if o.resume in (True, "true"):
        if latest is None:
            raise ConfigError(f"output.resume=true but {out} has no complete checkpoint")
        return latest
    if o.resume == "auto":
        if latest is None and ckpt.has_run_artifacts(out) and not o.overwrite_output_dir:
            raise ConfigError(f"output.output_dir {str(out)!r} holds a finished run and no checkpoint to resume; "
                              "set output.overwrite_output_dir=true to replace it, or choose another output_dir")
        return latest
    path = Path(o.resume)
    if not ckpt.is_complete(path):
        raise ConfigError(f"output.resume: {path} is not a complete checkpoint (no {ckpt.COMPLETE} marker)")
    return path


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: labels are shifted by one inside the model."""
    return int((labels[:, 1:] != -100).sum())


class Trainer:
    """Owns the optimizer, schedule, accelerator and state; `train()` is the loop."""

    def __init__(self, cfg: Config, bundle: ModelBundle, data: Any, evaluator: Any = None, accelerator: Any = None):
        self.cfg, self.bundle, self.data, self.evaluator = cfg, bundle, data, evaluator
        self.out = Path(cfg.output.output_dir)
        self.accelerator = accelerator or build_accelerator(cfg, bundle.device)
        self.world = self.accelerator.num_processes
        self.total_steps = total_steps(cfg, data, self.world)
        # Under FSDP the model is sharded here, so that the optimizer is built on the shards.
        self.parallel = Parallel.setup(cfg, bundle, self.accelerator)
        optimizer = build_optimizer(bundle.groups, cfg.train, bundle.device,
                                    offload_embedding_state=bundle.plan.offload_embedding_state)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.total_steps)
        self.model, self.optimizer = self.parallel.prepare(bundle.model, optimizer)
        if bundle.plan.sparse_embedding_grad and self.world > 1:
            raise ConfigError("row-sparse embedding gradients were set up for one process but this run has "
                              f"{self.world}; build the model after the launcher has set WORLD_SIZE")
        self.hooks = StepHooks(bundle.speed, self.model, self.optimizer, self.accelerator, self.world)
        self.state = TrainState()
        self.metrics_path: Optional[Path] = None  # the main process's metrics.jsonl
        self.trackers = Trackers(cfg, self.out)
        self.best_key = self._best_metric_key()

    def _best_metric_key(self) -> Optional[tuple[str, str]]:
        """(eval set, metric) named by output.metric_for_best_model, checked against the eval sets."""
        name = self.cfg.output.metric_for_best_model
        if not name:
            return None
        if self.evaluator is None or not self.cfg.eval.eval_steps:
            raise ConfigError("output.metric_for_best_model needs evaluation during training: set eval.eval_steps > 0 "
                              "and give an eval set (eval.sets or eval.holdout_fraction)")
        set_name, _, metric = name.partition("/")
        sets = [s.name for s in self.evaluator.eval_sets]
        metrics = ("loss", "perplexity", "bits_per_byte")
        if set_name not in sets or metric not in metrics:
            raise ConfigError(f"output.metric_for_best_model={name!r} is not '<set>/<metric>' with set one of {sets} and "
                              f"metric one of {list(metrics)}")
        return set_name, metric

    def _track_best(self, result: Optional[dict]) -> bool:
        """Note a new best evaluation; True when this step's state must be checkpointed and kept."""
        new_best = False
        if self.best_key is not None and result is not None and self.state.step > 0:
            value = result.get(self.best_key[0], {}).get(self.best_key[1])
            if isinstance(value, (int, float)) and math.isfinite(value) and (
                    self.state.best_metric is None or value < self.state.best_metric):
                self.state.best_metric, self.state.best_step = float(value), self.state.step
                new_best = True
                log.info("new best %s=%.5f at step %d", self.cfg.output.metric_for_best_model, value, self.state.step)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            new_best = broadcast_object_list([new_best])[0]
        return new_best

    # ------------------------------------------------------------------ saving and resuming

    def _write_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import save_file

        snap = self._snapshot  # gathered by save() on every rank
        self.parallel.save_trained(self.model, folder / "adapter", self.bundle.tokenizer, snap.adapter)
        save_file({k: v.contiguous() for k, v in snap.trained.items()}, str(folder / "trainable.safetensors"))
        # Full tensors keyed by parameter name: the same file under every strategy and world size.
        torch.save(snap.optimizer, folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), folder / "scaler.pt")
        torch.save(snap.rngs[0]["torch"], folder / "rng.pt")
        self.parallel.write_rank_rng(folder, snap)
        self.state.data = self.data.train.state_dict()
        state = {**self.state.__dict__, "rng": snap.rngs[0]["rng"], "total_steps": self.total_steps,
                 "world_size": self.world}
        ckpt.write_json(folder / "trainer_state.json", state)
        self._save_config(folder)

    def save(self) -> Optional[Path]:
        self.accelerator.wait_for_everyone()
        self._snapshot = self.parallel.snapshot(self.model, self.optimizer)  # every rank: FSDP gathers shards
        path = None
        if self.accelerator.is_main_process:
            best = (self.out / f"{ckpt.PREFIX}{self.state.best_step}",) if self.state.best_step is not None else ()
            path = ckpt.save_checkpoint(self.out, self.state.step, self._write_checkpoint, self.cfg.output.save_total_limit,
                                        protect=best)
            log.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def resume(self, path: Path) -> None:
        try:
            self._load_checkpoint(path)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            if isinstance(e, ckpt.CheckpointError):
                raise
            # A missing or damaged file, or a checkpoint of another configuration or data plan: name the folder.
            raise ckpt.CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}. Point output.resume at "
                                       "another checkpoint, or start fresh with output.resume=false and "
                                       "output.overwrite_output_dir=true") from e
        log.info("resumed from %s at step %d", path, self.state.step)

    def _load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        state = json.loads((path / "trainer_state.json").read_text())
        # Full tensors, loaded (and under FSDP sharded) on every rank: any world size, any strategy.
        self.parallel.load_trained(self.model, load_file(str(path / "trainable.safetensors")))
        self.parallel.load_optimizer(self.model, self.optimizer, ckpt.load_torch(path / "optimizer.pt"))
        self.scheduler.load_state_dict(ckpt.load_torch(path / "scheduler.pt"))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and (path / "scaler.pt").is_file():
            scaler.load_state_dict(ckpt.load_torch(path / "scaler.pt"))
        self.parallel.restore_rng(path, state)
        self.state = TrainState(**{k: state[k] for k in TrainState.__dataclass_fields__ if k in state})
        self.data.train.load_state_dict(self.state.data)

    def _resume_point(self) -> Optional[Path]:
        removed = ckpt.remove_partial(self.out) if self.accelerator.is_main_process else []
        for p in removed:
            log.warning("removed incomplete checkpoint %s (a save was interrupted)", p)
        self.accelerator.wait_for_everyone()  # every rank must see the same checkpoints after the clean-up
        start = resume_point(self.cfg.output)
        if start is None and self.accelerator.is_main_process and ckpt.has_run_artifacts(self.out):
            ckpt.clear_checkpoints(self.out)  # a fresh start that overwrite_output_dir allowed
        return start

    # ------------------------------------------------------------------ logging

    def _open_logs(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._save_config(self.out)
        self._truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        self.metrics_path = self.out / "metrics.jsonl"
        self.trackers.start()

    def _save_config(self, folder: Path) -> None:
        """The config as the user gave it, and beside it the run plan that was applied."""
        self.cfg.save(folder / "config.yaml")
        self.bundle.plan.save(folder)

    @staticmethod
    def _truncate_metrics(path: Path, step: int) -> None:
        """Drop records after the step we continue from: a killed run logged steps that the resumed run
        repeats, and a fresh start (step 0) owes nothing to an earlier attempt. Without this the file
        would hold two losses for the same step."""
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def _log(self, record: dict) -> None:
        if self.metrics_path is None:
            return
        with open(self.metrics_path, "a") as f:  # opened per record: nothing is left open when a run fails
            f.write(json.dumps(record) + "\n")
        self.trackers.log({"train": {k: v for k, v in record.items() if k != "step"}}, record["step"])

    def _memory_gib(self) -> float:
        if self.bundle.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.bundle.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def _evaluate(self) -> Optional[dict]:
        if self.evaluator is None:
            return None
        result = None
        # Under FSDP every rank runs the same forward passes (each one gathers the shards of all);
        # the other ranks' evaluators write to a scratch folder (see cpt.api.run_training).
        if self.accelerator.is_main_process or self.parallel.sharded:
            result = self.evaluator.run(self.accelerator.unwrap_model(self.model), self.state.step)
            if not self.accelerator.is_main_process:
                result = None
            if result is not None:
                self.trackers.log({"eval": {name: {k: m[k] for k in ("loss", "perplexity", "bits_per_byte") if k in m}
                                            for name, m in result.items() if isinstance(m, dict) and "bits_per_byte" in m}},
                                  self.state.step)
        self.accelerator.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """The run: resume, then steps until total_steps, logging, evaluating and saving on the way; a stop
        signal saves and returns. Returns the run summary (also written to run_summary.json)."""
        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        from accelerate.utils import set_seed

        # Dropout and sampling draw from these streams: seeded here (one stream per rank), replaced by
        # the checkpoint's saved states on resume.
        set_seed(t.seed, device_specific=True)
        start = self._resume_point()
        if start is not None:
            self.resume(start)
        self._open_logs()
        log.info("training %d steps: %d x %d blocks of %d tokens per step on %d process(es)", self.total_steps,
                 t.per_device_train_batch_size, t.gradient_accumulation_steps, cfg.model.max_seq_length, self.world)
        if self.state.step == 0 and cfg.eval.eval_at_start:
            self._evaluate()

        batches = self.data.train.batches(t.per_device_train_batch_size)
        stop = ckpt.StopSignal(cfg.output.save_grace_seconds)
        progress = _Progress(self.total_steps, self.state.step, enabled=self.accelerator.is_main_process)
        window = _Window()
        run_start = time.perf_counter() - self.state.elapsed_s
        last_saved = self.state.step if start is not None else -1
        self.model.train()
        with stop, progress:
            while self.state.step < self.total_steps:
                micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
                loss, grad_norm, finite, n_items = self._step(micro)
                self.state.step += 1
                self.state.tokens_seen += n_items
                read = sum(int(b["input_ids"].numel()) for b in micro) * self.world
                self.state.tokens_read += read
                self.state.nonfinite_in_a_row = 0 if finite else self.state.nonfinite_in_a_row + 1
                self.state.nonfinite_total += int(not finite)
                if finite:
                    self.state.loss_sum += loss
                    self.state.loss_steps += 1
                if not finite:
                    log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
                                self.state.step, loss, grad_norm, self.state.nonfinite_in_a_row)
                window.add(read, loss if finite else None)

                giving_up = self.state.nonfinite_in_a_row >= t.max_nonfinite_steps
                if self.state.step % cfg.output.logging_steps == 0 or self.state.step == self.total_steps or giving_up:
                    record = self._record(window, grad_norm, run_start)
                    self._log(record)
                    progress.update(self.state.step, record)
                else:
                    progress.update(self.state.step, None)
                self.state.elapsed_s = time.perf_counter() - run_start
                if giving_up:  # after logging, so the metrics show the skipped steps
                    self.save()
                    raise NonFiniteError(
                        f"{self.state.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (limit "
                        f"train.max_nonfinite_steps={t.max_nonfinite_steps}). Lower train.learning_rate, check the data "
                        f"near step {self.state.step}, or use bf16 instead of fp16. The last good weights were saved.")

                new_best = False
                if cfg.eval.eval_steps and self.state.step % cfg.eval.eval_steps == 0 and self.state.step < self.total_steps:
                    new_best = self._track_best(self._evaluate())
                if (cfg.output.save_steps and self.state.step % cfg.output.save_steps == 0) or new_best:
                    self.save()
                    last_saved = self.state.step
                if self.parallel.anyone(bool(stop.requested)):
                    if last_saved != self.state.step:
                        self.save()
                    log.warning("stopped by %s at step %d; resume with the same command",
                                stop.requested or "a signal to another rank", self.state.step)
                    return self._finish(interrupted=True)

            if last_saved != self.state.step:
                self.save()
        return self._finish(interrupted=False)

    def _step(self, micro: list[dict]) -> tuple[float, float, bool, int]:
        """One optimizer step over the micro-batches: forward and backward each, clip, update (or skip a
        non-finite step). Every micro-batch's summed loss is divided by the step's real target tokens
        across all ranks, so the gradient is the step's token mean. Returns (loss, grad norm, finite,
        target tokens)."""
        t, acc, hooks = self.cfg.train, self.accelerator, self.hooks
        n_local = sum(target_tokens(b["labels"]) for b in micro)
        n_items = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum")) if self.world > 1 else n_local
        step_loss = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            hooks.before_forward()
            batch = {k: to_device(v, acc.device) for k, v in batch.items()}
            with acc.no_sync(self.model) if not last and self.world > 1 else contextlib.nullcontext():
                # DDP averages gradients over ranks; scale back so the step is the global token mean.
                loss = self.bundle.loss_fn(self.model, batch, max(n_items, 1)) * self.world
                hooks.before_backward(micro, last, clipping=t.max_grad_norm > 0)
                acc.backward(loss)
                hooks.after_backward(i, last)
            step_loss += loss.detach() / self.world
        grad_norm = hooks.clip_grad_norm(t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        loss_value = float(acc.reduce(step_loss, "sum")) if self.world > 1 else float(step_loss)
        grad_value = float(plain(grad_norm)) if grad_norm is not None else float("nan")
        finite = math.isfinite(loss_value) and (math.isfinite(grad_value) or acc.mixed_precision == "fp16")
        if finite:
            self.optimizer.step()
        else:
            hooks.skip()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, grad_value, finite, n_items

    def _record(self, window: "_Window", grad_norm: float, run_start: float) -> dict:
        """The metrics line for the steps since the last one (metrics.jsonl, TensorBoard, progress)."""
        now = time.perf_counter()
        record = {
            "step": self.state.step,
            "loss": window.mean_loss(),
            "grad_norm": grad_norm,
            "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)},
            "tokens_per_s": window.tokens / max(now - window.start, 1e-9),
            "tokens": self.state.tokens_seen,
            "elapsed_s": now - run_start,
            "memory_gib": self._memory_gib(),
            "nonfinite_skipped": self.state.nonfinite_total,
            "epoch": self._epoch(),
        }
        window.reset(now)
        return record

    def _epoch(self) -> Optional[float]:
        per_epoch = self.data.train.blocks_per_epoch
        if not per_epoch:
            return None
        t = self.cfg.train
        return self.state.step * t.per_device_train_batch_size * t.gradient_accumulation_steps * self.world / per_epoch

    def _finish(self, interrupted: bool) -> dict:
        acc = self.accelerator
        summary = {"step": self.state.step, "total_steps": self.total_steps, "tokens": self.state.tokens_seen,
                   "train_runtime_s": self.state.elapsed_s, "interrupted": interrupted,
                   "train_loss": self.state.loss_sum / self.state.loss_steps if self.state.loss_steps else float("nan"),
                   "nonfinite_skipped": self.state.nonfinite_total, "epoch": self._epoch(), "world_size": self.world,
                   "tokens_read": self.state.tokens_read,
                   "tokens_per_s": self.state.tokens_read / max(self.state.elapsed_s, 1e-9),
                   **self.bundle.trainable_summary(), **self.hooks.summary()}
        if not interrupted:
            summary["eval"] = self._evaluate()
            self._track_best(summary["eval"])
            if self.state.best_step is not None:
                summary["best_checkpoint"] = str(self.out / f"{ckpt.PREFIX}{self.state.best_step}")
                summary["best_metric"] = self.state.best_metric
            trained = self.parallel.gather_trained(self.model)  # every rank: FSDP gathers shards
            if acc.is_main_process:
                self.parallel.save_trained(self.model, self.out, self.bundle.tokenizer, trained)
                self._save_config(self.out)
                if self.evaluator is not None:
                    summary["eval_table"] = self.evaluator.summary_table()
        if acc.is_main_process:
            ckpt.write_json(self.out / "run_summary.json", summary)
            self.trackers.finish()
        acc.wait_for_everyone()
        return summary


class _Window:
    """Tokens and finite losses since the last metrics line."""

    def __init__(self) -> None:
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.tokens, self.loss_sum, self.losses, self.start = 0, 0.0, 0, now

    def add(self, tokens: int, loss: Optional[float]) -> None:
        self.tokens += tokens
        if loss is not None:
            self.loss_sum, self.losses = self.loss_sum + loss, self.losses + 1

    def mean_loss(self) -> float:
        return self.loss_sum / self.losses if self.losses else float("nan")


class _Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, files)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "_Progress":
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        if self.bar:
            self.bar.__exit__(*a)

    def update(self, step: int, record: Optional[dict]) -> None:
        if not self.enabled:
            return
        info = ""
        if record:
            lrs = " ".join(f"lr_{k}={v:.2e}" for k, v in record["lr"].items())
            info = (f"loss={record['loss']:.4f} grad_norm={record['grad_norm']:.3f} {lrs} "
                    f"tok/s={record['tokens_per_s']:.0f} mem={record['memory_gib']:.2f}GiB")
        if self.bar:
            self.bar.update(self.task, completed=step, **({"info": info} if info else {}))
        elif record:
            log.info("step %d/%d %s", step, self.total, info)
