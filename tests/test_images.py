"""Image datasets: the fixed digits split, caption templates, synthetic shape scenes and users' image folders."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from triform.data import images as im
from triform.data.images import (
    COLOURS,
    DIGIT_WORDS,
    SHAPES,
    TEST_TEMPLATES,
    TRAIN_TEMPLATES,
    ImageSet,
    Scene,
    caption,
    captioned_digits,
    digits,
    image_folder,
    render_scene,
    shapes,
)
from triform.errors import DataError

WHITE = (255, 255, 255)


def _keys(s: ImageSet) -> list[tuple[bytes, int]]:
    """One hashable key per image: its pixel bytes (as float32) and label."""
    arr = s.images.numpy().astype(np.float32)
    return [(arr[i, 0].tobytes(), int(s.labels[i])) for i in range(len(s))]


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


# ---------------------------------------------------------------------------------------------- digits


def test_digits_split_partitions_sklearn_digits(sk_digits) -> None:
    train, test = digits("train"), digits("test")
    assert (len(train), len(test)) == (1438, 359)
    assert len(train) + len(test) == 1797 == len(sk_digits.target)
    reference = Counter(
        ((sk_digits.images[i] / 16.0).astype(np.float32).tobytes(), int(sk_digits.target[i]))
        for i in range(len(sk_digits.target))
    )
    assert len(reference) == 1797  # no two sklearn digits are identical, so keys identify images
    train_keys, test_keys = set(_keys(train)), set(_keys(test))
    assert len(train_keys) == len(train) and len(test_keys) == len(test)
    assert not train_keys & test_keys
    assert Counter(_keys(train)) + Counter(_keys(test)) == reference


def test_digits_test_split_is_twenty_percent_of_each_class(sk_digits) -> None:
    test = digits("test")
    per_class_total = np.bincount(sk_digits.target, minlength=10)
    per_class_test = np.bincount(test.labels.numpy(), minlength=10)
    for c in range(10):
        assert abs(per_class_test[c] - 0.2 * per_class_total[c]) <= 0.5, c
    assert set(test.labels.tolist()) == set(range(10))


def test_digits_tensors_shapes_and_range() -> None:
    for split, n in (("train", 1438), ("test", 359), ("all", 1797)):
        s = digits(split)
        assert s.images.shape == (n, 1, 8, 8) and s.images.dtype == torch.float32
        assert s.labels.shape == (n,) and s.labels.dtype == torch.long
        assert float(s.images.min()) == 0.0 and float(s.images.max()) == 1.0
        assert s.class_names == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        assert s.captions is None and len(s) == n


def test_digits_all_is_sklearn_order(sk_digits) -> None:
    s = digits("all")
    np.testing.assert_allclose(s.images[:, 0].numpy(), sk_digits.images / 16.0, rtol=0, atol=1e-7)
    assert s.labels.tolist() == sk_digits.target.tolist()


def test_digits_split_is_fixed_across_calls_and_loads() -> None:
    first_train, first_test = digits("train"), digits("test")
    first_train.images[0] += 5.0  # the caller's copy; the cache must not change
    again = digits("train")
    assert float(again.images.max()) == 1.0
    im._digits_arrays.cache_clear()  # a fresh load picks the same split
    reloaded_train, reloaded_test = digits("train"), digits("test")
    assert torch.equal(reloaded_train.images, again.images) and torch.equal(reloaded_train.labels, again.labels)
    assert torch.equal(reloaded_test.images, first_test.images) and torch.equal(reloaded_test.labels, first_test.labels)


def test_digits_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown digits split 'valid'"):
        digits("valid")  # type: ignore[arg-type]


def test_subset_keeps_fields_together() -> None:
    s = captioned_digits("test", seed=1)
    sub = s.subset([3, 0, 7])
    assert len(sub) == 3
    assert torch.equal(sub.images[1], s.images[0]) and int(sub.labels[2]) == int(s.labels[7])
    assert sub.captions == [s.captions[3], s.captions[0], s.captions[7]]
    mask = torch.zeros(len(s), dtype=torch.bool)
    mask[[2, 5]] = True
    by_mask = s.subset(mask)
    assert by_mask.captions == [s.captions[2], s.captions[5]] and torch.equal(by_mask.images, s.images[[2, 5]])
    with pytest.raises(DataError, match="out of range"):
        s.subset([len(s)])


# ------------------------------------------------------------------------------------------- templates


def test_templates_are_disjoint_and_have_a_slot() -> None:
    assert len(TRAIN_TEMPLATES) >= 6 and len(TEST_TEMPLATES) >= 3
    assert len(set(TRAIN_TEMPLATES)) == len(TRAIN_TEMPLATES) and len(set(TEST_TEMPLATES)) == len(TEST_TEMPLATES)
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
    for t in TRAIN_TEMPLATES + TEST_TEMPLATES:
        assert t.count("{}") == 1, t
    for held_out in TEST_TEMPLATES:
        for seen in TRAIN_TEMPLATES:
            # no held-out template is a train template with words added at either end (or the reverse)
            assert seen not in held_out and held_out not in seen, (seen, held_out)
            head, tail = held_out.split("{}")
            seen_head, seen_tail = seen.split("{}")
            assert not (head == seen_head and tail == seen_tail)


def test_caption_fills_the_slot() -> None:
    assert caption("seven", "a handwritten {}") == "a handwritten seven"
    assert caption("two", "{} written by hand") == "two written by hand"
    with pytest.raises(DataError, match="has no"):
        caption("two", "a handwritten digit")


def test_captioned_digits_draws_from_the_given_templates() -> None:
    s = captioned_digits("train", seed=0)
    assert s.captions is not None and len(s.captions) == len(s) == 1438
    assert torch.equal(s.images, digits("train").images)
    used = Counter()
    for text, y in zip(s.captions, s.labels.tolist()):
        word = DIGIT_WORDS[y]
        assert word in text.split(), text
        matches = [t for t in TRAIN_TEMPLATES if t.replace("{}", word) == text]
        assert len(matches) == 1, text
        used[matches[0]] += 1
    assert set(used) == set(TRAIN_TEMPLATES)  # 1,438 draws hit every template


def test_captioned_digits_is_reproducible_by_seed() -> None:
    a, b = captioned_digits("test", seed=4), captioned_digits("test", seed=4)
    assert a.captions == b.captions
    assert captioned_digits("test", seed=5).captions != a.captions


def test_captioned_digits_held_out_and_custom_templates() -> None:
    held = captioned_digits("test", templates=TEST_TEMPLATES, seed=0)
    fixed_parts = [t.split("{}") for t in TEST_TEMPLATES]
    for text in held.captions:
        assert any(text.startswith(h) and text.endswith(t) for h, t in fixed_parts), text
        assert not any(text == t.replace("{}", w) for t in TRAIN_TEMPLATES for w in DIGIT_WORDS), text
    custom = captioned_digits("test", templates=["<{}>"], seed=9)
    assert custom.captions == [f"<{DIGIT_WORDS[y]}>" for y in custom.labels.tolist()]
    with pytest.raises(DataError, match="at least one caption template"):
        captioned_digits("test", templates=[])
    with pytest.raises(DataError, match="has no"):
        captioned_digits("test", templates=["a digit"])


# ---------------------------------------------------------------------------------------------- shapes


def _colour_count(pixels: np.ndarray, rgb: tuple[int, int, int]) -> int:
    return int(np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1).sum())


def _colours_in(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}


def test_scene_captions() -> None:
    scene = Scene(("red", "circle"), ("blue", "square"))
    assert scene.caption() == "a red circle left of a blue square"
    assert scene.reordered() == "a blue square left of a red circle"
    assert Counter(scene.caption().split()) == Counter(scene.reordered().split())
    assert scene.caption() != scene.reordered()
    with pytest.raises(DataError, match="unknown colour 'purple'"):
        Scene(("purple", "circle"), ("blue", "square"))
    with pytest.raises(DataError, match="unknown shape 'star'"):
        Scene(("red", "circle"), ("blue", "star"))


def test_render_without_jitter_puts_each_colour_in_its_half() -> None:
    img = render_scene(Scene(("red", "circle"), ("blue", "square")), size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    left, right = img[:, :16], img[:, 16:]
    assert _colours_in(left) == {WHITE, COLOURS["red"]}
    assert _colours_in(right) == {WHITE, COLOURS["blue"]}
    assert _colour_count(left, COLOURS["red"]) >= 30 and _colour_count(right, COLOURS["blue"]) >= 30
    assert tuple(img[0, 0]) == WHITE and tuple(img[31, 31]) == WHITE
    # without jitter the objects sit at a quarter and three quarters across, half-way down
    assert tuple(img[16, 8]) == COLOURS["red"] and tuple(img[16, 24]) == COLOURS["blue"]


def _row_widths(img: np.ndarray, rgb: tuple[int, int, int]) -> list[int]:
    counts = np.all(img == np.array(rgb, dtype=np.uint8), axis=-1).sum(axis=1)
    return [int(c) for c in counts if c > 0]


@pytest.mark.parametrize("jitter_seed", [None, 7])
def test_rendered_shapes_have_their_outlines(jitter_seed: int | None) -> None:
    rng = None if jitter_seed is None else np.random.default_rng(jitter_seed)
    circle_square = render_scene(Scene(("green", "circle"), ("yellow", "square")), size=48, rng=rng)
    triangle = render_scene(Scene(("blue", "triangle"), ("red", "circle")), size=48, rng=rng)
    square_rows = _row_widths(circle_square, COLOURS["yellow"])
    assert len(square_rows) >= 8 and len(set(square_rows)) == 1  # every row of a square is equally wide
    circle_rows = _row_widths(circle_square, COLOURS["green"])
    assert circle_rows[0] < max(circle_rows) and circle_rows[-1] < max(circle_rows)  # round at the top and bottom
    triangle_rows = _row_widths(triangle, COLOURS["blue"])
    assert triangle_rows == sorted(triangle_rows) and triangle_rows[0] < triangle_rows[-1]  # widens downwards


def test_render_with_jitter_is_seeded_and_stays_in_its_half() -> None:
    scene = Scene(("yellow", "triangle"), ("green", "circle"))
    a = render_scene(scene, rng=np.random.default_rng(3))
    b = render_scene(scene, rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    others = [render_scene(scene, rng=np.random.default_rng(s)) for s in range(4, 10)]
    assert any(not np.array_equal(a, o) for o in others)
    for img in [a, *others]:
        assert _colours_in(img[:, :16]) == {WHITE, COLOURS["yellow"]}
        assert _colours_in(img[:, 16:]) == {WHITE, COLOURS["green"]}


def test_shapes_dataset() -> None:
    s = shapes(60, seed=2)
    assert s.images.shape == (60, 3, 32, 32) and s.images.dtype == torch.float32
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    colours, kinds = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    expected_names = {f"{c} {k}" for c in colours for k in kinds}
    assert len(s.class_names) == 12 and set(s.class_names) == expected_names
    assert SHAPES == ("circle", "square", "triangle")
    assert s.scenes is not None and len(s.scenes) == 60 and s.captions is not None
    caption_form = re.compile(r"a (\w+) (\w+) left of a (\w+) (\w+)")
    pixels = np.rint(s.images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i, scene in enumerate(s.scenes):
        assert scene.left != scene.right
        m = caption_form.fullmatch(s.captions[i])
        assert m is not None and (m[1], m[2]) == scene.left and (m[3], m[4]) == scene.right
        assert s.class_names[int(s.labels[i])] == f"{scene.left[0]} {scene.left[1]}"
        assert _colours_in(pixels[i, :, :16]) == {WHITE, COLOURS[scene.left[0]]}
        assert _colours_in(pixels[i, :, 16:]) == {WHITE, COLOURS[scene.right[0]]}
    assert len(set(s.labels.tolist())) >= 8  # 60 draws over 12 classes are not all alike


def test_shapes_is_deterministic_for_a_seed() -> None:
    a, b = shapes(25, seed=11), shapes(25, seed=11)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.captions == b.captions
    c = shapes(25, seed=12)
    assert not torch.equal(a.images, c.images)
    big = shapes(4, size=48, seed=0)
    assert big.images.shape == (4, 3, 48, 48)
    assert len(shapes(0)) == 0
    with pytest.raises(DataError, match="number of scenes"):
        shapes(-1)
    with pytest.raises(DataError, match="at least 8 pixels"):
        shapes(3, size=4)


# ---------------------------------------------------------------------------------------- image folder


def _write_pngs(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)


def _random_rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_image_folder_reads_labels_and_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a.png": _random_rgb(rng, 5, 6), "b.png": _random_rgb(rng, 5, 6), "c.png": _random_rgb(rng, 5, 6)}
    _write_pngs(tmp_path, arrays)
    (tmp_path / "labels.csv").write_text("file,label\na.png,dog\nb.png,cat\nc.png,dog\n")
    s = image_folder(tmp_path)
    assert s.images.shape == (3, 3, 5, 6) and s.images.dtype == torch.float32
    assert s.class_names == ["cat", "dog"] and s.labels.tolist() == [1, 0, 1] and s.captions is None
    back = np.rint(s.images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        assert np.array_equal(back[i], arrays[name])


def test_image_folder_greyscale_and_captions(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
    colour = _random_rgb(rng, 4, 4)
    _write_pngs(tmp_path, {"g.png": grey, "c.png": colour})
    (tmp_path / "labels.csv").write_text('file,caption\ng.png,"a grey square, noisy"\nc.png,a colour one\n')
    s = image_folder(tmp_path, channels=1)
    assert s.images.shape == (2, 1, 4, 4)
    assert s.captions == ["a grey square, noisy", "a colour one"]
    assert s.class_names == [] and s.labels.tolist() == [0, 0]
    back = np.rint(s.images[:, 0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(back[0], grey)
    assert np.array_equal(back[1], np.asarray(Image.fromarray(colour).convert("L")))
    as_rgb = image_folder(tmp_path)  # a greyscale PNG read as RGB repeats its one channel
    assert as_rgb.images.shape == (2, 3, 4, 4)
    assert torch.equal(as_rgb.images[0, 0], as_rgb.images[0, 2]) and torch.equal(as_rgb.images[0, 1], s.images[0, 0])


def test_image_folder_csv_path_with_both_columns_and_subfolders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = {"imgs/x.png": _random_rgb(rng, 3, 3), "imgs/y.png": _random_rgb(rng, 3, 3)}
    _write_pngs(tmp_path / "data", arrays)
    csv_path = tmp_path / "data" / "pairs.csv"
    csv_path.write_text("caption,file,label\nthe first,imgs/x.png,b\nthe second,imgs/y.png,a\n")
    s = image_folder(csv_path)
    assert s.class_names == ["a", "b"] and s.labels.tolist() == [1, 0]
    assert s.captions == ["the first", "the second"]
    assert np.array_equal(np.rint(s.images[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8), arrays["imgs/y.png"])


def test_image_folder_resizes_mixed_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays = {"big.png": _random_rgb(rng, 10, 12), "small.png": _random_rgb(rng, 6, 6)}
    _write_pngs(tmp_path, arrays)
    Image.fromarray(_random_rgb(rng, 9, 9)).save(tmp_path / "photo.jpg", quality=95)
    (tmp_path / "labels.csv").write_text("file,label\nbig.png,x\nsmall.png,y\nphoto.jpg,x\n")
    with pytest.raises(DataError, match=r"small\.png is 6x6 pixels but big\.png is 12x10.*--image-size"):
        image_folder(tmp_path)
    s = image_folder(tmp_path, size=8)
    assert s.images.shape == (3, 3, 8, 8)
    expected = np.asarray(Image.fromarray(arrays["big.png"]).resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(np.rint(s.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), expected)
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0


@pytest.mark.parametrize(
    ("csv_bytes", "match"),
    [
        (b"", r"labels\.csv is empty"),
        (b"name,label\na.png,cat\n", r"no 'file' column"),
        (b"file,colour\na.png,red\n", r"needs a 'label' or 'caption' column"),
        (b"file,label\n", r"lists no images"),
        (b"file,label\na.png,cat\nmissing.png,dog\n", r"labels\.csv:3 lists missing\.png, which does not exist"),
        (b"file,label\nbroken.png,cat\n", r"broken\.png could not be read as a PNG or JPEG image"),
        (b"file,label\na.png,caf\xe9\n", r"labels\.csv:2 is not UTF-8 text"),
        (b"file,label\na.png,\n", r"labels\.csv:2 has no label for a\.png"),
    ],
)
def test_image_folder_errors(tmp_path: Path, csv_bytes: bytes, match: str) -> None:
    _write_pngs(tmp_path, {"a.png": np.zeros((2, 2, 3), dtype=np.uint8)})
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "labels.csv").write_bytes(csv_bytes)
    with pytest.raises(DataError, match=match) as info:
        image_folder(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


def test_image_folder_missing_paths_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"image folder .*nowhere does not exist"):
        image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no labels\.csv"):
        image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="channels must be 1"):
        image_folder(tmp_path, channels=4)
    with pytest.raises(DataError, match="image size"):
        image_folder(tmp_path, size=0)
