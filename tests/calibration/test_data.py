"""Calibration sets from tensors and real image datasets, and loading image datasets from disk."""

import re
from pathlib import Path

import pytest
import torch

from optimum_dfq import CalibrationError
from optimum_dfq.calibration import CalibrationSet, calibration_set_from_dataset
from optimum_dfq.calibration.data import load_image_dataset

from ..conftest import FIXTURES, two_image_columns

TRAIN_PARQUET = FIXTURES / "cifar10_tiny_train.parquet"


@pytest.mark.parametrize("pixels,got", [(torch.zeros(3, 32, 32), r"Tensor with shape torch.Size\(\[3, 32, 32\]\)"),
                                        ([[0.0]], "list with shape None")])
def test_pixel_values_must_be_a_4d_tensor(pixels, got):
    with pytest.raises(CalibrationError, match=rf"must be a \[N, C, H, W\] tensor, got {got}"):
        CalibrationSet(pixel_values=pixels)


def test_pixel_values_must_be_processed_finite_images():
    # raw uint8 pixels, NaN or inf (one value is enough) and no image at all are refused, naming the problem
    nan, inf = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    nan[1, 0, 0, 0], inf[0, 2, 3, 3] = float("nan"), float("-inf")
    for pixels, problem in [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), r"dtype torch\.uint8.*image processor"),
                            (nan, "NaN or inf"), (inf, "NaN or inf"), (torch.zeros(0, 3, 4, 4), "empty")]:
        with pytest.raises(CalibrationError, match=problem):
            CalibrationSet(pixel_values=pixels)


def test_images_of_another_size_or_channel_count_than_the_models_are_refused():
    from transformers import ViTConfig, ViTForImageClassification

    from optimum_dfq.errors import ImageSizeError

    model = ViTForImageClassification(ViTConfig(image_size=[32, 48], patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10))
    CalibrationSet(pixel_values=torch.zeros(1, 3, 32, 48)).check_image_size(model)  # (height, width)
    for shape in [(1, 3, 48, 32), (1, 1, 32, 48)]:
        with pytest.raises(ImageSizeError, match=r"expects \(3, 32, 48\)"):
            CalibrationSet(pixel_values=torch.zeros(shape)).check_image_size(model)


def test_an_empty_dataset_or_one_image_too_few_is_refused(cifar_train, image_processor):
    with pytest.raises(CalibrationError, match="The calibration dataset is empty"):
        calibration_set_from_dataset(cifar_train.select([]), image_processor)
    four = cifar_train.select(range(4))
    assert len(calibration_set_from_dataset(four, image_processor, num_images=4)) == 4
    with pytest.raises(CalibrationError, match="Asked for 5 calibration images but the dataset has only 4"):
        calibration_set_from_dataset(four, image_processor, num_images=5)


def test_dataset_without_image_column_names_the_needed_feature(cifar_train, image_processor):
    with pytest.raises(CalibrationError, match=r"no image column \(features: \['label'\]\).*datasets.Image"):
        calibration_set_from_dataset(cifar_train.remove_columns("img"), image_processor, num_images=2)


def test_a_column_of_image_paths_gets_the_cast_that_makes_it_an_image_column(cifar_train, image_processor, tmp_path):
    # a dataset built from file paths (Dataset.from_dict({"image": paths, ...})) only heard that an Image feature is
    # needed, not how to get one from the paths it has
    from datasets import Dataset, Image

    paths = []
    for index, image in enumerate(cifar_train.select(range(2))["img"]):
        image.save(tmp_path / f"{index}.png")
        paths.append(str(tmp_path / f"{index}.png"))
    dataset = Dataset.from_dict({"image": paths, "label": [0, 1]})
    with pytest.raises(CalibrationError, match=r"no image column .*"
                                               r"dataset\.cast_column\('image', datasets\.Image\(\)\)"):
        calibration_set_from_dataset(dataset, image_processor, num_images=2)
    cast = calibration_set_from_dataset(dataset.cast_column("image", Image()), image_processor, num_images=2)
    assert cast.pixel_values.shape == (2, 3, 32, 32)


