"""Decoding images and masks into fixed-size arrays, cached in memory for the whole run.

Grayscale, RGB, RGBA (alpha dropped), palette, 1-bit and 16-bit images are all accepted and
converted to the configured channel count. Images are resized to ``size × size`` with bilinear
(antialiased) interpolation; non-square images are stretched, which keeps every pixel of the part
in view. Images and masks are turned upright by their EXIF orientation. Masks are binarised on
their own values (:func:`read_mask`), optionally inverted, and box-resized so thin defects survive.

Arrays are kept as uint8 (``N×H×W×C``) to stay small; :func:`to_tensor` maps them to [-1, 1].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from twostage_ad.config import MAX_IMAGE_SIZE
from twostage_ad.data.records import DataError, Record

__all__ = ["DecodedImages", "decode_native", "decode_records", "infer_bit_depth", "infer_channels", "read_image", "read_mask", "resize_images",
           "resize_maps", "to_tensor", "training_channels", "warn_if_much_reduced"]

log = logging.getLogger(__name__)

_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# The median reduction (native longest side / stage 1's input) from which a run warns that small defects may vanish.
WARN_REDUCTION = 4.0
FLOAT_SLACK = 0.01  # how far outside 0–1 a float image may stray (rounding in its processing) before it is refused


def _to_8bit(image: Image.Image, bit_depth: int = 16) -> Image.Image:
    """Single-channel 16-/32-bit integer and float images to 8-bit L by a fixed range.

    Integer modes (``I;16*`` and ``I``, which Pillow uses for 16-bit PNG/TIFF) are read as
    0 – 2^``bit_depth`` − 1 (a 12-bit camera's 0–4095 in 16-bit files: ``bit_depth`` 12); float
    mode ``F`` as 0–1. The scale never depends on one image's values, so two images of one camera
    decode consistently (``data.bit_depth`` fixes it for a whole run).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float64) / ((2**bit_depth - 1) / 255.0)  # 16 bits: / 257, exactly
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64) * 255.0
    else:
        return image
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


# What Pillow raises for a file it cannot decode; DecompressionBombError (an image past Pillow's
# pixel limit, about 179 Mpx) is not an OSError.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open_upright(path: str | Path, what: str) -> Image.Image:
    """``path`` fully decoded in its own Pillow mode and turned as its EXIF orientation says (as
    viewers show it, so that a mask drawn on the shown image fits); ``DataError`` if unreadable."""
    try:
        with Image.open(path) as opened:
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)  # keeps .format; no copy when there is nothing to turn
            return opened
    except _UNREADABLE as exc:
        raise DataError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def _open_converted(path: str | Path, mode: str, what: str, bit_depth: int = 16) -> Image.Image:
    """Open and fully decode ``path`` as Pillow ``mode`` (``L`` or ``RGB``); ``DataError`` if unreadable,
    or if it is a float image whose values lie outside 0–1 (read as 0–1, they would clip unseen)."""
    image = _open_upright(path, what)
    if image.mode == "F" and what != "mask":  # a mask is binarised on its own values
        values = np.asarray(image)
        if not np.isfinite(values).all():
            raise DataError(f"{what} {str(path)!r} holds NaN or infinite float values: replace them before training")
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise DataError(f"{what} {str(path)!r} holds float values from {low:.4g} to {high:.4g}, but float images are "
                            "read as 0–1 (0 black, 1 white): scale them to 0–1, or save them as 8- or 16-bit images")
    return _to_8bit(image, bit_depth).convert(mode)


def infer_bit_depth(records: list[Record], sample: int = 16) -> int:
    """The bits the training images' single-channel 16-bit values use: the smallest of 8, 10, 12,
    14, 16 that holds the largest value among up to ``sample`` evenly spaced files (16 when none is
    16-bit grey). Unreadable files are skipped here; decoding reports them. (Pillow reads 48-bit
    colour files at their high byte, so colour files never reach this scaling.)"""
    files = [r for r in records if r.image is not None]
    largest = -1.0
    for index in sorted(set(np.linspace(0, len(files) - 1, min(sample, len(files))).round().astype(int))):
        try:
            with Image.open(files[index].image) as opened:  # the header says the mode; only 16-bit files are decoded
                if opened.mode in _SIXTEEN_BIT_MODES:
                    largest = max(largest, float(np.asarray(opened).max()))
        except _UNREADABLE:
            continue
    if largest < 0:
        return 16
    bits = next(bits for bits in (8, 10, 12, 14, 16) if largest <= 2**bits - 1 or bits == 16)
    log.info("16-bit images: largest value %d in the sampled training images, read as %d-bit (data.bit_depth)",
             largest, bits)
    return bits


