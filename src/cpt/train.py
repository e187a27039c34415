"""The training loop: one readable function from batch to optimizer step.

Each optimizer step pulls `gradient_accumulation_steps` micro-batches, counts their real (non-ignored)
target tokens across all ranks, and divides every micro-batch's summed loss by that count, so the
step's gradient is the token mean however the tokens fall into micro-batches. Then it clips, checks
that loss and gradient are finite (skipping the update if not), steps, logs, evaluates and saves.

    cpt train examples/quickstart.yaml train.max_steps=20
    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

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
from cpt.config import Config, ConfigError, OutputConfig
from cpt.distributed import Parallel, build_accelerator, plain
from cpt.model import ModelBundle, sparse_gradients
from cpt.host_state import to_device
from cpt.kernels.compile import mark_step, own_gradients
from cpt.optim import build_optimizer, build_scheduler, clip_grad_norm_

log = logging.getLogger("cpt")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    step: int = 0
    tokens_seen: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    elapsed_s: float = 0.0
    data: dict = field(default_factory=dict)
    best_metric: Optional[float] = None  # output.metric_for_best_model at best_step (lower is better)
    best_step: Optional[int] = None


def mixed_precision(cfg: Config, device: torch.device, dtype: torch.dtype) -> str:
    t = cfg.train
    if device.type != "cuda":
        return "no"
    if t.fp16 or (t.fp16 is None and t.bf16 is None and dtype == torch.float16):
        return "fp16"
    if t.bf16 or (t.bf16 is None and dtype == torch.bfloat16):
        return "bf16"
    return "no"


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
        optimizer = build_optimizer(bundle.groups, cfg.train, bundle.device)
        self.scheduler = build_scheduler(optimizer, cfg.train, self.total_steps)
        self.model, self.optimizer = self.parallel.prepare(bundle.model, optimizer)
        self.sparse_grads = sparse_gradients(bundle.model)
        if self.sparse_grads and self.world > 1:
            raise ConfigError("row-sparse embedding gradients were set up for one process but this run has "
                              f"{self.world}; build the model after the launcher has set WORLD_SIZE")
        self.state = TrainState()
        self.metrics_file: Optional[Any] = None
        self.tb: Any = None
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
        self.cfg.save(folder / "config.yaml")

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
        self.cfg.save(self.out / "config.yaml")
        self._truncate_metrics(self.out / "metrics.jsonl", self.state.step)
        self.metrics_file = open(self.out / "metrics.jsonl", "a")
        if "tensorboard" in self.cfg.output.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

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
        if self.metrics_file is None:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
                elif isinstance(v, dict):
                    for kk, vv in v.items():
                        self.tb.add_scalar(f"train/{k}/{kk}", vv, record["step"])

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
            if self.tb is not None:
                for name, m in result.items():
                    if isinstance(m, dict) and "bits_per_byte" in m:
                        self.tb.add_scalar(f"eval/{name}/bits_per_byte", m["bits_per_byte"], self.state.step)
                        self.tb.add_scalar(f"eval/{name}/loss", m["loss"], self.state.step)
        self.accelerator.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg, t, acc = self.cfg, self.cfg.train, self.accelerator
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

        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        inner_opt = getattr(optimizer, "optimizer", optimizer)
        early = inner_opt.start_early if getattr(inner_opt, "host_split_state", False) and self.world == 1 else None
        batches = self.data.train.batches(t.per_device_train_batch_size)
        stop = ckpt.StopSignal(cfg.output.save_grace_seconds)
        progress = _Progress(self.total_steps, self.state.step, enabled=acc.is_main_process)
        window_tokens, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
        run_start = time.perf_counter() - self.state.elapsed_s
        last_saved = self.state.step if start is not None else -1
        model.train()
        # The trained parameters, listed once: walking an 8B LoRA model's ~2,700 modules for them took the
        # host ~6 ms per step while the GPU waited (bench/NOTES.md, session 14). Distributed wrappers
        # (FSDP's gradient clipping) want the model's own list.
        trained = [q for q in model.parameters() if q.requires_grad] if self.world == 1 else None
        with stop, progress:
            while self.state.step < self.total_steps:
                micro = [next(batches) for _ in range(t.gradient_accumulation_steps)]
                n_local = sum(target_tokens(b["labels"]) for b in micro)
                n_items = int(acc.reduce(torch.tensor(n_local, device=acc.device), "sum")) if self.world > 1 else n_local
                step_loss = torch.zeros((), device=acc.device)
                for i, b in enumerate(micro):
                    mark_step()  # model.cuda_graphs: the previous pass's graph outputs are free to reuse
                    b = {k: to_device(v, acc.device) for k, v in b.items()}
                    sync = i == len(micro) - 1
                    with (acc.no_sync(model) if not sync and self.world > 1 else _null()):
                        # DDP averages gradients over ranks; scale back so the step is the global token mean.
                        loss = self.bundle.loss_fn(model, b, max(n_items, 1)) * self.world
                        if sync and early is not None:
                            # Host-resident embedding states: what needs no gradient starts now, beside
                            # the backward pass (cpt.host_state).
                            early(torch.cat([m["input_ids"].reshape(-1) for m in micro]), t.max_grad_norm > 0)
                        acc.backward(loss)
                        if i == 0 and not sync:
                            own_gradients(trained or model.parameters())  # model.cuda_graphs: out of the graphs' memory
                    step_loss += loss.detach() / self.world
                max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
                # Row-sparse embedding gradients (one process only) need their rows summed before the norm.
                grad_norm = (clip_grad_norm_(trained or model.parameters(), max_norm) if self.sparse_grads
                             else acc.clip_grad_norm_(trained or model.parameters(), max_norm))
                loss_value = float(acc.reduce(step_loss, "sum")) if self.world > 1 else float(step_loss)
                grad_value = float(plain(grad_norm)) if grad_norm is not None else float("nan")
                finite = math.isfinite(loss_value) and (math.isfinite(grad_value) or acc.mixed_precision == "fp16")
                if finite:
                    optimizer.step()
                    self.state.nonfinite_in_a_row = 0
                else:
                    if early is not None:
                        inner_opt.abandon_early()
                    self.state.nonfinite_in_a_row += 1
                    self.state.nonfinite_total += 1
                    log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row)",
                                self.state.step + 1, loss_value, grad_value, self.state.nonfinite_in_a_row)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                self.state.step += 1
                self.state.tokens_seen += n_items
                window_tokens += sum(int(b["input_ids"].numel()) for b in micro) * self.world
                if finite:
                    window_loss, window_n = window_loss + loss_value, window_n + 1

                giving_up = self.state.nonfinite_in_a_row >= t.max_nonfinite_steps
                if self.state.step % cfg.output.logging_steps == 0 or self.state.step == self.total_steps or giving_up:
                    now = time.perf_counter()
                    record = {
                        "step": self.state.step,
                        "loss": window_loss / window_n if window_n else float("nan"),
                        "grad_norm": grad_value,
                        "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)},
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "tokens": self.state.tokens_seen,
                        "elapsed_s": now - run_start,
                        "memory_gib": self._memory_gib(),
                        "nonfinite_skipped": self.state.nonfinite_total,
                        "epoch": self._epoch(),
                    }
                    self._log(record)
                    progress.update(self.state.step, record)
                    window_tokens, window_start, window_loss, window_n = 0, now, 0.0, 0
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
                   "nonfinite_skipped": self.state.nonfinite_total,
                   "tokens_per_s": self.state.tokens_seen / max(self.state.elapsed_s, 1e-9),
                   **self.bundle.trainable_summary()}
        from cpt.kernels.compile import _FAILED

        if _FAILED:  # model.compile fell back to the plain layers mid-run (a warning then; here for good)
            summary["compile_failed"] = "; ".join(_FAILED.values())
        if not interrupted:
            summary["eval"] = self._evaluate()
            self._track_best(summary["eval"])
            if self.state.best_step is not None:
                summary["best_checkpoint"] = str(self.out / f"{ckpt.PREFIX}{self.state.best_step}")
                summary["best_metric"] = self.state.best_metric
            trained = self.parallel.gather_trained(self.model)  # every rank: FSDP gathers shards
            if acc.is_main_process:
                self.parallel.save_trained(self.model, self.out, self.bundle.tokenizer, trained)
                self.cfg.save(self.out / "config.yaml")
                if self.evaluator is not None:
                    summary["eval_table"] = self.evaluator.summary_table()
        if acc.is_main_process:
            ckpt.write_json(self.out / "run_summary.json", summary)
            if self.metrics_file:
                self.metrics_file.close()
            if self.tb is not None:
                self.tb.close()
            if not interrupted and self.cfg.output.report:
                try:
                    from cpt.report import write_report
                    summary["report"] = str(write_report(self.out))
                except Exception as e:  # a plotting problem must never cost the trained adapter
                    log.warning("could not write the report: %s", e)
        acc.wait_for_everyone()
        return summary


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


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
