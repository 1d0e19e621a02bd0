"""The model card: strict, versioned JSON that round-trips and names every bad field."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from edgedx.card import (
    ONNX_METADATA_KEY,
    SCHEMA_VERSION,
    SIDECAR_SUFFIX,
    CropPolicy,
    ModelCard,
    Normalization,
    Provenance,
    sidecar_path,
)
from edgedx.errors import CardError, EdgeDxError

PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")


def make_card(task: str = "binary", **overrides: Any) -> ModelCard:
    """A small valid card for ``task``; ``overrides`` replace any field."""
    defaults: dict[str, Any] = {
        "binary": {"class_names": ("uninfected", "parasitized"), "positive_class": "parasitized", "threshold": 0.4},
        "multiclass": {"class_names": ("a", "b", "c")},
        "multilabel": {"class_names": ("a", "b", "c"), "output_activation": "sigmoid", "threshold": 0.3},
    }[task]
    fields: dict[str, Any] = {
        "arch": "x",
        "task": task,
        "input_size": (32, 48),
        "crop": CropPolicy(tile_size=(32, 48), stride=(16, 24)),
        "provenance": PROVENANCE,
        **defaults,
        **overrides,
    }
    return ModelCard(**fields)


def card_dict(task: str = "binary", **overrides: Any) -> dict[str, Any]:
    """The JSON object of a valid card, to be broken by the tests."""
    return json.loads(make_card(task, **overrides).to_json())


def assert_card_error(data: Any, *fragments: str) -> str:
    """Parsing ``data`` (a dict, serialised first) fails with a CardError containing every fragment."""
    text = data if isinstance(data, str) else json.dumps(data)
    with pytest.raises(CardError) as info:
        ModelCard.from_json(text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- round trip ------------------------------------------------------------------------


ROUND_TRIP_CARDS = {
    "binary": lambda: make_card("binary"),
    "binary-positive-first": lambda: make_card(
        "binary", class_names=("positive", "negative"), positive_class="positive", threshold=None
    ),
    "multiclass": lambda: make_card(
        "multiclass",
        colour_order="BGR",
        interpolation="cubic",
        input_format="uint8_nhwc",
        normalization=Normalization(kind="per_image", pixel_scale=1.0, mean=(0.5,), std=(0.25,)),
        crop=CropPolicy(tile_size=(64, 80), stride=(17, 40), scale=0.75, pad_value=255),
    ),
    "multilabel": lambda: make_card(
        "multilabel",
        metrics={"split": "val", "epoch": 3, "macro_auc": 0.875, "per_class": {"a": [1, 2.5]}},
        provenance=Provenance(
            edgedx_version="0.1.0",
            created_at="2026-01-01T00:00:00+00:00",
            data_summary={"n_images": 160, "classes": {"a": 80, "b": 80}},
            split_seed=7,
            weights="imagenet",
            training={"epochs": 3, "lr": 0.002},
        ),
        intended_use="tests only — not for diagnosis",
    ),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_CARDS))
def test_round_trip_equals_original(name: str) -> None:
    card = ROUND_TRIP_CARDS[name]()
    text = card.to_json()
    back = ModelCard.from_json(text)
    assert back == card
    assert back.to_json() == text
    # the same through from_dict and compact JSON and bytes
    assert ModelCard.from_dict(card.to_dict()) == card
    assert ModelCard.from_json(card.to_json(indent=None).encode("utf-8")) == card
    # tuples stay tuples (lists would break equality and hashing of the policy)
    assert isinstance(back.class_names, tuple)
    assert isinstance(back.crop.tile_size, tuple) and isinstance(back.normalization.mean, tuple)


def test_round_trip_keeps_non_default_values() -> None:
    card = ROUND_TRIP_CARDS["multiclass"]()
    back = ModelCard.from_json(card.to_json())
    assert back.normalization.kind == "per_image"
    assert back.normalization.mean == (0.5,) and back.normalization.std == (0.25,)
    assert back.crop == CropPolicy(tile_size=(64, 80), stride=(17, 40), scale=0.75, pad_value=255)
    assert back.colour_order == "BGR" and back.input_format == "uint8_nhwc" and back.interpolation == "cubic"
    assert back.schema_version == SCHEMA_VERSION


def test_json_has_every_field_and_version() -> None:
    data = card_dict()
    assert set(data) == {f.name for f in dataclasses.fields(ModelCard)}
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data["crop"]) == {f.name for f in dataclasses.fields(CropPolicy)}
    assert data["crop"]["tile_size"] == [32, 48]
    assert ONNX_METADATA_KEY == "edgedx.card"


def test_non_finite_metrics_serialise_as_null() -> None:
    card = make_card(metrics={"auc": float("nan"), "nested": {"x": float("inf"), "y": [float("-inf"), 1.5]}})
    text = card.to_json()
    # strict JSON: no NaN/Infinity tokens anywhere
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    data = json.loads(text)
    assert data["metrics"] == {"auc": None, "nested": {"x": None, "y": [None, 1.5]}}
    back = ModelCard.from_json(text)
    assert back.metrics["auc"] is None


def test_derived_properties() -> None:
    card = make_card("binary")
    assert card.n_classes == 2
    assert card.positive_index == 1
    assert make_card("binary", class_names=("p", "n"), positive_class="p").positive_index == 0
    assert make_card("multiclass").positive_index is None


# -- missing, unknown and mistyped fields ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        (("arch",), "'arch'"),
        (("class_names",), "'class_names'"),
        (("crop",), "'crop'"),
        (("crop", "stride"), "'crop.stride'"),
        (("normalization", "std"), "'normalization.std'"),
        (("provenance", "created_at"), "'provenance.created_at'"),
    ],
)
def test_missing_field_is_named(path: tuple[str, ...], dotted: str) -> None:
    data = card_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    message = assert_card_error(data, "missing", dotted)
    assert message.count("'") == 2  # names exactly the one field


def test_missing_schema_version_is_named() -> None:
    data = card_dict()
    del data["schema_version"]
    assert_card_error(data, "missing", "schema_version")


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        ((), "'colour'"),
        (("crop",), "'crop.overlap'"),
        (("normalization",), "'normalization.variance'"),
        (("provenance",), "'provenance.author'"),
    ],
)
def test_unknown_field_is_named(path: tuple[str, ...], dotted: str) -> None:
    data = card_dict()
    target = data
    for key in path:
        target = target[key]
    target[dotted.strip("'").split(".")[-1]] = 1
    assert_card_error(data, "unknown", dotted)


@pytest.mark.parametrize(
    ("path", "value", "dotted"),
    [
        (("input_size",), "32", "'input_size'"),
        (("input_size",), [32.0, 48], "'input_size[0]'"),
        (("input_size",), [32, 48, 3], "'input_size'"),
        (("threshold",), "0.5", "'threshold'"),
        (("threshold",), True, "'threshold'"),
        (("crop", "pad_value"), True, "'crop.pad_value'"),
        (("crop", "stride"), [16, False], "'crop.stride[1]'"),
        (("provenance", "split_seed"), True, "'provenance.split_seed'"),
        (("provenance", "split_seed"), 1.5, "'provenance.split_seed'"),
        (("class_names",), "uninfected,parasitized", "'class_names'"),
        (("class_names",), ["uninfected", 2], "'class_names[1]'"),
        (("task",), "regression", "'task'"),
        (("colour_order",), "rgb", "'colour_order'"),
        (("crop",), [32, 48], "'crop'"),
        (("metrics",), [], "'metrics'"),
        (("arch",), None, "'arch'"),
        (("normalization", "mean"), [0.5, "0.5", 0.5], "'normalization.mean[1]'"),
    ],
)
def test_wrong_type_is_named(path: tuple[str, ...], value: Any, dotted: str) -> None:
    data = card_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert_card_error(data, dotted)


def test_schema_version_wrong_type() -> None:
    for bad in ("1", 1.0, True):
        data = card_dict()
        data["schema_version"] = bad
        assert_card_error(data, "schema_version", "integer")


def test_newer_schema_version_says_upgrade() -> None:
    data = card_dict()
    data["schema_version"] = SCHEMA_VERSION + 1
    data["a_field_from_the_future"] = {"x": 1}  # the version check comes before field checks
    assert_card_error(data, "upgrade edgedx", str(SCHEMA_VERSION + 1))


def test_schema_version_zero_is_invalid() -> None:
    data = card_dict()
    data["schema_version"] = 0
    message = assert_card_error(data, "schema_version 0")
    assert "upgrade" not in message


def test_not_an_object_or_not_json() -> None:
    assert_card_error("[1, 2]", "JSON object", "list")
    assert_card_error("{not json", "not valid JSON")
    assert_card_error("", "not valid JSON")
    with pytest.raises(CardError):
        ModelCard.from_dict("{}")


def test_card_error_is_an_edgedx_error() -> None:
    assert issubclass(CardError, EdgeDxError)


# -- invalid values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(class_names=["a", "b", "c"], positive_class="a"), "exactly two"),
        (lambda d: d.update(positive_class="healthy"), "positive_class"),
        (lambda d: d.update(positive_class=None), "positive_class"),
        (lambda d: d.update(threshold=1.5), "threshold"),
        (lambda d: d.update(threshold=-0.01), "threshold"),
        (lambda d: d.update(class_names=["a", "a"], positive_class="a"), "class_names"),
        (lambda d: d.update(class_names=["", "b"], positive_class="b"), "class_names"),
        (lambda d: d.update(input_size=[0, 32]), "input_size"),
        (lambda d: d["crop"].update(stride=[0, 16]), "crop.stride"),
        (lambda d: d["crop"].update(tile_size=[-32, 48]), "crop.tile_size"),
        (lambda d: d["crop"].update(scale=0.0), "crop.scale"),
        (lambda d: d["crop"].update(pad_value=256), "crop.pad_value"),
        (lambda d: d["normalization"].update(std=[0.2, 0.0, 0.2]), "normalization.std"),
        (lambda d: d["normalization"].update(std=[0.2, 0.2]), "mean has 3 values but std has 2"),
        (lambda d: d["normalization"].update(mean=[0.1, 0.2], std=[0.1, 0.2]), "normalization.mean"),
        (lambda d: d["normalization"].update(pixel_scale=0), "normalization.pixel_scale"),
    ],
)
def test_invalid_values_fail(mutate: Any, fragment: str) -> None:
    data = card_dict("binary")
    mutate(data)
    assert_card_error(data, fragment)


def test_multiclass_needs_two_classes_and_multilabel_needs_sigmoid() -> None:
    data = card_dict("multiclass")
    data["class_names"] = ["only"]
    assert_card_error(data, "at least two")
    data = card_dict("multilabel")
    data["output_activation"] = "softmax"
    assert_card_error(data, "multilabel", "sigmoid")
    data = card_dict("multiclass")
    data["positive_class"] = "z"
    assert_card_error(data, "positive_class", "'z'")
    # a single-class multilabel card is fine
    data = card_dict("multilabel")
    data["class_names"] = ["only"]
    assert ModelCard.from_dict(data).class_names == ("only",)


def test_invalid_values_fail_in_the_constructor_too() -> None:
    with pytest.raises(CardError, match="threshold"):
        make_card("binary", threshold=1.5)
    with pytest.raises(CardError, match="multilabel"):
        make_card("multilabel", output_activation="softmax")
    with pytest.raises(CardError, match="crop.stride"):
        CropPolicy(tile_size=(32, 32), stride=(0, 16))
    with pytest.raises(CardError, match="normalization.std"):
        Normalization(std=(0.2, 0.0, 0.2))
    with pytest.raises(CardError, match="schema_version"):
        make_card("binary", schema_version=SCHEMA_VERSION + 1)


def test_threshold_edges_are_valid() -> None:
    for t in (0.0, 1.0):
        assert ModelCard.from_json(make_card("binary", threshold=t).to_json()).threshold == t
    data = card_dict("binary")
    data["threshold"] = 1  # an integer is a number
    assert ModelCard.from_dict(data).threshold == 1.0


# -- files -------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    folder = tmp_path / "model dir ünïcödé 模型"
    folder.mkdir()
    card = ROUND_TRIP_CARDS["multilabel"]()
    path = card.save(sidecar_path(folder / "model fp16.engine"))
    assert path == folder / "model fp16.engine.card.json"
    assert path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and json.loads(text)["schema_version"] == SCHEMA_VERSION
    assert ModelCard.load(path) == card
    assert ModelCard.load(str(path)) == card


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "no such dir é" / "model.engine.card.json"
    with pytest.raises(CardError) as info:
        ModelCard.load(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_load_invalid_json_names_path(tmp_path: Path) -> None:
    path = tmp_path / "bad card ß.json"
    path.write_text("{ this is not json", encoding="utf-8")
    with pytest.raises(CardError) as info:
        ModelCard.load(path)
    assert str(path) in str(info.value) and "not valid JSON" in str(info.value)


def test_load_invalid_card_names_path_and_field(tmp_path: Path) -> None:
    path = tmp_path / "old card é.json"
    data = card_dict()
    del data["crop"]["stride"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CardError) as info:
        ModelCard.load(path)
    assert str(path) in str(info.value) and "'crop.stride'" in str(info.value)


def test_load_directory_names_path(tmp_path: Path) -> None:
    path = tmp_path / "a dir.card.json"
    path.mkdir()
    with pytest.raises(CardError) as info:
        ModelCard.load(path)
    assert str(path) in str(info.value)


def test_sidecar_path() -> None:
    assert sidecar_path("m/model.engine") == Path("m/model.engine.card.json")
    assert sidecar_path(Path("a b/mödel.v2.plan")) == Path("a b/mödel.v2.plan.card.json")
    assert str(sidecar_path("model")).endswith(SIDECAR_SUFFIX)


# -- immutability ---------------------------------------------------------------------------


def test_card_is_frozen() -> None:
    card = make_card()
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.threshold = 0.9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.crop.scale = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.normalization.kind = "per_image"  # type: ignore[misc]
    assert card.threshold == 0.4


def test_replace_returns_changed_copy() -> None:
    card = make_card()
    before = copy.deepcopy(card)
    changed = card.replace(threshold=0.9, metrics={"auc": 0.5})
    assert changed is not card
    assert changed.threshold == 0.9 and changed.metrics == {"auc": 0.5}
    assert card == before and card.threshold == 0.4 and card.metrics == {}
    assert changed.replace(threshold=0.4, metrics={}) == card
    # replace validates like the constructor
    with pytest.raises(CardError, match="threshold"):
        card.replace(threshold=2.0)


def test_schema_version_constant() -> None:
    assert isinstance(SCHEMA_VERSION, int) and SCHEMA_VERSION >= 1
    assert make_card().schema_version == SCHEMA_VERSION


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["normalization"].update(mean=[float("nan")] * 3),
        lambda d: d["normalization"].update(std=[float("inf")] * 3),
        lambda d: d["normalization"].update(pixel_scale=float("inf")),
    ],
)
def test_non_finite_normalisation_is_rejected(mutate: Any) -> None:
    data = card_dict()
    mutate(data)
    with pytest.raises(CardError, match="normalization"):
        ModelCard.from_json(json.dumps(data))  # json.dumps writes NaN / Infinity tokens


def test_non_finite_normalisation_fails_in_the_constructor() -> None:
    for kwargs in ({"mean": (math.nan,) * 3}, {"std": (math.inf,) * 3}, {"pixel_scale": math.inf}):
        with pytest.raises(CardError, match="normalization"):
            Normalization(**kwargs)


def test_older_cards_migrate_to_defaults_that_mean_as_before() -> None:
    """A schema-1 card (no crop modes, no calibration, no quality limits) reads as the current schema and behaves as it did."""
    data = make_card("binary").to_dict()
    data["schema_version"] = 1
    for added in ("top_k", "centre_weighting", "min_foreground", "mode", "shorter_side", "min_content"):
        del data["crop"][added]
    for added in ("calibration", "abstention", "quality", "um_per_px"):
        del data[added]
    del data["provenance"]["lineage"]
    card = ModelCard.from_dict(data)
    assert card.schema_version == SCHEMA_VERSION and card.crop.mode == "scale" and card.crop.min_content == 0.05
    assert card.calibration.method == "none" and card.calibration.temperature == ()
    assert card.abstention.qhat is None and card.abstention.dispersion_limit is None
    assert card.quality.focus_min is None and card.um_per_px is None and card.provenance.lineage == ()


def test_trust_fields_are_checked() -> None:
    from edgedx.card import Abstention, Calibration

    with pytest.raises(CardError, match="calibration.temperature' must be positive"):
        Calibration("temperature", (0.0,))
    with pytest.raises(CardError, match="abstention.coverage' must be within"):
        Abstention(coverage=1.5)
    with pytest.raises(CardError, match="um_per_px' must be a positive number"):
        make_card("binary", um_per_px=-1.0)
    with pytest.raises(CardError, match="3 values for a binary model"):
        make_card("binary", calibration=Calibration("temperature", (1.0, 1.0, 1.0)))
    per_label = make_card("multilabel", calibration=Calibration("temperature", (1.2, 0.8, 1.0)))
    assert ModelCard.from_json(per_label.to_json()) == per_label


def test_detection_round_trips_and_older_cards_read_with_it_off() -> None:
    """Detection (schema 6) survives JSON; schema-4 and schema-5 cards read with detection off; a detection object
    missing a field still fails naming it."""
    from edgedx.card import Detection

    on = make_card("binary", detection=Detection(
        enabled=True, tile_threshold=0.7, nms_iou=0.25, count_cells=True, field_rule="count_at_least", field_k=2,
        field_threshold=0.6, slide_rule="count_at_least", slide_k=3, fitted_on={"fields": 52},
    ))
    assert ModelCard.from_json(on.to_json()) == on
    older = make_card("binary").to_dict()
    older["schema_version"] = 4
    for added in ("ensemble", "threshold_choice", "detection"):
        del older[added]
    del older["crop"]["tta"]
    assert ModelCard.from_dict(older).detection == Detection()
    five = make_card("binary").to_dict()
    five["schema_version"] = 5
    del five["detection"]
    assert ModelCard.from_dict(five).detection == Detection()
    current = make_card("binary").to_dict()
    del current["detection"]
    assert_card_error(current, "missing", "'detection'")
    partial = on.to_dict()
    del partial["detection"]["nms_iou"]
    assert_card_error(partial, "missing", "'detection.nms_iou'")
    with pytest.raises(CardError, match="detection.enabled' needs a positive_class"):
        make_card("multiclass", detection=Detection(enabled=True))