def decode_native(path: str | Path, *, mode: str | None = None, what: str = "image") -> Image.Image:
    """An image file fully decoded at its native size as the package decodes it (16-bit and float
    images by their mode's full range, i.e. ``data.bit_depth: 16``): Pillow ``mode`` ``L`` or
    ``RGB``, default ``L`` for grey files and ``RGB`` otherwise. ``DataError`` names the file when
    it cannot be read."""
    if mode is None:
        try:
            with Image.open(path) as opened:
                mode = "L" if opened.mode in _GREY_MODES else "RGB"
        except _UNREADABLE as exc:
            raise DataError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    return _open_converted(path, mode, what)


def _resized_array(image: Image.Image, size: int) -> np.ndarray:
    array = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``N×H×W×C`` images to ``N×size×size×C`` the way decoding resizes (bilinear,
    antialiased); the array itself when it already has that size. One stage's view of images
    decoded at the other stage's larger scale."""
    if images.shape[1:3] == (size, size):
        return images
    resized = np.empty((len(images), size, size, images.shape[3]), np.uint8)
    for index, image in enumerate(images):
        resized[index] = _resized_array(Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image), size).reshape(
            size, size, images.shape[3])
    return resized


def resize_maps(maps: np.ndarray, size: int, batch_size: int = 64) -> np.ndarray:
    """float ``N×h×w`` maps to ``N×size×size`` float32, bilinearly (as stage 2 upsamples its cells)."""
    if maps.shape[1:] == (size, size):
        return maps
    out = np.empty((len(maps), size, size), np.float32)
    for first in range(0, len(maps), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(maps[first : first + batch_size], dtype=np.float32))[:, None]
        out[first : first + batch_size] = torch.nn.functional.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()
    return out


