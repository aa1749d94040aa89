"""Peer baselines: anomalib's GANomaly and DRAEM on our data splits, image size and machine.

Run it with the peer venv's Python (anomalib never becomes a dependency of twostage_ad):

    bash benchmarks/setup_peer_env.sh .peer-venv
    .peer-venv/bin/python benchmarks/peer_anomalib.py train --manifest DATA/split.csv \\
        [--category NAME] --image-size 128 --channels 3 --epochs 15 --batch-size 32 --seed 0 \\
        --output result.json
    .peer-venv/bin/python benchmarks/peer_anomalib.py train --model draem --manifest DATA/split.csv \\
        --image-size 128 --channels 1 --max-seconds 600 --batch-size 8 --output draem.json
    .peer-venv/bin/python benchmarks/peer_anomalib.py speed --image-size 64 128 256 --channels 1 \\
        --batch-size 32 --images 256 --output speed.json

train: fits ``anomalib.models.Ganomaly`` (anomalib's own defaults: n_features, latent_vec_size,
loss weights, lr, betas and its default pre-processing, Resize to --image-size and ImageNet
Normalize) through anomalib's ``Engine`` -- i.e. Lightning runs the module's own
``training_step`` -- on the normal ``train`` rows of the manifest, for exactly --epochs epochs.
It then scores the ``test`` rows with the trained ``GanomalyModel`` in eval mode under
``torch.inference_mode`` and takes anomalib's RAW per-image score, ``pred_score =
mean_k (z_k - z_hat_k)^2`` over the latent vector (not the Lightning module's per-batch min-max
normalised score, which uses test statistics and is not monotone across batches). Test labels
are used for the image AUROC only (sklearn, on the raw scores).

train --model draem: fits ``anomalib.models.Draem`` from scratch (Zavrtanik et al., "DRAEM",
ICCV 2021: a reconstructive network trained to repair Perlin-shaped synthetic anomalies and a
discriminative network that sees the image beside its reconstruction), with anomalib's defaults
(its Resize-only pre-processing, blend factor U[0.1, 1], Adam 1e-4, SSIM + L2 + focal loss). Its
texture source, DTD, cannot be downloaded here: ``dtd_dir`` is an existing empty folder, so the
Perlin generator fills the anomaly masks with Perlin noise textures (DRAEM's ablation: the texture
source barely matters). ``--max-seconds`` stops training after that wall time (Lightning's
``max_time``, checked after every batch), which is how it is compared with our two stages at equal
time. The score is anomalib's: the image score is the maximum of the softmax anomaly map; pixel
AUROC and PRO are computed from that map with twostage_ad's own metric code and mask reader (masks
binarised at > 127, optionally inverted, box-resized to --image-size), as for our runs.

speed: a GanomalyModel with random weights in eval mode under ``torch.inference_mode`` on random
tensors: warm-up, then --repeats timed passes of forward passes (images/s of the best pass, and
the median), and forward FLOPs per image
(``torch.utils.flop_counter.FlopCounterMode``), for each --image-size.

Channels: anomalib's GANomaly is RGB-only. Its reader converts every image to RGB (grey images
become three equal channels), its batch validator rejects anything but 3 channels, and the
Lightning module hard-codes ``GanomalyModel(num_input_channels=3)``. So training always runs the
3-channel network. ``--channels 1`` turns colour inputs grey (Grayscale replicated to 3 channels,
before anomalib's default Resize + Normalize); for images that are already grey, such as MTD's,
--channels 1 and 3 give the same run. In ``speed`` mode --channels is the network's
``num_input_channels``: 3 is the network that training runs; 1 is a hypothetical native-grey
GANomaly, which differs only in the first conv of each encoder and the last layer of the decoder.

Manifest: CSV with columns image,label,split,mask,category; image paths relative to the manifest's
folder; split train/val/test; label 0 normal, 1 anomalous. --category keeps only rows whose
category column equals NAME (PIPED: the class, e.g. PA_BDP01_TL). Do not pass it for MTD, where
the column holds defect types (MT_Free, MT_Blowhole, ...) and all rows form one data set.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

logger = logging.getLogger("peer_anomalib")

PEERS = {"ganomaly": "anomalib.Ganomaly", "draem": "anomalib.Draem"}
REPO = Path(__file__).resolve().parent.parent

try:
    import numpy as np
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.transforms.v2 import Compose, Grayscale

    with warnings.catch_warnings():  # anomalib.models imports every model; some warn about deprecated imports
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import anomalib
        from anomalib.callbacks.checkpoint import ModelCheckpoint
        from anomalib.data.datasets.base.image import AnomalibDataset
        from anomalib.engine import Engine
        from anomalib.models import Draem, Ganomaly
        from anomalib.models.image.ganomaly.torch_model import GanomalyModel
        from anomalib.pre_processing import PreProcessor
        from lightning.pytorch import Callback, seed_everything
except ImportError as error:  # pragma: no cover - depends on the venv
    sys.exit(
        f"peer_anomalib.py: cannot import {error.name!r} ({error}).\n"
        "This script runs in the peer venv, not in twostage_ad's: run benchmarks/setup_peer_env.sh first, "
        "then call it with that venv's python (e.g. .peer-venv/bin/python benchmarks/peer_anomalib.py ...)."
    )


GANOMALY_DEFAULTS = {name: p.default for name, p in inspect.signature(Ganomaly).parameters.items()}


# --------------------------------------------------------------------------------------------- data
class ManifestDataset(AnomalibDataset):
    """anomalib dataset over rows of our manifest (classification task: masks are not read).

    anomalib's documented extension point: a subclass sets ``samples`` (columns image_path, split,
    label_index, mask_path). Note the setter sorts the rows by image_path.
    """

    def __init__(self, rows: pd.DataFrame, root: Path, category: str | None) -> None:
        super().__init__(augmentations=None)
        self.category = category
        self.samples = pd.DataFrame({
            "image_path": [str(root / p) for p in rows["image"]],
            "label_index": rows["label"].astype(int).to_numpy(),
            "mask_path": "",
            "split": rows["split"].to_numpy(),
        })
        masks = rows["mask"].fillna("") if "mask" in rows.columns else pd.Series("", index=rows.index)
        self.mask_of = {str(root / image): (str(root / mask) if mask else "") for image, mask in zip(rows["image"], masks)}
        self.samples.attrs["task"] = "classification"


def read_manifest(manifest: Path, category: str | None) -> pd.DataFrame:
    frame = pd.read_csv(manifest, dtype={"image": str, "split": str, "mask": str, "category": str})
    missing = {"image", "label", "split"} - set(frame.columns)
    if missing:
        raise SystemExit(f"{manifest}: missing column(s) {sorted(missing)}")
    if category is not None:
        if "category" not in frame.columns:
            raise SystemExit(f"{manifest}: --category given but the manifest has no category column")
        frame = frame[frame["category"] == category]
        if frame.empty:
            raise SystemExit(f"{manifest}: no rows with category == {category!r}")
    return frame


def split_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = frame[(frame["split"] == "train") & (frame["label"] == 0)]
    test = frame[frame["split"] == "test"]
    if train.empty:
        raise SystemExit("no normal train rows (label 0, split train) after filtering")
    if test["label"].nunique() < 2:
        raise SystemExit("the test rows need both normal and anomalous images for an AUROC "
                         "(MTD's category column holds defect types: do not pass --category for it)")
    return train, test


# -------------------------------------------------------------------------------------------- model
def build_module(image_size: int, channels: int, batch_size: int) -> Ganomaly:
    """anomalib's Ganomaly with its defaults at ``image_size`` (always its 3-channel network).

    ``channels == 1`` puts a Grayscale (replicated to 3 channels) before anomalib's default
    Resize + ImageNet Normalize: colour images lose their colour, grey ones are unchanged (anomalib's
    reader already makes them three equal channels).
    """
    if image_size < 8 or image_size & (image_size - 1):
        # GanomalyModel builds its layers for input_size but pads every input to the next power of
        # two (pad_nextpow2), so any other size gives a network that does not fit its own input.
        raise SystemExit(f"--image-size must be a power of two >= 8 for anomalib's GANomaly, got {image_size}")
    pre_processor = Ganomaly.configure_pre_processor((image_size, image_size))
    if channels == 1:
        pre_processor = PreProcessor(transform=Compose([Grayscale(num_output_channels=3),
                                                        *pre_processor.transform.transforms]))
    # evaluator/visualizer act on validation/test only, which this script does outside Lightning;
    # disabling them keeps fit() from writing images or computing metrics.
    return Ganomaly(batch_size=batch_size, pre_processor=pre_processor, evaluator=False, visualizer=False)


def build_draem(image_size: int, channels: int, dtd_dir: Path) -> Draem:
    """anomalib's Draem with its defaults at ``image_size``; ``dtd_dir`` an existing empty folder.

    ``channels == 1`` puts a Grayscale (replicated to 3 channels) before its Resize, as for GANomaly.
    """
    pre_processor = Draem.configure_pre_processor((image_size, image_size))
    if channels == 1:
        pre_processor = PreProcessor(transform=Compose([Grayscale(num_output_channels=3),
                                                        *pre_processor.transform.transforms]))
    return Draem(dtd_dir=dtd_dir, pre_processor=pre_processor, post_processor=False, evaluator=False, visualizer=False)


class EpochTimer(Callback):
    """Wall seconds of each training epoch (data loading, pre-processing and both GAN updates)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        logger.info("epoch %d/%d: %.1f s", len(self.seconds), trainer.max_epochs, self.seconds[-1])


