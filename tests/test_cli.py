"""The CLI is thin: each command makes one library call with the user's arguments.

Library calls are patched and their arguments asserted (fast, no model needed);
error handling is checked through the real entry point in a subprocess.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from conftest import run_edgedx
from edgedx.cli import app
from edgedx.runtime.io.manifest import ManifestLayout
from tests.fakes import fake_train

runner = CliRunner()
COMMANDS = ("train", "export", "diagnose", "evaluate", "bench", "demo", "models", "audit")


@pytest.fixture(autouse=True)
def named_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The paths the patched commands name exist (train and export check them before importing torch)."""
    cwd = tmp_path / "cwd"
    for folder in ("my data", "isic", "data", "cal dir", "labelled", "run"):
        (cwd / folder).mkdir(parents=True)
    (cwd / "run" / "model.pt").write_bytes(b"")
    monkeypatch.chdir(cwd)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_top_level_help_lists_commands_and_version() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    assert runner.invoke(app, ["--version"]).output.strip().startswith("edgedx ")


def test_train_passes_options_through() -> None:
    from edgedx.training.train import TrainConfig

    fake = fake_train({"splits": {"note": "no patient ids: images of one patient may be in several splits"}})
    with mock.patch("edgedx.training.train.train", fake):
        result = runner.invoke(
            app,
            ["train", "my data", "--out", "run dir", "--arch", "resnet18", "--epochs", "3", "--input-size", "64",
             "--weights", "none", "--positive-class", "melanoma", "--seed", "7", "--strategy", "last:2",
             "--imbalance", "sampler", "--augment", "dermoscopy", "--patience", "2", "--labels", "a, b",
             "--optimizer", "sgd", "--schedule", "plateau", "--monitor", "auc", "--resume"],
        )
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(
        Path("my data"), Path("run dir"),
        TrainConfig(arch="resnet18", epochs=3, input_size=64, weights="none", positive_class="melanoma", seed=7,
                    strategy="last:2", imbalance="sampler", augmentation="dermoscopy", patience=2, label_columns=("a", "b"),
                    optimizer="sgd", schedule="plateau", monitor="auc", resume=True),
        nproc=1, folds=None, progress=mock.ANY,
    )
    assert "val accuracy 0.900" in result.output and "no patient ids" in result.output


def test_train_passes_hard_negative_options() -> None:
    from edgedx.training.train import TrainConfig

    fake = fake_train()
    with mock.patch("edgedx.training.train.train", fake):
        result = runner.invoke(
            app,
            ["train", "data", "--out", "run", "--hard-negatives", "fields", "--hard-negative-annotations", "fields/annotations.json",
             "--hard-negative-rounds", "3", "--hard-negative-epochs", "4", "--hard-negative-max", "50", "--mine-positives",
             "--mine-positive-margin", "0"],
        )
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(
        Path("data"), Path("run"),
        TrainConfig(hard_negatives="fields", hard_negative_annotations=str(Path("fields/annotations.json")), hard_negative_rounds=3,
                    hard_negative_epochs=4, hard_negative_max=50, mine_positives=True, mine_positive_margin=0.0),
        nproc=1, folds=None, progress=mock.ANY,
    )


def test_train_states_the_positive_class_and_what_the_threshold_targets() -> None:
    fake = mock.MagicMock()
    fake.return_value.card.metrics = {"accuracy": 0.7, "balanced_accuracy": 0.7, "macro_auc": 0.8, "target_sensitivity": 0.95,
                                      "sensitivity": 0.96, "specificity": 0.41}
    fake.return_value.card.task = "binary"
    fake.return_value.card.positive_class = "MEL"
    fake.return_value.card.threshold = 0.31
    fake.return_value.summary = {
        "warnings": ["validation AUC is 0.440 (≤ 0.6; 0.5 is chance): the model barely separates the classes"],
        "test": {"n": 20, "accuracy": 0.8, "balanced_accuracy": 0.75, "macro_auc": 0.82},
    }
    fake.return_value.skipped = ()
    with mock.patch("edgedx.training.train.train", fake):
        result = runner.invoke(app, ["train", "isic", "--out", "run", "--positive-class", "MEL"])
    assert result.exit_code == 0, result.output
    assert "positive class: MEL (the class this model screens for); threshold 0.310 chosen on validation for sensitivity ≥ 0.950 to MEL" in result.output
    assert "p(MEL) ≥ 0.310 → MEL" in result.output
    assert "val accuracy 0.700 and balanced accuracy 0.700 (at threshold 0.31), AUC 0.800" in result.output
    assert "held-out test split (n 20, at the same threshold): accuracy 0.800, balanced accuracy 0.750, AUC 0.820" in result.output
    out = result.output
    assert "warning: validation AUC is 0.440" in out and out.index("warning:") < out.index("not ready to deploy") < out.index("next: edgedx export")


