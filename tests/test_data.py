"""Tests for the INTL data-loading helpers (load_image_split, ImageDataset; labels_of, linear_eval's)."""

import io
import json
import shutil
from collections import Counter

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.functional import pil_to_tensor

from intl import ImageDataset, ImageSplit, load_image_split
from linear_eval import labels_of

CLASS_COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


@pytest.fixture(autouse=True)
def isolated_hf_cache(tmp_path, monkeypatch):
    """Keep builder caches out of ~/.cache and make sure no Hub dataset is cached."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def write_png(path, color, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)


def png_bytes(color, size=(6, 5)):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def class_of_pixel(image):
    """Recover the class name from the solid colour the test images are painted with."""
    pixel = tuple(int(v) for v in np.asarray(image)[0, 0])
    return next(name for name, color in CLASS_COLORS.items() if color == pixel)


# ----------------------------------------------------------------------------- digits


def test_digits_default_gives_1797_rgb_32x32_images_in_10_classes(digits_split):
    train = digits_split("train")  # load_image_split("digits", "train"), loaded once per session
    test = load_image_split(None, "test")  # the default source
    assert len(train.dataset) + len(test.dataset) == 1797
    assert len(test.dataset) == 360
    for split in (train, test):
        assert isinstance(split, ImageSplit)
        assert (split.image_column, split.label_column, split.num_classes) == ("image", "label", 10)
        assert split.dataset.features["label"].names == [str(d) for d in range(10)]
        assert set(labels_of(split).tolist()) == set(range(10))
    image, label = ImageDataset(train, transform=None)[0]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert 0 <= label < 10
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.max() > 200 and pixels.min() == 0
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey digits replicated over RGB


def test_digits_split_is_deterministic_and_stratified(digits_split):
    first, second = load_image_split(None, "test"), load_image_split(None, "test")
    assert torch.equal(labels_of(first), labels_of(second))
    undecoded = datasets.Image(decode=False)
    first_bytes = [v["bytes"] for v in first.dataset.cast_column("image", undecoded)["image"]]
    second_bytes = [v["bytes"] for v in second.dataset.cast_column("image", undecoded)["image"]]
    assert first_bytes == second_bytes

    train_counts = Counter(labels_of(digits_split("train")).tolist())
    test_counts = Counter(labels_of(first).tolist())
    for digit in range(10):
        total = train_counts[digit] + test_counts[digit]
        assert abs(test_counts[digit] - 0.2 * total) <= 1, (digit, test_counts[digit], total)

    with pytest.raises(ValueError, match=r"no split 'unlabeled'.*\['test', 'train'\]"):
        load_image_split(None, "unlabeled")


# ----------------------------------------------------------------------------- image folders


def test_image_folder_flat_layout_loads_as_train_with_folder_labels(tmp_path):
    root = tmp_path / "flat"
    counts = {"ant": 2, "bee": 3, "cat": 1}
    for name, count in counts.items():
        for i in range(count):
            write_png(root / name / f"{i}.png", CLASS_COLORS[name])

    split = load_image_split(root, "train")
    assert split.num_classes == 3 and split.label_column == "label"
    names = split.dataset.features["label"].names
    assert names == ["ant", "bee", "cat"]
    assert Counter(names[i] for i in labels_of(split).tolist()) == counts
    for image, label in ImageDataset(split, transform=None):
        assert class_of_pixel(image) == names[label]

    with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
        load_image_split(root, "test")


def test_image_folder_train_val_layout_keeps_class_indices_across_splits(tmp_path):
    root = tmp_path / "imagenet_like"
    for name in ("ant", "bee", "cat"):
        write_png(root / "train" / name / "a.png", CLASS_COLORS[name])
        write_png(root / "train" / name / "b.png", CLASS_COLORS[name])
    for name in ("ant", "cat"):  # "bee" missing from val must not shift "cat"'s index
        write_png(root / "val" / name / "a.png", CLASS_COLORS[name])

    train = load_image_split(str(root), "train")
    val = load_image_split(str(root), "val")
    assert len(train.dataset) == 6 and len(val.dataset) == 2
    with pytest.raises(ValueError, match=r"has no split 'test'; available splits: \['train', 'val'\]"):
        load_image_split(str(root), "test")  # asked for by its own name only
    for split in (train, val):
        assert split.dataset.features["label"].names == ["ant", "bee", "cat"]
        for image, label in ImageDataset(split, transform=None):
            assert class_of_pixel(image) == ["ant", "bee", "cat"][label]
    assert sorted(labels_of(val).tolist()) == [0, 2]


def test_image_folder_loads_with_hub_offline_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_png(tmp_path / "f" / "ant" / "0.png", CLASS_COLORS["ant"])
    write_png(tmp_path / "f" / "bee" / "0.png", CLASS_COLORS["bee"])
    assert labels_of(load_image_split(tmp_path / "f", "train")).tolist() == [0, 1]



def test_image_folder_labels_files_at_any_depth_by_class_folder_and_skips_other_files(tmp_path):
    root = tmp_path / "f"
    write_png(root / "ant" / "0.png", CLASS_COLORS["ant"])
    write_png(root / "ant" / "more" / "deeper" / "1.png", CLASS_COLORS["ant"])
    write_png(root / "bee" / "0.PNG", CLASS_COLORS["bee"])
    (root / "bee" / "notes.txt").write_text("not an image")
    write_png(root / "bee" / ".hidden.png", CLASS_COLORS["bee"])
    split = load_image_split(root, "train")
    assert labels_of(split).tolist() == [0, 0, 1]
    for image, label in ImageDataset(split, transform=None):
        assert class_of_pixel(image) == ["ant", "bee"][label]


def test_image_folder_is_scanned_at_each_load_so_a_new_image_is_seen(tmp_path):
    root = tmp_path / "f"
    for name in ("ant", "bee"):
        write_png(root / name / "0.png", CLASS_COLORS[name])
    assert len(load_image_split(root, "train").dataset) == 2
    write_png(root / "bee" / "1.png", CLASS_COLORS["bee"])
    assert labels_of(load_image_split(root, "train")).tolist() == [0, 1, 1]


def test_a_flat_folder_of_photos_is_an_unlabelled_training_split(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for width, name in ((4, "b.jpg"), (5, "a.JPG"), (6, "c.png")):
        PIL.Image.new("RGB", (width, 3), (90, 80, 70)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    split = load_image_split(root, "train")
    assert (split.label_column, split.num_classes) == (None, None)
    assert labels_of(split).tolist() == [-1, -1, -1]
    images = ImageDataset(split, transform=None)
    assert [(image.size[0], label) for image, label in images] == [(5, -1), (4, -1), (6, -1)]  # a.JPG, b.jpg, c.png
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
        load_image_split(root, "test")


def test_missing_local_folder_is_reported_as_such(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_image_split(str(tmp_path / "nope"), "train")


def test_a_file_given_as_dataset_is_named_a_file_not_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.tar").write_bytes(b"an archive")
    write_png(tmp_path / "x.png", CLASS_COLORS["ant"])
    for source in ("x.tar", "x.png", str(tmp_path / "x.png")):  # bare names would otherwise go to the Hub
        with pytest.raises(ValueError, match=r"--dataset \S*x\.(tar|png) is a file, not a folder .*class sub-folders"):
            load_image_split(source, "train")


def test_a_class_folder_linking_to_the_dataset_folder_or_above_is_refused_one_linking_elsewhere_is_a_class(tmp_path):
    root = tmp_path / "subset"
    write_png(root / "ant" / "0.png", CLASS_COLORS["ant"])
    write_png(tmp_path / "full" / "bee" / "0.png", CLASS_COLORS["bee"])
    (root / "bee").symlink_to(tmp_path / "full" / "bee", target_is_directory=True)  # as ImageNet-100 subsets are made
    for name, target in (("loop", root), ("up", tmp_path), ("train", root)):
        (root / name).symlink_to(target, target_is_directory=True)
        with pytest.raises(ValueError, match=rf"{name} is a link to .*every image would count twice; remove the link"):
            load_image_split(root, "train")
        (root / name).unlink()
    split = load_image_split(root, "train")
    assert split.dataset.features["label"].names == ["ant", "bee"] and labels_of(split).tolist() == [0, 1]
    for image, label in ImageDataset(split, transform=None):
        assert class_of_pixel(image) == ["ant", "bee"][label]


# ----------------------------------------------------------------------------- save_to_disk


def make_dataset(n=4, extra_columns=None):
    columns = {
        "image": [png_bytes(CLASS_COLORS["ant" if i % 2 == 0 else "bee"]) for i in range(n)],
        "label": [i % 2 for i in range(n)],
    }
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])}
    for name, (values, feature) in (extra_columns or {}).items():
        columns[name], features[name] = values, feature
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_save_to_disk_dataset_and_datasetdict_load(tmp_path):
    make_dataset(4).save_to_disk(tmp_path / "single")
    single = load_image_split(tmp_path / "single", "train")
    assert len(single.dataset) == 4 and single.num_classes == 2
    assert labels_of(single).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"single has no split 'test'; available splits: \['train'\]"):
        load_image_split(tmp_path / "single", "test")

    datasets.DatasetDict({"train": make_dataset(4), "validation": make_dataset(2)}).save_to_disk(
        tmp_path / "dict"
    )
    assert len(load_image_split(tmp_path / "dict", "train").dataset) == 4
    held_out = load_image_split(tmp_path / "dict", "validation")
    assert len(held_out.dataset) == 2
    image, label = ImageDataset(held_out, transform=pil_to_tensor)[1]
    assert image.shape == (3, 5, 6) and label == 1
    with pytest.raises(ValueError, match=r"no split 'extra'.*\['train', 'validation'\]"):
        load_image_split(tmp_path / "dict", "extra")


def damage(folder, how):
    """Damages a save_to_disk folder -> what the refusal says after the folder (the library's own words)."""
    if how == "empty train split":
        datasets.DatasetDict({"train": make_dataset(0), "test": make_dataset(2)}).save_to_disk(folder)
        return "a split of it has no rows"
    make_dataset(300).save_to_disk(folder)
    (arrow,) = folder.glob("*.arrow")
    if how == "no .arrow file":
        arrow.unlink()
        return f"FileNotFoundError: [Errno 2] No such file or directory: '{arrow}'"
    if how == "truncated .arrow":
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
        return "OSError: Expected to be able to read"
    (folder / how).write_text('{"_data_files": [')
    return "JSONDecodeError: Expecting value"


@pytest.mark.parametrize("how", ["empty train split", "no .arrow file", "truncated .arrow", "state.json",
                                 "dataset_info.json"])
def test_a_damaged_save_to_disk_folder_is_one_error_naming_the_folder_and_the_cause(tmp_path, how):
    expected = damage(tmp_path / "saved", how)
    with pytest.raises(ValueError) as info:
        load_image_split(tmp_path / "saved", "train")
    message = str(info.value)
    assert message.startswith(f"cannot load {tmp_path / 'saved'} (written by save_to_disk): ")
    assert expected in message and message.endswith("save it again") and "\n" not in message


# ----------------------------------------------------------------------------- columns


def test_columns_detection_follows_cifar100_conventions(tmp_path):
    n = 3
    cifar100_like = datasets.Dataset.from_dict(
        {"img": [png_bytes((1, 2, 3))] * n, "coarse_label": [0, 0, 0], "fine_label": [2, 0, 1]},
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "coarse_label": datasets.ClassLabel(names=["c0"]),
                "fine_label": datasets.ClassLabel(names=["f0", "f1", "f2"]),
            }
        ),
    )
    cifar100_like.save_to_disk(tmp_path / "c100")
    split = load_image_split(tmp_path / "c100", "train")
    assert (split.image_column, split.label_column, split.num_classes) == ("img", "fine_label", 3)
    assert labels_of(split).tolist() == [2, 0, 1]


