"""Hard augmentation: synthetic defects with a known mask, on albumentations (docs/design.md §2).

Each transform takes a normal uint8 image ``H×W×C`` and a mask of ones, and returns the image with
one synthetic defect and the mask with 0 where the defect changed the image (1 = normal, the
attention-map convention). Kinds:

- ``cutout``: albumentations ``CoarseDropout`` with random (noise or uniform) fill.
- ``cutpaste``: a rectangle cut from elsewhere in the image, rotated and colour-jittered, pasted
  (Li et al., "CutPaste", CVPR 2021).
- ``blob``: an irregular region from thresholded Perlin noise filled with a foreign texture at a
  random opacity (Zavrtanik et al., "DRAEM", ICCV 2021). Deviation from DRAEM: no external
  texture set; textures come from another training image (``texture=`` target), a shuffled,
  rotated or rescaled copy of the same image, procedural Perlin noise, or a flat stain.
- ``crack``: thin random-walk polylines, darker or brighter than the surface.

albumentations' ``Compose(seed=...)`` seeds everything here; ``torch.manual_seed`` does not.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise

from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from twostage_ad.config import BLOB_AREA_DRAWS, AugmentConfig  # noqa: E402

__all__ = ["HELD_OUT_KINDS", "BlobDefect", "CrackDefect", "CutPasteDefect", "apply_defect", "build_defect_augmentation",
           "held_out_defect", "perlin_noise", "synthetic_defects"]

_VISIBLE = 3.0  # grey levels of mean absolute change below which a pixel is not labelled defect


def perlin_noise(height: int, width: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise ``H×W`` roughly in [-1, 1], ``scale`` lattice cells per side."""
    cells_y = max(1, scale)
    cells_x = max(1, int(round(scale * width / height)))
    angles = rng.uniform(0, 2 * np.pi, size=(cells_y + 1, cells_x + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys = np.linspace(0, cells_y, height, endpoint=False)
    xs = np.linspace(0, cells_x, width, endpoint=False)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return (top * (1 - wy) + bottom * wy) * np.sqrt(2)


def _per_channel(array: np.ndarray, op: Any) -> np.ndarray:
    """Apply a Pillow float-image operation to each channel of ``H×W×C`` float32 and restack."""
    return np.stack([np.asarray(op(Image.fromarray(array[..., c].astype(np.float32)))) for c in range(array.shape[-1])], axis=-1)


class _SyntheticDefect(A.DualTransform):
    """Base: subclasses return a defect image and an opacity map; blending and the mask are shared."""

    def __init__(self, max_area: float = 0.25, p: float = 1.0):
        super().__init__(p=p)
        self.max_area = max_area

    def make_defect(self, image: np.ndarray, texture: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(defect_image float32 H×W×C in [0, 255], opacity float32 H×W in [0, 1])``."""
        raise NotImplementedError

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        squeeze = image.ndim == 2
        image3 = image[:, :, None] if squeeze else image
        texture = data.get("texture")
        if texture is not None and texture.ndim == 2:
            texture = texture[:, :, None]
        defect, opacity = self.make_defect(image3.astype(np.float32), texture)
        original = image3.astype(np.float32)
        blended = original * (1.0 - opacity[..., None]) + defect * opacity[..., None]
        changed = np.abs(blended - original).mean(axis=-1) > _VISIBLE
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return {"defect_image": out[:, :, 0] if squeeze else out, "defect_region": changed}

    def apply(self, img: np.ndarray, defect_image: np.ndarray, **params: Any) -> np.ndarray:
        return defect_image

    def apply_to_mask(self, mask: np.ndarray, defect_region: np.ndarray, **params: Any) -> np.ndarray:
        return np.where(defect_region, 0, mask).astype(mask.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_area",)

    # -- helpers shared by subclasses ---------------------------------------------------------
    def _random_box(self, height: int, width: int, min_area: float = 0.01) -> tuple[int, int, int, int]:
        rng = self.random_generator
        min_area = min(min_area, self.max_area / 2)
        area = rng.uniform(min_area, max(min_area, self.max_area * 0.6)) * height * width
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
        h = int(np.clip(np.sqrt(area / aspect), 2, height - 1))
        w = int(np.clip(np.sqrt(area * aspect), 2, width - 1))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top, left, h, w


class CutPasteDefect(_SyntheticDefect):
    """A patch cut from elsewhere, rotated by a random angle, colour-jittered and pasted."""

    def make_defect(self, image: np.ndarray, texture: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        rng = self.random_generator
        height, width = image.shape[:2]
        top, left, h, w = self._random_box(height, width)
        src_top = int(rng.integers(0, height - h + 1))
        src_left = int(rng.integers(0, width - w + 1))
        patch = image[src_top : src_top + h, src_left : src_left + w]
        gain = rng.uniform(0.7, 1.3)
        offset = rng.uniform(-40, 40)
        patch = np.clip(patch * gain + offset, 0, 255)
        angle = float(rng.uniform(-45, 45))
        rotated = _per_channel(patch, lambda plane: plane.rotate(angle, Image.BILINEAR))
        shape = np.asarray(Image.fromarray(np.full((h, w), 255, np.uint8)).rotate(angle, Image.BILINEAR)) / 255.0
        defect = image.copy()
        defect[top : top + h, left : left + w] = rotated
        opacity = np.zeros((height, width), np.float32)
        opacity[top : top + h, left : left + w] = shape
        return defect, opacity


class BlobDefect(_SyntheticDefect):
    """A Perlin-noise shaped region filled with a foreign texture at random opacity (DRAEM).

    Its area, a share of the image, is drawn between ``area_min`` (capped at ``max_area``) and
    ``max_area``: ``log_uniform`` gives many small spots and some large stains, ``uniform`` mostly
    large ones.
    """

    def __init__(self, max_area: float = 0.25, opacity_min: float = 0.25, area_min: float = 0.001,
                 area_draw: str = "log_uniform", p: float = 1.0):
        super().__init__(max_area=max_area, p=p)
        if area_draw not in BLOB_AREA_DRAWS:
            raise ValueError(f"area_draw must be one of {BLOB_AREA_DRAWS}, got {area_draw!r}")
        if not area_min > 0:
            raise ValueError(f"area_min must be > 0, got {area_min!r}")
        self.opacity_min = opacity_min
        self.area_min = area_min
        self.area_draw = area_draw

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_area", "opacity_min", "area_min", "area_draw")

    def _area(self) -> float:
        low = min(self.area_min, self.max_area)
        if self.area_draw == "uniform":
            return float(self.random_generator.uniform(low, self.max_area))
        return float(np.exp(self.random_generator.uniform(np.log(low), np.log(self.max_area))))

    def _texture(self, image: np.ndarray, texture: np.ndarray | None) -> np.ndarray:
        rng = self.random_generator
        height, width, channels = image.shape
        choice = int(rng.integers(0, 4))
        if choice == 0 and texture is not None and texture.shape[:2] == (height, width):
            source = texture.astype(np.float32)
            if source.shape[-1] != channels:
                source = np.repeat(source.mean(axis=-1, keepdims=True), channels, axis=-1)
            return np.rot90(source, k=int(rng.integers(0, 4)), axes=(0, 1)).copy() if height == width else source
        if choice <= 1:  # the same image, rescaled and shifted: a plausible but misplaced texture
            zoom = rng.uniform(1.5, 4.0)
            crop = max(4, int(height / zoom)), max(4, int(width / zoom))
            top = int(rng.integers(0, height - crop[0] + 1))
            left = int(rng.integers(0, width - crop[1] + 1))
            patch = image[top : top + crop[0], left : left + crop[1]]
            resized = _per_channel(patch, lambda plane: plane.resize((width, height), Image.BILINEAR))
            return np.flip(resized, axis=int(rng.integers(0, 2))).copy()
        if choice == 2:  # procedural noise texture around a random mean
            noise = perlin_noise(height, width, int(rng.integers(4, 32)), rng)
            mean = rng.uniform(0, 255, size=channels)
            contrast = rng.uniform(10, 80)
            return np.clip(mean[None, None, :] + contrast * noise[..., None], 0, 255).astype(np.float32)
        shade = image.mean(axis=(0, 1)) + rng.choice([-1.0, 1.0]) * rng.uniform(30, 120)  # flat stain
        return np.broadcast_to(np.clip(shade, 0, 255), image.shape).astype(np.float32).copy()

    def make_defect(self, image: np.ndarray, texture: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        rng = self.random_generator
        height, width = image.shape[:2]
        noise = perlin_noise(height, width, int(2 ** rng.integers(1, 4)), rng)
        region = noise > np.quantile(noise, 1.0 - self._area())
        opacity = region.astype(np.float32) * rng.uniform(self.opacity_min, 1.0)
        return self._texture(image, texture), opacity


class CrackDefect(_SyntheticDefect):
    """One to three thin random-walk cracks, darker or brighter than the surface."""

    def make_defect(self, image: np.ndarray, texture: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        rng = self.random_generator
        height, width = image.shape[:2]
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.uniform(0, height), rng.uniform(0, width)
            heading = rng.uniform(0, 2 * np.pi)
            points = [(x, y)]
            length = rng.uniform(0.15, 0.6) * max(height, width)
            step = max(1.0, max(height, width) / 32)
            for _ in range(int(length / step)):
                heading += rng.normal(0, 0.4)
                x, y = x + step * np.cos(heading), y + step * np.sin(heading)
                points.append((x, y))
            thickness = int(rng.integers(1, max(2, height // 48) + 1))
            draw.line(points, fill=255, width=thickness)
        opacity = np.asarray(canvas, dtype=np.float32) / 255.0 * rng.uniform(0.6, 1.0)
        if rng.random() < 0.75:
            defect = image * rng.uniform(0.0, 0.5)  # dark crack
        else:
            defect = np.clip(image + rng.uniform(60, 160), 0, 255)  # bright scratch
        return defect.astype(np.float32), opacity


def build_defect_augmentation(config: AugmentConfig, seed: int | None = None) -> A.Compose:
    """One synthetic defect per call, its kind drawn uniformly from ``config.kinds``.

    Call as ``aug(image=uint8 H×W×C, mask=ones H×W, texture=optional other image)``.
    """
    longest = min(0.3, float(np.sqrt(config.max_area / 3)))  # three holes together stay within max_area
    hole_side = (min(0.05, longest / 2), longest)
    makers = {
        "cutout": lambda: A.OneOf(
            [
                A.CoarseDropout(
                    num_holes_range=(1, 3),
                    hole_height_range=hole_side,
                    hole_width_range=hole_side,
                    fill=fill,
                    fill_mask=0,
                    p=1.0,
                )
                for fill in ("random", "random_uniform")
            ],
            p=1.0,
        ),
        "cutpaste": lambda: CutPasteDefect(max_area=config.max_area, p=1.0),
        "blob": lambda: BlobDefect(max_area=config.max_area, opacity_min=config.blob_opacity_min,
                                   area_min=config.blob_area_min, area_draw=config.blob_area_draw, p=1.0),
        "crack": lambda: CrackDefect(max_area=config.max_area, p=1.0),
    }
    compose = A.Compose([A.OneOf([makers[k]() for k in config.kinds], p=1.0)], seed=seed, strict=True)
    compose.strict = False  # strict checked the arguments above; the call passes an extra ``texture`` key
    return compose


def apply_defect(
    augmentation: A.Compose, image: np.ndarray, texture: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(defective uint8 image, mask uint8 H×W with 1 normal / 0 defect)``."""
    data: dict[str, Any] = {"image": image, "mask": np.ones(image.shape[:2], dtype=np.uint8)}
    if texture is not None:
        data["texture"] = texture
    out = augmentation(**data)
    return out["image"], out["mask"]


VALIDATION_SEED_OFFSET = 1_000_003  # synthetic validation defects never share training's random stream
# kinds that training never draws: the validation score also measures defects the network was not shown
HELD_OUT_KINDS = ("scratch", "stain")


def _visible(image: np.ndarray, defective: np.ndarray) -> np.ndarray:
    """Mask ``H×W`` (1 normal, 0 defect) of the pixels a defect changed visibly."""
    change = np.abs(defective.astype(np.float32) - image.astype(np.float32)).mean(axis=-1)
    return (change < _VISIBLE).astype(np.uint8)


def held_out_defect(kind: str, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A defect of a kind training never draws, on uint8 ``H×W×C``: ``(defective, mask 1 normal / 0 defect)``.

    ``scratch``: one to three straight lines (training's cracks wander), 1–2 px, 15–60 grey levels
    darker or brighter. ``stain``: a smooth low-contrast round shading, 12–40 grey levels at its
    centre, radius 4–15 % of the side (training's blobs are textured and sharp-edged).
    """
    height, width = image.shape[:2]
    side = max(height, width)
    base = image.astype(np.float32)
    if kind == "scratch":
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            y, x, angle = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0, np.pi)
            half = rng.uniform(0.1, 0.3) * side
            dx, dy = half * np.cos(angle), half * np.sin(angle)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=255, width=int(rng.integers(1, 3)))
        weight = (np.asarray(canvas, dtype=np.float32) / 255.0)[..., None]
        delta = rng.uniform(15, 60) * (1 if rng.random() < 0.5 else -1)
    elif kind == "stain":
        cy, cx, radius = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width, rng.uniform(0.04, 0.15) * side
        yy, xx = np.mgrid[0:height, 0:width]
        weight = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2)).astype(np.float32)[..., None]
        delta = rng.uniform(12, 40) * (1 if rng.random() < 0.5 else -1)
    else:
        raise ValueError(f"kind must be one of {HELD_OUT_KINDS}, got {kind!r}")
    defective = np.clip(np.rint(base + delta * weight), 0, 255).astype(np.uint8)
    return defective, _visible(image, defective)


def synthetic_defects(
    images: np.ndarray, config: AugmentConfig, *, seed: int = 0, held_out: tuple[str, ...] = HELD_OUT_KINDS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One synthetic defect on each uint8 ``N×H×W×C`` image, for a validation score without test labels.

    The kinds of ``config.kinds`` and the ``held_out`` kinds (never drawn in training,
    :func:`held_out_defect`) take turns (image ``i`` gets kind ``i mod K``), each drawn from
    ``seed + VALIDATION_SEED_OFFSET``, apart from training's stream; a blob's texture is the next
    image. Images whose defect changed no visible pixel are left out. Returns ``(defective images,
    masks N×H×W with 1 = defect as ground-truth masks have it, kinds)``.
    """
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"expected at least 2 images N×H×W×C, got shape {images.shape}")
    kinds = [*config.kinds, *held_out]
    # the blob's opacity floor and area draw keep their defaults whatever training sets (a fixed yardstick);
    # the kinds and max_area are training's
    augmentations = {k: build_defect_augmentation(AugmentConfig(kinds=[k], probability=config.probability,
                                                                max_area=config.max_area), seed=seed + VALIDATION_SEED_OFFSET + n)
                     for n, k in enumerate(config.kinds)}
    rng = np.random.default_rng(seed + VALIDATION_SEED_OFFSET)
    out_images, out_masks, out_kinds = [], [], []
    for i, image in enumerate(images):
        kind = kinds[i % len(kinds)]
        if kind in augmentations:
            defective, mask = apply_defect(augmentations[kind], image, images[(i + 1) % len(images)])
        else:
            defective, mask = held_out_defect(kind, image, rng)
        if (mask == 0).any():
            out_images.append(defective)
            out_masks.append((mask == 0).astype(np.uint8))
            out_kinds.append(kind)
    height, width = images.shape[1:3]
    if not out_images:
        return images[:0], np.zeros((0, height, width), np.uint8), []
    return np.stack(out_images), np.stack(out_masks), out_kinds