def test_train_and_evaluate_read_isic_labels_csv_with_the_same_options(tmp_path: Path) -> None:
    """ISIC's own labels.csv: ids without suffix in an ``image`` column, images in a folder, class in ``diagnosis``."""
    from edgedx.training.train import TrainConfig

    isic = ["--path-column", "image", "--image-dir", "isic/images", "--suffix", ".jpg", "--label-column", "diagnosis"]
    fake = fake_train()
    (tmp_path / "labels.csv").write_text("image,diagnosis\n", encoding="utf-8")
    with mock.patch("edgedx.training.train.train", fake):
        result = runner.invoke(app, ["train", str(tmp_path / "labels.csv"), "--out", "run", *isic])
    assert result.exit_code == 0, result.output
    config = fake.call_args.args[2]
    assert config == TrainConfig(path_column="image", image_dir="isic/images", suffix=".jpg", label_column="diagnosis")
    assert config.image_dir == str(Path("isic/images").absolute())  # recorded absolute: export reloads from anywhere
    assert config.layout() == ManifestLayout("image", "diagnosis", "isic/images", ".jpg")

    evaluate = mock.MagicMock()
    evaluate.return_value.metrics = {"n": 2, "accuracy": 1.0, "balanced_accuracy": 1.0, "auc": 1.0, "per_class": {}}
    evaluate.return_value.failed = ()
    evaluate.return_value.threshold = 0.5
    evaluate.return_value.data = "labels.csv"
    with mock.patch("edgedx.runtime.evaluate.evaluate", evaluate):
        result = runner.invoke(app, ["evaluate", "m.onnx", "labels.csv", "--split", "all", *isic])
    assert result.exit_code == 0, result.output
    assert evaluate.call_args.kwargs["layout"] == ManifestLayout("image", "diagnosis", "isic/images", ".jpg")


def test_epoch_lines_are_shown_without_verbose_and_stay() -> None:
    """nohup edgedx train > log: every epoch must be in the log, as a plain line, with or without -v."""
    import logging

    def fake_train(*args: object, **kwargs: object) -> mock.MagicMock:
        logging.getLogger("edgedx.steps").info("epoch 1/2: train loss 0.700, val loss 0.650; val balanced accuracy 0.600")
        logging.getLogger("edgedx.training.train").info("a detail for -v only")
        result = mock.MagicMock()
        result.card.metrics = {"accuracy": 0.9, "balanced_accuracy": 0.8, "macro_auc": 0.95}
        result.card.task = "multiclass"
        result.summary, result.skipped = {}, ()
        return result

    with mock.patch("edgedx.training.train.train", fake_train):
        quiet = runner.invoke(app, ["train", "data", "--out", "run"])
        verbose = runner.invoke(app, ["-v", "train", "data", "--out", "run"])
    assert quiet.exit_code == 0, quiet.output
    assert "epoch 1/2: train loss 0.700, val loss 0.650; val balanced accuracy 0.600\n" in quiet.output
    assert "a detail for -v only" not in quiet.output and "a detail for -v only" in verbose.output
    assert verbose.output.count("epoch 1/2: train loss") == 1  # not twice (step handler and root handler)


def test_train_folds_prints_the_cross_validation_summary() -> None:
    from edgedx.training.train import CrossValidationResult, TrainConfig

    summary = {"folds": 3, "accuracy": {"mean": 0.8, "sd": 0.05}, "macro_auc": None}
    with mock.patch("edgedx.training.train.train", return_value=CrossValidationResult((), summary)) as one_call:
        result = runner.invoke(app, ["train", "data", "--out", "run", "--folds", "3"])
    assert result.exit_code == 0, result.output
    one_call.assert_called_once_with(Path("data"), Path("run"), TrainConfig(), nproc=1, folds=3, progress=mock.ANY)
    assert "accuracy: 0.800 ± 0.050 over 3 folds" in result.output and "per-fold runs and cv_summary.json: run" in result.output


