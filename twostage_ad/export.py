"""Export both stages of a finished run for deployment: TorchScript, and ONNX when ``onnx`` is installed.

Each stage is wrapped so the exported graph computes exactly what :meth:`AttentionStage.score`
and :meth:`PatchScorerStage.score` compute, with the run's weights and constants baked in:

- ``stage1``: ``x`` (``B×C×S×S`` in [-1, 1], ``S`` = stage 1's size) -> ``(screening loss B,
  anomaly map 1 − A B×S×S)``
- ``stage2``: ``(x, stage-1 anomaly map)`` (``x`` ``B×C×S₂×S₂`` at stage 2's size, the map as stage 1
  returns it) -> ``(image score B, standardised map B×S₂×S₂)``; with ``stage2.guidance: none`` the
  map input is unused (ONNX drops it from the graph). A tiled stage is traced for one image per
  call (``cascade.json`` says ``stage1_batch: 1`` or ``stage2_batch: 1``); its TorchScript graph
  refuses another batch or image size with an error, its ONNX graph has fixed input shapes.

The cascade itself (τ₁, τ₂, the fusion statistics) is plain arithmetic on these outputs; its
constants are written next to the models as ``cascade.json``. Inputs are images scaled as
``pixel / 127.5 − 1`` (``twostage_ad.data.images.to_tensor``). The graphs are float32 even when the
run scores stage 1 in bf16 (``run.precision``; its scores then differ from the run's by bf16 rounding).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from twostage_ad.detector import TwoStageDetector
from twostage_ad.runs import read_json, write_atomic, write_json
from twostage_ad.stages.patch_scorer import image_scores, standardised_map
from twostage_ad.stages.screening import screening_batch, screening_loss

__all__ = ["Stage1Scorer", "Stage2Scorer", "OneImageStage1", "OneImageStage2", "export_run", "EXPORT_FORMATS"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")


class Stage1Scorer(nn.Module):
    """Stage 1's screening loss and map as one module (eval mode, constants from the config)."""

    def __init__(self, detector: TwoStageDetector):
        super().__init__()
        self.model = detector.stage1.model_.eval()
        self.config = detector.stage1.config  # exported graphs are float32 (screening_batch's default)
        self.positions = detector.stage1._positions()  # constants in the graph
        self.features = detector.stage1._features()  # the feature banks, constants too
        self.map_features = detector.stage1._map_features()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        components, anomaly = screening_batch(self.model, x, self.config, positions=self.positions, features=self.features,
                                              map_features=self.map_features)
        return screening_loss(components, self.config, self.features), anomaly


