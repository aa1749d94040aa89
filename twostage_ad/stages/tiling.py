"""Overlapping tiles over an image and a seamless stitch of per-tile cell maps (docs/design.md §2).

Stage 2 is fully convolutional: one latent cell per ``cell × cell`` pixels; a tiled stage 1 maps
its tiles pixel by pixel (``cell`` 1). On an image larger than its tile a stage scores overlapping
tiles whose origins lie on the image's cell grid, so every tile's cells coincide with the image's
cells, and blends them per cell (each of its maps alike) with a separable window
that is largest at a tile's centre and small at its border (where a convolution sees padding):

    stitched[c] = Σ_t w_t(c)·map_t(c) / Σ_t w_t(c)

A cell covered by one tile takes that tile's value; between tiles the weights trade off
smoothly, so no seam shows where tiles meet and no tile is normalised on its own. Tiles are
cut and scored a batch at a time, so memory grows with ``batch_size × tile²`` and the cell maps,
not with the number of tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["blend_window", "pad_to_grid", "stitch_cell_maps", "tile_origins", "tile_stride"]


def tile_stride(tile: int, overlap: float, cell: int) -> int:
    """Step between tile origins: ``tile·(1 − overlap)`` rounded down to whole cells, at least one cell."""
    if tile % cell:
        raise ValueError(f"tile size must be a multiple of the cell size {cell}, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    pixels = math.floor(tile * (1.0 - overlap) + 1e-9)  # 160·(1 − 0.8) is 31.999… in floating point
    return max(cell, pixels // cell * cell)


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Origins along one axis of ``length`` pixels (``length >= tile``): ``0, stride, …`` and a
    last tile flush with the end, so every pixel is covered."""
    if length < tile:
        raise ValueError(f"an axis of {length} pixels is shorter than the tile ({tile}); pad it first")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def blend_window(cells: int, *, floor: float = 0.05) -> torch.Tensor:
    """``cells × cells`` weights: the outer product of a sine bump ``sin(π(i + ½)/cells)``, kept
    above ``floor`` so that a cell one tile alone covers still counts."""
    ramp = torch.sin(math.pi * (torch.arange(cells, dtype=torch.float64) + 0.5) / cells).clamp_min(floor)
    return (ramp[:, None] * ramp[None, :]).float()


def pad_to_grid(x: torch.Tensor, tile: int, cell: int) -> torch.Tensor:
    """Pad ``B×C×H×W`` at the bottom and right to whole cells and at least one tile per side
    (reflection where the image is large enough, else edge replication)."""
    height, width = x.shape[-2:]
    target_h = max(tile, math.ceil(height / cell) * cell)
    target_w = max(tile, math.ceil(width / cell) * cell)
    pad_h, pad_w = target_h - height, target_w - width
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def stitch_cell_maps(
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int,
    stride: int,
    cell: int,
    batch_size: int = 64,
) -> torch.Tensor:
    """Cell maps of images ``B×C×H×W`` scored tile by tile: ``B×K×⌈H/cell⌉×⌈W/cell⌉``.

    ``forward`` maps ``N×C×tile×tile`` tiles to their ``N×K×(tile/cell)×(tile/cell)`` cell maps
    (``K`` maps, each blended alike);
    tile origins are multiples of ``cell`` (``stride`` and ``tile`` are), so tiles share cells.
    The same origins are cut from every image of the batch; at most ``max(batch_size, B)`` tiles
    go through ``forward`` at once.
    """
    if x.ndim != 4:
        raise ValueError(f"stitch_cell_maps takes images B×C×H×W, got {tuple(x.shape)}")
    if stride % cell or tile % cell:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be multiples of the cell size {cell}")
    batch, (height, width) = len(x), x.shape[-2:]
    padded = pad_to_grid(x, tile, cell)
    grid_h, grid_w = padded.shape[-2] // cell, padded.shape[-1] // cell
    per_tile = tile // cell
    window = blend_window(per_tile).to(padded.device)
    total: torch.Tensor | None = None  # B×K×grid_h×grid_w, once K is known
    weight = torch.zeros(grid_h, grid_w, device=padded.device)
    origins = [(top, left) for top in tile_origins(padded.shape[-2], tile, stride)
               for left in tile_origins(padded.shape[-1], tile, stride)]
    per_call = max(1, batch_size // batch)  # origins per forward call
    for first in range(0, len(origins), per_call):
        chunk = origins[first : first + per_call]
        tiles = torch.cat([padded[:, :, top : top + tile, left : left + tile] for top, left in chunk])
        maps = forward(tiles).float()
        if maps.shape[-2:] != (per_tile, per_tile):
            raise ValueError(f"forward returned cell maps of shape {tuple(maps.shape)} for {tile}-px tiles; "
                             f"expected {per_tile}×{per_tile} cells ({cell} px each)")
        if total is None:
            total = torch.zeros(batch, maps.shape[1], grid_h, grid_w, device=padded.device)
        for k, (top, left) in enumerate(chunk):
            rows = slice(top // cell, top // cell + per_tile)
            cols = slice(left // cell, left // cell + per_tile)
            total[:, :, rows, cols] += window * maps[k * batch : (k + 1) * batch]
            weight[rows, cols] += window
    stitched = total / weight
    return stitched[:, :, : math.ceil(height / cell), : math.ceil(width / cell)]