def test_a_calibration_image_that_does_not_decode_is_named(cifar_train, image_processor):
    # PIL's "cannot identify image file <_io.BytesIO object at 0x...>" named neither the dataset's problem nor the fix
    from datasets import Dataset, Image

    raw = cifar_train.select(range(4)).cast_column("img", Image(decode=False))
    rows = raw.to_list()
    rows[2]["img"] = {"bytes": b"not an image", "path": None}
    broken = Dataset.from_list(rows, features=raw.features).cast_column("img", Image())
    with pytest.raises(CalibrationError, match=r"An image of the dataset \(column 'img'\) cannot be decoded .*corrupt "
                                               r"or truncated.*drop"):
        calibration_set_from_dataset(broken, image_processor, num_images=4)


def test_dataset_without_class_labels_gives_an_unlabelled_set(cifar_train, image_processor):
    labelled = calibration_set_from_dataset(cifar_train, image_processor, num_images=3, seed=1)
    unlabelled = calibration_set_from_dataset(cifar_train.remove_columns("label"), image_processor, num_images=3,
                                              seed=1)
    assert labelled.labels is not None and unlabelled.labels is None
    assert torch.equal(unlabelled.pixel_values, labelled.pixel_values)  # same images, only the labels are gone


def test_load_image_dataset_from_a_missing_parquet_file(tmp_path):
    with pytest.raises(CalibrationError, match="missing.parquet.*does not exist; check the path"):
        load_image_dataset(str(tmp_path / "missing.parquet"))


def test_load_image_dataset_from_save_to_disk_folders(cifar_train, tmp_path):
    from datasets import DatasetDict

    train, test = cifar_train.select(range(3)), cifar_train.select(range(3, 5))
    train.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "splits"))

    single = load_image_dataset(str(tmp_path / "single"))
    assert single["label"] == train["label"] and single.features == train.features
    picked = load_image_dataset(str(tmp_path / "splits"), split="test")
    assert picked["label"] == test["label"] and len(picked) == 2
    with pytest.raises(CalibrationError, match=r"no split 'validation'; its splits are \['train', 'test'\]"):
        load_image_dataset(str(tmp_path / "splits"), split="validation")


def test_load_image_dataset_names_a_corrupt_save_to_disk_folder(cifar_train, tmp_path):
    # the CLI's --calibration-dataset / --dataset printed only pyarrow's "Expected to be able to read ... bytes"
    cifar_train.select(range(4)).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:-100])
    with pytest.raises(CalibrationError, match=r"'.*saved' holds a saved dataset whose data file is corrupt or "
                                               r"truncated"):
        load_image_dataset(str(tmp_path / "saved"))


def test_a_saved_dataset_missing_its_data_file_is_not_called_corrupt(cifar_train, tmp_path):
    # the synthesis cache tells a set moved meanwhile by another run (FileNotFoundError) from a damaged one by this
    from optimum_dfq.calibration.data import load_saved_dataset

    cifar_train.select(range(2)).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    arrow.unlink()
    with pytest.raises(FileNotFoundError):
        load_saved_dataset(tmp_path / "saved")


@pytest.mark.parametrize("path", ["./no-such-data", "no-such-data/", "a/b/no-such-data", "~/no-such-data"])
def test_load_image_dataset_reports_a_missing_local_folder_as_such(path, tmp_path, monkeypatch):
    # a path that can only be local (as for models: hub.looks_like_local_path) is not looked up on the Hub, whose
    # error ("Couldn't reach './no-such-data' on the Hub") would hide the typo in the path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    missing = Path(path).expanduser().absolute()
    with pytest.raises(CalibrationError, match=rf"^No dataset at {re.escape(str(missing))}: check the path"):
        load_image_dataset(path)