def test_train_nproc_hands_the_run_to_the_launcher() -> None:
    from edgedx.training.train import TrainConfig

    fake = mock.MagicMock()
    fake.return_value.card.metrics = {"accuracy": 0.75, "balanced_accuracy": 0.7, "macro_auc": 0.8}
    fake.return_value.card.task = "multiclass"
    fake.return_value.summary = {}
    fake.return_value.skipped = ()
    single = mock.MagicMock()
    with mock.patch("edgedx.training.distributed.launch_train", fake), mock.patch("edgedx.training.train.train_run", single):
        result = runner.invoke(app, ["train", "data", "--out", "run", "--nproc", "2", "--batch-size", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(Path("data"), Path("run"), TrainConfig(batch_size=16, device="cpu"), nproc=2, folds=None)
    single.assert_not_called()
    assert "val accuracy 0.750" in result.output


def test_export_passes_options_through(tmp_path: Path) -> None:
    from edgedx.export.pipeline import ExportOptions

    fake = mock.MagicMock()
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"x" * 2000)
    parity = {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "max_prob_delta": 1e-7,
              "labelled": {"accuracy": 0.9, "accuracy_delta": 0.0, "n": 10}}
    fake.return_value.onnx_path = onnx_file
    fake.return_value.artefacts = [
        {"path": "model.onnx", "format": "onnx", "precision": "fp32", "bytes": 2000, "parity": parity},
        {"path": "model.int8.onnx", "format": "onnx", "precision": "int8", "bytes": 700, "parity": {**parity, "labelled": None}},
    ]
    fake.return_value.path_of = lambda a: tmp_path / a["path"]
    fake.return_value.bundle_path = tmp_path / "model.edgedx-bundle.zip"
    fake.return_value.data = {"verification": {"n_samples": 10, "n_crops": 14, "n_real": 10, "n_labelled": 10, "source": "val split"}}
    fake.return_value.batchnorm = {"in_model": 5, "folded_by_exporter": 5, "folded_into_conv": 0, "converted_to_affine": 0, "remaining": 0}
    with mock.patch("edgedx.export.pipeline.export_checkpoint", fake):
        result = runner.invoke(
            app,
            ["export", "run/model.pt", "--out", "exp", "--opset", "20", "--precision", "int8,fp16", "--mobile",
             "--embed-preprocessing", "--calibration", "cal dir", "--verify-data", "labelled",
             "--engine-batch", "2,4,16", "--workspace-gib", "1.5", "--fixed-batch", "4", "--bundle", "--embed-resample"],
        )
    assert result.exit_code == 0, result.output
    expected = ExportOptions(
        precisions=("fp32", "fp16", "int8"), mobile=True, embed_preprocessing=True,
        calibration=Path("cal dir"), verify_data=Path("labelled"), opset=20, engine_batch=(2, 4, 16), workspace_gib=1.5,
        fixed_batch=4, bundle=True, embed_resample=True,
    )
    fake.assert_called_once_with(Path("run/model.pt"), Path("exp"), expected, progress=mock.ANY)
    assert "model.int8.onnx  0.0 MB  int8 onnx" in result.output
    assert "bundle for the vendor: " in result.output and "edgedx verify " in result.output
    assert "verified as diagnose runs on 10 images (14 crops; 10 real, 10 labelled: val split)" in result.output
    assert "accuracy 0.900 (Δ +0.000 on 10)" in result.output and "edgedx diagnose" in result.output


def test_export_of_a_cross_validation_folder_exports_its_fold_ensemble(tmp_path: Path) -> None:
    from edgedx.export.pipeline import ExportOptions

    (Path("cv") / "fold_1").mkdir(parents=True)
    (Path("cv") / "cv_summary.json").write_text("{}")
    fake = mock.MagicMock()
    fake.return_value.onnx_path = tmp_path / "ensemble.onnx"
    fake.return_value.artefacts = []
    fake.return_value.data = {"verification": {"n_samples": 16, "n_crops": 16, "n_real": 16, "n_labelled": 16, "source": "val split"}}
    fake.return_value.batchnorm = {"in_model": 10, "folded_by_exporter": 10, "folded_into_conv": 0, "converted_to_affine": 0, "remaining": 0}
    single = mock.MagicMock()
    with mock.patch("edgedx.export.ensemble.export_folds", fake), mock.patch("edgedx.export.pipeline.export_checkpoint", single):
        result = runner.invoke(app, ["export", "cv", "--out", "exp", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(Path("cv"), Path("exp"), ExportOptions(precisions=("fp32", "fp16")), progress=mock.ANY)
    single.assert_not_called()
    assert "next: edgedx diagnose IMAGES... --model " in result.output


def fake_diagnosed(n_failed: int = 0, n_resumed: int = 0, records: tuple = ()) -> mock.MagicMock:
    """What edgedx.runtime.diagnose.diagnose returns, as the CLI reads it."""
    done = mock.MagicMock()
    done.summary.n_failed, done.summary.n_resumed, done.summary.n_inputs = n_failed, n_resumed, 2
    done.summary.n_ok = 2 - n_failed
    done.summary.label_counts = {"a": 2}
    done.summary.seconds = 0.5
    done.summary.overlays = ()
    done.summary.out = Path("o.csv")
    done.records = records
    return done


def test_diagnose_passes_options_through() -> None:
    """One library call: the inputs and one DiagnoseOptions; the rules (engine, watch, out) are the library's."""
    from edgedx.runtime.options import DiagnoseOptions

    fake = mock.MagicMock(return_value=fake_diagnosed())
    with mock.patch("edgedx.runtime.diagnose.diagnose", fake):
        result = runner.invoke(
            app, ["diagnose", "a.png", "scans/*.jpg", "--model", "m.onnx", "--out", "o.csv", "--batch-size", "8", "--device", "cuda"]
        )
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(
        ["a.png", "scans/*.jpg"], DiagnoseOptions(model=Path("m.onnx"), out=Path("o.csv"), device="cuda", batch_size=8), progress=mock.ANY
    )
    assert "2 diagnosed (2 a), 0 failed, 0.5s → o.csv" in result.output


def test_diagnose_passes_crop_overrides_feeds_and_audit() -> None:
    from edgedx.runtime.options import DiagnoseOptions

    fake = mock.MagicMock(return_value=fake_diagnosed(n_resumed=3))
    with mock.patch("edgedx.runtime.diagnose.diagnose", fake):
        result = runner.invoke(
            app,
            ["diagnose", "smear.avi", "camera:0", "--model", "m.engine", "--out", "o.jsonl", "--resume", "--audit", "audit log.jsonl",
             "--refer-band", "0.3,0.7", "--aggregation", "top_k_mean", "--top-k", "5", "--tile", "64", "--stride", "32,48",
             "--scale", "0.78", "--padding", "reflect", "--min-foreground", "0.2", "--centre-weighting", "gaussian",
             "--every", "10", "--window", "3", "--max-frames", "50", "--maps", "maps", "--audit-names", "hash",
             "--reconnect", "2", "--max-pixels", "1000000"],
        )
    assert result.exit_code == 0, result.output
    crop = {
        "aggregation": "top_k_mean", "top_k": 5, "tile_size": (64, 64), "stride": (32, 48), "scale": 0.78,
        "padding": "reflect", "min_foreground": 0.2, "centre_weighting": "gaussian",
    }
    fake.assert_called_once_with(
        ["smear.avi", "camera:0"],
        DiagnoseOptions(
            model=Path("m.engine"), out=Path("o.jsonl"), maps=Path("maps"), resume=True, audit=Path("audit log.jsonl"),
            audit_names="hash", crop=crop, refer_band=(0.3, 0.7), every=10, window=3, max_frames=50, reconnect=2, max_pixels=1000000,
        ),
        progress=mock.ANY,
    )
    assert "3 already done" in result.output


def test_diagnose_engine_ray_and_watch_are_options_of_the_one_call() -> None:
    from edgedx.runtime.options import DiagnoseOptions

    fake = mock.MagicMock(return_value=fake_diagnosed())
    with mock.patch("edgedx.runtime.diagnose.diagnose", fake):
        result = runner.invoke(
            app,
            ["diagnose", "scans", "--model", "m.onnx", "--out", "shards.parquet", "--engine", "ray", "--address", "ray://head:10001",
             "--device", "cuda", "--batch-size", "16", "--tile", "64", "--refer-band", "0.3,0.7", "--overwrite"],
        )
        assert result.exit_code == 0, result.output
        watched = runner.invoke(app, ["diagnose", "--watch", "scanner out", "--model", "m.onnx", "--out", "o.jsonl", "--idle-timeout", "60"])
        assert watched.exit_code == 0, watched.output
        listed = runner.invoke(app, ["diagnose", "--slides", "day 3/slides.csv", "--model", "m.onnx", "--out", "o.jsonl"])
        assert listed.exit_code == 0, listed.output
    assert fake.call_args_list == [
        mock.call(["scans"], DiagnoseOptions(
            model=Path("m.onnx"), out=Path("shards.parquet"), engine="ray", address="ray://head:10001", device="cuda", batch_size=16,
            crop={"tile_size": (64, 64)}, refer_band=(0.3, 0.7), overwrite=True), progress=mock.ANY),
        mock.call([], DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), watch=Path("scanner out"), idle_timeout_s=60.0), progress=mock.ANY),
        mock.call([], DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), slides=Path("day 3/slides.csv")), progress=mock.ANY),
    ]