class Stage2Scorer(nn.Module):
    """Stage 2's image score and standardised, upsampled map as one module."""

    def __init__(self, detector: TwoStageDetector):
        super().__init__()
        stage = detector.stage2
        self.model = stage.model_.eval()
        self.config = stage.config
        self.statistics = [(float(mean), float(std)) for mean, std in stage.map_statistics]

    def forward(self, x: torch.Tensor, stage1_anomaly: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if stage1_anomaly.shape[-2:] != x.shape[-2:]:  # as the detector does: stage 1's map at stage 2's size first
            stage1_anomaly = nn.functional.interpolate(stage1_anomaly[:, None].float(), size=x.shape[-2:], mode="bilinear",
                                                       align_corners=False)[:, 0]
        full = standardised_map(self.model, x, stage1_anomaly, self.config, self.statistics)
        return image_scores(full, self.config), full


class OneImageStage1(nn.Module):
    """A traced tiled stage 1 behind an input check: its tile loop was unrolled for one image of its
    size, so another batch or size would be scored wrongly without an error (scripted, so the check
    stays in the graph)."""

    def __init__(self, traced: torch.jit.ScriptModule, size: int):
        super().__init__()
        self.traced = traced
        self.size = size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != 1 or x.shape[-2] != self.size or x.shape[-1] != self.size:
            raise RuntimeError("this tiled stage-1 graph scores one image of its size per call (cascade.json: stage1_batch 1, image_size)")
        return self.traced(x)


class OneImageStage2(nn.Module):
    """A traced tiled stage 2 behind the same check as :class:`OneImageStage1` (and one stage-1 map)."""

    def __init__(self, traced: torch.jit.ScriptModule, size: int):
        super().__init__()
        self.traced = traced
        self.size = size

    def forward(self, x: torch.Tensor, stage1_anomaly: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] != 1 or stage1_anomaly.shape[0] != 1 or x.shape[-2] != self.size or x.shape[-1] != self.size:
            raise RuntimeError("this tiled stage-2 graph scores one image of its size per call (cascade.json: stage2_batch 1, "
                               "stage2_image_size)")
        return self.traced(x, stage1_anomaly)


def _example(size: int, channels: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, channels, size, size, generator=generator) * 2 - 1


def export_run(
    run_dir: str | Path, output_dir: str | Path | None = None, formats: tuple[str, ...] = ("torchscript", "onnx")
) -> dict[str, list[str]]:
    """Write ``stage{1,2}.ts`` (TorchScript) and / or ``stage{1,2}.onnx`` plus ``cascade.json``.

    ``output_dir`` defaults to ``RUN_DIR/export``. ONNX is skipped, with a warning, when the
    ``onnx`` package is not installed (``pip install twostage_ad[export]``). Returns the written
    files per format.
    """
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown or not formats:
        raise ValueError(f"formats must be drawn from {EXPORT_FORMATS}, got {formats!r}")
    run_dir = Path(run_dir)
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "export"
    output_dir.mkdir(parents=True, exist_ok=True)
    detector = TwoStageDetector.from_run(run_dir, device="cpu")
    stage1, stage2 = Stage1Scorer(detector), Stage2Scorer(detector)
    # each graph takes its own stage's scale; a tiled stage is traced for one image at a time
    # (its tile loop unrolls for the traced batch)
    tiled, tiled1 = detector.stage2.tiled, detector.stage1.tiled
    x = _example(detector.stage1.image_size, detector.channels, batch=1 if tiled1 else 2)
    x2 = _example(detector.stage2.image_size, detector.channels, batch=1 if tiled else 2)
    with torch.inference_mode():
        _, anomaly = stage1(x)
    anomaly = anomaly[: len(x2)].expand(len(x2), -1, -1)  # a tiled stage 1 traced one image: its map for each of x2's
    written: dict[str, list[str]] = {}
    if "torchscript" in formats:
        written["torchscript"] = []
        for name, module, args in (("stage1", stage1, (x,)), ("stage2", stage2, (x2, anomaly))):
            path = output_dir / f"{name}.ts"
            with torch.no_grad(), warnings.catch_warnings():
                # TorchScript is deprecated upstream in favour of torch.export, but still what
                # most C++ / mobile runtimes load; the models' shape checks trace as constants
                warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                traced = torch.jit.trace(module, args, check_trace=False)
                if tiled if name == "stage2" else tiled1:  # one image per call: refuse more, not mis-score them
                    traced = torch.jit.script(OneImageStage2(traced, detector.stage2.image_size) if name == "stage2"
                                              else OneImageStage1(traced, detector.stage1.image_size))
                write_atomic(path, lambda tmp, traced=traced: torch.jit.save(traced, tmp))
            written["torchscript"].append(str(path))
    if "onnx" in formats:
        if importlib.util.find_spec("onnx") is None:
            log.warning("ONNX export skipped: the onnx package is not installed (pip install 'twostage_ad[export]')")
        else:
            written["onnx"] = []
            for name, module, args, inputs, outputs in (
                ("stage1", stage1, (x,), ["image"], ["screening_loss", "anomaly_map"]),
                ("stage2", stage2, (x2, anomaly), ["image", "stage1_anomaly_map"], ["score", "anomaly_map"]),
            ):
                path = output_dir / f"{name}.onnx"
                axes = {} if (tiled if name == "stage2" else tiled1) else {n: {0: "batch"} for n in inputs + outputs}
                with torch.no_grad(), warnings.catch_warnings():
                    # the TorchScript-based exporter (needs only `onnx`); its tracer warnings are about
                    # the models' shape checks, which hold for the fixed image size
                    warnings.simplefilter("ignore")
                    write_atomic(path, lambda tmp, m=module, a=args, i=inputs, o=outputs, d=axes: torch.onnx.export(
                        m, a, tmp, input_names=i, output_names=o, dynamic_axes=d, dynamo=False, opset_version=17))
                written["onnx"].append(str(path))
    write_json(output_dir / "cascade.json", {
        "thresholds": read_json(run_dir / "thresholds.json"),
        "image_size": detector.stage1.image_size,
        "stage1_tile_size": detector.stage1.config.tile_size if tiled1 else None,
        "stage1_batch": 1 if tiled1 else "any",
        "stage2_image_size": detector.stage2.image_size,
        "stage2_tile_size": detector.stage2.config.tile_size if tiled else None,
        "stage2_batch": 1 if tiled else "any",
        "channels": detector.channels,
        "input_scaling": "pixel / 127.5 - 1, N×C×H×W float32",
        # how a 16-bit grey file becomes an 8-bit pixel: rint(value · 255 / (2^bit_depth − 1)), clipped to 255
        "bit_depth": detector.bit_depth,
        "stage2_guidance": detector.stage2.config.guidance,
    })
    return written