def test_explicit_columns_override_detection_and_wrong_names_list_columns(tmp_path):
    n = 4
    make_dataset(
        n,
        extra_columns={
            "thumb": ([png_bytes(CLASS_COLORS["cat"], size=(2, 2))] * n, datasets.Image()),
            "size": ([3, 2, 1, 0], datasets.Value("int64")),
        },
    ).save_to_disk(tmp_path / "multi")

    detected = load_image_split(tmp_path / "multi", "train")
    assert (detected.image_column, detected.label_column) == ("image", "label")

    chosen = load_image_split(tmp_path / "multi", "train", image_column="thumb", label_column="size")
    assert (chosen.image_column, chosen.label_column, chosen.num_classes) == ("thumb", "size", None)
    assert labels_of(chosen).tolist() == [3, 2, 1, 0]
    image, label = ImageDataset(chosen, transform=None)[0]
    assert image.size == (2, 2) and class_of_pixel(image) == "cat" and label == 3

    for kwargs in ({"image_column": "picture"}, {"label_column": "target"}):
        with pytest.raises(ValueError, match=r"columns: \['image', 'label', 'thumb', 'size'\]"):
            load_image_split(tmp_path / "multi", "train", **kwargs)


def test_unlabelled_data_gives_label_minus_one(tmp_path):
    datasets.Dataset.from_dict(
        {"image": [png_bytes((9, 9, 9))] * 2}, features=datasets.Features({"image": datasets.Image()})
    ).save_to_disk(tmp_path / "unlabelled")
    split = load_image_split(tmp_path / "unlabelled", "train")
    assert split.label_column is None and split.num_classes is None
    assert labels_of(split).tolist() == [-1, -1]
    assert ImageDataset(split, transform=None)[1][1] == -1