def raw_scores(model: GanomalyModel, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, float]:
    """anomalib's raw per-image score in eval mode, and the wall seconds of the forward passes."""
    model.eval()
    scores = []
    with torch.inference_mode():
        model(images[:batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            scores.append(model(images[first:first + batch_size]).pred_score)
        seconds = time.perf_counter() - start
    return torch.cat(scores).double().numpy(), seconds


def draem_scores(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """DRAEM's image scores (max of the softmax anomaly map), its maps ``N×H×W``, forward seconds."""
    model.eval()
    scores, maps = [], []
    with torch.inference_mode():
        model(images[:batch_size])  # warm-up, not timed
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            output = model(images[first:first + batch_size])
            scores.append(output.pred_score)
            maps.append(output.anomaly_map.reshape(-1, *images.shape[-2:]))
        seconds = time.perf_counter() - start
    return torch.cat(scores).double().numpy(), torch.cat(maps).float().numpy(), seconds


def pixel_metrics(data: ManifestDataset, labels: list[int], maps: np.ndarray, invert_masks: bool) -> dict:
    """Pixel AUROC and PRO of ``maps`` with twostage_ad's mask reader and metric code (same rules as ours)."""
    sys.path.insert(0, str(REPO))
    from twostage_ad.data.images import read_mask
    from twostage_ad.metrics import pixel_auroc, pro_score

    size = maps.shape[-1]
    masks = np.zeros(maps.shape, np.uint8)
    has_mask = np.zeros(len(labels), bool)
    for index, image_path in enumerate(data.samples["image_path"]):
        mask_path = data.mask_of[image_path]
        if mask_path:
            masks[index] = read_mask(mask_path, size, invert=invert_masks)
            has_mask[index] = True
        elif labels[index] == 0:  # a normal image without a mask file: no defect pixels
            has_mask[index] = True
    labels_array = np.asarray(labels)
    pixel = pixel_auroc(labels_array, masks, has_mask, maps)
    pro = pro_score(labels_array, masks, has_mask, maps, max_fpr=0.3)
    return {"pixel_auroc": pixel.value, "pro": pro.value}


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / x.shape[0]


# -------------------------------------------------------------------------------------------- modes
def run_train(args: argparse.Namespace) -> dict:
    manifest = args.manifest.resolve()
    train_rows, test_rows = split_rows(read_manifest(manifest, args.category))
    logger.info("%d normal train images, %d test images (%d anomalous)",
                len(train_rows), len(test_rows), int(test_rows["label"].sum()))
    train_data = ManifestDataset(train_rows, manifest.parent, args.category)
    test_data = ManifestDataset(test_rows, manifest.parent, args.category)

    seed_everything(args.seed, workers=True)
    loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        collate_fn=train_data.collate_fn)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory(prefix="peer-anomalib-") as workdir:
        if args.model == "draem":
            dtd_dir = Path(workdir) / "dtd-empty"  # exists and is empty: Perlin noise textures, no download
            dtd_dir.mkdir()
            module = build_draem(args.image_size, args.channels, dtd_dir)
        else:
            module = build_module(args.image_size, args.channels, args.batch_size)
        budget = {} if args.max_seconds is None else {"max_time": {"seconds": args.max_seconds}}
        engine = Engine(
            default_root_dir=workdir, max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False,
            # Engine adds a checkpoint per epoch unless given one: this one saves nothing (the
            # GANomaly state with both Adam states is ~0.6 GB at 128 px, and it is not fitting).
            callbacks=[ModelCheckpoint(dirpath=workdir, save_top_k=0, save_last=False), timer], **budget,
        )
        logger.info("fitting %s: %s epochs, %s s budget, batch %d, %d px, %d channel(s), %d torch threads",
                    PEERS[args.model], args.epochs, args.max_seconds, args.batch_size, args.image_size, args.channels,
                    torch.get_num_threads())
        start = time.perf_counter()
        engine.fit(model=module, train_dataloaders=loader)
        train_seconds = time.perf_counter() - start
    if args.max_seconds is None and len(timer.seconds) != args.epochs:
        raise SystemExit(f"trained {len(timer.seconds)} epochs, expected {args.epochs}")

    # Decode and pre-process the test images (anomalib's reader + the module's own transform,
    # one image at a time) before timing, so the timing covers forward passes only.
    module.eval()
    images, labels = [], []
    with torch.inference_mode():
        for index in range(len(test_data)):
            item = test_data[index]
            images.append(module.pre_processor.transform(item.image.unsqueeze(0))[0])
            labels.append(int(item.gt_label))
    batch = torch.stack(images)
    logger.info("scoring %d test images of shape %s", len(batch), tuple(batch.shape[1:]))
    extra: dict = {}
    if args.model == "draem":
        scores, maps, score_seconds = draem_scores(module.model, batch, args.batch_size)
        extra = pixel_metrics(test_data, labels, maps, args.invert_masks)
    else:
        scores, score_seconds = raw_scores(module.model, batch, args.batch_size)
        extra = {"network_channels": module.model.generator.encoder1.input_layers[0].in_channels}
    if not np.isfinite(scores).all():
        raise SystemExit(f"non-finite {PEERS[args.model]} scores")
    return {
        "peer": PEERS[args.model],
        "anomalib_version": anomalib.__version__,
        "manifest": str(args.manifest),
        "category": args.category,
        "image_size": args.image_size,
        "channels": args.channels,
        "epochs": args.epochs,
        "epochs_trained": len(timer.seconds),
        "steps_trained": module.trainer.global_step if module._trainer is not None else None,
        "max_seconds": args.max_seconds,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_train": len(train_data),
        "n_test": len(test_data),
        "n_test_anomalous": int(sum(labels)),
        "image_auroc": float(roc_auc_score(labels, scores)),
        **extra,
        "train_seconds": train_seconds,
        "epoch_seconds": timer.seconds,
        "score_seconds": score_seconds,
        "score_images_per_s": len(batch) / score_seconds,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
    }


def run_speed(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    tuned = False
    if args.tune_malloc:  # the same glibc setting our pipeline applies (twostage_ad/allocator.py, no torch import)
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from twostage_ad.allocator import tune_malloc

        tuned = tune_malloc()
    rows = []
    for size in args.image_size:
        if size < 8 or size & (size - 1):
            raise SystemExit(f"--image-size must be powers of two >= 8 for anomalib's GANomaly, got {size}")
        model = GanomalyModel(input_size=(size, size), num_input_channels=args.channels,
                              **{name: GANOMALY_DEFAULTS[name] for name in
                                 ("n_features", "latent_vec_size", "extra_layers", "add_final_conv_layer")}).eval()
        x = torch.randn(args.images, args.channels, size, size)
        flops = forward_flops(model, x[:1])
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            for first in range(0, min(len(x), 2 * args.batch_size), args.batch_size):  # warm-up
                model(x[first:first + args.batch_size])
            repeats = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for first in range(0, len(x), args.batch_size):
                    model(x[first:first + args.batch_size])
                repeats.append(time.perf_counter() - start)
        seconds = min(repeats)
        row = {"image_size": size, "flops_per_image": flops, "gflops_per_image": flops / 1e9,
               "params_generator": sum(p.numel() for p in model.generator.parameters()),
               "params_discriminator": sum(p.numel() for p in model.discriminator.parameters()),
               "seconds": seconds, "images_per_s": len(x) / seconds,
               "images_per_s_median": len(x) / float(np.median(repeats)), "repeat_seconds": repeats}
        logger.info("%d px: %.3f GFLOPs/image, %.1f images/s (best of %d; median %.1f)", size,
                    row["gflops_per_image"], row["images_per_s"], len(repeats), row["images_per_s_median"])
        rows.append(row)
    return {
        "peer": PEERS["ganomaly"],
        "anomalib_version": anomalib.__version__,
        "channels": args.channels,
        "batch_size": args.batch_size,
        "images": args.images,
        "repeats": args.repeats,
        "tuned_malloc": tuned,
        "bf16": args.bf16,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "results": rows,
    }


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--channels", type=int, choices=(1, 3), default=3,
                        help="train: 1 = grey input (replicated to anomalib's 3 channels), 3 = colour; "
                             "speed: GanomalyModel's num_input_channels (default 3)")
    common.add_argument("--batch-size", type=int, default=32, help="training and scoring batch size (default 32)")
    common.add_argument("--seed", type=int, default=0, help="seed for lightning.seed_everything (default 0)")
    common.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    common.add_argument("--output", type=Path, required=True, help="JSON file to write")

    train = modes.add_parser("train", parents=[common], help="fit on a manifest's normal train rows, score its test rows",
                             description="Fit anomalib's Ganomaly on the normal train rows, report raw-score image AUROC.")
    train.add_argument("--manifest", type=Path, required=True, help="split.csv (image,label,split,mask,category)")
    train.add_argument("--category", help="keep rows whose category column equals this (PIPED classes; not MTD)")
    train.add_argument("--image-size", type=int, default=128, help="square input size, a power of two (default 128)")
    train.add_argument("--model", choices=sorted(PEERS), default="ganomaly", help="which anomalib model (default ganomaly)")
    train.add_argument("--epochs", type=int, help="training epochs, run exactly (required unless --max-seconds)")
    train.add_argument("--max-seconds", type=float,
                       help="stop training after this wall time (--epochs, if given, is then an upper bound)")
    train.add_argument("--invert-masks", action="store_true",
                       help="draem: masks mark defects in black (PIPED), as data.invert_masks in our configs")
    train.add_argument("--num-workers", type=int, default=0,
                       help="DataLoader workers for training (default 0: decode in the main process)")

    speed = modes.add_parser("speed", parents=[common], help="forward images/s and FLOPs of an untrained GanomalyModel",
                             description="Scoring speed and FLOPs per image of GanomalyModel on random tensors.")
    speed.add_argument("--image-size", type=int, nargs="+", default=[64, 128, 256],
                       help="square input sizes, powers of two (default 64 128 256)")
    speed.add_argument("--images", type=int, default=256, help="images timed per size (default 256)")
    speed.add_argument("--repeats", type=int, default=1,
                       help="timed passes over the images per size; images_per_s is the best one, "
                            "images_per_s_median the median (default 1)")
    speed.add_argument("--tune-malloc", action="store_true",
                       help="apply twostage_ad's glibc allocator tuning first (as speed.py does for ours)")
    speed.add_argument("--bf16", action="store_true", help="forward passes under bf16 autocast (CPU)")
    args = parser.parse_args(argv)
    if args.mode == "train":
        if args.epochs is None and args.max_seconds is None:
            parser.error("train: give --epochs, --max-seconds or both")
        if args.max_seconds is not None and args.max_seconds <= 0:
            parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")
        if args.epochs is None:
            args.epochs = 100_000  # bounded by --max-seconds
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "anomalib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*validation_step.*")
    warnings.filterwarnings("ignore", message=".*infer the `batch_size`.*")  # only weights the logged losses
    warnings.filterwarnings("ignore", message=".*no logger configured.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_train(args) if args.mode == "train" else run_speed(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", args.output)
    print(json.dumps({k: v for k, v in result.items() if k != "epoch_seconds"}, indent=2))


if __name__ == "__main__":
    main()
