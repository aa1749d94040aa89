"""Stage 1: training the attention network and computing the deterministic screening loss.

Training (normal images only): each batch is shuffled normals; a share
``augment.probability`` of them gets one synthetic defect with a known mask. Losses (all
mean-reduced, weights in :class:`~twostage_ad.config.Stage1Config`):

- ``w_con · L1(x̂, x)`` on clean rows, ``w_rep · L1(x̂_aug, x)`` on defect rows (repair),
- ``w_enc · L2(z, ẑ)``,
- ``w_att · [BCE(A(x), 1) + BCE(A(x_aug), M)]`` with logits (``BCEWithLogits``),
- ``w_adv ·`` feature matching against a discriminator on image ⊕ attention map, which sees
  (clean image, true mask) as real and (x̂, A) as fake.

Screening (:func:`screening_scores`): eval mode, ``torch.inference_mode``, no augmentation, one
image at a time in effect (InstanceNorm, no batch statistics), so the same image always gets the
same numbers whatever batch it is in.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from twostage_ad.config import AugmentConfig, Stage1Config
from twostage_ad.data.augment import apply_defect, build_defect_augmentation
from twostage_ad.data.images import to_tensor
from twostage_ad.distributed import DistributedContext, GlobalBatchSampler, wrap_ddp
from twostage_ad.models.attention_net import AttentionNet, AttentionNetEnsemble, ImageMapDiscriminator
from twostage_ad.runs import load_checkpoint, save_checkpoint

__all__ = [
    "SCREENING_COMPONENTS",
    "resolve_device",
    "memory_format_for",
    "has_fast_bf16",
    "build_attention_network",
    "DefectDataset",
    "ScreeningResult",
    "screening_batch",
    "uses_reconstruction",
    "screening_scores",
    "COLLAPSE_LOSS",
    "reinitialise_discriminator",
    "training_fingerprint",
    "check_resumable",
    "load_for_resume",
    "AttentionStage",
]

log = logging.getLogger(__name__)

SCREENING_COMPONENTS = ("stage1_recon", "stage1_latent", "stage1_att_mean", "stage1_att_topk")
COLLAPSE_LOSS = 1e-5  # a discriminator loss below this = D has won outright and teaches nothing


def reinitialise_discriminator(discriminator: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """GANomaly's remedy for a collapsed discriminator: fresh weights and a fresh optimiser state."""
    for sub in discriminator.modules():
        if sub is not discriminator and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    optimizer.state.clear()


def memory_format_for(config: Any) -> torch.memory_format:
    """``channels_last`` (NHWC) when the stage config asks for it: convolutions then run NHWC end to end."""
    return torch.channels_last if getattr(config, "channels_last", False) else torch.contiguous_format


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was requested but CUDA is not available; use device: auto or cpu")
    return device


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here: a CUDA GPU with bf16 (not emulated), or a CPU with
    ``avx512_bf16`` or AMX (read from ``/proc/cpuinfo``; False where that cannot be read). Elsewhere
    bf16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_attention_network(config: Stage1Config, channels: int, image_size: int) -> AttentionNet | AttentionNetEnsemble:
    """The stage-1 network a config describes: one :class:`AttentionNet`, or ``ensemble_size`` of
    them (each drawn from the torch random state in turn) in an :class:`AttentionNetEnsemble`."""
    members = [
        AttentionNet(
            channels,
            image_size,
            base_width=config.base_width,
            max_width=config.max_width,
            bottleneck_size=config.bottleneck_size,
            attention_max_tokens=config.attention_max_tokens,
            attention_kv_max_tokens=config.attention_kv_max_tokens,
            final_up=config.final_up,
            separate_reconstruction=config.separate_reconstruction,
        )
        for _ in range(config.ensemble_size)
    ]
    return members[0] if len(members) == 1 else AttentionNetEnsemble(members)


# --------------------------------------------------------------------------------------------
# data


