"""Hard-negative mining: which tiles are mined, how they are cut, and the training rounds around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from edgedx.card import CropPolicy, ModelCard, Normalization, Provenance  # noqa: E402
from edgedx.errors import InputError  # noqa: E402
from edgedx.runtime.io.field_annotations import read_field_annotations  # noqa: E402
from edgedx.runtime.io.image_io import write_image  # noqa: E402
from edgedx.training.checkpoint import load_checkpoint  # noqa: E402
from edgedx.training.hard_negatives import mine  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402

from test_training_loop import FAST, colour_folder  # noqa: E402


class Brightness(torch.nn.Module):
    """p(light) rises with a tile's mean brightness: 0.5 at mid-grey."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(m), 10 * (m - 0.5)], dim=1)


def brightness_card() -> ModelCard:
    """16-px tiles at half scale, no overlap: a 128-px field is a 4×4 grid of 32-px blocks."""
    return ModelCard(
        arch="fake", task="binary", class_names=("dark", "light"), positive_class="light", threshold=0.5, input_size=(16, 16),
        crop=CropPolicy(tile_size=(16, 16), stride=(16, 16), scale=0.5), normalization=Normalization(mean=(0, 0, 0), std=(1, 1, 1)),
        provenance=Provenance(edgedx_version="test", created_at="now"),
    )


def field(path: Path, blocks: dict[tuple[int, int], int]) -> Path:
    """A black 128×128 field with uniform 32-px blocks of the given brightness at (row, col)."""
    pixels = np.zeros((128, 128, 3), np.uint8)
    for (r, c), value in blocks.items():
        pixels[32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)] = value
    write_image(path, pixels)
    return path


def test_mine_keeps_the_highest_false_positives_and_never_an_annotated_one(tmp_path: Path) -> None:
    a = field(tmp_path / "a.png", {(0, 0): 255, (1, 2): 230, (3, 3): 180, (2, 1): 100})
    b = field(tmp_path / "b.png", {(0, 1): 240, (2, 2): 200})
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps([
        {"image_name": "a.png", "objects": [
            {"type": "ring", "bbox": {"x": "70", "y": "40", "w": "10", "h": "10"}},  # centre in block (1, 2)
            {"type": "difficult", "bbox": {"x": 100, "y": 100, "w": 5, "h": 5}},  # touches block (3, 3)
        ]},
        {"image_name": "b.png", "objects": []},
    ]))
    card, model = brightness_card(), Brightness()

    blind = mine(model, card, [a, b], None, threshold=0.5, limit=3, batch_size=4)
    assert blind.provenance == ("a.png:0,0,32,32", "b.png:32,0,32,32", "a.png:64,32,32,32")
    assert blind.n_fields == 2 and blind.n_candidates == 5  # the 100-grey block is below the threshold
    assert list(blind.scores) == sorted(blind.scores, reverse=True) and (blind.scores >= 0.5).all()
    assert blind.crops.shape == (3, 16, 16, 3) and blind.crops.dtype == np.uint8
    assert [int(c.mean()) for c in blind.crops] == [255, 240, 230]  # cut as the splitter cut them: uniform blocks at half scale

    truth = read_field_annotations(annotations)
    known = mine(model, card, [a, b], truth, threshold=0.5, limit=10, batch_size=4)
    assert known.provenance == ("a.png:0,0,32,32", "b.png:32,0,32,32", "b.png:64,64,32,32")  # never the ring, never the difficult block
    assert known.source_sizes == ((32, 32),) * 3

    again = mine(model, card, [a, b], truth, threshold=0.5, limit=10, batch_size=4, skip=set(known.provenance[:2]))
    assert again.provenance == ("b.png:64,64,32,32",)
    assert known.positives is None and known.n_positive == 0

    both = mine(model, card, [a, b], truth, threshold=0.5, limit=10, batch_size=4, positives=True)
    assert both.provenance == known.provenance  # the false positives are the same
    assert both.positives is not None and both.positives.provenance == ("a.png:64,32,32,32",)  # the tile the ring's centre is in the middle of
    assert [int(c.mean()) for c in both.positives.crops] == [230] and both.positives.scores[0] > 0.5
    assert mine(model, card, [a, b], truth, threshold=0.5, limit=10, batch_size=4, positives=True,
                skip={"a.png:64,32,32,32"}).n_positive == 0  # mined in an earlier round: not again
    with pytest.raises(InputError, match="needs annotations naming the positives"):
        mine(model, card, [a, b], None, threshold=0.5, limit=10, batch_size=4, positives=True)


