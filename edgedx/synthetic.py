"""Synthetic Giemsa-stained thin blood smear fields with exact ground truth.

Why: the offline demo (train a malaria "parasitized vs uninfected" tile
classifier, then diagnose whole fields with sliding crops) must run without any
downloaded data, and the tests need images whose answer is known exactly.

Rendering follows Beer-Lambert, as transmitted-light microscopy does: every
stained structure adds optical density (OD) to a pale background, so
overlapping cells darken and a parasite on a red cell mixes colours the way a
real specimen does. Per-field variation (stain strength and hue, brightness,
contrast, focus, sensor noise) keeps a classifier from learning one look.

Numpy and OpenCV only. Coordinates: ``x`` is the column, ``y`` the row, and
``x = j`` is the centre of pixel column ``j``. Images are RGB uint8 (H, W, 3).
Everything random comes from the ``numpy.random.Generator`` passed in, so a
seed reproduces a field exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "Cell",
    "Field",
    "render_field",
    "render_tile_dataset",
    "tile_has_parasite",
    "write_image_folder",
]

# Optical density per unit stain concentration, RGB. Eosin leaves erythrocytes
# pink (absorbs green most); azure/methylene blue colours parasite cytoplasm
# blue-violet; chromatin takes azure-eosinate, a dark red-violet; platelets are
# a pale lilac.
_OD_EOSIN = np.array([0.06, 0.42, 0.27], np.float32)
_OD_AZURE = np.array([0.80, 0.92, 0.26], np.float32)
_OD_CHROMATIN = np.array([1.00, 1.70, 0.62], np.float32)
_OD_PLATELET = np.array([0.42, 0.55, 0.18], np.float32)

_RING_MIN, _RING_MAX = 0.30, 0.45  # ring radius as a fraction of the cell radius
_COVERAGE = (0.40, 0.55)  # fraction of the field covered by red cells, thin-smear monolayer
_MIN_GAP = 0.9  # centre distance >= _MIN_GAP * (r_i + r_j): touching, barely overlapping
_PLATELETS_PER_CELL = 0.025  # Poisson rate of platelet distractors per red cell
_MAX_BLUR = 1.2
# Beyond the ring radius: chromatin dot offset (0.5) + 3 sigma of the dot (3.0) + 2 sigma of blur.
_PARASITE_SPILL = 3.5 + 2.0 * _MAX_BLUR


@dataclass(frozen=True)
class Cell:
    """One erythrocyte and, when infected, where its ring-form parasite sits."""

    x: float  # centre column, pixels
    y: float  # centre row, pixels
    radius: float
    infected: bool
    parasite_xy: tuple[float, float] | None  # centre of the ring-form parasite (x, y) when infected


@dataclass(frozen=True)
class Field:
    """A rendered microscope field and the cells in it (the ground truth)."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    cells: tuple[Cell, ...]


def _parasite_reach(cell: Cell) -> float:
    """How far from a parasite's centre its stain can show: ring, chromatin dot and blur.

    Used to keep "uninfected" tiles free of even a partial parasite.
    """
    return _RING_MAX * cell.radius + _PARASITE_SPILL


# ----------------------------------------------------------------------------------
# Field rendering
# ----------------------------------------------------------------------------------


