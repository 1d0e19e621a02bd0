"""train → export → diagnose for real, on tiny synthetic smears (CPU, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import CLASSES, TILE, Trained, run_edgedx

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")


def expected_crops(height: int, width: int, tile: int, stride: int) -> int:
    """Closed form of the classic policy: ceil((L - T) / S) + 1 starts per axis (1 when L <= T)."""
    per_axis = [1 if n <= tile else math.ceil((n - tile) / stride) + 1 for n in (height, width)]
    return per_axis[0] * per_axis[1]


def test_training_learns_and_checkpoint_carries_card(trained: Trained) -> None:
    from edgedx.training.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(trained.checkpoint)
    card = ckpt.card
    assert card.task == "binary"
    assert card.class_names == tuple(sorted(CLASSES))
    assert card.positive_class == "parasitized"
    assert card.input_size == (TILE, TILE)
    assert card.crop.tile_size == (TILE, TILE) and card.crop.stride == (TILE // 2, TILE // 2)
    assert card.provenance.weights.startswith("imagenet")
    assert card.metrics["split"] == "val"
    assert card.metrics["accuracy"] >= 0.75  # at the operating threshold; chance is 0.5 on this balanced task
    assert card.metrics["macro_auc"] >= 0.8
    # The operating threshold reaches the target sensitivity on validation data.
    assert card.metrics["target_sensitivity"] == 0.95 and card.metrics["sensitivity"] >= 0.95
    assert card.threshold == card.metrics["threshold"]

    # The checkpoint holds the best epoch's weights: re-scoring them on the saved
    # validation split at the card's threshold reproduces the accuracy in the card.
    import torch

    from edgedx.runtime.io.image_io import read_image
    from edgedx.runtime.preprocess import preprocess_batch

    split = json.loads((trained.checkpoint.parent / "split.json").read_text())
    model = build_model(ckpt)
    crops = np.stack([read_image(trained.checkpoint.parent / p) for p in split["val"]])  # paths relative to the run
    truth = np.array([card.class_names.index(p.split("/")[-2]) for p in split["val"]])
    with torch.inference_mode():
        p_pos = torch.softmax(model(torch.from_numpy(preprocess_batch(crops, card))), 1)[:, card.positive_index].numpy()
    pred = np.where(p_pos >= card.threshold, card.positive_index, 1 - card.positive_index)
    assert float((pred == truth).mean()) == pytest.approx(card.metrics["accuracy"], abs=1e-9)
    run = trained.checkpoint.parent
    history = json.loads((run / "metrics.json").read_text())
    assert len(history["history"]) == 3 and history["best_epoch"] == card.metrics["epoch"]
    for name in ("learning_curves", "roc", "confusion_matrix", "radar"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 5000
    assert len(list((run / "gradcam").glob("*.gradcam.png"))) == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["loss_shares"]["parasitized"]["after"] == pytest.approx(0.5)
    assert "no patient ids" in summary["splits"]["note"]
    assert (run / "last.pt").is_file()


def test_export_folds_batchnorm_embeds_card_and_verifies_parity(trained: Trained) -> None:
    from edgedx.card import ONNX_METADATA_KEY, ModelCard
    from edgedx.export.bn_fold import count_batchnorms
    from edgedx.training.checkpoint import file_sha256, load_checkpoint

    report = json.loads(trained.export_report.read_text())
    [artefact] = report["artefacts"]
    assert artefact["path"] == "model.onnx" and artefact["precision"] == "fp32" and artefact["format"] == "onnx"
    assert artefact["sha256"] == file_sha256(trained.onnx) and artefact["bytes"] == trained.onnx.stat().st_size
    parity = artefact["parity"]
    assert parity["passed"] is True and parity["failures"] == []
    assert parity["max_abs_diff"] < 1e-3 and parity["max_prob_delta"] < 1e-4  # fp32: logits agree to float rounding
    assert parity["top1_agreement"] == 1.0 and parity["decision_agreement"] == 1.0
    # every validation image of the run (32 of 160 tiles), read back from split.json, with labels
    assert parity["n_samples"] == parity["n_real"] == 32
    assert report["verification"]["n_labelled"] == 32
    assert parity["labelled"]["accuracy_delta"] == 0.0
    bn = report["batchnorm"]
    assert bn["in_model"] > 0 and bn["remaining"] == 0
    assert bn["folded_by_exporter"] + bn["folded_into_conv"] + bn["converted_to_affine"] == bn["in_model"]

    graph = onnx.load(str(trained.onnx))
    assert count_batchnorms(graph) == 0
    meta = {p.key: p.value for p in graph.metadata_props}
    assert ModelCard.from_json(meta[ONNX_METADATA_KEY]) == load_checkpoint(trained.checkpoint).card
    assert meta["edgedx.checkpoint_sha256"] == file_sha256(trained.checkpoint)
    dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value  # dynamic batch axis


def test_diagnose_cli_odd_size_space_and_bad_image(trained: Trained) -> None:
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = trained.root / "whole fields"
    folder.mkdir()
    field = render_field(np.random.default_rng(3), 237, 511, infected_fraction=0.3)
    write_image(folder / "field 511x237.png", field.image)
    write_image(folder / "tiny.png", field.image[:20, :25])
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    out = trained.root / "results dir" / "out.jsonl"

    proc = run_edgedx("diagnose", str(folder), "--model", str(trained.onnx), "--out", str(out), "--overlays", str(trained.root / "overlays"))
    assert proc.returncode == 1, proc.stderr  # one input failed: the exit code says so
    assert "Traceback" not in proc.stderr
    assert "2 diagnosed" in proc.stdout and "1 of 3 inputs could not be read" in proc.stderr
    records = {r["input"].rsplit("/", 1)[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"field 511x237.png", "tiny.png", "broken.jpg"}
    big = records["field 511x237.png"]
    assert big["n_crops"] == expected_crops(237, 511, TILE, TILE // 2) == 434
    assert big["error"] is None and big["label"] in CLASSES
    assert sum(big["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert records["tiny.png"]["n_crops"] == 1  # smaller than one crop: zero-padded
    assert records["broken.jpg"]["label"] is None and "not a decodable image" in records["broken.jpg"]["error"]
    written = sorted(p.name for p in (trained.root / "overlays").iterdir())
    assert written == sorted(records[n]["overlay"] for n in ("field 511x237.png", "tiny.png"))  # each record names its overlay
    assert [n.split(".")[0] for n in written] == ["field 511x237", "tiny"] and all(n.endswith(".overlay.png") for n in written)


def test_diagnosis_beats_chance_on_unseen_tiles_and_csv(trained: Trained) -> None:
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.synthetic import render_tile_dataset, write_image_folder

    images, labels = render_tile_dataset(np.random.default_rng(99), 40, TILE)
    paths = write_image_folder(trained.root / "unseen", images, labels, CLASSES)
    out = trained.root / "unseen.csv"
    summary = diagnose_paths(paths, trained.onnx, out)
    assert summary.n_failed == 0 and summary.n_inputs == 40
    lines = out.read_text().splitlines()
    assert lines[0] == (
        "input,label,decision,n_crops,tiles_used,tiles_skipped,read_ms,diagnose_ms,error,input_sha256,overlay,tile_map,"
        "threshold,rule,prediction_set,crop_dispersion,refer_reasons,reject_reasons,quality_passed,quality_measures,"
        "image_um_per_px,scale_factor,p_parasitized,p_uninfected"
    )
    predicted = [row.split(",")[1] for row in lines[1:]]  # still images: no empty frame/time_s columns
    accuracy = np.mean([p == CLASSES[y] for p, y in zip(predicted, labels)])
    assert accuracy >= 0.75


def test_evaluate_and_bench_do_their_job(trained: Trained) -> None:
    from edgedx.runtime.bench import bench_model
    from edgedx.runtime.evaluate import evaluate_folder
    from edgedx.synthetic import render_tile_dataset, write_image_folder

    images, labels = render_tile_dataset(np.random.default_rng(7), 40, TILE)
    write_image_folder(trained.root / "labelled", images, labels, CLASSES)
    report = evaluate_folder(trained.onnx, trained.root / "labelled")
    m = report.metrics
    assert m["n"] == 40 and sum(map(sum, m["confusion"])) == 40
    assert m["accuracy"] >= 0.75 and m["auc"] >= 0.8
    from edgedx.runtime import load_model

    assert report.threshold == load_model(trained.onnx).card.threshold  # the operating point chosen in training
    assert 0 < report.threshold < 1

    bench = bench_model(trained.onnx, batch_sizes=(1, 4), min_runs=5, min_seconds=0.05)
    assert [r.batch_size for r in bench.rows] == [1, 4]
    for r in bench.rows:
        assert r.runs >= 5 and 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert r.images_per_s == pytest.approx(r.batch_size * 1000 / r.mean_ms)
    assert bench.providers[0] == "CPUExecutionProvider"


def test_bench_sweeps_artefacts_with_stages_parity_accuracy_and_environment(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.bench import bench_models
    from edgedx.runtime.tiling import plan_tiles
    from edgedx.training.checkpoint import load_checkpoint

    from edgedx.synthetic import render_tile_dataset, write_image_folder

    images, labels = render_tile_dataset(np.random.default_rng(8), 24, TILE)
    write_image_folder(tmp_path / "bench data", images, labels, CLASSES)
    report = bench_models(
        [trained.onnx], batch_sizes=(2,), image_sizes=[(237, 511)], data=tmp_path / "bench data",
        min_runs=3, min_seconds=0.05,
    )
    [row] = report.rows
    assert row.artefact == "model.onnx" and row.precision == "fp32" and row.device == "cpu"
    assert row.size_mb == pytest.approx(trained.onnx.stat().st_size / 1e6, abs=0.01)
    assert row.parity["top1_agreement"] == 1.0 and row.parity["passed"] is True  # from export_report.json beside it
    assert 0.75 <= row.accuracy <= 1.0
    [image] = report.image_rows
    card = load_checkpoint(trained.checkpoint).card
    assert image.image_size == (237, 511) and image.tiles == plan_tiles(237, 511, card.crop).n_tiles
    assert set(image.stages_ms) == {"decode", "tiling_preprocess", "inference", "merge"}
    assert all(v > 0 for v in image.stages_ms.values())
    assert sum(image.stages_ms.values()) <= image.p90_ms * 1.5
    assert image.tiles_per_s == pytest.approx(image.images_per_s * image.tiles)
    env = report.environment
    assert env["cores"] >= 1 and env["versions"]["onnxruntime"] and env["providers"]["model.onnx@cpu"][0] == "CPUExecutionProvider"
    assert json.loads(json.dumps(report.to_dict()))["image_rows"][0]["tiles"] == image.tiles


def test_embedding_api_on_array_and_path(trained: Trained) -> None:
    from edgedx.runtime import load_model

    model = load_model(trained.onnx)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, size=(50, 70), dtype=np.uint8)  # grey arrays are accepted
    result = model.diagnose(grey)
    assert result.n_crops == expected_crops(50, 70, TILE, TILE // 2)
    assert set(result.probabilities) == set(CLASSES)
    assert result.sliding.tile_map(0).shape == result.sliding.grid.shape


def test_evaluate_csv_and_npz_with_intervals_plots_and_html(trained: Trained, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from edgedx.runtime.evaluate import evaluate
    from edgedx.synthetic import render_tile_dataset

    images, labels = render_tile_dataset(np.random.default_rng(11), 30, TILE)
    card_classes = ("parasitized", "uninfected")  # the trained model's class order (sorted folder names)
    # npz: integer labels in the model's class order
    npz = tmp_path / "tiles set.npz"
    model_labels = np.asarray([card_classes.index(CLASSES[y]) for y in labels])
    np.savez(npz, val_images=images, val_labels=model_labels[:, None])
    report = evaluate(trained.onnx, npz, bootstrap=200, out=tmp_path / "report dir")
    m = report.metrics
    assert m["n"] == 30 and report.data.endswith("(val)")
    assert m["accuracy"] >= 0.7
    low, high = m["ci95"]["accuracy"]
    assert low <= m["accuracy"] <= high
    assert high - low > 0.05  # Wilson: never a point, not even for a perfect score on 30 images
    assert m["ci95_method"]["accuracy"] == "wilson" and m["ci95_method"]["auc"] == "bootstrap" and m["ci95_n"]["accuracy"] == 30
    assert m["at_0.5"]["threshold"] == 0.5 and m["threshold"] == report.threshold
    assert {"sensitivity", "specificity", "auc"} <= set(m)
    out = tmp_path / "report dir"
    for name in ("evaluation.json", "roc.png", "confusion_matrix.png", "radar.png", "report.html"):
        assert (out / name).stat().st_size > 500, name
    page = (out / "report.html").read_text()
    assert "Intended use" in page and "not a medical device" in page and "data:image/png;base64," in page
    # the same images as a CSV manifest give the same numbers
    from edgedx.runtime.io.image_io import write_image

    rows = ["path,label,split"]
    (tmp_path / "csv imgs").mkdir()
    for i, (image, y) in enumerate(zip(images, labels)):
        write_image(tmp_path / "csv imgs" / f"{i}.png", image)
        rows.append(f"csv imgs/{i}.png,{CLASSES[y]},val")
    rows.append("csv imgs/0.png,uninfected,train")  # other splits are ignored
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    again = evaluate(trained.onnx, tmp_path / "manifest.csv", bootstrap=0)
    assert again.metrics["accuracy"] == m["accuracy"] and again.metrics["n"] == 30


def test_evaluate_scores_the_runs_own_held_out_split_and_matches_the_card(trained: Trained, tmp_path: Path) -> None:
    """`edgedx evaluate MODEL RUN_DIR`: the run's validation images, with the labels training used, through diagnose's path."""
    from edgedx.errors import InputError
    from edgedx.runtime.evaluate import evaluate
    from edgedx.training.checkpoint import load_checkpoint

    run = trained.checkpoint.parent
    card = load_checkpoint(trained.checkpoint).card
    report = evaluate(trained.onnx, run, split="val", bootstrap=0)
    assert report.metrics["n"] == card.metrics["n"] and "val split of the run" in report.data
    assert report.metrics["accuracy"] == pytest.approx(card.metrics["accuracy"], abs=1e-9)  # the card = the deployed path
    with pytest.raises(InputError, match=r"has no 'test' split; it holds \['val'\]"):
        evaluate(trained.onnx, run, split="test", bootstrap=0)
    manifest = tmp_path / "all.csv"
    manifest.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(trained.data.rglob("*.png"))[:4]), encoding="utf-8")
    with pytest.raises(InputError, match=r"no split column, so --split val cannot pick its val rows.*--split all"):
        evaluate(trained.onnx, manifest, split="val", bootstrap=0)
    assert evaluate(trained.onnx, manifest, split="all", bootstrap=0).metrics["n"] == 4
