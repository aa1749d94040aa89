"""The machinery both stages share: one training loop, checkpoints, resume, batched inference.

A stage is a scikit-learn-style estimator that subclasses :class:`TrainableStage` and supplies
only what is its own: its networks (``_networks``), its training rows (``_dataset``), its
optimisers and one update (``_train_step``, built on the pure losses in ``losses.py``).
:meth:`TrainableStage.fit` does the rest, once for both stages: seeding, the global-batch
sampler, ``DistributedDataParallel``, re-initialising a collapsed discriminator, the NaN check,
the per-epoch atomic checkpoint and resuming from it bit-exactly (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from twostage_ad.data.images import to_tensor
from twostage_ad.device import memory_format_for, resolve_device
from twostage_ad.distributed import DistributedContext, GlobalBatchSampler, wrap_ddp
from twostage_ad.migration import stored_section
from twostage_ad.runs import load_checkpoint, save_checkpoint

__all__ = [
    "COLLAPSE_LOSS",
    "TrainableStage",
    "check_resumable",
    "inference_batches",
    "load_for_resume",
    "planned_steps",
    "reinitialise_discriminator",
    "training_fingerprint",
]

log = logging.getLogger(__name__)

COLLAPSE_LOSS = 1e-5  # a discriminator loss below this = D has won outright and teaches nothing
CLOCK_KEY = "_seconds"  # the training clock, averaged over ranks with a step's losses
MAX_BATCH_VALUES = 1 << 24  # an inference batch holds at most this many input values (64 MB float32), fewer images when large


def reinitialise_discriminator(discriminator: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """GANomaly's remedy for a collapsed discriminator: fresh weights and a fresh optimiser state."""
    for sub in discriminator.modules():
        if sub is not discriminator and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    optimizer.state.clear()


