"""The training loop: knows the objective interface (`Objectives`), not the model (minGPT style)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from index_builder.progress import progress
from training import distributed
from training.acceleration import accelerate
from training.checkpoint import load_trainer_state, load_weights, save_checkpoint
from training.config import TrainConfig
from training.datasets import Collate, EpochSampler, PairDataset
from training.distributed import DistInfo
from training.evaluate import SplitEvaluator
from training.objectives import Objectives
from training.plots import plot_curves
from training.schedule import set_lr, warmup_cosine
from training.semantic import wise_mixed

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
NO_VALIDATION = "last step (no validation split)"  # how `best` was chosen without one


def build_optimizer(module: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norm parameters and scalars (the temperature).

    On CUDA the fused kernel updates every parameter in one launch; on CPU the plain one."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(decay + no_decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {name!r}, expected auto, fp32, bf16 or fp16")
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class Trainer:
    """Runs `cfg` over `dataset` with `objectives`; validation, checkpoints, metrics, callbacks.

    Callbacks: `add_callback(event, fn(trainer))` for "on_step_end", "on_validation_end".
    """

    def __init__(
        self,
        cfg: TrainConfig,
        objectives: Objectives,
        dataset: PairDataset | Any,
        run_dir: str | Path,
        dist_info: DistInfo | None = None,
        evaluator: SplitEvaluator | Any | None = None,
    ) -> None:
        self.cfg, self.objectives, self.dataset = cfg, objectives, dataset
        self.run_dir = Path(run_dir)
        self.dist = dist_info or DistInfo()
        self.evaluator = evaluator
        self.device = self.dist.device
        # the model a checkpoint holds (over a feature cache, the full model it stands for)
        self.model = getattr(objectives.model, "source", objectives.model)
        objectives.to(self.device)
        if objectives.memory is not None:
            objectives.memory.to(self.device)
        momentum = [objectives.memory.encoder] if objectives.memory is not None else []
        t = cfg.train
        backend = t.compile_backend if t.compile else None
        accelerate([objectives, *momentum], t.checkpointing, backend)
        self.module: torch.nn.Module = objectives
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Some parameters serve only some objectives (e.g. the ViT mask token, MVM only).
            self.module = DistributedDataParallel(
                objectives, device_ids=ids, find_unused_parameters=True
            )
        self.optimizer = build_optimizer(objectives, cfg)
        self.amp_dtype = resolve_precision(cfg.optim.precision, self.device)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.sampler = EpochSampler(
            len(dataset), cfg.data.batch_size, self.dist.rank, self.dist.world_size, cfg.train.seed
        )
        self.steps_per_epoch = self.sampler.per_rank // cfg.data.batch_size // cfg.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError("one epoch is shorter than one optimiser step; lower optim.grad_accum")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.eval_every = t.eval_every or self.steps_per_epoch
        self.step = 0
        self.best: float | None = None
        self.callbacks: dict[str, list[Callable[[Trainer], None]]] = defaultdict(list)
        self.last_logs: dict[str, Any] = {}

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.dist.world_size * self.cfg.optim.grad_accum

    def add_callback(self, event: str, fn: Callable[[Trainer], None]) -> None:
        self.callbacks[event].append(fn)

    def _trigger(self, event: str) -> None:
        for fn in self.callbacks[event]:
            fn(self)

    def _loader(self, epoch: int, skip_steps: int) -> DataLoader:
        skip = skip_steps * self.cfg.optim.grad_accum * self.cfg.data.batch_size
        self.sampler.set_epoch(epoch, skip)
        self.dataset.set_epoch(epoch)
        model = self.model
        collate = getattr(self.dataset, "collate", None)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.data.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.data.workers,
            collate_fn=collate or Collate(model.tokenizer_json, model.text_spec.context_length),
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )

    def fit(self) -> dict[str, Any]:
        """Train to `total_steps` (from `self.step`, so a resumed run continues)."""
        accum = self.cfg.optim.grad_accum
        bar = progress(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.dist.is_main,
        )
        window: list[float] = []
        tick = time.perf_counter()
        wait = 0.0  # seconds this optimiser step spent waiting for the loader
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            micro = 0
            for batch, waited in _timed(self._loader(epoch, offset)):
                wait += waited
                losses = self._micro_step(batch, sync=(micro + 1) % accum == 0)
                window.append(float(losses["loss"]))  # also waits for the device
                micro += 1
                if micro % accum:
                    continue
                lr = self._optimizer_step()
                now = time.perf_counter()
                seconds = max(now - tick, 1e-9)
                rate = self.global_batch / seconds
                self.last_logs = {
                    "epoch": epoch,
                    "lr": lr,
                    "pairs_per_s": rate,
                    "data_wait_s": wait,
                    "data_wait_frac": min(wait / seconds, 1.0),
                }
                tick, wait = now, 0.0
                self.last_logs.update({k: float(v) for k, v in losses.items()})
                self.last_logs.update(self.objectives.logs())
                bar.update(1)
                bar.set_postfix(
                    loss=f"{np.mean(window):.3f}",
                    pairs_s=f"{rate:.1f}",
                    wait=f"{self.last_logs['data_wait_frac']:.0%}",
                    lr=f"{lr:.2e}",
                )
                if self.step % self.cfg.train.log_every == 0:
                    self._log({"kind": "train", **self.last_logs, "loss": float(np.mean(window))})
                    window = []
                if self.step % self.eval_every == 0 or self.step == self.total_steps:
                    self.validate_and_save()
                    tick = time.perf_counter()  # throughput counts training time only
                    wait = 0.0
                self._trigger("on_step_end")
                if self.step >= self.total_steps or self.step % self.steps_per_epoch == 0:
                    break
        bar.close()
        return self.last_logs

    def _micro_step(self, batch: dict[str, torch.Tensor], sync: bool) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        no_sync = getattr(self.module, "no_sync", None)
        quiet = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        with quiet:
            with torch.autocast(
                self.device.type,
                dtype=self.amp_dtype or torch.float32,
                enabled=bool(self.amp_dtype),
            ):
                losses = self.module(batch)
            self.scaler.scale(losses["loss"] / self.cfg.optim.grad_accum).backward()
        self.objectives.after_backward()
        return {k: v.detach() for k, v in losses.items()}

    def _optimizer_step(self) -> float:
        o = self.cfg.optim
        lr = warmup_cosine(self.step, o.lr, o.warmup_steps, self.total_steps, o.min_lr_ratio)
        set_lr(self.optimizer, lr)
        if o.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.objectives.parameters(), o.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.objectives.after_step()
        self.step += 1
        return lr

    def validate_and_save(self) -> dict[str, float] | None:
        """Validate (rank 0), keep the best checkpoint, always refresh `last` for --resume.

        Without a validation split there is nothing to choose by: `best` is the last step,
        and its metadata says so (`chosen_by`), so `checkpoints/best` always exists.
        """
        state = self.trainer_state()  # collective (RNG of every rank): all ranks call it
        metrics = None
        if self.dist.is_main:
            with wise_mixed(self.model, self.cfg.train.wise_alpha):  # `best` holds the mix
                if self.evaluator is not None:
                    metrics = self.evaluator.evaluate(self.objectives.model, self.device)
                    self._log({"kind": "val", "step": self.step, **metrics})
                    score = metrics[self.cfg.train.best_metric]
                    if self.best is None or score > self.best:
                        self.best = score
                        chosen = f"{self.cfg.data.val_split} {self.cfg.train.best_metric}"
                        self._save("best", metrics, chosen_by=chosen)
                else:
                    self._save("best", None, chosen_by=NO_VALIDATION)
            state["best"] = self.best
            self._save("last", metrics, state)
            plot_curves(self.run_dir / METRICS, self.run_dir)
        distributed.barrier()
        self._trigger("on_validation_end")
        return metrics

    def _save(
        self, name: str, metrics: dict | None, state: dict | None = None, chosen_by: str = ""
    ) -> None:
        meta = {
            "step": self.step,
            "recipe": self.cfg.name,
            "train_config": self.cfg.to_dict(),
            "metrics": metrics,
        }
        if chosen_by:
            meta["chosen_by"] = chosen_by
        save_checkpoint(self.run_dir / "checkpoints" / name, self.model, meta, state)

    def trainer_state(self) -> dict[str, Any]:
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        rngs: list[Any] = [rng]
        if distributed.is_distributed():
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {
            "step": self.step,
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objectives": self.objectives.extra_state(),
            "rng": rngs,
            "config": self.cfg.to_dict(),
        }

    def resume(self, checkpoint: str | Path) -> None:
        """Restore weights, optimiser, queues, momentum encoder, step and RNG of a `last` dir."""
        state = load_trainer_state(checkpoint)
        load_weights(self.model, checkpoint)
        self.objectives.load_extra_state(state["objectives"])
        self.objectives.to(self.device)
        if self.objectives.memory is not None:
            self.objectives.memory.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state["best"]
        rngs = state["rng"]
        rng = rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / METRICS, self.step)
        log.info("resumed from %s at step %d", checkpoint, self.step)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        record = {"step": self.step, **record}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / METRICS).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _timed(loader: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """(batch, seconds spent waiting for it): a starved device shows as a large wait."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - start


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint, so the curves do not fork."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