def test_diagnose_refusals_are_one_line_errors() -> None:
    """The library's rules reach the user as one line, exit 1, no traceback."""
    for args, named in (
        (["scans", "--out", "o.jsonl", "--engine", "ray", "--resume"], "--resume work only with the local engine"),
        (["scans", "--out", "o.jsonl", "--address", "auto"], "--engine ray"),
        (["scans", "--out", "o.jsonl", "--engine", "spark"], "'spark'"),
        (["--watch", "in"], "give --out FILE"),
        (["--slides", "s.csv", "--out", "o.jsonl", "--engine", "ray"], "--slides work only with the local engine"),
        (["--slides", "s.csv"], "--slides writes its slide summary beside the results file (OUT.slides.jsonl): give --out FILE"),
    ):
        refused = runner.invoke(app, ["diagnose", "--model", "m.onnx", *args])
        assert refused.exit_code == 1 and named in str(refused.exception), (args, refused.exception)


def test_evaluate_bench_demo_pass_options_through(tmp_path: Path) -> None:
    evaluate = mock.MagicMock()
    evaluate.return_value.metrics = {"n": 2, "accuracy": 1.0, "balanced_accuracy": 1.0, "auc": 1.0, "per_class": {}}
    evaluate.return_value.failed = ()
    evaluate.return_value.threshold = 0.5
    evaluate.return_value.data = "data"
    evaluate.return_value.n_misclassified = 3
    with mock.patch("edgedx.runtime.evaluate.evaluate", evaluate):
        result = runner.invoke(app, ["evaluate", "m.onnx", "data.npz", "--split", "train", "--out", "rep", "--bootstrap", "50"])
        assert result.exit_code == 0, result.output
    assert f"3 misclassified image(s) at threshold 0.500, most confidently wrong first: {Path('rep') / 'misclassified.csv'}" in result.output
    evaluate.assert_called_once_with(
        Path("m.onnx"), Path("data.npz"), split="train", device="cpu", bootstrap=50, out=Path("rep"), layout=ManifestLayout(),
        progress=mock.ANY,
    )

    bench = mock.MagicMock()
    bench.return_value.rows = ()
    bench.return_value.image_rows = ()
    bench.return_value.environment = {"cpu": "x86", "cores": 2, "gpu": "unknown"}
    with mock.patch("edgedx.runtime.bench.bench_models", bench):
        result = runner.invoke(
            app,
            ["bench", "m.onnx", "m.int8.onnx", "--batch-sizes", "1,4,16", "--seconds", "0.5", "--devices", "cpu,cuda",
             "--image-sizes", "1280x960,511x237", "--data", "val dir"],
        )
        assert result.exit_code == 0, result.output
    bench.assert_called_once_with(
        [Path("m.onnx"), Path("m.int8.onnx")], batch_sizes=[1, 4, 16], devices=["cpu", "cuda"],
        image_sizes=[(960, 1280), (237, 511)], data=Path("val dir"), threads=None, min_seconds=0.5, progress=mock.ANY,
    )
    bad = runner.invoke(app, ["bench", "m.onnx", "--batch-sizes", "1,x"])
    assert bad.exit_code == 1 and "--batch-sizes takes comma-separated integers, got '1,x'" in str(bad.exception)  # one exit code for bad values

    demo = mock.MagicMock()
    demo.return_value.rows = ()
    demo.return_value.paths = {"diagnoses": tmp_path / "d.jsonl"}
    demo.return_value.val_accuracy = demo.return_value.parity_max_abs_diff = demo.return_value.seconds = 0.0
    demo.return_value.fields_correct = 0
    with mock.patch("edgedx.demo.run_demo", demo):
        result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    demo.assert_called_once_with(tmp_path, seed=0, progress=mock.ANY)
    assert "synthetic" in result.output and str(tmp_path / "d.jsonl") in result.output