def planned_steps(epochs: int, steps_per_epoch: int, *, min_steps: int = 0, max_steps: int = 0) -> int:
    """Optimiser steps of one training: ``epochs`` passes of ``steps_per_epoch`` steps, raised to
    ``min_steps`` and capped at ``max_steps`` (0: no bound).

    Epochs say how often each image of a small set is seen; the cap bounds the training time of a
    large one (an epoch of 10 000 images is 625 steps at batch 16), so the last epoch may stop
    part-way. ``planned_steps(40, 35, max_steps=1400) == 1400``; ``planned_steps(40, 625,
    max_steps=1400) == 1400`` (2.24 epochs); ``planned_steps(40, 2, min_steps=160) == 160``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
    steps = max(epochs * steps_per_epoch, min_steps)
    return min(steps, max_steps) if max_steps else steps


def _out_of_time(history: list[dict[str, float]]) -> bool:
    """Whether a training history ends where ``max_seconds`` stopped it."""
    return bool(history and history[-1].get("out_of_time"))


def training_fingerprint(images: np.ndarray) -> str:
    """Identity of a training set: shape and SHA-1 of the decoded pixels (a resume must see the same)."""
    return f"{images.shape}:{hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()}"


def check_resumable(path: Path, state: dict[str, Any], data: str, device: torch.device, compute: dict[str, Any] | None = None) -> None:
    """Refuse to resume on different training images, another device or other compute settings
    (``compute``: ``amp``, ``channels_last``): the result would differ."""
    if state.get("data") != data:
        raise ValueError(
            f"cannot resume from {str(path)!r}: the training images differ from those it was trained on "
            "(files added, removed, changed or newly readable); start a new run"
        )
    if torch.device(state.get("device", "cpu")).type != device.type:  # each torchrun rank has its own cuda:N
        raise ValueError(f"cannot resume from {str(path)!r}: it trained on {state.get('device')!r}, this run uses {str(device)!r}")
    for key, value in (compute or {}).items():
        if state.get("compute", {}).get(key, value) != value:
            raise ValueError(f"cannot resume from {str(path)!r}: it trained with {key}={state['compute'][key]!r}, this run "
                             f"uses {value!r} (run.{key})")


def _same_as_stored(stored: Any, current: Any) -> Any:
    """A stored config dict as this version reads it: fields added since take the value they had
    when it was written, fields since removed (at the value that remains) are dropped
    (:func:`~twostage_ad.migration.stored_section`)."""
    if not (is_dataclass(current) and isinstance(stored, dict)):
        return stored
    cls = type(current)
    try:
        return asdict(cls(**stored_section(cls.section, stored, strict=True)))
    except (TypeError, ValueError):  # fields this version does not know, or removed at other values: they differ
        return stored


def load_for_resume(
    path: Path, expected: dict[str, Any], estimator: Any, data: str, *, name: str, epochs: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check that a per-epoch checkpoint belongs to this training, load weights and history into
    ``estimator`` (``model_``, ``discriminator_``, ``history_``, ``device_``); ``epochs``: how many
    the training has (its planned steps over the steps per epoch, the last one possibly partial).

    Returns ``(payload, training_state)``; the state is None when all epochs are already done.
    """
    payload = load_checkpoint(path)
    if payload.get("format") != expected["format"]:
        raise ValueError(
            f"cannot resume from {str(path)!r}: it was written by an older version of twostage_ad "
            f"({payload.get('format')!r}, now {expected['format']!r}); start a new run, or reuse its weights "
            f"with --{name.replace(' ', '')}-from {str(path)!r}"
        )
    for key, value in expected.items():
        stored = _same_as_stored(payload.get(key), getattr(estimator, key, None))
        if stored != value:
            raise ValueError(f"cannot resume from {str(path)!r}: its {key} differs from this run's ({payload.get(key)!r} vs {value!r})")
    # a training its time budget stopped is complete too (the final checkpoint may hold no training state)
    finished = int(payload["epoch"]) >= epochs or _out_of_time(payload.get("history") or [])
    state = payload.get("training_state")
    if not finished:
        if state is None:
            raise ValueError(f"cannot resume from {str(path)!r}: it holds no training state (written by an older version)")
        stored_config = payload.get("config") or {}  # older versions kept the compute settings there
        state.setdefault("compute", {k: stored_config[k] for k in ("amp", "channels_last") if k in stored_config})
        check_resumable(path, state, data, estimator.device_, {"amp": estimator.amp, "channels_last": estimator.channels_last})
    estimator.model_.load_state_dict(payload["model"])
    if estimator.discriminator_ is not None and "discriminator" in payload:
        estimator.discriminator_.load_state_dict(payload["discriminator"])
    estimator.history_ = list(payload.get("history", []))
    if finished:
        log.info("%s already trained for %d epochs in %s", name, epochs, path)
        return payload, None
    log.info("%s resumes after epoch %d of %d from %s", name, payload["epoch"], epochs, path)
    return payload, state