def test_string_labels_are_no_class_indices_unlabelled_when_detected_refused_when_asked_for(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [png_bytes((9, 9, 9))] * 2, "label": ["cat", "dog"]},
                               features=features).save_to_disk(tmp_path / "named")
    split = load_image_split(tmp_path / "named", "train")  # enough to pretrain on
    assert (split.label_column, split.num_classes) == (None, None)
    assert labels_of(split).tolist() == [-1, -1] and ImageDataset(split, transform=None)[0][1] == -1
    with pytest.raises(ValueError, match=r"label column 'label' of .* is Value\('string'\), not integer class labels"):
        load_image_split(tmp_path / "named", "train", label_column="label")
    with pytest.raises(ValueError, match=r"pretraining needs none \(leave --label_column out\); evaluation: map the "
                                         r"values to class indices \(Dataset.class_encode_column\) or name another"):
        load_image_split(tmp_path / "named", "train", label_column="label")


# ----------------------------------------------------------------------------- Hugging Face Hub


def hub_offline(monkeypatch):
    """As in a process started with HF_HUB_OFFLINE=1 (datasets and huggingface_hub read it once, at import)."""
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_id_not_in_the_cache_is_one_clear_error(monkeypatch):
    hub_offline(monkeypatch)
    with pytest.raises(ValueError) as info:
        load_image_split("uoft-cs/cifar10", "train")
    message = str(info.value)
    assert "'uoft-cs/cifar10'" in message and "offline mode is on" in message
    assert "\n" not in message
    assert "class sub-folders" in message and "save_to_disk" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_offline_hub_id_uses_a_cached_copy(tmp_path, isolated_hf_cache, monkeypatch):
    """An already-downloaded Hub dataset must load without network.

    The cached copy is faked by building a parquet dataset and moving it to where
    datasets (5.x) keeps Hub datasets: <cache>/<owner>___<name>/<config>/<version>/<hash>.
    """
    hub_offline(monkeypatch)
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    make_dataset(4).to_parquet(str(parquet_dir / "train.parquet"))
    make_dataset(2).to_parquet(str(parquet_dir / "test.parquet"))
    datasets.load_dataset(
        "parquet",
        data_files={s: str(parquet_dir / f"{s}.parquet") for s in ("train", "test")},
        cache_dir=str(tmp_path / "build"),
    )
    (built,) = [p for p in (tmp_path / "build" / "parquet").glob("*/*/*") if p.is_dir()]
    target = isolated_hf_cache / "intl-tests___tiny" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", "tiny-"))
    assert json.loads((target / "dataset_info.json").read_text())["config_name"] == "default"

    split = load_image_split("intl-tests/tiny", "test")
    assert labels_of(split).tolist() == [0, 1]
    assert split.num_classes == 2