def render_field(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    n_cells: int | None = None,
    infected_fraction: float = 0.0,
    cell_radius: float = 9.0,
) -> Field:
    """A whole microscope field: pale background, pink erythrocytes, some ring-form parasites.

    Erythrocytes are roughly non-overlapping, slightly elliptic discs with a
    paler centre (central pallor) and a darker rim. ``infected_fraction`` of them
    (rounded to nearest, at least one when the fraction is > 0) carry a thin
    violet ring (radius 0.30-0.45 of the cell radius) with one or two dark
    chromatin dots. Rarely, small pale platelets lie between cells as
    distractors. ``n_cells=None`` fills the field to a realistic density; cell
    centres always lie inside the image, and so do parasite centres.
    """
    height, width = int(height), int(width)
    _check_field_args(height, width, n_cells, infected_fraction, cell_radius)
    target, exact = _cell_target(rng, height, width, n_cells, cell_radius)
    xs, ys, radii = _place_cells(rng, height, width, target, cell_radius, exact=exact)
    n = len(xs)

    aspect = rng.uniform(0.86, 1.0, size=n)  # minor/major axis
    angle = rng.uniform(0.0, math.pi, size=n)
    semi_a = radii / np.sqrt(aspect)  # equal-area ellipse
    semi_b = radii * np.sqrt(aspect)
    infected_idx = _choose_infected(rng, n, infected_fraction)

    # Stain concentration maps, padded so every stamp fits without clipping.
    pad = int(math.ceil(cell_radius * 1.15 / math.sqrt(0.86))) + 4
    shape = (height + 2 * pad, width + 2 * pad)
    eosin = np.zeros(shape, np.float32)
    azure = np.zeros(shape, np.float32)
    chromatin = np.zeros(shape, np.float32)
    platelet = np.zeros(shape, np.float32)

    _stamp_cells(rng, eosin, pad, xs, ys, semi_a, semi_b, angle)
    parasites = _stamp_parasites(
        rng, azure, chromatin, pad, height, width, infected_idx, xs, ys, semi_b, radii
    )
    n_platelets = int(rng.poisson(_PLATELETS_PER_CELL * n)) if n else 0
    _stamp_platelets(rng, platelet, pad, height, width, xs, ys, semi_a, n_platelets)

    image = _develop(rng, height, width, pad, eosin, azure, chromatin, platelet)
    return Field(image=image, cells=_field_cells(xs, ys, radii, infected_idx, parasites))


def _check_field_args(
    height: int, width: int, n_cells: int | None, infected_fraction: float, cell_radius: float
) -> None:
    """Refuse impossible field requests up front, before any random number is drawn."""
    if height < 1 or width < 1:
        raise ValueError(f"field size must be positive, got {height}x{width}")
    if not 0.0 <= infected_fraction <= 1.0:
        raise ValueError(f"infected_fraction must be in [0, 1], got {infected_fraction}")
    if not cell_radius > 1.0:
        raise ValueError(f"cell_radius must be > 1 pixel, got {cell_radius}")
    if n_cells is not None and n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")


def _cell_target(
    rng: np.random.Generator, height: int, width: int, n_cells: int | None, cell_radius: float
) -> tuple[int, bool]:
    """How many cells to place and whether that count is exact (asked for) or a density goal.

    ``n_cells=None`` draws this field's coverage (one RNG draw) so fields vary in
    how crowded they are; an explicit count draws nothing.
    """
    if n_cells is None:
        coverage = rng.uniform(*_COVERAGE)
        return int(round(coverage * height * width / (math.pi * cell_radius**2))), False
    return int(n_cells), True


def _choose_infected(rng: np.random.Generator, n: int, infected_fraction: float) -> np.ndarray:
    """Sorted indices of the infected cells: the fraction rounded to nearest, at least one when > 0.

    Draws from ``rng`` only when some cell is infected: the draw order is part
    of what makes a seeded field reproducible.
    """
    n_infected = 0
    if n > 0 and infected_fraction > 0.0:
        n_infected = max(1, min(n, int(math.floor(infected_fraction * n + 0.5))))
    return np.sort(rng.choice(n, size=n_infected, replace=False)) if n_infected else np.empty(0, int)


def _stamp_parasites(
    rng: np.random.Generator,
    azure: np.ndarray,
    chromatin: np.ndarray,
    pad: int,
    height: int,
    width: int,
    infected_idx: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    semi_b: np.ndarray,
    radii: np.ndarray,
) -> dict[int, tuple[float, float]]:
    """Place and stamp one ring-form parasite per infected cell; return cell index -> parasite centre.

    The returned centres are the ground truth that tiles are labelled with.
    """
    parasites: dict[int, tuple[float, float]] = {}
    for i in infected_idx:
        px, py = _parasite_position(rng, height, width, xs[i], ys[i], semi_b[i], radii[i])
        ring_r = radii[i] * rng.uniform(_RING_MIN, _RING_MAX)
        _stamp_ring(rng, azure, chromatin, pad, px, py, ring_r)
        parasites[int(i)] = (float(px), float(py))
    return parasites


def _field_cells(
    xs: np.ndarray,
    ys: np.ndarray,
    radii: np.ndarray,
    infected_idx: np.ndarray,
    parasites: dict[int, tuple[float, float]],
) -> tuple[Cell, ...]:
    """The ground-truth :class:`Cell` records, in placement order, as plain Python numbers."""
    infected = np.zeros(len(xs), bool)
    infected[infected_idx] = True
    return tuple(
        Cell(
            x=float(xs[i]),
            y=float(ys[i]),
            radius=float(radii[i]),
            infected=bool(infected[i]),
            parasite_xy=parasites.get(i),
        )
        for i in range(len(xs))
    )