def test_a_tile_is_centred_on_a_positive_only_when_the_centre_is_well_inside_it() -> None:
    from edgedx.runtime.io.field_annotations import FieldTruth
    from edgedx.runtime.tiling import plan_tiles
    from edgedx.training.hard_negatives import centred_tiles

    grid = plan_tiles(128, 128, CropPolicy(tile_size=(64, 64), stride=(32, 32), scale=1.0))
    ys, xs = grid.starts()
    empty = np.zeros((0, 2))
    inner = FieldTruth("f", np.array([[50.0, 50.0]]), empty, 0)  # 50 is ≥ 8 inside both tiles along each axis
    edge = FieldTruth("f", np.array([[4.0, 4.0]]), empty, 0)  # 4 px from the border: a sliver of the object in any tile
    chosen = centred_tiles(grid, inner)
    assert chosen.sum() == 4 and set(zip(xs[chosen].tolist(), ys[chosen].tolist())) == {(0, 0), (32, 0), (0, 32), (32, 32)}
    assert not centred_tiles(grid, edge).any() and not centred_tiles(grid, None).any()
    # margin 0: every tile holding the centre (the tile-level truth field localisation scores); a quarter: the middle only
    assert centred_tiles(grid, inner, 0.0).sum() == 4
    anywhere = centred_tiles(grid, edge, 0.0)
    assert anywhere.sum() == 1 and (xs[anywhere][0], ys[anywhere][0]) == (0, 0)
    middle = centred_tiles(grid, inner, 0.25)  # 50 lies 16 px inside only the tile starting at 32 (32 + 16 ≤ 50 < 96 - 16)
    assert middle.sum() == 1 and (xs[middle][0], ys[middle][0]) == (32, 32)