def test_load_image_dataset_failure_names_the_path_and_the_accepted_forms(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"Could not load dataset '.*empty' \(split 'train'\).*\*\.parquet file"):
        load_image_dataset(str(tmp_path / "empty"))


def test_the_seed_picks_a_shuffled_subset_and_shuffle_false_takes_the_first_images(cifar_train, image_processor):
    def pixels(dataset):
        return image_processor(images=[im.convert("RGB") for im in dataset["img"]], return_tensors="pt")["pixel_values"]

    for seed in (0, 1):
        calibration = calibration_set_from_dataset(cifar_train, image_processor, num_images=6, seed=seed)
        expected = cifar_train.shuffle(seed=seed).select(range(6))
        torch.testing.assert_close(calibration.pixel_values, pixels(expected))
        assert calibration.labels.tolist() == expected["label"] and calibration.metadata["seed"] == seed
    first = calibration_set_from_dataset(cifar_train, image_processor, num_images=6, shuffle=False)
    torch.testing.assert_close(first.pixel_values, pixels(cifar_train.select(range(6))))
    assert cifar_train.shuffle(seed=0)["label"][:6] != cifar_train.shuffle(seed=1)["label"][:6]  # seeds differ


def test_processor_output_size_is_judged_only_where_it_can_be():
    from transformers import ViTImageProcessor

    from optimum_dfq.calibration.data import check_processor_output_size
    from optimum_dfq.errors import ImageSizeError

    resizing = ViTImageProcessor(size={"height": 64, "width": 48})
    with pytest.raises(ImageSizeError, match=r"resizes every image to 64x48 .* takes 32x32"):
        check_processor_output_size(resizing, (3, 32, 32))
    with pytest.raises(ImageSizeError, match=r"resizes every image to 64x48"):
        check_processor_output_size(ViTImageProcessor(size={"height": 64, "width": 48}, image_mean=[0.5],
                                                      image_std=[0.5]), (1, 32, 32))  # probed with grayscale images
    check_processor_output_size(resizing, (3, 64, 48))
    check_processor_output_size(resizing, (4, 32, 32))  # no 4-channel PIL image to probe with: not judged
    check_processor_output_size(ViTImageProcessor(do_resize=False), (3, 32, 32))  # keeps each image's size
    check_processor_output_size(object(), (3, 32, 32))  # not a transformers processor: only mean/std are read
    check_processor_output_size(resizing, (1, 32, 32))  # its 3-channel mean fails on a grayscale probe: not judged


def _pixels(images, image_processor) -> torch.Tensor:
    return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def test_several_image_columns_are_refused_unless_one_is_chosen(cifar_train, image_processor):
    # the first Image column was taken without a word
    pairs = two_image_columns(cifar_train.select(range(4)))
    with pytest.raises(CalibrationError, match=r"several image columns \['img', 'other'\].*image_column='img' "
                                               r"\(command line: --image-column img\).*remove_columns"):
        calibration_set_from_dataset(pairs, image_processor, num_images=2)
    for column in ("img", "other"):
        chosen = calibration_set_from_dataset(pairs, image_processor, shuffle=False, image_column=column)
        torch.testing.assert_close(chosen.pixel_values, _pixels(pairs[column], image_processor))
    first = calibration_set_from_dataset(pairs, image_processor, shuffle=False, image_column="img").pixel_values
    other = calibration_set_from_dataset(pairs, image_processor, shuffle=False, image_column="other").pixel_values
    assert not torch.equal(first, other)


