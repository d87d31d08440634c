import pytest
import torch
from datasets import Value

from optimum_dfq.errors import CalibrationError, DFQError, ImageSizeError
from optimum_dfq.evaluation import evaluate_accuracy, load_top_k_metric, predict_top_k

from .conftest import tiny_vit, two_image_columns


def test_metric_module_loads_offline_and_counts():
    metric = load_top_k_metric()
    result = metric.compute(predictions=[[0, 1], [2, 0], [1, 2], [3, 1]], references=[0, 0, 2, 0], k=[1, 2])
    assert result == {"top1": 0.25, "top2": 0.75}


def test_end_to_end_matches_hand_computed_accuracy(cifar_test, image_processor):
    model = tiny_vit()
    subset = cifar_test.select(range(40))
    pixels = image_processor(images=[im.convert("RGB") for im in subset["img"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    labels = subset["label"]
    ranked = logits.argsort(dim=-1, descending=True).tolist()
    top1 = sum(r[0] == y for r, y in zip(ranked, labels)) / len(labels)
    top5 = sum(y in r[:5] for r, y in zip(ranked, labels)) / len(labels)
    result = evaluate_accuracy(model, subset, image_processor, batch_size=16, progress=False)
    assert result["num_examples"] == 40
    assert result["top1"] == pytest.approx(top1)
    assert result["top5"] == pytest.approx(top5)


def test_top5_dropped_for_five_or_fewer_classes(cifar_test, image_processor):
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=5)).eval()
    from datasets import ClassLabel

    five_classes = cifar_test.filter(lambda example: example["label"] < 5).select(range(8))
    five_classes = five_classes.cast_column("label", ClassLabel(names=five_classes.features["label"].names[:5]))
    result = evaluate_accuracy(model, five_classes, image_processor, progress=False)
    assert set(result) == {"top1", "num_examples"}
    assert set(evaluate_accuracy(model, five_classes, image_processor, top_k=(1, 4), progress=False)) == {
        "top1", "top4", "num_examples"}
    with pytest.raises(DFQError, match=r"top_k=\(5,\) leaves no accuracy.*top_k=\(1,\)"):
        evaluate_accuracy(model, five_classes, image_processor, top_k=(5,), progress=False)
    with pytest.raises(DFQError, match=r"top_k=\(\) is empty.*top_k=\(1, 5\)"):  # not "every k >= 5 is always 1"
        evaluate_accuracy(model, five_classes, image_processor, top_k=(), progress=False)


def test_errors(cifar_test):
    with pytest.raises(DFQError, match="image processor"):
        evaluate_accuracy(tiny_vit(), cifar_test.select(range(4)), None)
    with pytest.raises(DFQError, match="empty"):
        evaluate_accuracy(tiny_vit(), cifar_test.select([]), None)


def test_labels_must_be_class_ids_of_the_model(cifar_test, image_processor):
    subset = cifar_test.select(range(6))
    renamed = subset.cast_column("label", Value("int64")).rename_column("label", "labels")
    assert evaluate_accuracy(tiny_vit(), renamed, image_processor, progress=False)["num_examples"] == 6
    unlabelled = subset.cast_column("label", Value("int64")).map(lambda _: {"label": -1})
    with pytest.raises(DFQError, match=r"Labels \[-1\] .* 10 classes \(-1 marks an unlabelled split"):
        evaluate_accuracy(tiny_vit(), unlabelled, image_processor, progress=False)
    names = subset.cast_column("label", Value("string"))
    with pytest.raises(DFQError, match=r"must be integer class ids, got \['str'\].*label2id"):
        evaluate_accuracy(tiny_vit(), names, image_processor, progress=False)
    with pytest.raises(DFQError, match="no label column.*rename_column"):
        evaluate_accuracy(tiny_vit(), subset.remove_columns("label"), image_processor, progress=False)
    beyond = subset.cast_column("label", Value("int64")).map(lambda row, i: {"label": 10 if i == 3 else 0},
                                                             with_indices=True)
    with pytest.raises(DFQError, match=r"Labels \[10\] .* 10 classes\. Evaluate"):  # ids are 0..9: 10 is one too many
        evaluate_accuracy(tiny_vit(), beyond, image_processor, progress=False)
    flags = subset.remove_columns("label").add_column("label", [True, False] * 3)  # a bool column
    with pytest.raises(DFQError, match=r"must be integer class ids, got \['bool'\]"):  # True is not class 1
        evaluate_accuracy(tiny_vit(), flags, image_processor, progress=False)


def test_predict_top_k_returns_at_most_every_class(cifar_test, image_processor):
    predictions, labels = predict_top_k(tiny_vit(), cifar_test.select(range(3)), image_processor, k=20, progress=False)
    assert [sorted(row) for row in predictions] == [list(range(10))] * 3 and len(labels) == 3


def test_streaming_dataset_and_wrong_image_size_are_named(cifar_test, image_processor):
    from transformers import ViTImageProcessor

    subset = cifar_test.select(range(4))
    with pytest.raises(DFQError, match="streaming"):
        evaluate_accuracy(tiny_vit(), subset.to_iterable_dataset(), image_processor, progress=False)
    wrong_size = ViTImageProcessor(size={"height": 64, "width": 64})
    with pytest.raises(ImageSizeError, match=r"\(3, 64, 64\) .* expects \(3, 32, 32\)"):
        evaluate_accuracy(tiny_vit(), subset, wrong_size, progress=False)


def test_training_mode_is_restored(cifar_test, image_processor):
    model = tiny_vit().train()
    evaluate_accuracy(model, cifar_test.select(range(4)), image_processor, progress=False)
    assert model.training
    model.eval()
    evaluate_accuracy(model, cifar_test.select(range(4)), image_processor, progress=False)
    assert not model.training
    model.train()
    frozen = model.vit.embeddings  # a part kept in eval mode while the rest trains
    frozen.eval()
    evaluate_accuracy(model, cifar_test.select(range(4)), image_processor, progress=False)
    assert model.training and model.classifier.training and not any(m.training for m in frozen.modules())


def test_grayscale_model_is_evaluated_on_grayscale_images(cifar_test):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10,
                                                num_channels=1)).eval()
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5], image_std=[0.5])
    subset = cifar_test.select(range(8))
    pixels = processor(images=[im.convert("L") for im in subset["img"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top1 = (model(pixel_values=pixels).logits.argmax(-1) == torch.tensor(subset["label"])).float().mean().item()
    result = evaluate_accuracy(model, subset, processor, top_k=(1,), progress=False)
    assert result["top1"] == pytest.approx(top1)


def test_class_names_must_be_the_models(cifar_test, image_processor):
    """Ids in range are not enough: another dataset, or the classes in another order, would be scored silently."""
    subset = cifar_test.select(range(8))
    names = subset.features["label"].names
    model = tiny_vit()
    model.config.id2label = {i: name.upper().replace(" ", "_") for i, name in enumerate(names)}  # same names
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    assert evaluate_accuracy(model, subset, image_processor, progress=False)["num_examples"] == 8

    digits = {i: f"digit_{i}" for i in range(10)}
    model.config.id2label, model.config.label2id = digits, {name: i for i, name in digits.items()}
    with pytest.raises(DFQError, match=r"not the model's for 10 of 10 class ids \(0: 'airplane' in the dataset vs "
                                       r"'digit_0' in the model.*check_class_names=False"):
        evaluate_accuracy(model, subset, image_processor, progress=False)
    assert evaluate_accuracy(model, subset, image_processor, progress=False,
                             check_class_names=False)["num_examples"] == 8

    swapped = dict(enumerate(names)) | {0: names[1], 1: names[0]}  # the right classes in another order
    model.config.id2label, model.config.label2id = swapped, {name: i for i, name in swapped.items()}
    with pytest.raises(DFQError, match=r"for 2 of 10 class ids .*align_labels_with_mapping"):
        evaluate_accuracy(model, subset, image_processor, progress=False)
    aligned = subset.align_labels_with_mapping(model.config.label2id, "label")
    assert evaluate_accuracy(model, aligned, image_processor, progress=False)["num_examples"] == 8


def test_with_several_class_label_columns_the_one_with_the_models_names_is_scored(cifar_test, image_processor):
    """The first ClassLabel column was taken: with CIFAR-100-like fine and coarse columns, the coarse one first, a model
    with placeholder names (LABEL_0, ...) was silently scored against the wrong labels."""
    from datasets import ClassLabel

    subset = cifar_test.select(range(8))
    coarse = [0 if label in (0, 1, 8, 9) else 1 for label in subset["label"]]
    both = subset.add_column("coarse", coarse).cast_column("coarse", ClassLabel(names=["vehicle", "animal"]))
    both = both.select_columns(["img", "coarse", "label"])
    model = tiny_vit()
    expected = evaluate_accuracy(model, subset, image_processor, progress=False)
    assert evaluate_accuracy(model, both, image_processor, progress=False) == expected

    placeholders = {i: f"LABEL_{i}" for i in range(10)}
    model.config.id2label, model.config.label2id = placeholders, {name: i for i, name in placeholders.items()}
    # names that cannot be compared: the one column with the model's number of classes (CIFAR-100's fine_label for a
    # 100-class model, not its 20-class coarse_label), as verify_class_names compares counts then; it was refused,
    # with a fix (remove_columns) the command line cannot apply
    assert evaluate_accuracy(model, both, image_processor, progress=False) == expected
    twice = both.add_column("again", subset["label"]).cast_column("again", subset.features["label"])
    with pytest.raises(DFQError, match=r"several ClassLabel columns \['coarse', 'label', 'again'\].*more than one "
                                       r"has the model's class names.*label_column='coarse' \(command line: "
                                       r"--label-column coarse\).*remove_columns"):
        evaluate_accuracy(model, twice, image_processor, progress=False)
    assert evaluate_accuracy(model, twice, image_processor, progress=False, label_column="again") == expected
    with pytest.raises(DFQError, match="column 'coarse' has 2 classes, but the model has 10"):  # still checked
        evaluate_accuracy(model, twice, image_processor, progress=False, label_column="coarse")
    assert evaluate_accuracy(model, both.remove_columns("coarse"), image_processor, progress=False) == expected


def test_class_names_given_as_wordnet_ids_are_not_compared(cifar_test, image_processor):
    """ImageNet's parquet copies name classes by WordNet id (n01440764) while models say "tench, Tinca tinca"."""
    from datasets import ClassLabel

    subset = cifar_test.select(range(4))
    synsets = subset.cast_column("label", ClassLabel(names=[f"n{1440764 + i:08d}" for i in range(10)]))
    model = tiny_vit()
    model.config.id2label = {i: name for i, name in enumerate(subset.features["label"].names)}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    assert evaluate_accuracy(model, synsets, image_processor, progress=False)["num_examples"] == 4
    renamed = subset.cast_column("label", ClassLabel(names=[f"class {i}" for i in range(10)]))
    with pytest.raises(DFQError, match="class names are not the model's"):
        evaluate_accuracy(model, renamed, image_processor, progress=False)


def test_class_label_without_names_and_one_sided_wordnet_ids_are_not_compared(cifar_test, image_processor):
    """`ClassLabel(num_classes=n)` names its classes "0", "1", ...: no names to compare with the model's. WordNet ids
    on the model's side only (a model trained on ImageNet's folders) cannot be compared with words either; on both
    sides they are compared."""
    from datasets import ClassLabel

    subset = cifar_test.select(range(4))
    model = tiny_vit()
    model.config.id2label = {i: name for i, name in enumerate(subset.features["label"].names)}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    unnamed = subset.cast_column("label", ClassLabel(num_classes=10))
    assert evaluate_accuracy(model, unnamed, image_processor, progress=False)["num_examples"] == 4

    synsets = [f"n{1440764 + i:08d}" for i in range(10)]
    model.config.id2label = dict(enumerate(synsets))
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    assert evaluate_accuracy(model, subset, image_processor, progress=False)["num_examples"] == 4
    reordered = subset.cast_column("label", ClassLabel(names=synsets[1::-1] + synsets[2:]))
    with pytest.raises(DFQError, match=r"for 2 of 10 class ids"):
        evaluate_accuracy(model, reordered, image_processor, progress=False)


def test_batch_size_must_be_positive(cifar_test, image_processor):
    """`range(0, n, -1)` is empty: a negative batch size scored no image and reported nan over every example."""
    subset = cifar_test.select(range(4))
    for batch_size in (0, -1):
        with pytest.raises(DFQError, match=rf"batch_size={batch_size} .* positive"):
            evaluate_accuracy(tiny_vit(), subset, image_processor, batch_size=batch_size, progress=False)


def test_a_dataset_dict_or_another_object_is_named(cifar_test, image_processor):
    """`load_dataset(path)` without `split=` gives a DatasetDict; it crashed on a missing `.features` attribute."""
    from datasets import DatasetDict

    splits = DatasetDict({"test": cifar_test.select(range(4))})
    with pytest.raises(DFQError, match=r"DatasetDict with splits \['test'\].*dataset\['test'\]"):
        evaluate_accuracy(tiny_vit(), splits, image_processor, progress=False)
    with pytest.raises(DFQError, match=r"datasets.Dataset.*got list"):
        evaluate_accuracy(tiny_vit(), [{"img": None, "label": 0}], image_processor, progress=False)


def test_a_missing_image_is_named(cifar_test, image_processor):
    """A row without an image (None in the Image column) crashed in `None.convert`; it is named with the fix."""
    from datasets import Dataset

    subset = cifar_test.select(range(6))
    images = list(subset["img"])
    images[4] = None
    holed = Dataset.from_dict({"img": images, "label": subset["label"]}, features=subset.features)
    with pytest.raises(DFQError, match=r"example 4 has no image .*filter"):
        evaluate_accuracy(tiny_vit(), holed, image_processor, batch_size=4, progress=False)


def test_an_image_processor_given_as_a_path_names_the_loader(cifar_test):
    # "'str' object is not callable" from inside the evaluation loop
    with pytest.raises(DFQError, match=r"image_processor must be an image processor, got str 'google/vit-base-patch16"
                                       r"-224'.*AutoImageProcessor\.from_pretrained\('google/vit-base-patch16-224'\)"):
        evaluate_accuracy(tiny_vit(), cifar_test.select(range(2)), "google/vit-base-patch16-224", progress=False)


def _with_a_corrupt_image(dataset, row, truncated=False):
    from datasets import Dataset, Image

    rows = dataset.cast_column("img", Image(decode=False)).to_list()
    data = rows[row]["img"]["bytes"]
    rows[row]["img"] = {"bytes": data[: len(data) // 2] if truncated else b"not an image", "path": None}
    return Dataset.from_list(rows, features=dataset.cast_column("img", Image(decode=False)).features).cast_column(
        "img", Image())


@pytest.mark.parametrize("truncated", [False, True])
def test_an_image_that_does_not_decode_is_named_by_its_row(truncated, cifar_test, image_processor):
    """PIL's "cannot identify image file <_io.BytesIO object at 0x...>" (or "image file is truncated") named neither
    the example nor the fix; the CLI printed just that."""
    broken = _with_a_corrupt_image(cifar_test.select(range(6)), 5, truncated)
    with pytest.raises(DFQError, match=r"example 5 \(column 'img'\) cannot be decoded .*corrupt or truncated.*"
                                       r"i != 5"):
        evaluate_accuracy(tiny_vit(), broken, image_processor, batch_size=4, progress=False)


@pytest.mark.parametrize("names", [[f"n{1440764 + i:08d}" for i in range(1000)], None])
def test_a_class_label_with_another_number_of_classes_is_refused(names, cifar_test, image_processor):
    """A 10-class model on ImageNet (`--limit 4`: labels 0..3, all in range; WordNet ids, whose names are not
    compared) was scored without a word."""
    from datasets import ClassLabel

    subset = cifar_test.select(range(4))
    other = subset.cast_column("label", ClassLabel(names=names) if names else ClassLabel(num_classes=1000))
    with pytest.raises(DFQError, match=r"ClassLabel column 'label' has 1000 classes, but the model has 10.*"
                                       r"check_class_names=False"):
        evaluate_accuracy(tiny_vit(), other, image_processor, progress=False)
    assert evaluate_accuracy(tiny_vit(), other, image_processor, progress=False,
                             check_class_names=False)["num_examples"] == 4


def test_a_dataset_of_some_of_the_models_classes_under_their_names_is_scored(cifar_test, image_processor):
    """Class names that can be compared settle it: a two-class subset named like the model's first two classes is
    not refused for having fewer classes than the model (its class count alone is refused only without names)."""
    from datasets import ClassLabel

    two = cifar_test.filter(lambda example: example["label"] < 2).select(range(6))
    model = tiny_vit()
    expected = evaluate_accuracy(model, two, image_processor, progress=False)
    subset = two.cast_column("label", ClassLabel(names=two.features["label"].names[:2]))
    assert evaluate_accuracy(model, subset, image_processor, progress=False) == expected
    renamed = two.cast_column("label", ClassLabel(names=["cat", "dog"]))  # other names: still refused
    with pytest.raises(DFQError, match="class names are not the model's"):
        evaluate_accuracy(model, renamed, image_processor, progress=False)


def test_several_image_columns_are_refused_and_the_chosen_one_is_scored(cifar_test, image_processor):
    # the first Image column was scored without a word
    subset = cifar_test.select(range(8))
    pairs, model = two_image_columns(subset), tiny_vit()
    with pytest.raises(CalibrationError, match=r"several image columns \['img', 'other'\].*image_column='img' "
                                               r"\(command line: --image-column img\)"):
        evaluate_accuracy(model, pairs, image_processor, progress=False)
    reversed_images = subset.select(range(7, -1, -1))
    for column, images in (("img", subset), ("other", reversed_images)):
        predictions, labels = predict_top_k(model, pairs, image_processor, k=3, progress=False, image_column=column)
        assert predictions == predict_top_k(model, images, image_processor, k=3, progress=False)[0]
        assert labels == subset["label"]  # the rows' labels, whichever image column is read
    assert predict_top_k(model, subset, image_processor, k=3, progress=False)[0] != predict_top_k(
        model, reversed_images, image_processor, k=3, progress=False)[0]  # so the two choices score differently
    with pytest.raises(CalibrationError, match=r"image_column='label' is not an Image column \(it holds ClassLabel\)"):
        evaluate_accuracy(model, pairs, image_processor, progress=False, image_column="label")


def test_the_chosen_label_column_is_scored(cifar_test, image_processor):
    subset = cifar_test.select(range(6))
    target = [(label + 1) % 10 for label in subset["label"]]
    both = subset.add_column("target", target)
    model = tiny_vit()
    assert predict_top_k(model, both, image_processor, progress=False)[1] == subset["label"]  # the ClassLabel column
    assert predict_top_k(model, both, image_processor, progress=False, label_column="target")[1] == target
    with pytest.raises(CalibrationError, match=r"label_column='labels' is not a column of the dataset; its features "
                                               r"are: img \(Image\), label \(ClassLabel\), target \(int64\)"):
        evaluate_accuracy(model, both, image_processor, progress=False, label_column="labels")
    unlabelled = subset.remove_columns("label").add_column("target", target)
    with pytest.raises(DFQError, match=r"no label column.*label_column=<name> \(command line: --label-column NAME\)"):
        evaluate_accuracy(model, unlabelled, image_processor, progress=False)
    assert evaluate_accuracy(model, unlabelled, image_processor, progress=False, label_column="target") == (
        evaluate_accuracy(model, both, image_processor, progress=False, label_column="target"))