def _place_cells(
    rng: np.random.Generator, height: int, width: int, target: int, cell_radius: float, *, exact: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random sequential adsorption of discs, in vectorised chunks.

    Candidates that would overlap an accepted cell by more than ~10% of the
    diameters are dropped. With ``exact`` the requested count is always
    returned: when the field is too crowded the remainder is placed freely.
    """

    def draw(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            rng.uniform(0.0, width, size=k),
            rng.uniform(0.0, height, size=k),
            cell_radius * np.clip(rng.normal(1.0, 0.06, size=k), 0.85, 1.15),
        )

    acc_x: list[float] = []
    acc_y: list[float] = []
    acc_r: list[float] = []
    budget = max(12 * target, 64) if target else 0
    chunk = 256
    tried = 0
    while len(acc_x) < target and tried < budget:
        cx, cy, cr = draw(chunk)
        tried += chunk
        ok = np.ones(chunk, bool)
        if acc_x:
            ax, ay, ar = np.asarray(acc_x), np.asarray(acc_y), np.asarray(acc_r)
            d2 = (cx[:, None] - ax[None, :]) ** 2 + (cy[:, None] - ay[None, :]) ** 2
            ok = ~np.any(d2 < (_MIN_GAP * (cr[:, None] + ar[None, :])) ** 2, axis=1)
        idx = np.flatnonzero(ok)
        if idx.size == 0:
            continue
        sx, sy, sr = cx[idx], cy[idx], cr[idx]
        conflict = (sx[:, None] - sx[None, :]) ** 2 + (sy[:, None] - sy[None, :]) ** 2 < (
            _MIN_GAP * (sr[:, None] + sr[None, :])
        ) ** 2
        blocked = np.zeros(idx.size, bool)
        for k in range(idx.size):
            if blocked[k]:
                continue
            acc_x.append(float(sx[k]))
            acc_y.append(float(sy[k]))
            acc_r.append(float(sr[k]))
            if len(acc_x) == target:
                break
            blocked |= conflict[k]
    if exact and len(acc_x) < target:
        fx, fy, fr = draw(target - len(acc_x))
        acc_x.extend(fx.tolist())
        acc_y.extend(fy.tolist())
        acc_r.extend(fr.tolist())
    xs = np.minimum(np.asarray(acc_x, np.float64), np.nextafter(width, 0))
    ys = np.minimum(np.asarray(acc_y, np.float64), np.nextafter(height, 0))
    return xs, ys, np.asarray(acc_r, np.float64)


def _stamp_cells(
    rng: np.random.Generator,
    eosin: np.ndarray,
    pad: int,
    xs: np.ndarray,
    ys: np.ndarray,
    semi_a: np.ndarray,
    semi_b: np.ndarray,
    angle: np.ndarray,
) -> None:
    """Add every erythrocyte's eosin density: rim darker, centre paler (biconcave disc)."""
    n = len(xs)
    if n == 0:
        return
    half = pad - 1
    size = 2 * half + 1
    ox = np.floor(xs).astype(int) - half
    oy = np.floor(ys).astype(int) - half
    offs = np.arange(size, dtype=np.float32)
    gx = (ox[:, None] + offs[None, :] - xs[:, None]).astype(np.float32)[:, None, :]  # (n, 1, S)
    gy = (oy[:, None] + offs[None, :] - ys[:, None]).astype(np.float32)[:, :, None]  # (n, S, 1)
    cos = np.cos(angle).astype(np.float32)[:, None, None]
    sin = np.sin(angle).astype(np.float32)[:, None, None]
    a = semi_a.astype(np.float32)[:, None, None]
    b = semi_b.astype(np.float32)[:, None, None]
    u = gx * cos + gy * sin
    v = gy * cos - gx * sin
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    r_eff = np.sqrt(a * b)
    coverage = np.clip(0.5 - (rho - 1.0) * r_eff, 0.0, 1.0)  # anti-aliased edge

    base = rng.uniform(0.70, 0.90, size=n).astype(np.float32)[:, None, None]
    pallor_depth = rng.uniform(0.40, 0.62, size=n).astype(np.float32)[:, None, None]
    pallor_size = rng.uniform(0.38, 0.55, size=n).astype(np.float32)[:, None, None]
    rim = rng.uniform(0.25, 0.45, size=n).astype(np.float32)[:, None, None]
    # Slightly off-centre pallor: real cells are not perfectly symmetric.
    du = rng.normal(0.0, 0.06, size=n).astype(np.float32)[:, None, None]
    dv = rng.normal(0.0, 0.06, size=n).astype(np.float32)[:, None, None]
    rho_p = np.sqrt((u / a - du) ** 2 + (v / b - dv) ** 2)
    density = (
        base
        - pallor_depth * np.exp(-((rho_p / pallor_size) ** 2))
        + rim * np.exp(-(((rho - 0.87) / 0.10) ** 2))
    )
    stamps = density * coverage
    for i in range(n):
        r0, c0 = oy[i] + pad, ox[i] + pad
        eosin[r0 : r0 + size, c0 : c0 + size] += stamps[i]


def _parasite_position(
    rng: np.random.Generator, height: int, width: int, cx: float, cy: float, semi_minor: float, radius: float
) -> tuple[float, float]:
    """A parasite centre inside the cell (ring fully inside it) and inside the image."""
    room = max(semi_minor - _RING_MAX * radius - 1.5, 0.0)
    for _ in range(32):
        r = room * math.sqrt(rng.uniform())
        t = rng.uniform(0.0, 2.0 * math.pi)
        px, py = cx + r * math.cos(t), cy + r * math.sin(t)
        if 0.0 <= px <= width - 1 and 0.0 <= py <= height - 1:
            return px, py
    return float(min(max(cx, 0.0), width - 1)), float(min(max(cy, 0.0), height - 1))


def _local_grid(px: float, py: float, half: int, pad: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Padded-map origin and float offsets of a (2*half+1)^2 patch around (px, py)."""
    x0, y0 = int(math.floor(px)) - half, int(math.floor(py)) - half
    offs = np.arange(2 * half + 1, dtype=np.float32)
    dx = (x0 + offs - px)[None, :]
    dy = (y0 + offs - py)[:, None]
    return y0 + pad, x0 + pad, dx, dy


def _stamp_ring(
    rng: np.random.Generator,
    azure: np.ndarray,
    chromatin: np.ndarray,
    pad: int,
    px: float,
    py: float,
    ring_r: float,
) -> None:
    """A ring-form trophozoite: thin violet cytoplasm ring, thicker on one side, plus chromatin dot(s)."""
    half = int(math.ceil(ring_r)) + 3
    r0, c0, dx, dy = _local_grid(px, py, half, pad)
    dist = np.sqrt(dx**2 + dy**2)
    theta = np.arctan2(dy, dx)
    dot_angle = rng.uniform(0.0, 2.0 * math.pi)
    # Cytoplasm is thickest opposite the chromatin (the "signet ring" look).
    thick = 0.5 * (1.0 - np.cos(theta - dot_angle))
    sigma = 0.40 + rng.uniform(0.2, 0.5) * thick
    amp = rng.uniform(1.5, 2.1)
    ring = amp * np.exp(-0.5 * ((dist - ring_r) / sigma) ** 2)
    sl = np.s_[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1]
    azure[sl] += ring.astype(np.float32)

    angles = [dot_angle]
    if rng.uniform() < 0.3:  # double chromatin dot
        angles.append(dot_angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, math.pi))
    dots = np.zeros_like(ring)
    for t in angles:
        d = ring_r + rng.uniform(0.0, 0.5)
        s = rng.uniform(0.75, 1.0)
        dots += rng.uniform(1.8, 2.6) * np.exp(
            -0.5 * ((dx - d * math.cos(t)) ** 2 + (dy - d * math.sin(t)) ** 2) / s**2
        )
    chromatin[sl] += dots.astype(np.float32)


def _stamp_platelets(
    rng: np.random.Generator,
    platelet: np.ndarray,
    pad: int,
    height: int,
    width: int,
    xs: np.ndarray,
    ys: np.ndarray,
    semi_a: np.ndarray,
    count: int,
) -> None:
    """Small pale granular platelets in the gaps between cells: purple, but not ring forms."""
    placed = 0
    for _ in range(count * 40):
        if placed >= count:
            break
        size = rng.uniform(1.4, 2.3)
        px = rng.uniform(2.0, max(width - 3.0, 2.0))
        py = rng.uniform(2.0, max(height - 3.0, 2.0))
        if len(xs) and np.any(np.hypot(xs - px, ys - py) < semi_a + size + 1.5):
            continue
        half = int(math.ceil(size)) + 3
        r0, c0, dx, dy = _local_grid(px, py, half, pad)
        # Pale halo (hyalomere) plus a few darker granules (granulomere).
        blob = rng.uniform(0.28, 0.42) * np.exp(-0.5 * (dx**2 + dy**2) / (size * 0.9) ** 2)
        for _g in range(int(rng.integers(2, 5))):
            gx, gy = rng.normal(0.0, size * 0.35, size=2)
            blob += rng.uniform(0.40, 0.70) * np.exp(-0.5 * ((dx - gx) ** 2 + (dy - gy) ** 2) / 0.55**2)
        platelet[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1] += blob.astype(np.float32)
        placed += 1


def _develop(
    rng: np.random.Generator,
    height: int,
    width: int,
    pad: int,
    eosin: np.ndarray,
    azure: np.ndarray,
    chromatin: np.ndarray,
    platelet: np.ndarray,
) -> np.ndarray:
    """Stain densities to an RGB uint8 photograph, with this field's stain, optics and sensor."""
    crop = np.s_[pad : pad + height, pad : pad + width]

    def jitter(od: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """Stain batch/strength: overall strength and a small per-channel (hue) change."""
        return (od * rng.uniform(lo, hi) * np.exp(rng.normal(0.0, 0.07, size=3))).astype(np.float32)

    stains = np.stack(
        [
            jitter(_OD_EOSIN, 0.75, 1.25),
            jitter(_OD_AZURE, 0.85, 1.15),
            jitter(_OD_CHROMATIN, 0.85, 1.15),
            jitter(_OD_PLATELET, 0.8, 1.2),
        ]
    )  # (4 stains, RGB)
    densities = np.stack([eosin[crop], azure[crop], chromatin[crop], platelet[crop]], axis=-1)
    od = (densities.reshape(-1, 4) @ stains).reshape(height, width, 3)

    # Background: plasma/glass with a faint tint and uneven illumination.
    tint = np.array([0.93, 0.91, 0.93], np.float32) + rng.normal(0.0, 0.015, size=3).astype(np.float32)
    grid = rng.normal(0.0, 1.0, size=(4, 4, 3)).astype(np.float32)
    uneven = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, 3)
    background = np.clip(tint * (1.0 + 0.012 * uneven), 0.0, 1.0)
    image = background * np.exp(-od)

    # Stain hue/saturation drift between slides.
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-8.0, 8.0), 360.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.85, 1.15), 0.0, 1.0)
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    # Exposure: brightness and contrast about the field's mean.
    mean = float(image.mean())
    image = (image - mean) * rng.uniform(0.9, 1.12) + mean + rng.uniform(-0.04, 0.04)

    sigma = rng.uniform(0.0, _MAX_BLUR)  # focus
    if sigma > 0.25:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)

    noise_sd = rng.uniform(0.004, 0.014)  # sensor noise, in [0, 1] units
    image = image + noise_sd * rng.standard_normal(size=image.shape, dtype=np.float32)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------