def _assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_input_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_edgedx("diagnose", str(tmp_path / "nope.png"), "--model", "m.onnx", "--out", str(tmp_path / "o.jsonl"))
    _assert_one_line_error(proc, "input not found", "nope.png")


def test_model_without_card_is_a_one_line_error(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input"], ["logits"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3, 8, 8])],
    )
    path = tmp_path / "no card.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    image = tmp_path / "x.png"
    from edgedx.runtime.io.image_io import write_image
    import numpy as np

    write_image(image, np.zeros((8, 8, 3), np.uint8))
    proc = run_edgedx("diagnose", str(image), "--model", str(path), "--out", str(tmp_path / "o.jsonl"))
    _assert_one_line_error(proc, "has no EdgeDx model card", "edgedx export")


def test_checkpoint_without_card_is_a_one_line_error(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    proc = run_edgedx("export", str(path), "--out", str(tmp_path / "out"))
    _assert_one_line_error(proc, "not an EdgeDx checkpoint", "edgedx train")


def test_bad_output_suffix_and_empty_data_folder(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    proc = run_edgedx("diagnose", str(image), "--model", "m.onnx", "--out", str(tmp_path / "o.txt"))
    _assert_one_line_error(proc, ".jsonl or .csv")
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir()
    proc = run_edgedx("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--weights", "none", "--arch", "resnet18")
    _assert_one_line_error(proc, "contains no images")


def test_unknown_arch_suggests_close_matches(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    proc = run_edgedx("train", str(tmp_path), "--out", str(tmp_path / "run"), "--arch", "resnet5O")
    _assert_one_line_error(proc, "unknown architecture 'resnet5O'", "resnet50")


def test_unknown_precision_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"")  # there: the option's own error is the one shown
    proc = run_edgedx("export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--precision", "fp32,int4")
    _assert_one_line_error(proc, "unknown precision 'int4'", "fp32, fp16, int8")


def test_bad_engine_batch_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"")  # there: the option's own error is the one shown
    proc = run_edgedx("export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--engine-batch", "8,1")
    _assert_one_line_error(proc, "--engine-batch must be three whole numbers", "'8,1'")
    proc = run_edgedx("export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--engine-batch", "8,4,32")
    _assert_one_line_error(proc, "1 <= min <= opt <= max", "(8, 4, 32)")


def test_bad_diagnose_options_are_one_line_errors(tmp_path: Path) -> None:
    proc = run_edgedx("diagnose", "a.png", "--model", "m.onnx", "--out", str(tmp_path / "o.jsonl"), "--tile", "64,x")
    _assert_one_line_error(proc, "--tile must be N or H,W", "'64,x'")
    proc = run_edgedx("diagnose", "a.png", "--model", "m.onnx", "--out", str(tmp_path / "o.jsonl"), "--refer-band", "0.3")
    _assert_one_line_error(proc, "--refer-band must be LOW,HIGH", "'0.3'")
    proc = run_edgedx("diagnose", "--model", "m.onnx", "--out", str(tmp_path / "o.jsonl"))
    _assert_one_line_error(proc, "no inputs given", "--watch")


def test_models_lists_the_bundled_model_with_its_card() -> None:
    pytest.importorskip("onnxruntime")
    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert all(len(line.rstrip()) <= 80 for line in result.output.splitlines()), result.output  # readable in 80 columns
    words = " ".join(result.output.split())  # the grid wraps long values
    assert "isic_mel_nv (default)" in words and "melanoma vs nevus (screens for melanoma)" in words
    assert "not a medical device" in words and "auc 0.795" in words and "at threshold 0.112" in words
    assert "p(melanoma) ≥ 0.112 → melanoma (out of fold, 95% 0.015-0.197)" in words  # where the threshold came from
    assert "out of fold auc" in words and "validation auc" not in words  # the metrics are labelled by the split they came from
    assert "Held out (96 images no fold saw" in words  # and the held-out result on the shipped file stands beside them


def test_switches_show_no_type_in_help() -> None:
    """``--strict`` takes no value: help must not show it as ``--strict <bool>`` (typer's default)."""
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--strict" in result.output and "--resume" in result.output
    assert "<bool>" not in result.output and "<int>" in result.output  # value options keep their type


def test_help_shows_extras_literally() -> None:
    """Rich reads "[ray]" as markup and would drop it: the pip extra must survive into the help."""
    diagnose_help = runner.invoke(app, ["diagnose", "--help"], env={"COLUMNS": "400"}).output
    export_help = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "400"}).output
    assert "edgedx[ray]" in diagnose_help
    assert "edgedx[trt]" in export_help and "edgedx[simplify]" in export_help