@pytest.mark.parametrize("columns, reason", [
    ({"image_column": "image"}, (r"image_column='image' is not a column of the dataset; its features are: "
                                 r"img \(Image\), label \(ClassLabel\), other \(Image\), id \(int64\), "
                                 r"name \(string\)")),
    ({"image_column": "label"}, r"image_column='label' is not an Image column \(it holds ClassLabel\); .*img"),
    ({"label_column": "labels"}, r"label_column='labels' is not a column of the dataset; its features are: img"),
    ({"label_column": "name"}, r"label_column='name' is not a ClassLabel or integer column \(it holds string\)"),
    ({"label_column": "other"}, r"label_column='other' is not a ClassLabel or integer column \(it holds Image\)"),
])
def test_a_chosen_column_that_is_missing_or_of_another_type_is_refused_by_name(cifar_train, image_processor, columns,
                                                                              reason):
    pairs = two_image_columns(cifar_train.select(range(4)))
    pairs = pairs.add_column("id", list(range(4))).add_column("name", list("abcd"))
    with pytest.raises(CalibrationError, match=reason):
        calibration_set_from_dataset(pairs, image_processor, **{"image_column": "img", **columns})


def test_labels_come_from_the_chosen_label_column(cifar_train, image_processor, caplog):
    from datasets import ClassLabel

    subset = cifar_train.select(range(6))
    coarse = [int(label in (0, 1, 8, 9)) for label in subset["label"]]
    both = subset.add_column("coarse", coarse).cast_column("coarse", ClassLabel(names=["animal", "vehicle"]))
    # calibration does not use labels: with several ClassLabel columns and none chosen, none are read (not guessed)
    with caplog.at_level("INFO", logger="optimum_dfq.calibration.data"):
        unlabelled = calibration_set_from_dataset(both, image_processor, shuffle=False)
    assert unlabelled.labels is None and len(unlabelled) == 6
    assert "several ClassLabel columns ['label', 'coarse'] and none was chosen" in caplog.text
    from optimum_dfq.calibration.data import resolve_label_column

    with pytest.raises(CalibrationError, match=r"several ClassLabel columns \['label', 'coarse'\].*label_column="):
        resolve_label_column(both)  # the public resolver does not guess either
    assert torch.equal(unlabelled.pixel_values,
                       calibration_set_from_dataset(subset, image_processor, shuffle=False).pixel_values)
    for column, expected in (("label", subset["label"]), ("coarse", coarse)):
        chosen = calibration_set_from_dataset(both, image_processor, shuffle=False, label_column=column)
        assert chosen.labels.tolist() == expected
    ids = subset.remove_columns("label").add_column("target", [9, 8, 7, 6, 5, 4])  # a plain integer column
    assert calibration_set_from_dataset(ids, image_processor).labels is None  # not read unless chosen
    chosen = calibration_set_from_dataset(ids, image_processor, shuffle=False, label_column="target")
    assert chosen.labels.tolist() == [9, 8, 7, 6, 5, 4]


def test_the_split_to_load_is_the_one_asked_for_else_the_one_a_folder_holds_else_the_default(cifar_train, tmp_path):
    from datasets import DatasetDict

    from optimum_dfq.calibration.data import split_to_load

    subset = cifar_train.select(range(2))
    subset.save_to_disk(str(tmp_path / "one"))  # saved as "train"
    DatasetDict({"validation": subset}).save_to_disk(str(tmp_path / "dict"))
    DatasetDict({"train": subset, "test": subset}).save_to_disk(str(tmp_path / "both"))
    assert split_to_load(str(tmp_path / "one"), None, "test") == "train"
    assert split_to_load(str(tmp_path / "dict"), None, "test") == "validation"
    assert split_to_load(str(tmp_path / "both"), None, "test") == "test"
    assert split_to_load(str(tmp_path / "both"), "train", "test") == "train"
    assert split_to_load(str(FIXTURES / "cifar10_tiny_train.parquet"), None, "test") == "test"
    for folder in ("one", "dict"):  # the split it names is one load_image_dataset reads from that folder
        path = str(tmp_path / folder)
        assert len(load_image_dataset(path, split_to_load(path, None, "test"))) == 2