def read_image_with_size(path: str | Path, size: int, channels: int, bit_depth: int = 16) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` to ``size × size × channels`` uint8, and return its original ``(W, H)``
    (``bit_depth``: the bits a 16-bit file's values use, :func:`_to_8bit`)."""
    image = _open_converted(path, "L" if channels == 1 else "RGB", "image", bit_depth)
    return _resized_array(image, size), image.size


def read_image(path: str | Path, size: int, channels: int, bit_depth: int = 16) -> np.ndarray:
    """Decode ``path`` to a ``size × size × channels`` uint8 array. Raises ``DataError``."""
    return read_image_with_size(path, size, channels, bit_depth)[0]


def read_mask(path: str | Path, size: int, invert: bool = False, expect_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a ground-truth mask to ``size × size`` uint8 {0, 1}, 1 = defect.

    Binarised on its own values: above half its largest value (0/255, 0/65535, red on black, JPEG,
    float), or, for lossless integer masks whose largest value is below 16 (label masks 0/1/2…),
    any non-zero value; a JPEG whose largest value is below 16 holds only compression noise; colour
    masks by their brightest channel. Then ``invert``, then box-resized and kept where any defect
    falls in the box, so a 1-px crack in a large mask survives downscaling. A mask of another size
    than its image (``expect_shape``, W×H) is accepted with its aspect ratio (±2 %) at an eighth of
    its width or more.
    """
    mask = _open_upright(path, "mask")
    if expect_shape is not None and mask.size != expect_shape:
        (width, height), (image_width, image_height) = mask.size, expect_shape
        if abs(width * image_height - height * image_width) > 0.02 * image_width * height or 8 * width < image_width:
            raise DataError(
                f"mask {str(path)!r} is {width}×{height} but its image is {image_width}×{image_height} (as shown, after "
                "its EXIF orientation); a mask must have its image's size, or its aspect ratio (±2 %) at an eighth of "
                "its width or more"
            )
    values = _mask_values(mask)
    peak = float(values.max()) if values.size else 0.0
    if mask.mode == "F":  # soft masks: above half their peak
        cut = peak / 2
    elif mask.format == "JPEG":  # lossy: a peak below 16 is compression noise around nothing
        cut = peak / 2 if peak >= 16 else np.inf
    else:  # lossless integers: label masks 0/1/2… (peak below 16) by any non-zero value
        cut = 0 if peak < 16 else peak / 2
    binary = values > cut
    if invert:
        binary = ~binary
    resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((size, size), Image.BOX)
    return (np.asarray(resized) > 0).astype(np.uint8)


def _mask_values(mask: Image.Image) -> np.ndarray:
    """A mask's raw ``H×W`` values: single-channel modes as stored (16-bit and float included),
    colour and palette masks as their brightest channel."""
    if mask.mode in ("1", "L", "F", *_SIXTEEN_BIT_MODES):
        return np.asarray(mask.convert("L") if mask.mode == "1" else mask)
    return np.asarray(mask.convert("RGB")).max(axis=2)


def infer_channels(record: Record) -> int:
    """1 for grey-level sources, 3 for colour ones, judged from one image."""
    if record.array is not None:
        return 1 if record.array.ndim == 2 or record.array.shape[-1] == 1 else 3
    try:
        with Image.open(record.image) as image:
            return 1 if image.mode in _GREY_MODES else 3
    except _UNREADABLE as exc:
        raise DataError(f"cannot read image {str(record.image)!r}: {exc}") from exc


def training_channels(records: list[Record]) -> int:
    """Channels of the first readable training image (unreadable ones are reported later, when decoded)."""
    for record in records:
        try:
            return infer_channels(record)
        except DataError:
            continue
    raise DataError(
        f"none of the {len(records)} training image(s) can be read (e.g. {records[0].name!r}); check the files "
        "or the data.path" if records else "no training images"
    )


def _from_array(array: np.ndarray, size: int, channels: int) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array))
    return _resized_array(image.convert("L" if channels == 1 else "RGB"), size)


@dataclass
class DecodedImages:
    """Records with their decoded pixels (``N×H×W×C`` uint8) and defect masks (``N×H×W`` uint8).

    ``has_mask[i]`` says whether record i has a ground-truth mask (normals count as all-zero
    masks); ``native_sizes[i]`` is its file's ``(W, H)`` before resizing (zeros for in-memory pixels).
    ``mask_problems`` lists ``(name, reason)`` for kept images whose mask could not be used. ``failed`` lists ``(name, reason)`` for images that could not be read; they are left
    out of ``records``.
    """

    records: list[Record]
    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    failed: list[tuple[str, str]] = field(default_factory=list)
    native_sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # N×2 (W, H); 0 for arrays
    mask_problems: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): kept images whose mask is unusable

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)


def decode_records(
    records: list[Record],
    size: int,
    channels: int,
    invert_masks: bool = False,
    desc: str = "decode",
    progress: bool = True,
    bit_depth: int = 16,
) -> DecodedImages:
    """Decode every record once (the in-memory cache). Unreadable images are skipped and listed;
    ``bit_depth``: the bits 16-bit files' values use (``data.bit_depth``, resolved)."""
    kept, images, masks, has_mask, failed = [], [], [], [], []
    small: list[tuple[str, tuple[int, int]]] = []
    native: list[tuple[int, int]] = []  # (W, H) of each kept file, (0, 0) for in-memory pixels
    unusable_masks: list[tuple[str, str]] = []
    for record in tqdm(records, desc=desc, unit="img", disable=not progress, leave=False):
        try:
            if record.array is not None:
                image = _from_array(record.array, size, channels)
                original_size = None
            else:
                image, original_size = read_image_with_size(record.image, size, channels, bit_depth)
                if max(original_size) < size:  # upsampled in every direction (not merely a narrow side)
                    small.append((record.name, original_size))
        except DataError as exc:
            failed.append((record.name, str(exc)))
            log.warning("skipped %s: %s", record.name, exc)
            continue
        mask, present = np.zeros((size, size), dtype=np.uint8), record.label == 0 and record.mask is None
        if record.mask is not None:
            try:  # a mask that cannot be used costs the pixel metrics that image, not the image metrics
                if not Path(record.mask).is_file():
                    raise DataError(f"mask {str(record.mask)!r} of image {record.name!r} does not exist")
                mask, present = read_mask(record.mask, size, invert_masks, expect_shape=original_size), True
            except DataError as exc:
                unusable_masks.append((record.name, str(exc)))
                present = record.label == 0  # a normal's mask can only say "no defect"
        kept.append(record)
        native.append(original_size or (0, 0))
        images.append(image)
        masks.append(mask)
        has_mask.append(present)
    if small:
        name, (width, height) = small[0]
        fits = 2 ** int(np.floor(np.log2(max(32, max(width, height)))))
        log.warning(
            "%d image(s) are smaller than the decode size %d (data.image_size, or stage2.image_size when larger; e.g. %s: "
            "%d×%d) and are upsampled, which blurs fine defects; set data.image_size: %d (and stage2.image_size no larger) to "
            "work at their own resolution",
            len(small), size, name, width, height, fits,
        )
    shape = (0, size, size, channels)
    decoded = DecodedImages(
        records=kept,
        images=np.stack(images) if images else np.zeros(shape, dtype=np.uint8),
        masks=np.stack(masks) if masks else np.zeros(shape[:3], dtype=np.uint8),
        has_mask=np.array(has_mask, dtype=bool),
        failed=failed,
        native_sizes=np.array(native, dtype=np.int64).reshape(-1, 2),
        mask_problems=unusable_masks,
    )
    _warn_about_masks(decoded, invert_masks)
    return decoded


def _warn_about_masks(decoded: DecodedImages, inverted: bool) -> None:
    """Say when masks could not be used, anomalies' masks are empty, or they cover most of their
    images (defects drawn black without ``data.invert_masks``, or white with it)."""
    if decoded.mask_problems:
        log.warning("%d mask(s) could not be used (e.g. %s); their images count in the image metrics, anomalies among "
                    "them are left out of the pixel metrics", len(decoded.mask_problems), decoded.mask_problems[0][1])
    anomalous = (decoded.labels == 1) & decoded.has_mask
    if not anomalous.any():
        return
    coverage = decoded.masks[anomalous].reshape(int(anomalous.sum()), -1).mean(axis=1)
    names = [r.name for r, keep in zip(decoded.records, anomalous) if keep]
    if (coverage == 0).any():
        log.warning("%d anomaly mask(s) mark no defect pixel (e.g. %s); the pixel metrics leave those images out",
                    int((coverage == 0).sum()), names[int(np.argmin(coverage))])
    if float(np.median(coverage)) > 0.5:
        log.warning("the anomalies' masks mark %.0f %% of their images as defect (median): are the defects drawn %s? "
                    "then set data.invert_masks: %s", 100 * float(np.median(coverage)),
                    "white" if inverted else "black", "false" if inverted else "true")


def warn_if_much_reduced(decoded: DecodedImages, screen_size: int) -> bool:
    """Warn (and return True) when the decoded files' median longest side is
    :data:`WARN_REDUCTION` times stage 1's input ``screen_size`` (``data.image_size``) or more: a
    defect narrower than that factor then spans less than one pixel of the screen, which decides
    what stage 2 looks at, however many pixels stage 2 has."""
    longest = decoded.native_sizes.max(axis=1) if len(decoded) else np.zeros(0, np.int64)
    longest = longest[longest > 0]  # files only; in-memory pixels have no native size
    if not len(longest) or np.median(longest) < WARN_REDUCTION * screen_size:
        return False
    largest = int(np.argmax(decoded.native_sizes.max(axis=1)))
    width, height = decoded.native_sizes[largest]
    reduction = float(np.median(longest)) / screen_size
    remedy = ("try a run with a larger data.image_size (a power of two, at most 512): both stages then train on and score "
              "tiles of it (stage1.tile_size, stage2.tile_size, 128 px by default; training costs what it does at the tile's "
              "size, scoring a pass per tile), which helps defects that are small in the image but loses those that need more of the part in "
              "view; keep the run whose synthetic_val stage-1 AUROC is higher (compare RUN RUN)" if screen_size < MAX_IMAGE_SIZE else
              f"crop the images to the inspected region or cut them into parts smaller than {int(WARN_REDUCTION) * MAX_IMAGE_SIZE} px "
              f"({MAX_IMAGE_SIZE} px is the largest decode)")
    log.warning(
        "the images are about %.0f× larger than stage 1's input of %d px (median longest side %d px; largest %s: %d×%d): "
        "a defect narrower than about %.0f px spans less than one pixel of the screen and may never reach stage 2. For "
        "small defects in large images %s, and check the result on a few labelled defects: the synthetic defects are "
        "sized relative to the image and score small real ones too kindly (README: Large images, small defects)",
        reduction, screen_size, int(np.median(longest)), decoded.records[largest].name, width, height, reduction, remedy,
    )
    return True


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N×H×W×C`` (or ``H×W×C``) to float ``N×C×H×W`` in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return tensor.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