def inference_batches(
    images: np.ndarray, batch_size: int, device: torch.device, *, extra: np.ndarray | None = None,
    extra_name: str = "per-image arrays", progress: bool = False, desc: str = "score",
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, extra)`` per batch of uint8 ``N×H×W×C`` images: ``x`` ``B×C×H×W`` in [-1, 1] on ``device``,
    ``extra`` the matching rows of a per-image array (e.g. stage-1 maps ``N×H×W``) or None.

    Call inside ``torch.inference_mode()``; the one batching loop of every scoring pass. Large
    images come fewer to a batch (at most :data:`MAX_BATCH_VALUES` input values), which changes
    no score: scoring is batch-independent.
    """
    if extra is not None and len(extra) != len(images):
        raise ValueError(f"got {len(extra)} {extra_name} for {len(images)} images")
    batch_size = max(1, min(batch_size, MAX_BATCH_VALUES // max(1, int(np.prod(images.shape[1:])))))
    for first in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = to_tensor(images[first : first + batch_size]).to(device)
        yield x, None if extra is None else torch.as_tensor(extra[first : first + batch_size]).to(device)


@dataclass(kw_only=True)
class TrainableStage:
    """Shared parameters and the training loop of both stages (subclasses are dataclasses too).

    ``amp``: bf16 autocast in training; ``channels_last``: NHWC weights and activations;
    ``score_batch_size``: images per scoring batch. Fitted attributes: ``model_``,
    ``discriminator_`` (or None), ``device_``, ``history_`` (per-epoch losses), ``train_seconds_``,
    ``steps_`` and ``epochs_`` (the optimiser steps and epochs the training has: ``config.epochs``
    passes, bounded by ``config.min_steps`` and ``config.max_steps``, :func:`planned_steps`; fewer
    when ``config.max_seconds`` ran out first, ``out_of_time_`` then True, and the last history
    record has ``out_of_time: 1.0``).
    """

    config_name: ClassVar[str] = "stage"  # the config section its settings live in ("stage1")
    checkpoint_format: ClassVar[str] = ""  # what save writes; load also reads the first format, ".../1"
    progress_term: ClassVar[tuple[str, str]] = ("recon", "recon")  # (short name, history key) on the progress bar

    config: Any = field(default=None, kw_only=False)  # each stage's config dataclass: Stage(config) works
    image_size: int = 32
    channels: int = 1
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0
    amp: bool = False
    channels_last: bool = True
    score_batch_size: int = 64

    @property
    def trained_steps(self) -> int | None:
        """Optimiser steps the fitted or loaded stage trained (None for a checkpoint written before
        steps were recorded)."""
        return self.history_[-1].get("steps") if getattr(self, "history_", None) else None

    @property
    def stage_name(self) -> str:
        """``stage 1`` / ``stage 2``, in messages and progress bars."""
        return self.config_name.replace("stage", "stage ")

    # -- what a stage supplies ---------------------------------------------------------------------
    def _networks(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """Fresh (generator, discriminator or None), drawn from the torch random state."""
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """What defines the trained stage (saved in its checkpoint, matched when resuming)."""
        return {"config": asdict(self.config), "image_size": self.image_size, "channels": self.channels, "seed": self.seed}

    def _dataset(self, images: np.ndarray) -> tuple[Dataset, bool]:
        """The training rows and whether the sampler passes ``(epoch, index)`` items."""
        raise NotImplementedError

    def _optimisers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        raise NotImplementedError

    def _train_step(self, batch: Any, model: torch.nn.Module, discriminator: torch.nn.Module | None,
                    g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer | None, context: DistributedContext) -> dict[str, float]:
        """One update on this rank's slice of a global batch; returns the losses (``total`` among them)."""
        raise NotImplementedError

    def _start_training(self, context: DistributedContext) -> None:
        """Before DDP wraps the networks (freeze unused parts, global BatchNorm)."""

    def _end_training(self) -> None:
        """After training, also after an error."""

    def _fit_statistics(self, images: np.ndarray, context: DistributedContext, progress: bool) -> bool:
        """After training, in eval mode: fit what scoring needs besides the weights (saved by
        :meth:`_extra_payload` into the final checkpoint); every rank ends with the same values.
        Returns whether anything was fitted."""
        return False

    def _extra_payload(self) -> dict[str, Any]:
        """Fitted values besides the weights that a checkpoint carries."""
        return {}

    def _load_extra(self, payload: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_payload` saved."""

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], device: str) -> TrainableStage:
        """An unfitted stage with a checkpoint's configuration (raises ValueError, TypeError)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def _build(self) -> None:
        self.device_ = resolve_device(self.device)
        memory_format = memory_format_for(self.channels_last)
        model, discriminator = self._networks()
        self.model_ = model.to(self.device_, memory_format=memory_format)
        self.discriminator_ = None if discriminator is None else discriminator.to(self.device_, memory_format=memory_format)

    def _check_images(self, images: np.ndarray) -> None:
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size) or images.shape[3] != self.channels:
            raise ValueError(f"expected N×{self.image_size}×{self.image_size}×{self.channels} images, got shape {images.shape}")

    def use_scoring_fields(self, config: Any) -> None:
        """Take ``config``'s scoring fields (``scoring_fields`` of its class; the stage's own config for the rest)."""
        self.config = replace(self.config, **{f: getattr(config, f) for f in type(config).scoring_fields})

    def _require_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() or load() first")

    def fit(
        self,
        images: np.ndarray,
        *,
        checkpoint_path: str | Path | None = None,
        progress: bool = True,
        resume: bool = False,
        context: DistributedContext | None = None,
    ) -> TrainableStage:
        """Train on uint8 ``N×H×W×C`` normal images; checkpoint each epoch when a path is given.

        ``resume``: continue from the last complete epoch in ``checkpoint_path`` (weights,
        optimisers and random states), so the result equals an uninterrupted run (unless
        ``config.max_seconds`` binds: the clock counts the checkpointed seconds, not the time lost
        to the interruption).
        ``context``: under ``torchrun``, every rank calls ``fit`` with the same images; each
        trains on its slice of every global batch in ``DistributedDataParallel`` and rank 0
        alone writes checkpoints.
        """
        self._check_images(images)
        if len(images) < 2:
            raise ValueError(f"{self.stage_name} needs at least 2 normal training images, got {len(images)}")
        context = context or DistributedContext()
        torch.manual_seed(self.seed)
        self._build()
        dataset, with_epoch = self._dataset(images)
        generator = torch.Generator().manual_seed(self.seed)
        g_opt, d_opt = self._optimisers()
        self.history_: list[dict[str, float]] = []
        batch_size = min(self.config.batch_size, len(dataset))
        steps_per_epoch = len(dataset) // batch_size  # full batches only
        self.steps_ = planned_steps(self.config.epochs, steps_per_epoch, min_steps=self.config.min_steps,
                                    max_steps=self.config.max_steps)
        self.epochs_ = math.ceil(self.steps_ / steps_per_epoch)
        first_epoch, earlier_seconds, state = 1, 0.0, None
        data_id = training_fingerprint(images)
        if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
            first_epoch = self._restore(Path(checkpoint_path), g_opt, d_opt, generator, data_id)
            earlier_seconds = self.history_[-1]["seconds"] if self.history_ else 0.0
        self.out_of_time_ = _out_of_time(self.history_)
        if self.out_of_time_:  # resumed after its time budget ran out: that training is complete
            self.steps_, self.epochs_ = int(self.history_[-1]["steps"]), int(self.history_[-1]["epoch"])
            first_epoch = self.epochs_ + 1
        # under DDP each rank takes its slice of every global batch
        sampler = GlobalBatchSampler(len(dataset), batch_size, generator, context, with_epoch=with_epoch, start_epoch=first_epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        self._start_training(context)
        try:
            model = wrap_ddp(self.model_, context, self.device_)
            discriminator = None if self.discriminator_ is None else wrap_ddp(self.discriminator_, context, self.device_)
            start = time.perf_counter() - earlier_seconds
            epochs = tqdm(range(first_epoch, self.epochs_ + 1), desc=f"{self.stage_name} train", unit="epoch",
                          disable=not progress, initial=first_epoch - 1, total=self.epochs_)
            for epoch in epochs:
                planned = min(steps_per_epoch, self.steps_ - (epoch - 1) * steps_per_epoch)  # the last may be partial
                means, steps = self._train_epoch(epoch, loader, model, discriminator, g_opt, d_opt, context, progress,
                                                 planned, start)
                record = {"epoch": epoch, "steps": (epoch - 1) * steps_per_epoch + steps,
                          "seconds": time.perf_counter() - start, **means}
                self.out_of_time_ = self.out_of_time_ and record["steps"] < self.steps_  # spent on the last step: complete
                if self.out_of_time_:
                    record["out_of_time"] = 1.0
                self._finish_epoch(record, epochs)
                if epoch == first_epoch and not self.out_of_time_ and context.is_main:
                    self._warn_if_budget_short(record, earlier_seconds, earlier_steps=(first_epoch - 1) * steps_per_epoch)
                if checkpoint_path is not None and context.is_main:
                    state = {"g_opt": g_opt.state_dict(), "d_opt": None if d_opt is None else d_opt.state_dict(),
                             "loader_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                             "data": data_id, "device": str(self.device_),
                             "compute": {"amp": self.amp, "channels_last": self.channels_last}}
                    self.save(checkpoint_path, epoch=epoch, training_state=state)
                if self.out_of_time_:
                    epochs.close()
                    self._stop_for_time(record, planned_steps=self.steps_, is_main=context.is_main)
                    break
        finally:
            self._end_training()
        self.train_seconds_ = time.perf_counter() - start
        self.model_.eval()
        if self._fit_statistics(images, context, progress) and checkpoint_path is not None and context.is_main:  # the last epoch's checkpoint, now with them
            if state is None and Path(checkpoint_path).is_file():  # resumed after the last epoch
                state = load_checkpoint(checkpoint_path).get("training_state")
            self.save(checkpoint_path, epoch=len(self.history_), training_state=state)
        return self

    def _train_epoch(self, epoch: int, loader: DataLoader, model: torch.nn.Module, discriminator: torch.nn.Module | None,
                     g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer | None, context: DistributedContext,
                     progress: bool, steps: int, start: float) -> tuple[dict[str, float], int]:
        """The loader's first ``steps`` batches (a whole pass, or part of the last one): the mean of
        each loss over the steps run (and the discriminator resets), and how many ran.

        Stops after the step that spends ``config.max_seconds`` since ``start`` (a ``perf_counter``
        value), setting ``out_of_time_``; under ``torchrun`` the ranks' mean clock decides, so every
        rank stops at the same step."""
        budget = float(self.config.max_seconds)
        self.model_.train()
        if self.discriminator_ is not None:
            self.discriminator_.train()
        sums: dict[str, float] = {}
        done = resets = 0
        batches = itertools.islice(loader, steps)
        for step, batch in enumerate(tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False,
                                          total=steps)):
            losses = self._train_step(batch, model, discriminator, g_opt, d_opt, context)
            losses = context.mean_of({**losses, CLOCK_KEY: time.perf_counter() - start})  # one collective for both
            elapsed = losses.pop(CLOCK_KEY)
            done += 1
            if d_opt is not None and losses["discriminator"] < COLLAPSE_LOSS:  # the same decision on every rank
                reinitialise_discriminator(self.discriminator_, d_opt)
                context.broadcast_parameters(self.discriminator_)
                resets += 1
                log.warning("%s epoch %d step %d: discriminator loss %.2g < %.0e, re-initialised it",
                            self.stage_name, epoch, step, losses["discriminator"], COLLAPSE_LOSS)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            if budget and elapsed >= budget:
                self.out_of_time_ = True
                break
        means = {k: v / done for k, v in sums.items()}
        return ({**means, "discriminator_resets": resets} if d_opt is not None else means), done

    def _warn_if_budget_short(self, record: dict[str, float], earlier_seconds: float, *, earlier_steps: int) -> None:
        """After the first epoch a ``fit`` call trains: say early when, at that epoch's pace,
        ``config.max_seconds`` will stop training before its planned steps."""
        budget = float(self.config.max_seconds)
        steps = record["steps"] - earlier_steps
        if not budget or steps <= 0:
            return
        per_step = (record["seconds"] - earlier_seconds) / steps
        needed = record["seconds"] + per_step * (self.steps_ - record["steps"])
        if needed > budget:
            log.warning("%s takes %.2f s a step here: its %d steps need about %.0f s, so its time budget %s.max_seconds=%g s "
                        "will stop it near step %d (a new run with %s.max_seconds=0 trains every step)",
                        self.stage_name, per_step, self.steps_, needed, self.config_name, self.config.max_seconds,
                        min(self.steps_, int(record["steps"] + (budget - record["seconds"]) / per_step) + 1), self.config_name)

    def _stop_for_time(self, record: dict[str, float], *, planned_steps: int, is_main: bool) -> None:
        """Training ran out of ``config.max_seconds``: the steps and epochs it has are those it took."""
        self.steps_, self.epochs_ = int(record["steps"]), int(record["epoch"])
        if is_main:
            log.warning("%s stopped after %d of %d optimiser steps: its time budget %s.max_seconds=%g s ran out "
                        "(a new run with %s.max_seconds=0 trains every step)", self.stage_name, self.steps_,
                        planned_steps, self.config_name, self.config.max_seconds, self.config_name)

    def _finish_epoch(self, record: dict[str, float], epochs: tqdm) -> None:
        """The NaN check, the history, the progress bar and the log line of a finished epoch."""
        epoch = record["epoch"]
        if not math.isfinite(record["total"]):
            raise FloatingPointError(
                f"{self.stage_name} loss became {record['total']} in epoch {epoch}; lower {self.config_name}.lr "
                f"(now {self.config.lr}) or check the input images"
            )
        self.history_.append(record)
        short, key = self.progress_term
        epochs.set_postfix({"loss": f"{record['total']:.4f}", short: f"{record[key]:.4f}"})
        log.info("%s epoch %d/%d: %s", self.stage_name, epoch, self.epochs_,
                 {k: round(v, 5) for k, v in record.items() if k != "epoch"})

    def _restore(self, path: Path, g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer | None,
                 generator: torch.Generator, data: str) -> int:
        """Load a per-epoch checkpoint into the fresh training objects; returns the next epoch."""
        expected = {"format": self.checkpoint_format, **self._identity()}
        payload, state = load_for_resume(path, expected, self, data, name=self.stage_name, epochs=self.epochs_)
        if state is None:
            return self.epochs_ + 1
        g_opt.load_state_dict(state["g_opt"])
        if d_opt is not None:
            d_opt.load_state_dict(state["d_opt"])
        generator.set_state(state["loader_generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(payload["epoch"]) + 1

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path, *, epoch: int | None = None, training_state: dict[str, Any] | None = None) -> None:
        """Weights, configuration, history and fitted values; ``training_state`` (optimisers, random
        states) lets ``fit`` resume. Plain values and tensors only: loads with ``weights_only=True``."""
        payload: dict[str, Any] = {
            "format": self.checkpoint_format,
            "model": self.model_.state_dict(),
            **self._identity(),
            "epoch": epoch if epoch is not None else len(getattr(self, "history_", [])),
            "history": getattr(self, "history_", []),
            **self._extra_payload(),
        }
        if self.discriminator_ is not None:
            payload["discriminator"] = self.discriminator_.state_dict()
        if training_state is not None:
            payload["training_state"] = training_state
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> TrainableStage:
        """A fitted stage from a checkpoint written by :meth:`save` (weights only, no code runs)."""
        payload = load_checkpoint(path)
        if payload.get("format") not in (f"twostage_ad.{cls.config_name}/1", cls.checkpoint_format):
            raise ValueError(f"{str(path)!r} is not a twostage_ad {cls.config_name.replace('stage', 'stage-')} checkpoint "
                             f"(format {payload.get('format')!r})")
        try:
            stage = cls._from_payload(payload, device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} holds a config this version cannot use: {exc}") from exc
        stage._build()
        stage.model_.load_state_dict(payload["model"])
        if stage.discriminator_ is not None and "discriminator" in payload:
            stage.discriminator_.load_state_dict(payload["discriminator"])
        stage.history_ = list(payload.get("history", []))
        stage.out_of_time_ = _out_of_time(stage.history_)
        stage._load_extra(payload)
        stage.model_.eval()
        return stage