def test_a_single_split_folder_is_loaded_only_as_the_split_it_was_saved_as(cifar_train, tmp_path):
    # a folder holding the train split was returned for split="test" without a word
    from datasets import Dataset

    cifar_train.select(range(3)).save_to_disk(str(tmp_path / "train"))
    assert str(cifar_train.split) == "train"
    with pytest.raises(CalibrationError, match=r"saved as split 'train', not 'test'.*Ask for split 'train' \(command "
                                               r"line: --split / --calibration-split train\)"):
        load_image_dataset(str(tmp_path / "train"), split="test")
    for split in ("train", None):
        loaded = load_image_dataset(str(tmp_path / "train"), split=split)
        assert str(loaded.split) == "train" and len(loaded) == 3
    Dataset.from_dict({"label": [1, 2]}).save_to_disk(str(tmp_path / "unnamed"))  # no split recorded: as asked
    assert load_image_dataset(str(tmp_path / "unnamed"), split="test")["label"] == [1, 2]


def test_a_saved_slice_of_a_split_is_loaded_as_that_split(tmp_path):
    # load_dataset(..., split="test[:5]").save_to_disk(folder) records the split as 'test[:5]': `optimum-dfq evaluate`
    # (default --split test) refused the folder as "saved as split 'test[:5]', not 'test'"
    from datasets import load_dataset

    sliced = load_dataset("parquet", data_files={"test": str(FIXTURES / "cifar10_tiny_test.parquet")}, split="test[:5]")
    assert str(sliced.split) == "test[:5]"
    sliced.save_to_disk(str(tmp_path / "test-5"))
    for split in ("test", "test[:5]", None):
        assert load_image_dataset(str(tmp_path / "test-5"), split=split)["label"] == sliced["label"]
    with pytest.raises(CalibrationError, match=r"saved as split 'test\[:5\]', not 'train'"):
        load_image_dataset(str(tmp_path / "test-5"), split="train")
    with pytest.raises(CalibrationError, match=r"saved as split 'test\[:5\]', not 'test\[:3\]'"):  # not re-sliced
        load_image_dataset(str(tmp_path / "test-5"), split="test[:3]")
    sliced.save_to_disk(str(tmp_path / "both"))
    (tmp_path / "both" / "state.json").write_text(  # as load_dataset(..., split="test+train") saves it
        (tmp_path / "both" / "state.json").read_text().replace('"test[:5]"', '"test+train"'))
    with pytest.raises(CalibrationError, match=r"saved as split 'test\+train', not 'test'"):  # a slice, not a sum
        load_image_dataset(str(tmp_path / "both"), split="test")


def test_a_saved_dataset_dict_of_one_split_is_loaded_as_that_split_when_none_is_asked(tmp_path):
    # the README: "load_image_dataset(path) without split takes the saved one ("train" for sources of several splits)";
    # a DatasetDict folder holding only "validation" was refused as having no split 'train'
    from datasets import Dataset, DatasetDict

    DatasetDict({"validation": Dataset.from_dict({"label": [1, 2]})}).save_to_disk(str(tmp_path / "one"))
    assert load_image_dataset(str(tmp_path / "one"))["label"] == [1, 2]
    with pytest.raises(CalibrationError, match=r"has no split 'train'; its splits are \['validation'\]"):
        load_image_dataset(str(tmp_path / "one"), split="train")  # a split asked for is still checked
    two = DatasetDict({"test": Dataset.from_dict({"label": [3]}), "validation": Dataset.from_dict({"label": [4]})})
    two.save_to_disk(str(tmp_path / "two"))
    with pytest.raises(CalibrationError, match=r"has no split 'train'"):  # several splits: "train" by default
        load_image_dataset(str(tmp_path / "two"))


def test_a_parquet_file_is_labelled_with_the_split_asked_for(tmp_path):
    assert str(load_image_dataset(str(TRAIN_PARQUET)).split) == "train"
    assert str(load_image_dataset(str(TRAIN_PARQUET), split="validation").split) == "validation"