# ----------------------------------------------------------------------------- the 5-NN


def test_knn_memory_does_not_grow_with_the_label_values():
    import intl

    torch.manual_seed(0)
    train, test = torch.randn(200, 8), torch.randn(50, 8)
    train_labels, test_labels = torch.randint(0, 4, (200,)), torch.randint(0, 4, (50,))
    train_labels[:5] = torch.tensor([0, 1, 2, 3, 0])  # every class present: the ids map back one to one
    expected = intl.knn_classify(train, train_labels, test, test_labels, k=5)
    huge = torch.tensor([0, 7, 10**12, 10**15])  # votes per class for 10^15 classes would need petabytes
    assert intl.knn_classify(train, huge[train_labels], test, huge[test_labels], k=5) == expected
    tie = intl.knn_classify(torch.arange(4.0)[:, None], huge[[3, 1, 1, 3]], torch.tensor([[1.5]]), huge[[1]], k=4)
    assert tie["top1"] == 100.0  # a tie goes to the smallest class id, as before


# ----------------------------------------------------------------------------- decoding


def test_corrupt_png_raises_error_naming_the_file(tmp_path):
    root = tmp_path / "broken"
    write_png(root / "ant" / "good.png", CLASS_COLORS["ant"])
    bad = root / "bee" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(png_bytes(CLASS_COLORS["bee"], size=(64, 64))[:60])  # truncated PNG
    split = load_image_split(root, "train")
    images = ImageDataset(split, transform=None)
    assert class_of_pixel(images[0][0]) == "ant"
    with pytest.raises(OSError, match=r"image #1 .*'" + str(bad).replace("\\", "\\\\")):
        images[1]


