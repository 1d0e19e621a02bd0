"""The one diagnosis entry point: DiagnoseOptions validated once, then local, hot folder or Ray.

The engines themselves are tested elsewhere (test_runtime_e2e, test_reliability, test_ray_engine); here they are
replaced by fakes so the dispatch and the rules are checked in milliseconds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import pytest

from edgedx.errors import InputError
from edgedx.runtime import diagnose as entry
from edgedx.runtime.batch import DiagnoseSummary
from edgedx.runtime.options import DiagnoseOptions
from edgedx.runtime.outputs.records import RecordWriter, empty_record


def summary(out: Path | None) -> DiagnoseSummary:
    return DiagnoseSummary(Path(out or "x.jsonl"), 1, 0, {"a": 1}, 0.1)


@pytest.mark.parametrize(
    ("options", "inputs", "message"),
    [
        (DiagnoseOptions(out=Path("o.jsonl"), engine="spark"), ["a.png"], "--engine must be local or ray, got 'spark'"),
        (DiagnoseOptions(out=Path("o.jsonl"), address="auto"), ["a.png"], "--address names a Ray cluster: add --engine ray"),
        (DiagnoseOptions(out=Path("o"), engine="ray", resume=True), ["a"], "--resume work only with the local engine"),
        (DiagnoseOptions(out=Path("o"), engine="ray", every=5), ["a"], "--every/--window/--max-frames work only with the local engine"),
        (DiagnoseOptions(engine="ray"), ["a"], "--watch and --engine ray write their records to a file: give --out FILE"),
        (DiagnoseOptions(watch=Path("in")), [], "give --out FILE"),
        (DiagnoseOptions(out=Path("o.jsonl"), watch=Path("in")), ["a.png"], "give either inputs or --watch FOLDER, not both"),
        (DiagnoseOptions(out=Path("o.jsonl")), [], "no inputs given; name image files, folders, globs, videos or camera:N"),
        (DiagnoseOptions(out=Path("o.jsonl"), resume=True, overwrite=True), ["a"], "give one of them"),
        (DiagnoseOptions(out=Path("o.jsonl"), every=0), ["a"], "--every and --window must be at least 1, got 0 and 5"),
        (DiagnoseOptions(out=Path("o.jsonl"), audit_names="name"), ["a"], "--audit-names must be path or hash, got 'name'"),
        (DiagnoseOptions(out=Path("o.jsonl"), batch_size=0), ["a"], "batch size must be at least 1, got 0"),
    ],
)
def test_the_rules_are_checked_once_before_any_file_is_read(options: DiagnoseOptions, inputs: list[str], message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        entry.diagnose(inputs, options)


def test_paths_become_paths_and_the_mode_follows_resume_and_overwrite() -> None:
    options = DiagnoseOptions(out="o.jsonl", overlays="ov", watch="in dir")  # type: ignore[arg-type]
    assert options.out == Path("o.jsonl") and options.overlays == Path("ov") and options.watch == Path("in dir")
    assert DiagnoseOptions().mode == "auto" and DiagnoseOptions(resume=True).mode == "resume"
    assert DiagnoseOptions(overwrite=True).mode == "overwrite"


def test_local_files_go_to_diagnose_paths_with_the_same_options() -> None:
    options = DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), batch_size=8, refer_band=(0.3, 0.7))
    with mock.patch.object(entry, "diagnose_paths", return_value=summary(options.out)) as local:
        done = entry.diagnose(["a.png"], options)
    local.assert_called_once_with(["a.png"], Path("m.onnx"), Path("o.jsonl"), options, progress=mock.ANY)
    assert done.summary.n_ok == 1 and done.records == () and done.model == Path("m.onnx")


def test_watch_goes_to_the_hot_folder_and_ray_to_ray() -> None:
    watch = DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), watch=Path("scanner out"), idle_timeout_s=60.0)
    with mock.patch.object(entry, "diagnose_hot_folder", return_value=summary(watch.out)) as hot:
        entry.diagnose([], watch)
    hot.assert_called_once_with(Path("scanner out"), Path("m.onnx"), Path("o.jsonl"), watch, progress=mock.ANY)

    ray = DiagnoseOptions(model=Path("m.onnx"), out=Path("shards.parquet"), engine="ray", address="auto", device="cuda",
                          batch_size=16, crop={"tile_size": (64, 64)}, refer_band=(0.3, 0.7), overwrite=True)
    with mock.patch("edgedx.runtime.ray_engine.diagnose_ray", return_value=summary(ray.out)) as remote:
        entry.diagnose(["scans"], ray)
    remote.assert_called_once_with(
        ["scans"], Path("m.onnx"), Path("shards.parquet"), address="auto", device="cuda", batch_size=16,
        crop={"tile_size": (64, 64)}, refer_band=(0.3, 0.7), overwrite=True, progress=mock.ANY,
    )


def test_without_out_the_records_come_back_and_no_file_stays() -> None:
    written: list[Path] = []

    def fake(inputs: list[str], model: Path, out: Path, options: DiagnoseOptions, **kwargs: object) -> DiagnoseSummary:
        written.append(out)
        with RecordWriter(out, ("melanoma", "nevus")) as writer:
            writer.write({**empty_record("a.jpg"), "label": "melanoma", "decision": "melanoma"})
        return summary(out)

    with mock.patch.object(entry, "diagnose_paths", side_effect=fake):
        done = entry.diagnose(["a.jpg"], DiagnoseOptions(model=Path("m.onnx")))
    assert [r["input"] for r in done.records] == ["a.jpg"] and done.records[0]["decision"] == "melanoma"
    assert written and not written[0].exists()


def test_no_model_means_the_bundled_one_and_a_line_says_so(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime.bundled import bundled_model_path

    steps = logging.getLogger("edgedx.steps")
    monkeypatch.setattr(steps, "propagate", False)
    steps.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="edgedx.steps"), mock.patch.object(entry, "diagnose_paths", return_value=summary(None)) as local:
            done = entry.diagnose(["skin.jpg"], DiagnoseOptions(out=Path("o.jsonl")))
    finally:
        steps.removeHandler(caplog.handler)
    assert local.call_args.args[1] == bundled_model_path("isic_mel_nv") == done.model
    assert any("using the bundled model isic_mel_nv" in m and "not a medical device" in m for m in caplog.messages)
