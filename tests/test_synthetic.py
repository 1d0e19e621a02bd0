"""Synthetic thin-smear renderer: ground truth, determinism, labels and files are right."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgedx.synthetic import (
    Cell,
    Field,
    render_field,
    render_tile_dataset,
    tile_has_parasite,
    write_image_folder,
)


def purple_fraction(tiles: np.ndarray) -> np.ndarray:
    """Per tile, the fraction of pixels coloured like a stained parasite (saturated blue-violet).

    Erythrocytes are pink (hue ~340 deg) and the background is pale, so neither counts.
    """
    hsv = np.stack([cv2.cvtColor(t, cv2.COLOR_RGB2HSV) for t in tiles])
    hue_deg = hsv[..., 0].astype(np.int32) * 2
    mask = (hue_deg >= 220) & (hue_deg <= 310) & (hsv[..., 1] >= 60)
    return mask.mean(axis=(1, 2))


def test_field_shapes_and_ground_truth_types() -> None:
    field = render_field(np.random.default_rng(0), 120, 160, infected_fraction=0.2)
    assert isinstance(field, Field)
    assert field.image.shape == (120, 160, 3)
    assert field.image.dtype == np.uint8
    assert field.image.flags.c_contiguous
    assert len(field.cells) > 20  # filled to a realistic density
    assert all(isinstance(c, Cell) for c in field.cells)
    for c in field.cells:
        assert 0 <= c.x < 160 and 0 <= c.y < 120
        assert c.radius == pytest.approx(9.0, rel=0.2)
    # Not a flat image: pale background and darker pink cells both present.
    green = field.image[..., 1]
    assert green.max() > 190 and green.min() < 140


def test_same_seed_same_field_and_different_seed_differs() -> None:
    a = render_field(np.random.default_rng(7), 80, 96, infected_fraction=0.3)
    b = render_field(np.random.default_rng(7), 80, 96, infected_fraction=0.3)
    c = render_field(np.random.default_rng(8), 80, 96, infected_fraction=0.3)
    assert np.array_equal(a.image, b.image)
    assert a.cells == b.cells
    assert not np.array_equal(a.image, c.image)

    ta, la = render_tile_dataset(np.random.default_rng(3), 20, 48)
    tb, lb = render_tile_dataset(np.random.default_rng(3), 20, 48)
    assert np.array_equal(ta, tb) and np.array_equal(la, lb)


@pytest.mark.parametrize(
    ("n_cells", "fraction", "expected"),
    [(40, 0.0, 0), (40, 0.01, 1), (40, 0.25, 10), (37, 0.3, 11), (40, 0.5, 20), (40, 1.0, 40), (0, 0.5, 0)],
)
def test_infected_fraction_is_honoured(n_cells: int, fraction: float, expected: int) -> None:
    field = render_field(np.random.default_rng(1), 150, 150, n_cells=n_cells, infected_fraction=fraction)
    assert len(field.cells) == n_cells
    assert sum(c.infected for c in field.cells) == expected


def test_infected_fraction_in_density_mode_rounds_to_nearest() -> None:
    field = render_field(np.random.default_rng(2), 160, 200, infected_fraction=0.15)
    n = len(field.cells)
    assert sum(c.infected for c in field.cells) == math.floor(0.15 * n + 0.5)


def test_bad_infected_fraction_is_rejected() -> None:
    with pytest.raises(ValueError, match="infected_fraction"):
        render_field(np.random.default_rng(0), 50, 50, infected_fraction=1.5)


def test_parasites_lie_inside_their_cells_and_are_drawn() -> None:
    field = render_field(np.random.default_rng(4), 200, 240, infected_fraction=0.3)
    infected = [c for c in field.cells if c.infected]
    healthy = [c for c in field.cells if not c.infected]
    assert infected and healthy
    for c in field.cells:
        assert (c.parasite_xy is not None) == c.infected
    for c in infected:
        px, py = c.parasite_xy
        assert math.hypot(px - c.x, py - c.y) < c.radius
        assert 0 <= px < 240 and 0 <= py < 200

    # Where a parasite is, the stain is dark violet: green drops far below a healthy cell's.
    green = field.image[..., 1].astype(np.float32)

    def darkest_green(x: float, y: float, r: float) -> float:
        r0, r1 = max(0, int(y - r)), min(200, int(y + r) + 1)
        c0, c1 = max(0, int(x - r)), min(240, int(x + r) + 1)
        return float(green[r0:r1, c0:c1].min())

    at_parasites = np.mean([darkest_green(*c.parasite_xy, 5) for c in infected])
    at_healthy = np.mean([darkest_green(c.x, c.y, 5) for c in healthy])
    assert at_parasites < at_healthy - 40


def test_tile_has_parasite_on_a_constructed_field() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    field = Field(
        image=image,
        cells=(
            Cell(x=30.0, y=40.0, radius=9.0, infected=True, parasite_xy=(31.0, 40.0)),
            Cell(x=70.0, y=70.0, radius=9.0, infected=False, parasite_xy=None),
        ),
    )
    assert tile_has_parasite(field, top=30, left=20, size=20)
    # Left edge: the centre must be >= margin px from the first column.
    assert tile_has_parasite(field, top=30, left=29, size=20)  # 31 - 29 = 2
    assert not tile_has_parasite(field, top=30, left=30, size=20)  # 1 px from the edge
    assert tile_has_parasite(field, top=30, left=30, size=20, margin=0.0)
    # Right edge: last column is left + size - 1.
    assert tile_has_parasite(field, top=30, left=14, size=20)  # 14 + 19 - 31 = 2
    assert not tile_has_parasite(field, top=30, left=13, size=20)
    # Far away, or over the healthy cell only.
    assert not tile_has_parasite(field, top=0, left=60, size=30)
    assert not tile_has_parasite(field, top=60, left=60, size=30)
    healthy_only = Field(image=image, cells=(field.cells[1],))
    assert not tile_has_parasite(healthy_only, top=0, left=0, size=100)


def test_tile_dataset_counts_dtypes_and_colour_signal() -> None:
    tiles, labels = render_tile_dataset(np.random.default_rng(0), 301, 48, positive_fraction=0.3)
    assert tiles.shape == (301, 48, 48, 3) and tiles.dtype == np.uint8
    assert labels.shape == (301,) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert int(labels.sum()) == 90  # round(301 * 0.3) exactly
    assert 0 < labels[:100].sum() < 100  # classes are shuffled, not in blocks

    purple = purple_fraction(tiles)
    pos, neg = purple[labels == 1], purple[labels == 0]
    # Parasitized tiles carry the parasite's blue-violet; uninfected ones at most a platelet speck.
    assert pos.mean() > 0.01
    assert pos.mean() > 10 * neg.mean()
    assert np.mean(pos > 0.005) > 0.95  # each positive tile really shows a parasite
    assert np.mean(neg > 0.005) < 0.02  # no negative tile shows (part of) a ring


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (1.0, 12), (0.5, 6)])
def test_tile_dataset_extreme_fractions(fraction: float, expected: int) -> None:
    _, labels = render_tile_dataset(np.random.default_rng(5), 12, 32, positive_fraction=fraction)
    assert int(labels.sum()) == expected


def test_write_image_folder_round_trips_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 20, 24, 3), dtype=np.uint8)
    images[0] = (255, 0, 0)  # pure red: a BGR/RGB swap would show
    labels = np.array([0, 1, 0, 1, 1, 0], np.int64)
    root = tmp_path / "synthetic smear"
    paths = write_image_folder(root, images, labels, ["uninfected", "parasitized"])

    assert paths == [root / ("uninfected", "parasitized")[int(lab)] / f"{i:05d}.png" for i, lab in enumerate(labels)]
    assert sorted(p.name for p in (root / "parasitized").iterdir()) == ["00001.png", "00003.png", "00004.png"]
    for path, image in zip(paths, images):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert bgr is not None, path
        assert np.array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), image)