def test_corrupt_embedded_image_without_path_names_its_index():
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": png_bytes((0, 0, 0)), "path": None}, {"bytes": b"garbage", "path": None}]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    split = ImageSplit(dataset, "image", None, None, "in-memory test data")
    with pytest.raises(OSError, match=r"image #1 of in-memory test data \(no file path\)"):
        ImageDataset(split, transform=None)[1]


def test_labels_of_reads_labels_without_decoding_images(monkeypatch, digits_split):
    split = digits_split("test")
    shuffled = ImageSplit(split.dataset.shuffle(seed=1).select(range(50)), "image", "label", 10, "x")

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    labels = labels_of(shuffled)
    assert labels.dtype == torch.long and labels.shape == (50,)
    assert labels.tolist() == list(shuffled.dataset.with_format(None)["label"])


def test_image_dataset_works_in_dataloader_with_two_workers(digits_split):
    split = digits_split("test")
    loader = torch.utils.data.DataLoader(
        ImageDataset(split, transform=pil_to_tensor), batch_size=64, num_workers=2
    )
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.shape == (360, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels, labels_of(split))


# ----------------------------------------------------------------------------- every PIL mode -> the RGB it shows


def encoded(image, fmt="PNG", **save_args):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def over_white(rgb, alpha):
    """The expected composite of a colour over the white background, computed here in float64."""
    alpha = alpha[..., None] / 255.0
    return np.rint(rgb * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


def gray3(gray):
    return np.repeat(gray[..., None], 3, axis=2).astype(np.uint8)


def mode_cases():
    """(mode as PIL opens the file, encoded file, the 8-bit RGB it shows), each from known numpy data."""
    rng = np.random.default_rng(0)
    shape = (5, 7)
    cases = {}
    deep = rng.integers(0, 65536, shape)
    deep.flat[:4] = [0, 257, 32768, 65535]
    cases["I;16"] = ("I;16", encoded(PIL.Image.fromarray(deep.astype(np.uint16))), gray3(np.rint(deep / 257)))
    cases["I"] = ("I", encoded(PIL.Image.fromarray(deep.astype(np.int32)), "TIFF"), gray3(np.rint(deep / 257)))
    palette = np.array([[10, 20, 30], [200, 100, 50], [0, 0, 0], [250, 240, 5]], np.uint8)
    index = rng.integers(0, 4, shape)
    index.flat[:4] = [0, 1, 2, 3]
    paletted = PIL.Image.fromarray(index.astype(np.uint8), mode="P")
    paletted.putpalette(palette.flatten().tolist())
    cases["P"] = ("P", encoded(paletted), palette[index])
    shown = palette[index].copy()
    shown[index == 2] = 255
    cases["P, one transparent entry"] = ("P", encoded(paletted, transparency=2), shown)
    entry_alpha = np.array([0, 128, 255, 64])
    cases["P, alpha per entry"] = ("P", encoded(paletted, transparency=bytes(entry_alpha.tolist())),
                                   over_white(palette[index], entry_alpha[index]))
    rgba = rng.integers(0, 256, (*shape, 4))
    rgba[0, :3, 3] = [0, 255, 128]
    cases["RGBA"] = ("RGBA", encoded(PIL.Image.fromarray(rgba.astype(np.uint8))), over_white(rgba[..., :3], rgba[..., 3]))
    la = rng.integers(0, 256, (*shape, 2))
    cases["LA"] = ("LA", encoded(PIL.Image.fromarray(la.astype(np.uint8), mode="LA")),
                   over_white(gray3(la[..., 0]).astype(float), la[..., 1]))
    rgb = rng.integers(0, 256, (*shape, 3))
    rgb[0, 0] = rgb[2, 3] = (1, 2, 3)
    keyed = over_white(rgb, np.where((rgb == (1, 2, 3)).all(axis=2), 0, 255))
    cases["RGB, one transparent colour"] = ("RGB", encoded(PIL.Image.fromarray(rgb.astype(np.uint8)),
                                                           transparency=(1, 2, 3)), keyed)
    cmyk = rng.integers(0, 256, (*shape, 4))
    cases["CMYK"] = ("CMYK", encoded(PIL.Image.fromarray(cmyk.astype(np.uint8), mode="CMYK"), "TIFF"),
                     np.rint((255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255).astype(np.uint8))
    gray = rng.integers(0, 256, shape)
    cases["L"] = ("L", encoded(PIL.Image.fromarray(gray.astype(np.uint8))), gray3(gray))
    bits = rng.integers(0, 2, shape).astype(bool)
    cases["1"] = ("1", encoded(PIL.Image.fromarray(bits)), gray3(bits * 255))
    return cases


MODE_CASES = mode_cases()


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_pil_mode_decodes_to_the_8_bit_rgb_it_shows(case):
    """16-bit values scale to 8 bits (not clipped to white); transparent pixels show the white background (not the
    colour stored under them); the other modes convert as PIL does."""
    mode, data, expected = MODE_CASES[case]
    assert PIL.Image.open(io.BytesIO(data)).mode == mode  # the case is what it says
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}]},
                                         features=datasets.Features({"image": datasets.Image()}))
    image, _ = ImageDataset(ImageSplit(dataset, "image", None, None, case), transform=None)[0]
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), expected)


def test_a_split_is_loaded_under_its_own_name(tmp_path):
    write_png(tmp_path / "f" / "train" / "ant" / "0.png", CLASS_COLORS["ant"])
    write_png(tmp_path / "f" / "val" / "ant" / "0.png", CLASS_COLORS["ant"])
    assert str(load_image_split(tmp_path / "f", "val").dataset.split) == "val"
    assert str(load_image_split(None, "test").dataset.split) == "test"  # digits' held-out split