def test_diagnose_without_out_shows_a_table() -> None:
    records = (
        {"input": "a.jpg", "decision": "melanoma", "rule": "p(melanoma) = 0.480 ≥ threshold 0.310 → melanoma", "error": None},
        {"input": "b.jpg", "decision": None, "rule": None, "error": "b.jpg: empty file (0 bytes)"},
    )
    fake = mock.MagicMock(return_value=fake_diagnosed(n_failed=1, records=records))
    with mock.patch("edgedx.runtime.diagnose.diagnose", fake):
        result = runner.invoke(app, ["diagnose", "a.jpg", "b.jpg", "--model", "m.onnx", "--refer-band", "0.3,0.7"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    options = fake.call_args.args[1]
    assert fake.call_args.args[0] == ["a.jpg", "b.jpg"] and options.out is None and options.refer_band == (0.3, 0.7)
    assert "p(melanoma) = 0.480 ≥ threshold 0.310 → melanoma" in result.output and "empty file (0 bytes)" in result.output
    assert "give --out FILE to keep the records" in result.output and "their reasons are in the table" in result.output


def test_missing_paths_fail_before_torch_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.") or m.startswith("edgedx.training") or m.startswith("edgedx.export")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch now fails: the errors must come first
    result = runner.invoke(app, ["train", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "training data not found" in str(result.exception)
    result = runner.invoke(app, ["export", str(tmp_path / "model.pt"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "checkpoint not found" in str(result.exception)


def test_train_folds_says_what_was_chosen_out_of_fold_and_what_is_the_result() -> None:
    from edgedx.training.train import CrossValidationResult, TrainConfig

    summary = {
        "folds": 5, "accuracy": {"mean": 0.8, "sd": 0.05},
        "epoch_selection": {"method": "out_of_fold", "monitor": "balanced_accuracy", "chosen": 7},
        "out_of_fold": {"n": 468, "threshold": 0.31, "metrics": {"accuracy": 0.81, "auc": 0.88, "sensitivity": 0.95, "specificity": 0.4},
                        "ci95": {"auc": [0.84, 0.91]}},
        "held_out_spread": {"auc": {"mean": 0.86, "sd": 0.02, "min": 0.83, "max": 0.89, "n_folds": 5}},
        "warnings": ["sensitivity 0.95 costs nearly all specificity here"], "ensemble": "run/ensemble.pt",
    }
    with mock.patch("edgedx.training.train.train", return_value=CrossValidationResult((), summary)) as one_call:
        result = runner.invoke(app, ["train", "data", "--out", "run", "--folds", "5", "--epoch-selection", "out_of_fold"])
    assert result.exit_code == 0, result.output
    one_call.assert_called_once_with(Path("data"), Path("run"), TrainConfig(epoch_selection="out_of_fold"), nproc=1, folds=5, progress=mock.ANY)
    out = " ".join(result.output.split())
    assert "epoch 7 chosen on the folds' mean validation balanced accuracy" in out
    assert "out-of-fold (n 468, used for selection): accuracy 0.810, AUC 0.880 [0.840, 0.910]" in out
    assert "held-out test split, each fold model (5 folds): auc 0.860 ± 0.020" in out
    assert "warning: sensitivity 0.95 costs nearly all specificity" in out and "edgedx export run" in out


def test_fit_fields_passes_its_options_to_the_one_library_call() -> None:
    from edgedx.export.fit_fields import FieldFitReport, FitFieldsOptions

    Path("m.onnx").write_bytes(b"")
    point = {"found": 5, "n_parasites": 6, "false_per_field": 0.5, "n_fields": 8,
             "field": {"n_positive_fields": 4, "sensitivity": 1.0, "sensitivity_ci95": [0.5, 1.0], "specificity": 1.0, "specificity_ci95": [0.5, 1.0]}}
    slides = {"fitted": True, "n_slides": 6, "sensitivity": 1.0, "specificity": 0.5}
    detection = {"tile_threshold": 0.9, "field_rule": "any", "field_k": 1, "field_threshold": None, "slide_rule": "count_at_least", "slide_k": 2,
                 "fitted_on": {"slides": slides}}
    report = FieldFitReport("m.onnx", "ab" * 32, "out/m.fields.onnx", "cd" * 32, "out/fit_fields_report.json", detection, point, point,
                            [{"fp_per_field": 1.0, "threshold": 0.9, "found": 5, "false_per_field": 0.5}], [], {"n_scored": 8}, {"passed": True}, 1.0,
                            neighbour_context=0.45)
    fake = mock.MagicMock(return_value=report)
    with mock.patch("edgedx.export.fit_fields.fit_fields", fake):
        result = runner.invoke(app, ["fit-fields", "m.onnx", "data", "--annotations", "a.json", "-o", "out", "--fp-per-field", "0.5",
                                     "--no-count-cells", "--field-rule", "count_at_least", "--slide-k", "2", "--seed", "3", "--slides", "s.csv",
                                     "--neighbour-context", "0.45"])
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(
        Path("m.onnx"), Path("data"), Path("a.json"), Path("out"),
        FitFieldsOptions(fp_per_field=0.5, count_cells=False, field_rule="count_at_least", slide_k=2, seed=3, neighbour_context=0.45), progress=mock.ANY,
        slides=Path("s.csv"),
    )
    assert "slide rule count_at_least (k 2, fitted on 6 slides: sensitivity 1.000, specificity 0.500, optimistic)" in result.output
    assert "tile threshold 0.9" in result.output and "cross-fitted" in result.output and "new model: out/m.fields.onnx" in result.output
    assert "crops: each blended 0.45 with its brightest grid neighbour" in " ".join(result.output.split())


def test_evaluate_with_annotations_is_the_same_one_call_with_the_annotations() -> None:
    from edgedx.runtime.evaluate import FieldEvaluationReport

    point = {"tile_threshold": 0.9, "found": 5, "n_parasites": 6, "false_per_field": 0.5, "n_fields": 8,
             "field": {"n_positive_fields": 4, "sensitivity": 1.0, "sensitivity_ci95": None, "specificity": 0.75, "specificity_ci95": None},
             "parasitaemia": {"mae_points": 0.4, "n_fields": 8}}
    slides = {"grouped_by": "manifest", "n_slides": 3, "n_positive_slides": 2, "rule": "any_field", "sensitivity": 1.0,
              "sensitivity_ci95": [0.34, 1.0], "specificity": 0.0, "specificity_ci95": [0.0, 0.79], "parasitaemia_mae_points": 0.25}
    report = FieldEvaluationReport("m.onnx", "data", "a.json", {"field_rule": "any", "field_k": 1}, point,
                                   [{"fp_per_field": 1.0, "threshold": 0.9, "found": 5, "false_per_field": 0.5}], [], [], {"n_scored": 8},
                                   slides=slides)
    evaluate = mock.MagicMock(return_value=report)
    with mock.patch("edgedx.runtime.evaluate.evaluate", evaluate):
        result = runner.invoke(app, ["evaluate", "m.onnx", "data", "--annotations", "a.json", "--out", "rep", "--slides", "s.csv"])
    assert result.exit_code == 0, result.output
    evaluate.assert_called_once_with(
        Path("m.onnx"), Path("data"), split="val", device="cpu", bootstrap=1000, out=Path("rep"), layout=ManifestLayout(),
        progress=mock.ANY, annotations=Path("a.json"), slides=Path("s.csv"),
    )
    assert "parasites found 5 of 6" in result.output and "specificity 0.750" in result.output and "parasitaemia" in result.output
    assert "slides (3, 2 positive, grouped by manifest; rule any_field): sensitivity 1.000 [0.340, 1.000], specificity 0.000" in result.output