def tile_has_parasite(field: Field, top: int, left: int, size: int, margin: float = 2.0) -> bool:
    """True when a parasite centre lies in the tile, at least ``margin`` px from its edges.

    The tile holds pixel centres ``left .. left+size-1`` (columns) and
    ``top .. top+size-1`` (rows); distances are measured from those. Used to
    label training tiles and to score per-tile maps.
    """
    lo_x, hi_x = left + margin, left + size - 1 - margin
    lo_y, hi_y = top + margin, top + size - 1 - margin
    for cell in field.cells:
        if cell.parasite_xy is None:
            continue
        px, py = cell.parasite_xy
        if lo_x <= px <= hi_x and lo_y <= py <= hi_y:
            return True
    return False


def _tile_touches_parasite(parasites: np.ndarray, reach: np.ndarray, top: int, left: int, size: int) -> bool:
    """True when any parasite's stain could reach into the tile (centre within tile grown by its reach)."""
    if parasites.size == 0:
        return False
    px, py = parasites[:, 0], parasites[:, 1]
    inside = (
        (px >= left - reach)
        & (px <= left + size - 1 + reach)
        & (py >= top - reach)
        & (py <= top + size - 1 + reach)
    )
    return bool(inside.any())


def render_tile_dataset(
    rng: np.random.Generator,
    n: int,
    size: int,
    *,
    positive_fraction: float = 0.5,
    cell_radius: float = 9.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training tiles (n, size, size, 3) uint8 RGB and labels (n,) int64.

    1 = parasitized (a parasite centre inside the tile per :func:`tile_has_parasite`),
    0 = uninfected (no parasite stain anywhere in the tile, not even partially).
    Tiles are windows cut from rendered fields, so they look exactly like the
    crops a sliding-window diagnosis sees; several windows come from each field
    for speed. The class counts are exact: round(n * positive_fraction) positives.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if size < 8:
        raise ValueError(f"tile size must be >= 8 pixels, got {size}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    n_pos = int(math.floor(n * positive_fraction + 0.5))
    n_neg = n - n_pos
    side = max(2 * size, size + int(math.ceil(10 * cell_radius)))
    # Infect each field so that a negative window (the tile grown by a parasite's
    # reach) holds about one parasite on average: both classes stay easy to find
    # at any tile size, and positive tiles sometimes hold several parasites.
    grown = size + 2.0 * (_RING_MAX * cell_radius + _PARASITE_SPILL)
    cells_per_window = sum(_COVERAGE) / 2.0 * grown**2 / (math.pi * cell_radius**2)
    per_field = 4  # windows of each class per field: diversity vs. speed
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    filled = 0
    need_pos, need_neg = n_pos, n_neg
    span = side - size  # window origins lie in [0, span]

    while need_pos > 0 or need_neg > 0:
        fraction = min(1.0, rng.uniform(0.4, 1.2) / cells_per_window) if need_pos > 0 else 0.0
        field = render_field(rng, side, side, infected_fraction=fraction, cell_radius=cell_radius)
        infected = [c for c in field.cells if c.parasite_xy is not None]
        parasites = np.array([c.parasite_xy for c in infected], np.float64).reshape(-1, 2)
        reach = np.array([_parasite_reach(c) for c in infected], np.float64)

        # Positives: put the window around a chosen parasite, anywhere it fits with the margin.
        chosen = rng.permutation(len(parasites))[: min(need_pos, per_field)] if need_pos else []
        for j in chosen:
            px, py = parasites[j]
            lo_l, hi_l = max(0, math.ceil(px - (size - 1 - 2.0))), min(span, math.floor(px - 2.0))
            lo_t, hi_t = max(0, math.ceil(py - (size - 1 - 2.0))), min(span, math.floor(py - 2.0))
            if lo_l > hi_l or lo_t > hi_t:
                continue
            left, top = int(rng.integers(lo_l, hi_l + 1)), int(rng.integers(lo_t, hi_t + 1))
            if not tile_has_parasite(field, top, left, size):
                continue
            images[filled] = field.image[top : top + size, left : left + size]
            labels[filled] = 1
            filled += 1
            need_pos -= 1

        # Negatives: random windows with no parasite stain reaching in.
        got = 0
        for _ in range(4 * per_field if need_neg else 0):
            if got >= per_field or need_neg == 0:
                break
            top, left = (int(v) for v in rng.integers(0, span + 1, size=2))
            if _tile_touches_parasite(parasites, reach, top, left, size):
                continue
            images[filled] = field.image[top : top + size, left : left + size]
            labels[filled] = 0
            filled += 1
            need_neg -= 1
            got += 1

    order = rng.permutation(n)
    return images[order], labels[order]


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------


def write_image_folder(
    root: Path, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> list[Path]:
    """Write an ImageFolder layout ``root/<class_name>/<index:05d>.png``; return the paths.

    ``index`` is the image's position in ``images``, so a file traces back to its
    array row. PNG is lossless, so the pixels read back exactly. Encoding goes
    through ``cv2.imencode`` and a byte write (as :mod:`edgedx.runtime.io.image_io`
    does) so paths with spaces or non-ASCII characters work on every OS.
    """
    root = Path(root)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8 RGB, got {images.shape} {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be ({images.shape[0]},), got {labels.shape}")
    names = [str(c) for c in class_names]
    if not names or any(not c or c in (".", "..") or "/" in c or "\\" in c for c in names):
        raise ValueError(f"class names must be non-empty folder names, got {names}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"labels must be in [0, {len(names) - 1}], got range [{labels.min()}, {labels.max()}]")

    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / names[int(label)] / f"{index:05d}.png"
        ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"{path}: OpenCV could not encode the image as PNG")
        path.write_bytes(encoded.tobytes())
        paths.append(path)
    return paths