def light_fields(root: Path, n: int = 3) -> Path:
    """Whole images of light noise and no positive: every tile the model calls light is a false positive."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        write_image(root / f"field{i}.png", np.clip(rng.normal(200, 20, (40, 50, 3)), 0, 255).astype(np.uint8))
    return root


def test_two_rounds_grow_only_the_training_split(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data")
    fields = light_fields(tmp_path / "fields")
    config = TrainConfig(**{**FAST.__dict__, "hard_negatives": str(fields), "hard_negative_rounds": 2, "hard_negative_epochs": 1, "hard_negative_max": 4})
    result = train(data, tmp_path / "run", config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["hard_negatives"]
    rounds = record["rounds"]
    assert len(rounds) == 2 and [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["n_mined"] == 4 and rounds[0]["n_fields"] == 3 and rounds[0]["threshold"] == 0.5
    assert record["n_train_after"] == record["n_train_before"] + sum(r["n_mined"] for r in rounds)
    assert all(c.startswith("field") for c in rounds[0]["crops"])
    assert len(metrics["history"]) == 2 + sum(len(r["epochs"]) for r in rounds)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(summary["class_counts_train"].values()) == record["n_train_after"]
    card = load_checkpoint(result.checkpoint).card
    assert card.provenance.training["hard_negatives"]["rounds"][0]["n_mined"] == 4
    assert "crops" not in card.provenance.training["hard_negatives"]["rounds"][0]
    assert result.card.threshold is not None
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    plain = train(data, tmp_path / "plain", FAST)
    assert json.loads((tmp_path / "plain" / "split.json").read_text())["val"] == split["val"]  # validation: the same ids and count
    mined_val, plain_val = (np.load(tmp_path / run / "val_predictions.npz") for run in ("run", "plain"))
    assert np.array_equal(mined_val["idx"], plain_val["idx"]) and np.array_equal(mined_val["targets"], plain_val["targets"])
    assert plain.card.provenance.training.get("hard_negatives") is None

def test_centred_positives_join_the_training_split_as_the_positive_class(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data")
    fields = light_fields(tmp_path / "fields", n=2)
    annotations = tmp_path / "annotations.json"  # one positive centred in each field, in the middle of its tiles
    annotations.write_text(json.dumps([
        {"image_name": f"field{i}.png", "objects": [{"type": "ring", "bbox": {"x": 20, "y": 15, "w": 10, "h": 10}}]} for i in range(2)
    ]))
    config = TrainConfig(**{**FAST.__dict__, "hard_negatives": str(fields), "hard_negative_annotations": str(annotations),
                            "hard_negative_epochs": 1, "mine_positives": True})
    train(data, tmp_path / "run", config)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["hard_negatives"]
    first = record["rounds"][0]
    assert record["mine_positives"] and record["mine_positive_margin"] == 0.125 and first["n_positive_mined"] == len(first["positive_crops"]) >= 2
    assert all(c.split(":")[0] in ("field0.png", "field1.png") for c in first["positive_crops"])
    assert not set(first["positive_crops"]) & set(first["crops"])  # a tile centred on a positive is never a mined negative
    assert record["n_train_after"] == record["n_train_before"] + first["n_mined"] + first["n_positive_mined"]
    counts = json.loads((tmp_path / "run" / "summary.json").read_text())["class_counts_train"]
    before = {"light": counts["light"] - first["n_positive_mined"], "dark": counts["dark"] - first["n_mined"]}
    assert before["light"] == before["dark"] == record["n_train_before"] // 2  # 12 + 12 images, split alike: the extra light ones are the tiles


def test_a_fold_refinished_at_the_out_of_fold_epoch_keeps_its_mining_record(tmp_path: Path) -> None:
    from unittest import mock

    from edgedx.training import train as training
    from edgedx.training.train import cross_validate

    def not_fold_ones_best(histories: list[list[dict]], monitor: str) -> tuple[int, list[float]]:
        """An epoch other than fold 1's own best, so fold 1 is finished again from that epoch's snapshot."""
        curve = [float(row["val"][monitor]) for row in histories[0]]
        best = int(np.argmax(curve)) + 1
        return (2 if best == 1 else 1), curve

    data = colour_folder(tmp_path / "data", n=8)
    fields = light_fields(tmp_path / "fields", n=2)
    config = TrainConfig(**{**FAST.__dict__, "epochs": 1, "hard_negatives": str(fields), "hard_negative_epochs": 1, "hard_negative_max": 3})
    with mock.patch.object(training, "choose_epoch", side_effect=not_fold_ones_best) as chosen:
        cv = cross_validate(data, tmp_path / "cv", config, folds=2)
    epoch, _ = chosen.side_effect([r.history for r in cv.folds], config.monitor)
    assert cv.folds[0].best_epoch == epoch  # finished again at an epoch other than its own best
    for i in (1, 2):
        metrics = json.loads((tmp_path / "cv" / f"fold_{i}" / "metrics.json").read_text())
        assert metrics["hard_negatives"]["rounds"][0]["n_mined"] == 3, i
        assert load_checkpoint(tmp_path / "cv" / f"fold_{i}" / "model.pt").card.provenance.training["hard_negatives"]["n_fields"] == 2


@pytest.mark.parametrize("stop_at", ["epoch 3/4 loss", "epoch 4/4 loss"])  # before and after a round's first epoch
def test_a_run_stopped_inside_a_mining_round_resumes_exactly(tmp_path: Path, stop_at: str) -> None:
    from test_training_loop import Interrupt

    data = colour_folder(tmp_path / "data")
    fields = light_fields(tmp_path / "fields")
    config = TrainConfig(**{**FAST.__dict__, "hard_negatives": str(fields), "hard_negative_max": 4})  # 2 epochs, then 2 in the round
    straight = train(data, tmp_path / "a", config)

    def stop(stage: str, done: int, total: int, info: str = "") -> None:
        if info.startswith(stop_at):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(data, tmp_path / "b", config, progress=stop)
    assert (tmp_path / "b" / "hard_negatives" / "round_1.npz").is_file()
    resumed = train(data, tmp_path / "b", TrainConfig(**{**config.__dict__, "resume": True}))
    a, b = load_checkpoint(straight.checkpoint).state_dict, load_checkpoint(resumed.checkpoint).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history] and len(resumed.history) == 4
    records = [json.loads((tmp_path / run / "metrics.json").read_text())["hard_negatives"] for run in ("a", "b")]
    assert records[0] == {**records[1], "folder": records[0]["folder"]} and records[1]["rounds"][0]["epochs"] == [3, 4]
    with pytest.raises(InputError, match="already finished 4 of 4 epochs \\(2 and 1 mining rounds\\)"):
        train(data, tmp_path / "b", TrainConfig(**{**config.__dict__, "resume": True}))


def test_config_refuses_mining_that_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="binary task with a positive class.*without --hard-negatives"):
        TrainConfig(task="multiclass", hard_negatives=str(tmp_path)).validate()
    with pytest.raises(InputError, match="folder not found: .*nowhere; give a folder of whole images"):
        TrainConfig(hard_negatives=str(tmp_path / "nowhere")).validate()
    with pytest.raises(InputError, match="rounds must be at least 1, got 0"):
        TrainConfig(hard_negatives=str(tmp_path), hard_negative_rounds=0).validate()
    with pytest.raises(InputError, match="without --hard-negatives"):
        TrainConfig(hard_negative_annotations="a.json").validate()
    with pytest.raises(InputError, match="--mine-positives is given without --hard-negatives"):
        TrainConfig(mine_positives=True).validate()
    with pytest.raises(InputError, match="--mine-positives .* needs --hard-negative-annotations"):
        TrainConfig(hard_negatives=str(tmp_path), mine_positives=True).validate()
    for margin in (-0.1, 0.5):
        with pytest.raises(InputError, match=f"--mine-positive-margin must be at least 0 and below 0.5 .* got {margin}"):
            TrainConfig(hard_negatives=str(tmp_path), mine_positive_margin=margin).validate()
    # a margin without --mine-positives would change nothing: said, not ignored
    with pytest.raises(InputError, match="--mine-positive-margin is given without --hard-negatives and --mine-positives"):
        TrainConfig(mine_positive_margin=0.0).validate()
    with pytest.raises(InputError, match="--mine-positive-margin chooses which tiles --mine-positives takes"):
        TrainConfig(hard_negatives=str(tmp_path), mine_positive_margin=0.0).validate()
