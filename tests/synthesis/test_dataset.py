"""Calibration sets as datasets, and the image grid."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from synth_helpers import FAST, MEAN, NORM, STD, tiny_swin

from optimum_dfq.calibration import CalibrationSet
from optimum_dfq.errors import CalibrationError
from optimum_dfq.synthesis import (
    calibration_set_from_dataset_dict,
    calibration_set_to_dataset,
    get_synthesizer,
    load_calibration_set,
    save_calibration_set,
    save_image_grid,
)


@pytest.fixture(scope="module")
def synthetic_set():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return get_synthesizer("sardfq", **FAST).synthesize(tiny_swin(), 3, seed=0, **NORM)
    finally:
        torch.set_num_threads(previous)


def _assert_same(a: CalibrationSet, b: CalibrationSet) -> None:
    assert torch.equal(a.pixel_values, b.pixel_values) and a.pixel_values.dtype == torch.float32
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.soft_labels, b.soft_labels)
    assert a.metadata == b.metadata


def test_round_trip_through_save_and_load(synthetic_set, tmp_path):
    save_calibration_set(synthetic_set, tmp_path / "calib")
    loaded = load_calibration_set(tmp_path / "calib")
    _assert_same(loaded, synthetic_set)
    assert loaded.metadata["synthesizer"] == "sardfq"
    assert loaded.metadata["hyperparameters"]["iterations"] == [2, 2]



def test_saving_over_an_earlier_set_is_refused_unless_asked(synthetic_set, tmp_path):
    first = CalibrationSet(torch.zeros(2, 3, 4, 4), metadata={"run": 1})
    save_calibration_set(first, tmp_path / "calib")
    with pytest.raises(CalibrationError, match="already holds files.*overwrite=True"):
        save_calibration_set(synthetic_set, tmp_path / "calib")
    kept = load_calibration_set(tmp_path / "calib")  # the earlier set is intact
    assert torch.equal(kept.pixel_values, first.pixel_values) and kept.metadata == first.metadata
    save_calibration_set(synthetic_set, tmp_path / "calib", overwrite=True)
    _assert_same(load_calibration_set(tmp_path / "calib"), synthetic_set)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CalibrationError, match="is a file"):
        save_calibration_set(first, tmp_path / "file", overwrite=True)
    (tmp_path / "empty").mkdir()
    save_calibration_set(first, tmp_path / "empty")  # an empty folder is fine

def test_dataset_columns_and_parquet_round_trip(synthetic_set, tmp_path):
    from datasets import load_dataset

    dataset = calibration_set_to_dataset(synthetic_set)
    assert dataset.column_names == ["pixel_values", "labels", "soft_labels", "metadata"]
    assert len(dataset) == 3 and '"synthesizer": "sardfq"' in dataset.info.description
    _assert_same(calibration_set_from_dataset_dict(dataset), synthetic_set)
    dataset.to_parquet(str(tmp_path / "calib.parquet"))
    reloaded = load_dataset("parquet", data_files={"train": str(tmp_path / "calib.parquet")})
    _assert_same(calibration_set_from_dataset_dict(reloaded), synthetic_set)


def test_set_without_labels_round_trips(tmp_path):
    plain = CalibrationSet(torch.randn(2, 3, 4, 4), metadata={"source": "synthetic"})
    save_calibration_set(plain, tmp_path / "plain")
    loaded = load_calibration_set(tmp_path / "plain")
    assert torch.equal(loaded.pixel_values, plain.pixel_values)
    assert loaded.labels is None and loaded.soft_labels is None and loaded.metadata == plain.metadata


def test_image_grid_is_denormalised(tmp_path):
    pixels = torch.zeros(5, 3, 4, 6)
    pixels[0, 0] = (1 - MEAN[0]) / STD[0]
    save_image_grid(CalibrationSet(pixels), tmp_path / "grid.png", MEAN, STD, columns=3, padding=1)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 7 + 1, 2 * 5 + 1) and grid.mode == "RGB"
    assert grid.getpixel((1, 1)) == (255, round(MEAN[1] * 255), round(MEAN[2] * 255))
    assert grid.getpixel((8, 1)) == tuple(round(m * 255) for m in MEAN)
    assert grid.getpixel((0, 0)) == (255, 255, 255)


def test_image_grid_reads_normalisation_from_metadata(synthetic_set, tmp_path):
    save_image_grid(calibration_set_to_dataset(synthetic_set), tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)


def test_several_splits_need_an_explicit_split():
    from datasets import DatasetDict

    one = calibration_set_to_dataset(CalibrationSet(torch.zeros(1, 3, 2, 2), metadata={"seed": 1}))
    two = calibration_set_to_dataset(CalibrationSet(torch.ones(2, 3, 2, 2), metadata={"seed": 2}))
    splits = DatasetDict({"a": one, "b": two})
    with pytest.raises(CalibrationError, match=r"splits \['a', 'b'\]; pass split=<name>"):
        calibration_set_from_dataset_dict(splits)
    picked = calibration_set_from_dataset_dict(splits, split="b")
    assert torch.equal(picked.pixel_values, torch.ones(2, 3, 2, 2)) and picked.metadata == {"seed": 2}
    with pytest.raises(CalibrationError, match=r"no split 'c'; its splits are \['a', 'b'\]"):
        calibration_set_from_dataset_dict(splits, split="c")


def test_an_empty_calibration_set_dataset_is_refused():
    empty = calibration_set_to_dataset(CalibrationSet(torch.zeros(1, 3, 2, 2))).select([])
    with pytest.raises(CalibrationError, match="has no rows"):
        calibration_set_from_dataset_dict(empty)


def test_loading_a_folder_without_a_saved_dataset_names_it(tmp_path):
    (tmp_path / "not-a-set").mkdir()
    with pytest.raises(CalibrationError, match=r"'.*not-a-set' holds no saved dataset.*save_calibration_set"):
        load_calibration_set(tmp_path / "not-a-set")


def test_a_dataset_without_pixel_values_is_refused_with_the_fix(cifar_train):
    with pytest.raises(CalibrationError, match=r"no 'pixel_values' column \(columns: \['img', 'label'\]\).*"
                                               r"calibration_set_to_dataset"):
        calibration_set_from_dataset_dict(cifar_train)


def test_loading_a_missing_folder_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(CalibrationError, match=r"No saved calibration set at '.*nowhere'.*save_calibration_set"):
        load_calibration_set(tmp_path / "nowhere")


def test_metadata_falls_back_to_the_description_without_a_metadata_column():
    from datasets import Dataset, DatasetInfo

    written = calibration_set_to_dataset(CalibrationSet(torch.zeros(2, 3, 2, 2), metadata={"seed": 7}))
    assert calibration_set_from_dataset_dict(written.remove_columns("metadata")).metadata == {"seed": 7}
    pixels = {"pixel_values": torch.zeros(1, 3, 2, 2).numpy()}
    hand_made = Dataset.from_dict(pixels, info=DatasetInfo(description="made by hand"))
    assert calibration_set_from_dataset_dict(hand_made).metadata == {"description": "made by hand"}  # not JSON
    assert calibration_set_from_dataset_dict(Dataset.from_dict(pixels)).metadata == {}


def test_tensor_and_numpy_metadata_is_stored_as_plain_json(tmp_path):
    import numpy as np

    metadata = {"tensor": torch.tensor([[1, 2]]), "scalar": np.float32(0.5), "array": np.arange(3), 4: (1, 2)}
    save_calibration_set(CalibrationSet(torch.zeros(1, 3, 2, 2), metadata=metadata), tmp_path / "calib")
    loaded = load_calibration_set(tmp_path / "calib").metadata
    assert loaded == {"tensor": [[1, 2]], "scalar": 0.5, "array": [0, 1, 2], "4": [1, 2]}


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_corrupt_saved_set_is_named_with_the_fix(damage, tmp_path):
    # pyarrow's "Expected to be able to read 50848 bytes for message body, got 24884" (an OSError) was all the user saw
    save_calibration_set(CalibrationSet(torch.randn(4, 3, 8, 8)), tmp_path / "set")
    (arrow,) = (tmp_path / "set").glob("*.arrow")
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 16 + data[16:])
    with pytest.raises(CalibrationError, match=r"'.*set' holds a saved dataset whose data file is corrupt or truncated"
                                               r".*save it again"):
        load_calibration_set(tmp_path / "set")


def test_a_saved_set_this_user_may_not_read_is_not_called_corrupt(tmp_path, monkeypatch):
    import datasets

    save_calibration_set(CalibrationSet(torch.randn(2, 3, 8, 8)), tmp_path / "set")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(datasets, "load_from_disk", denied)  # as for another user's 0600 file (root reads anything)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_calibration_set(tmp_path / "set")