class DefectDataset(Dataset):
    """Training normals; item ``(epoch, i)`` (or ``i``) is ``(input, clean, mask, is_defect)``, tensors in [-1, 1].

    ``mask`` is ``1×H×W`` with 1 = normal, 0 = synthetic defect (all ones for clean rows).
    Whether a row gets a defect, its kind and its texture (another training image) are drawn
    from ``(seed, epoch, i)`` alone: the same image gets the same defect in the same epoch
    whichever process, loader worker or resumed run draws it.
    """

    def __init__(self, images: np.ndarray, augment: AugmentConfig, seed: int = 0):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"expected a non-empty N×H×W×C uint8 array, got shape {images.shape}")
        self.images = images
        self.augment_config = augment
        self.seed = seed
        self.augmentation = build_defect_augmentation(augment, seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.images[index]
        clean = to_tensor(image)[0]
        entropy = np.random.SeedSequence([self.seed, epoch, index])
        rng = np.random.default_rng(entropy)
        is_defect = bool(rng.random() < self.augment_config.probability)
        if not is_defect:
            return clean, clean, torch.ones(1, *image.shape[:2]), torch.tensor(False)
        other = (index + 1 + int(rng.integers(0, len(self.images) - 1))) % len(self.images)  # never itself
        self.augmentation.set_random_seed(int(entropy.generate_state(1)[0]))
        defective, mask = apply_defect(self.augmentation, image, self.images[other])
        return to_tensor(defective)[0], clean, torch.from_numpy(mask).float()[None], torch.tensor(True)


def training_fingerprint(images: np.ndarray) -> str:
    """Identity of a training set: shape and SHA-1 of the decoded pixels (a resume must see the same)."""
    return f"{images.shape}:{hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()}"


def check_resumable(path: Path, state: dict[str, Any], data: str, device: torch.device) -> None:
    """Refuse to resume on different training images or another device: the result would differ."""
    if state.get("data") != data:
        raise ValueError(
            f"cannot resume from {str(path)!r}: the training images differ from those it was trained on "
            "(files added, removed, changed or newly readable); start a new run"
        )
    if torch.device(state.get("device", "cpu")).type != device.type:  # each torchrun rank has its own cuda:N
        raise ValueError(f"cannot resume from {str(path)!r}: it trained on {state.get('device')!r}, this run uses {str(device)!r}")


def load_for_resume(
    path: Path, expected: dict[str, Any], estimator: Any, data: str, *, name: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Check that a per-epoch checkpoint belongs to this training, load weights and history into
    ``estimator`` (``model_``, ``discriminator_``, ``history_``, ``config.epochs``, ``device_``).

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
        stored = payload.get(key)
        current = getattr(estimator, key, None)
        if is_dataclass(current) and isinstance(stored, dict):  # fields added since it was written take their defaults
            try:
                stored = asdict(type(current)(**stored))
            except TypeError:  # fields this version does not know: compared as they are, so they differ
                pass
        if stored != value:
            raise ValueError(f"cannot resume from {str(path)!r}: its {key} differs from this run's ({payload.get(key)!r} vs {value!r})")
    finished = int(payload["epoch"]) >= estimator.config.epochs
    state = payload.get("training_state")
    if not finished:
        if state is None:
            raise ValueError(f"cannot resume from {str(path)!r}: it holds no training state (written by an older version)")
        check_resumable(path, state, data, estimator.device_)
    estimator.model_.load_state_dict(payload["model"])
    if estimator.discriminator_ is not None and "discriminator" in payload:
        estimator.discriminator_.load_state_dict(payload["discriminator"])
    estimator.history_ = list(payload.get("history", []))
    if finished:
        log.info("%s already trained for %d epochs in %s", name, estimator.config.epochs, path)
        return payload, None
    log.info("%s resumes after epoch %d of %d from %s", name, payload["epoch"], estimator.config.epochs, path)
    return payload, state


# --------------------------------------------------------------------------------------------
# screening


@dataclass
class ScreeningResult:
    """Per-image screening loss and components (arrays of length N) and anomaly maps ``N×H×W``.

    ``anomaly_maps`` is ``1 − A``: 0 = looks normal, 1 = looks anomalous.
    """

    loss: np.ndarray
    components: dict[str, np.ndarray]
    anomaly_maps: np.ndarray
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return len(self.loss) / self.seconds if self.seconds > 0 else float("nan")


def screening_batch(model: AttentionNet | AttentionNetEnsemble, x: torch.Tensor, config: Stage1Config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Screening components (each ``B``) and the anomaly map ``1 − A`` (``B×H×W``) of a batch ``x``.

    x̂ and ẑ are computed only when a screening weight uses them; otherwise ``stage1_recon`` and
    ``stage1_latent`` are NaN (not computed), and the screening loss leaves them out. With
    ``config.score_bf16`` the network runs under bf16 autocast, everything after it in float32;
    without it, autocast is switched off for the network even inside a caller's autocast region.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.score_bf16):
        out = model(x, reconstruct=uses_reconstruction(config))
    nan = torch.full((x.shape[0],), float("nan"), device=x.device)
    recon = nan if out.reconstruction is None else (out.reconstruction.float() - x).abs().mean(dim=(1, 2, 3))
    latent = nan if out.latent_reconstructed is None else (
        (out.latent.float() - out.latent_reconstructed.float()).pow(2).mean(dim=(1, 2, 3)))
    pixel_bce = F.softplus(-out.attention_logits.float())  # BCE-with-logits against "normal" (1)
    smoothed = F.avg_pool2d(pixel_bce, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    k = max(1, int(round(config.screen_topk * math.prod(int(d) for d in smoothed.shape[1:]))))  # ints also when traced
    topk = smoothed.flatten(1).topk(k, dim=1).values.mean(dim=1)
    components = {
        "stage1_recon": recon,
        "stage1_latent": latent,
        "stage1_att_mean": pixel_bce.mean(dim=(1, 2, 3)),
        "stage1_att_topk": topk,
    }
    return components, 1.0 - torch.sigmoid(out.attention_logits.float())[:, 0]


def uses_reconstruction(config: Stage1Config, *, training: bool = False) -> bool:
    """Whether screening (or, with ``training``, the training loss) needs x̂ and ẑ."""
    if training:
        return any(w > 0 for w in (config.w_con, config.w_rep, config.w_enc, config.w_adv))
    return config.screen_con != 0 or config.screen_enc != 0


def screening_loss(components: dict[str, Any], config: Stage1Config) -> Any:
    """``screen_con·recon + screen_enc·latent + screen_att·att_topk`` (documented weights; terms
    with weight 0 are left out, so a component that was not computed does not turn it NaN).

    Works on numpy arrays and on torch tensors (the exported scorer uses it too).
    """
    terms = [(config.screen_con, "stage1_recon"), (config.screen_enc, "stage1_latent"), (config.screen_att, "stage1_att_topk")]
    total = components["stage1_att_topk"] * 0
    for weight, name in terms:
        if weight != 0:
            total = total + weight * components[name]
    return total


def screening_scores(
    model: AttentionNet | AttentionNetEnsemble,
    images: np.ndarray,
    config: Stage1Config,
    device: torch.device,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "stage 1 score",
) -> ScreeningResult:
    """Score uint8 ``N×H×W×C`` images: deterministic eval-mode screening loss, components, maps."""
    model.eval()
    if config.score_bf16 and not has_fast_bf16(device):  # the warnings module shows it once per place
        warnings.warn(f"stage1.score_bf16 is on, but {device} has no native bf16: scoring is emulated and slower "
                      "than float32 (set stage1.score_bf16: false for new runs; a run's thresholds assume its own "
                      "setting)", RuntimeWarning, stacklevel=2)
    batch_size = batch_size or config.score_batch_size
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SCREENING_COMPONENTS}
    maps: list[np.ndarray] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
            x = to_tensor(images[first : first + batch_size]).to(device)
            components, anomaly = screening_batch(model, x, config)
            for name, value in components.items():
                parts[name].append(value.cpu().numpy())
            maps.append(anomaly.cpu().numpy())
    seconds = time.perf_counter() - start
    size = images.shape[1]
    components = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in parts.items()}
    return ScreeningResult(
        loss=screening_loss(components, config),
        components=components,
        anomaly_maps=np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32),
        seconds=seconds,
    )


# --------------------------------------------------------------------------------------------
# training


def _masked_mean(values: torch.Tensor, rows: torch.Tensor, count: float | None = None, scale: float = 1.0) -> torch.Tensor:
    """Mean of per-row ``values`` over the selected rows; 0 (with a graph) when none is selected.

    ``count``: the number of selected rows over all ranks (default: here); the local sum is
    divided by it and multiplied by ``scale`` (the world size), so that DDP's average of the
    ranks' gradients is the gradient of the global mean.
    """
    count = float(rows.sum()) if count is None else count
    if count == 0:
        return values.sum() * 0.0
    return values[rows].sum() * (scale / count)


def _attention_bce(logits: torch.Tensor, mask: torch.Tensor, balanced: bool) -> torch.Tensor:
    """Per-row BCE-with-logits of ``B×1×H×W`` logits against the mask (1 normal, 0 defect).

    ``balanced``: the mean over defect pixels and the mean over normal pixels count half each, so
    a defect covering 1 % of the image is not drowned by the 99 % that is normal (a deviation from
    the plain mean of DESIGN §2, in the spirit of DRAEM's focal loss). Rows without defect pixels
    get the plain mean.
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits, mask, reduction="none").flatten(1)
    if not balanced:
        return per_pixel.mean(dim=1)
    defect = (mask.flatten(1) < 0.5).float()
    n_defect = defect.sum(dim=1)
    n_normal = defect.shape[1] - n_defect
    defect_mean = (per_pixel * defect).sum(dim=1) / n_defect.clamp(min=1)
    normal_mean = (per_pixel * (1 - defect)).sum(dim=1) / n_normal.clamp(min=1)
    return torch.where(n_defect > 0, 0.5 * (defect_mean + normal_mean), per_pixel.mean(dim=1))


@dataclass
class AttentionStage:
    """Stage 1 as an estimator: ``fit`` on normal images, then ``score``.

    Parameters are stored as given; the fitted network is ``model_``, the per-epoch losses
    ``history_`` and the training time ``train_seconds_``.
    """

    config: Stage1Config = field(default_factory=Stage1Config)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    image_size: int = 32
    channels: int = 1
    device: str = "auto"
    seed: int = 0
    num_workers: int = 0

    def _build(self) -> None:
        c = self.config
        self.device_ = resolve_device(self.device)
        self.model_ = build_attention_network(c, self.channels, self.image_size).to(self.device_, memory_format=memory_format_for(c))
        self.discriminator_ = (
            ImageMapDiscriminator(self.channels, self.image_size, base_width=c.base_width, max_width=c.max_width).to(
                self.device_, memory_format=memory_format_for(c))
            if c.w_adv > 0
            else None
        )

    def fit(
        self,
        images: np.ndarray,
        *,
        checkpoint_path: str | Path | None = None,
        progress: bool = True,
        resume: bool = False,
        context: DistributedContext | None = None,
    ) -> "AttentionStage":
        """Train on uint8 ``N×H×W×C`` normal images; checkpoint each epoch when a path is given.

        ``resume``: continue from the last complete epoch in ``checkpoint_path`` (weights,
        optimiser, scheduler and random states), so the result equals an uninterrupted run.
        ``context``: under ``torchrun``, every rank calls ``fit`` with the same images; each
        trains on its slice of every global batch in ``DistributedDataParallel`` and rank 0
        alone writes checkpoints.
        """
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size) or images.shape[3] != self.channels:
            raise ValueError(
                f"expected N×{self.image_size}×{self.image_size}×{self.channels} images, got shape {images.shape}"
            )
        if len(images) < 2:
            raise ValueError(f"stage 1 needs at least 2 normal training images, got {len(images)}")
        context = context or DistributedContext()
        torch.manual_seed(self.seed)
        self._build()
        c = self.config
        if not uses_reconstruction(c, training=True):  # attention-only training: x̂ and ẑ are never computed
            for module in self.model_.reconstruction_modules():
                module.requires_grad_(False)  # (and DDP does not wait for their gradients)
        generator = torch.Generator().manual_seed(self.seed)
        dataset = DefectDataset(images, self.augment, seed=self.seed)
        g_opt = torch.optim.Adam(self.model_.parameters(), lr=c.lr, betas=(0.5, 0.999), weight_decay=c.weight_decay)
        d_opt = (
            torch.optim.Adam(self.discriminator_.parameters(), lr=c.lr, betas=(0.5, 0.999))
            if self.discriminator_ is not None
            else None
        )
        schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
            for opt in (g_opt, d_opt)
            if opt is not None and c.lr_schedule == "cosine"
        ]
        use_amp = c.amp
        self.history_: list[dict[str, float]] = []
        first_epoch, earlier_seconds = 1, 0.0
        data_id = training_fingerprint(images)
        if resume and checkpoint_path is not None and Path(checkpoint_path).is_file():
            first_epoch = self._restore(Path(checkpoint_path), g_opt, d_opt, schedulers, generator, data_id)
            earlier_seconds = self.history_[-1]["seconds"] if self.history_ else 0.0
        sampler = GlobalBatchSampler(len(dataset), min(c.batch_size, len(dataset)), generator, context,
                                     with_epoch=True, start_epoch=first_epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0)
        model = wrap_ddp(self.model_, context, self.device_)
        discriminator = wrap_ddp(self.discriminator_, context, self.device_) if self.discriminator_ is not None else None
        start = time.perf_counter() - earlier_seconds
        epochs = tqdm(range(first_epoch, c.epochs + 1), desc="stage 1 train", unit="epoch", disable=not progress,
                      initial=first_epoch - 1, total=c.epochs)
        for epoch in epochs:
            self.model_.train()
            sums: dict[str, float] = {}
            steps = 0
            resets = 0
            for batch in tqdm(loader, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False):
                losses = context.mean_of(self._train_step(batch, model, discriminator, g_opt, d_opt, use_amp, context))
                if d_opt is not None and losses["discriminator"] < COLLAPSE_LOSS:  # the same decision on every rank
                    reinitialise_discriminator(self.discriminator_, d_opt)
                    context.broadcast_parameters(self.discriminator_)
                    resets += 1
                    log.warning("stage 1 epoch %d: discriminator loss %.2g < %.0e, re-initialised it",
                                epoch, losses["discriminator"], COLLAPSE_LOSS)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value
                steps += 1
            for scheduler in schedulers:
                scheduler.step()
            record = {"epoch": epoch, "seconds": time.perf_counter() - start, **{k: v / steps for k, v in sums.items()}}
            if d_opt is not None:
                record["discriminator_resets"] = resets
            if not math.isfinite(record["total"]):
                raise FloatingPointError(
                    f"stage 1 loss became {record['total']} in epoch {epoch}; lower stage1.lr "
                    f"(now {c.lr}) or check the input images"
                )
            self.history_.append(record)
            epochs.set_postfix(loss=f"{record['total']:.4f}", att=f"{record['attention']:.4f}")
            log.info("stage 1 epoch %d/%d: %s", epoch, c.epochs, {k: round(v, 5) for k, v in record.items() if k != "epoch"})
            if checkpoint_path is not None and context.is_main:
                state = {
                    "g_opt": g_opt.state_dict(),
                    "d_opt": d_opt.state_dict() if d_opt is not None else None,
                    "schedulers": [s.state_dict() for s in schedulers],
                    "loader_generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "data": data_id,
                    "device": str(self.device_),
                }
                self.save(checkpoint_path, epoch=epoch, training_state=state)
        self.train_seconds_ = time.perf_counter() - start
        self.model_.eval()
        return self

    def _restore(self, path: Path, g_opt, d_opt, schedulers, generator: torch.Generator, data: str) -> int:
        """Load a per-epoch checkpoint into the fresh training objects; returns the next epoch."""
        expected = {"format": "twostage_ad.stage1/2", "config": asdict(self.config), "augment": asdict(self.augment),
                    "image_size": self.image_size, "channels": self.channels, "seed": self.seed}
        payload, state = load_for_resume(path, expected, self, data, name="stage 1")
        if state is None:
            return self.config.epochs + 1
        if d_opt is not None:
            d_opt.load_state_dict(state["d_opt"])
        g_opt.load_state_dict(state["g_opt"])
        for scheduler, saved in zip(schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        generator.set_state(state["loader_generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(payload["epoch"]) + 1

    def _train_step(
        self,
        batch: tuple[torch.Tensor, ...],
        model: torch.nn.Module,
        discriminator: torch.nn.Module | None,
        g_opt: torch.optim.Optimizer,
        d_opt: torch.optim.Optimizer | None,
        use_amp: bool,
        context: DistributedContext,
    ) -> dict[str, float]:
        """One generator and one discriminator update; ``model`` / ``discriminator`` may be DDP-wrapped.

        Every loss is a mean over the *global* batch (all ranks), so DDP's gradient average
        equals one process's gradient: means over clean / defect rows divide by global row
        counts, and feature matching compares global feature means (autograd all-reduce).
        """
        c = self.config
        x_in, x_clean, mask, is_defect = (t.to(self.device_, non_blocking=True) for t in batch)
        clean_rows = ~is_defect
        n_clean, n_defect = context.sum(torch.stack([clean_rows.sum(), is_defect.sum()]).float()).tolist()
        reconstruct = uses_reconstruction(c, training=True)
        with torch.autocast(self.device_.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x_in, reconstruct=reconstruct)
        logits = out.attention_logits.float()
        members = 1
        if out.member_attention_logits is None:
            bce = _attention_bce(logits, mask, balanced=c.att_balanced)
        else:  # the sum of the members' own losses: each member's gradient is the one it would get alone
            members = out.member_attention_logits.shape[0]
            bce = sum(_attention_bce(m, mask, balanced=c.att_balanced) for m in out.member_attention_logits.float())
        scale = context.world_size  # DDP divides the summed gradients by the world size
        if reconstruct:
            recon_err = (out.reconstruction.float() - x_clean).abs().mean(dim=(1, 2, 3))
            l_con = _masked_mean(recon_err, clean_rows, n_clean, scale)
            l_rep = _masked_mean(recon_err, is_defect, n_defect, scale)
            l_enc = F.mse_loss(out.latent_reconstructed.float(), out.latent.float())
        else:
            l_con = l_rep = l_enc = torch.zeros((), device=self.device_)
        l_att = _masked_mean(bce, clean_rows, n_clean, scale) + _masked_mean(bce, is_defect, n_defect, scale)
        total = c.w_con * l_con + c.w_rep * l_rep + c.w_enc * l_enc + c.w_att * l_att
        losses = {"recon": l_con.item(), "repair": l_rep.item(), "latent": l_enc.item(), "attention": l_att.item() / members}
        attention = torch.sigmoid(logits)
        if self.discriminator_ is not None:
            # the plain network (no DDP): this forward trains the generator, not the discriminator
            self.discriminator_.requires_grad_(False)
            _, features = self._discriminate(self.discriminator_, x_clean, mask, out.reconstruction.float(), attention)
            self.discriminator_.requires_grad_(True)
            real_feat, fake_feat = features.flatten(1).chunk(2)
            rows = float(len(real_feat) * context.world_size)
            fake_mean = context.sum(fake_feat.sum(dim=0), differentiable=True) / rows
            real_mean = context.sum(real_feat.detach().sum(dim=0)) / rows
            l_adv = F.mse_loss(fake_mean, real_mean)
            total = total + c.w_adv * l_adv
            losses["adversarial"] = l_adv.item()
        g_opt.zero_grad(set_to_none=True)
        total.backward()
        g_opt.step()
        # per rank and member (ensembles train the attention term alone); the mean over ranks is the global batch's
        losses["total"] = total.item() / members
        if discriminator is not None and d_opt is not None:
            logits_d, _ = self._discriminate(discriminator, x_clean, mask, out.reconstruction.detach().float(), attention.detach())
            real_logits, fake_logits = logits_d.chunk(2)
            target = torch.cat([torch.ones_like(real_logits), torch.zeros_like(fake_logits)])
            l_d = F.binary_cross_entropy_with_logits(logits_d, target)
            d_opt.zero_grad(set_to_none=True)
            l_d.backward()
            d_opt.step()
            losses["discriminator"] = l_d.item()
        return losses

    @staticmethod
    def _discriminate(
        discriminator: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, reconstruction: torch.Tensor,
        attention: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One concatenated forward (DDP-safe): rows ``[:B]`` real (clean image, true mask), ``[B:]`` fake."""
        return discriminator(torch.cat([image, reconstruction]), torch.cat([mask, attention]))

    # -- scoring and persistence ----------------------------------------------------------------
    def score(self, images: np.ndarray, *, batch_size: int | None = None, progress: bool = True, desc: str = "stage 1 score") -> ScreeningResult:
        if not hasattr(self, "model_"):
            raise RuntimeError("AttentionStage is not fitted: call fit() or load() first")
        return screening_scores(self.model_, images, self.config, self.device_, batch_size=batch_size, progress=progress, desc=desc)

    def save(self, path: str | Path, *, epoch: int | None = None, training_state: dict[str, Any] | None = None) -> None:
        """Weights, configs and history; ``training_state`` (optimisers, random states) lets ``fit`` resume."""
        payload: dict[str, Any] = {
            "format": "twostage_ad.stage1/2",
            "model": self.model_.state_dict(),
            "config": asdict(self.config),
            "augment": asdict(self.augment),
            "image_size": self.image_size,
            "channels": self.channels,
            "seed": self.seed,
            "epoch": epoch if epoch is not None else len(getattr(self, "history_", [])),
            "history": getattr(self, "history_", []),
        }
        if self.discriminator_ is not None:
            payload["discriminator"] = self.discriminator_.state_dict()
        if training_state is not None:
            payload["training_state"] = training_state
        save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "AttentionStage":
        payload = load_checkpoint(path)
        if payload.get("format") not in ("twostage_ad.stage1/1", "twostage_ad.stage1/2"):
            raise ValueError(f"{str(path)!r} is not a twostage_ad stage-1 checkpoint (format {payload.get('format')!r})")
        try:
            config = Stage1Config(**payload["config"])
            augment = AugmentConfig(**payload["augment"])
            config.validate()
            augment.validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {str(path)!r} holds a config this version cannot use: {exc}") from exc
        stage = cls(
            config=config,
            augment=augment,
            image_size=payload["image_size"],
            channels=payload["channels"],
            device=device,
            seed=payload["seed"],
        )
        stage._build()
        stage.model_.load_state_dict(payload["model"])
        if stage.discriminator_ is not None and "discriminator" in payload:
            stage.discriminator_.load_state_dict(payload["discriminator"])
        stage.history_ = list(payload.get("history", []))
        stage.model_.eval()
        return stage
