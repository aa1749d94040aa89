import numpy as np
import pytest
from PIL import Image

from twostage_ad.config import DataConfig
from twostage_ad.data.images import (
    decode_records,
    infer_bit_depth,
    infer_channels,
    read_image,
    read_image_with_size,
    read_mask,
    to_tensor,
    warn_if_much_reduced,
)
from twostage_ad.data.records import (
    DataError,
    Record,
    ensure_val_split,
    load_records,
    read_digits,
    read_manifest,
    read_mvtec_layout,
    read_seed_layout,
    split_records,
)

from conftest import textured, write_image


def test_seed_layout_reads_labels_and_splits(seed_layout):
    records = read_seed_layout(seed_layout)
    assert len(records) == 14
    assert {(r.split, r.label) for r in records} == {("train", 0), ("test", 0), ("test", 1)}
    assert sum(r.label for r in records) == 3


def test_mvtec_layout_pairs_masks_and_selects_category(mvtec_layout):
    records = read_mvtec_layout(mvtec_layout, category="tile")
    anomalies = [r for r in records if r.label == 1]
    assert len(records) == 10 and len(anomalies) == 2
    assert all(r.mask is not None and r.mask.name.endswith("_mask.png") for r in anomalies)
    assert all(r.category == "crack" for r in anomalies)


def test_manifest_paths_are_relative_to_the_csv_and_category_filters(tmp_path, rng):
    write_image(tmp_path / "imgs" / "a.png", textured(rng))
    write_image(tmp_path / "imgs" / "b.png", textured(rng))
    write_image(tmp_path / "imgs" / "b_mask.png", np.zeros((40, 40), np.uint8))
    (tmp_path / "split.csv").write_text(
        "image,label,split,mask,category\nimgs/a.png,0,train,,x\nimgs/b.png,1,test,imgs/b_mask.png,x\nimgs/a.png,0,train,,y\n"
    )
    records = read_manifest(tmp_path / "split.csv", category="x")
    assert [r.image for r in records] == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert records[1].mask == tmp_path / "imgs" / "b_mask.png" and records[0].mask is None
    with pytest.raises(DataError, match="no rows of category 'z'"):
        read_manifest(tmp_path / "split.csv", category="z")


def test_folders_layout_reads_anomalies_sorted_into_subfolders(seed_layout, rng):
    write_image(seed_layout / "test" / "1.abnormal" / "scratch" / "s0.png", textured(rng))
    for skipped in ("masks", ".ipynb_checkpoints", "@eaDir", "scratch/deeper"):
        write_image(seed_layout / "test" / "1.abnormal" / skipped / "x.png", textured(rng))
    write_image(seed_layout / "test" / "1.abnormal" / "p0.PGM", textured(rng))  # netpbm, as machine-vision tools write
    records = {r.name: r for r in read_seed_layout(seed_layout)}
    assert not any("x.png" in name for name in records)
    assert read_image(records["test/1.abnormal/p0.PGM"].image, 16, 1).shape == (16, 16, 1)
    assert records["test/1.abnormal/scratch/s0.png"].label == 1
    assert records["test/1.abnormal/scratch/s0.png"].category == "scratch"
    assert records["test/1.abnormal/a0.png"].category == "1.abnormal"


def test_mvtec_layout_variants_find_their_masks_and_normals(tmp_path, rng, caplog):
    root = tmp_path / "visa"
    write_image(root / "train" / "Good" / "0.png", textured(rng))
    write_image(root / "test" / "Good" / "1.PNG", textured(rng))  # another case
    for stem, mask_name in (("a", "a.png"), ("b", "B_MASK.bmp"), ("c", None), ("d_mask", "d_mask.png")):
        write_image(root / "test" / "scratch" / f"{stem}.png", textured(rng))
        if mask_name:
            write_image(root / "ground_truth" / "Scratch" / mask_name, np.zeros((40, 40), np.uint8))
    write_image(root / "ground_truth" / "Scratch" / "a_mask.png", np.zeros((40, 40), np.uint8))  # MVTec's name wins
    with caplog.at_level("WARNING", logger="twostage_ad.data.records"):
        records = {r.name: r for r in read_mvtec_layout(root)}
    assert records["test/Good/1.PNG"].label == 0
    assert records["test/scratch/a.png"].mask.name == "a_mask.png" and records["test/scratch/b.png"].mask.name == "B_MASK.bmp"
    assert records["test/scratch/d_mask.png"].mask.name == "d_mask.png"
    assert records["test/scratch/c.png"].mask is None and "1 image(s) in" in caplog.text and "ground_truth/scratch" in caplog.text


def test_manifest_written_on_windows_reads_the_same_files(tmp_path, rng):
    write_image(tmp_path / "imgs" / "sub" / "b.png", textured(rng))
    write_image(tmp_path / "imgs" / "sub" / "b_mask.png", np.zeros((40, 40), np.uint8))
    (tmp_path / "split.csv").write_text("image,label,split,mask,category\r\nimgs\\sub\\b.png,1,test,imgs\\sub\\b_mask.png,x\r\n")
    [record] = read_manifest(tmp_path / "split.csv")
    assert record.image == tmp_path / "imgs" / "sub" / "b.png" and record.image.is_file()
    assert record.mask == tmp_path / "imgs" / "sub" / "b_mask.png"


@pytest.mark.parametrize(
    "row, message",
    [
        ("imgs/a.png,2,train,,x", "label must be 0 (normal) or 1"),
        ("imgs/a.png,0,holdout,,x", "split must be one of"),
        (",0,train,,x", "the image column is empty"),
    ],
)
def test_manifest_bad_rows_name_the_line(tmp_path, row, message):
    (tmp_path / "split.csv").write_text(f"image,label,split,mask,category\n{row}\n")
    with pytest.raises(DataError, match="line 2") as info:
        read_manifest(tmp_path / "split.csv")
    assert message in str(info.value)


def test_manifest_missing_columns(tmp_path):
    (tmp_path / "split.csv").write_text("path,label\na.png,0\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['image', 'split'\]"):
        read_manifest(tmp_path / "split.csv")


def test_val_split_is_carved_from_train_normals_reproducibly(seed_layout):
    records = read_seed_layout(seed_layout)
    a = ensure_val_split(records, 0.25, seed=1)
    b = ensure_val_split(records, 0.25, seed=1)
    val = [r.name for r in a if r.split == "val"]
    assert val == [r.name for r in b if r.split == "val"]
    assert len(val) == 2 and all(r.label == 0 for r in a if r.split == "val")
    assert sum(r.split == "train" for r in a) == 6
    parts = split_records(a)
    assert len(parts["train"]) == 6 and len(parts["test"]) == 6


def test_load_records_rejects_a_source_without_training_normals(tmp_path):
    (tmp_path / "train" / "0.normal").mkdir(parents=True)
    with pytest.raises(DataError, match="no normal training images"):
        load_records(DataConfig(source="seed", path=str(tmp_path)))


def test_digits_are_bundled_and_one_digit_is_normal():
    records = read_digits(normal_digit=3)
    assert len(records) == 1797
    assert all((r.label == 0) == (r.category == "digit_3") for r in records)
    assert not any(r.split == "train" and r.label for r in records)


@pytest.mark.parametrize(
    "array, mode, channels",
    [
        (np.full((20, 30), 100, np.uint8), "L", 1),
        (np.full((20, 30, 3), 100, np.uint8), "RGB", 3),
        (np.full((20, 30, 4), 100, np.uint8), "RGBA", 3),
        (np.full((20, 30), 100 * 257, np.uint16), "I;16", 1),
    ],
)
def test_image_modes_decode_to_8bit_of_the_requested_channels(tmp_path, array, mode, channels):
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    assert infer_channels(Record(name="x", label=0, split="train", image=path)) == channels
    for wanted in (1, 3):
        out = read_image(path, 32, wanted)
        assert out.shape == (32, 32, wanted) and out.dtype == np.uint8
        assert abs(int(out.mean()) - 100) <= 1  # 16-bit is scaled by its range, not clipped


def test_masks_binarise_and_invert(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[:20] = 255  # defect (white) in the top half
    mask[20:22] = 100  # below half the mask's largest value: not defect
    Image.fromarray(mask).save(tmp_path / "m.png")
    plain = read_mask(tmp_path / "m.png", 32)
    inverted = read_mask(tmp_path / "m.png", 32, invert=True)
    assert set(np.unique(plain)) == {0, 1}
    assert plain[:15].all() and not plain[18:].any()
    assert np.array_equal(inverted, 1 - plain)


def test_mask_of_another_aspect_ratio_is_a_clear_error_and_a_smaller_one_is_resized(tmp_path):
    Image.fromarray(np.zeros((20, 10), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="is 10×20 but its image is 40×40"):
        read_mask(tmp_path / "m.png", 32, expect_shape=(40, 40))
    half = np.zeros((20, 20), np.uint8)
    half[:, 10:] = 255  # a half-resolution mask: the right half is defect
    Image.fromarray(half).save(tmp_path / "half.png")
    mask = read_mask(tmp_path / "half.png", 32, expect_shape=(40, 40))
    assert mask[:, 16:].all() and not mask[:, :16].any()


@pytest.mark.parametrize(("encoding", "defect", "mode"), [
    ("label 0/1", 1, "L"), ("label 0/2 (a class index)", 2, "L"), ("0/255", 255, "L"), ("16-bit 0/255", 255, "I;16"),
    ("16-bit 0/65535", 65535, "I;16"), ("red on black", (255, 0, 0), "RGB"), ("dark red on black", (128, 0, 0), "RGB"),
    ("1-bit", True, "1"),
])
def test_masks_of_every_common_encoding_mark_the_defect(tmp_path, encoding, defect, mode):
    shape = (40, 40, 3) if mode == "RGB" else (40, 40)
    values = np.zeros(shape, {"I;16": np.uint16, "1": bool}.get(mode, np.uint8))
    values[10:20, 10:30] = defect
    Image.fromarray(values).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == mode
    mask = read_mask(tmp_path / "m.png", 40)
    assert mask.sum() == 200 and mask[10:20, 10:30].all(), encoding


def test_jpeg_mask_noise_is_not_a_defect(tmp_path):
    values = np.zeros((64, 64), np.uint8)
    values[20:40, 20:40] = 255
    Image.fromarray(values).save(tmp_path / "m.jpg", quality=60)  # ringing puts small values around the square
    mask = read_mask(tmp_path / "m.jpg", 64)
    assert mask[22:38, 22:38].all() and not mask[:16].any() and abs(int(mask.sum()) - 400) <= 40
    noise = np.random.default_rng(0).integers(0, 4, (64, 64)).astype(np.uint8)  # a "normal" JPEG mask: noise only
    Image.fromarray(noise).save(tmp_path / "n.jpg", quality=90)
    assert read_mask(tmp_path / "n.jpg", 64).sum() == 0
    Image.fromarray(noise).save(tmp_path / "n.png")  # the same values lossless are labels: every non-zero one counts
    assert read_mask(tmp_path / "n.png", 64).sum() == (noise > 0).sum()


def test_float_images_are_read_as_0_to_1_and_refused_outside_it(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32), (40, 1))
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    grey = read_image(tmp_path / "unit.tif", 40, 1)[..., 0]
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and np.all(np.diff(grey[0].astype(int)) >= 0)
    Image.fromarray(ramp * 255).save(tmp_path / "bytes.tif")  # 0-255 as floats: would be white nearly everywhere
    with pytest.raises(DataError, match=r"bytes.tif' holds float values from 0 to 255, but float images are read as 0–1"):
        read_image(tmp_path / "bytes.tif", 40, 1)
    ramp[0, 0] = np.nan  # where Pillow's extrema would read NaN and let the range through
    Image.fromarray(ramp).save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="nan.tif' holds NaN or infinite float values"):
        read_image(tmp_path / "nan.tif", 40, 1)


def test_soft_float_masks_cut_at_half_their_peak(tmp_path):
    soft = np.zeros((40, 40), np.float32)
    soft[10:20, 10:30], soft[20:25, 10:30] = 1.0, 0.3  # a defect and a faint halo
    Image.fromarray(soft).save(tmp_path / "m.tif")
    assert read_mask(tmp_path / "m.tif", 40).sum() == 200


def test_decoding_keeps_anomalies_whose_masks_are_unusable_and_says_why(tmp_path, caplog):
    image = write_image(tmp_path / "a.png", textured(np.random.default_rng(0)))
    empty = write_image(tmp_path / "empty.png", np.zeros((40, 40), np.uint8))
    records = [Record(name="lost", label=1, split="test", image=image, mask=tmp_path / "nowhere.png"),
               Record(name="empty", label=1, split="test", image=image, mask=empty),
               Record(name="normal", label=0, split="test", image=image, mask=tmp_path / "gone.png")]
    with caplog.at_level("WARNING", logger="twostage_ad.data.images"):
        decoded = decode_records(records, 32, 1, progress=False)
    assert [r.name for r in decoded.records] == ["lost", "empty", "normal"] and decoded.failed == []
    assert decoded.has_mask.tolist() == [False, True, True]  # a normal's lost mask could only have said "no defect"
    assert [name for name, _ in decoded.mask_problems] == ["lost", "normal"]
    assert "2 mask(s) could not be used" in caplog.text and "nowhere.png" in caplog.text
    assert "1 anomaly mask(s) mark no defect pixel (e.g. empty)" in caplog.text


def test_masks_covering_most_of_their_images_suggest_inverting(tmp_path, caplog):
    image = write_image(tmp_path / "a.png", textured(np.random.default_rng(0)))
    black_defect = np.full((40, 40), 255, np.uint8)
    black_defect[5:10, 5:10] = 0  # PIPED's convention: the defect is black
    mask = write_image(tmp_path / "m.png", black_defect)
    with caplog.at_level("WARNING", logger="twostage_ad.data.images"):
        decode_records([Record(name="a", label=1, split="test", image=image, mask=mask)], 32, 1, progress=False)
    assert "mark 98 % of their images as defect" in caplog.text and "data.invert_masks: true" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage_ad.data.images"):
        decoded = decode_records([Record(name="a", label=1, split="test", image=image, mask=mask)], 40, 1, True, progress=False)
    assert "invert_masks" not in caplog.text and decoded.masks[0].sum() == 25


def test_jpeg_orientation_is_applied_to_images_and_masks(tmp_path):
    stored = np.zeros((20, 40), np.uint8)  # stored 40 wide, 20 high; the tag says: turn it to 20×40
    stored[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.fromarray(stored).save(tmp_path / "a.jpg", exif=exif, quality=95)
    image, native = read_image_with_size(tmp_path / "a.jpg", 40, 1)
    assert native == (20, 40)  # as viewers show it
    assert image[:10, :, 0].mean() > 200 and image[-10:, :, 0].mean() < 50  # the bright left band is now on top
    shown = np.zeros((40, 20), np.uint8)
    shown[:10] = 255  # a mask drawn on the shown image: the band on top
    Image.fromarray(shown).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", 32, expect_shape=native)[:8].all()
    Image.fromarray(stored).save(tmp_path / "tagged.png", exif=exif)  # a mask carrying the image's tag turns with it
    tagged = read_mask(tmp_path / "tagged.png", 32, expect_shape=native)
    assert tagged[:8].all() and not tagged[-8:].any()


def test_an_image_past_pillows_pixel_limit_is_skipped_not_fatal(tmp_path, monkeypatch):
    path = write_image(tmp_path / "huge.png", np.zeros((200, 200), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 000 px is past twice the limit
    decoded = decode_records([Record(name="huge", label=0, split="train", image=path)], 32, 1, progress=False)
    assert len(decoded) == 0 and decoded.failed[0][0] == "huge" and "decompression bomb" in decoded.failed[0][1]


def test_decode_skips_and_lists_unreadable_images(seed_layout):
    records = read_seed_layout(seed_layout)
    broken = seed_layout / "test" / "1.abnormal" / "a0.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated file
    (seed_layout / "test" / "1.abnormal" / "notes.png").write_text("not an image")
    records = read_seed_layout(seed_layout)
    decoded = decode_records(records, 32, 1, progress=False)
    assert len(decoded) == len(records) - 2
    assert sorted(name.split("/")[-1] for name, _ in decoded.failed) == ["a0.png", "notes.png"]
    assert all("cannot read image" in reason for _, reason in decoded.failed)
    assert decoded.images.shape == (len(records) - 2, 32, 32, 1)


def test_to_tensor_maps_uint8_to_minus_one_one():
    images = np.array([[[[0]], [[255]]]], dtype=np.uint8)  # 1×2×1×1
    tensor = to_tensor(images)
    assert tensor.shape == (1, 1, 2, 1)
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0


def test_sixteen_bit_scaling_depends_on_the_mode_not_the_pixels(tmp_path):
    dark = np.full((8, 8), 200, np.uint16)  # a dark 16-bit image must stay dark
    ramp = np.tile(np.linspace(0, 65535, 8).astype(np.uint16), (8, 1))
    Image.fromarray(dark).save(tmp_path / "dark.png")
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert read_image(tmp_path / "dark.png", 32, 1).max() <= 1
    out = read_image(tmp_path / "ramp.png", 32, 1)
    assert out[:, 0].max() < 40 and out[:, -1].min() > 215


def test_twelve_bit_values_in_sixteen_bit_files_use_the_whole_grey_range(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 8).astype(np.uint16), (8, 1))  # a 12-bit camera's values
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert read_image(tmp_path / "ramp.png", 32, 1).max() <= 16  # read as 16 bits: nearly black
    out = read_image(tmp_path / "ramp.png", 32, 1, bit_depth=12)
    assert out[:, 0].max() < 40 and out[:, -1].min() > 215
    records = [Record(name="r", label=0, split="train", image=tmp_path / "ramp.png")]
    assert infer_bit_depth(records) == 12
    Image.fromarray(np.full((8, 8), 4096, np.uint16)).save(tmp_path / "over.png")
    assert infer_bit_depth([*records, Record(name="o", label=0, split="train", image=tmp_path / "over.png")]) == 14
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "eight.png")
    assert infer_bit_depth([Record(name="e", label=0, split="train", image=tmp_path / "eight.png")]) == 16  # no 16-bit file
    decoded = decode_records(records, 32, 1, progress=False, bit_depth=12)
    np.testing.assert_array_equal(decoded.images[0], out)


def test_thin_mask_lines_survive_downscaling(tmp_path):
    mask = np.zeros((384, 384), np.uint8)
    mask[:, 200] = 255  # a 1-px crack
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", 128).sum() >= 128


@pytest.mark.parametrize(("sides", "warned"), [((600, 520, 700), True), ((300, 359, 618), False)])
def test_a_run_is_warned_when_images_are_much_larger_than_the_screen(tmp_path, caplog, sides, warned):
    records = []
    for index, side in enumerate(sides):
        path = write_image(tmp_path / f"{index}.png", np.full((side // 2, side), 128, np.uint8))  # W = side
        records.append(Record(name=path.name, label=0, split="train", image=path))
    records.append(Record(name="gone.png", label=0, split="train", image=tmp_path / "gone.png"))  # skipped: not counted
    decoded = decode_records(records, 256, 1, progress=False)  # a larger stage 2's decode: not what is judged
    assert decoded.native_sizes.tolist() == [[side, side // 2] for side in sides]
    with caplog.at_level("WARNING", logger="twostage_ad.data.images"):
        assert warn_if_much_reduced(decoded, 128) is warned
    messages = [r.getMessage() for r in caplog.records if "larger than stage 1's input" in r.getMessage()]
    if warned:  # median longest side 600 px: reduced 4.7× at the 128-px screen, named with the largest image
        assert len(messages) == 1 and "about 5× larger than stage 1's input of 128 px" in messages[0]
        assert "2.png: 700×350" in messages[0] and "data.image_size" in messages[0]
    else:  # MTD's spread of sizes (median 359 px, 2.8×) stays quiet
        assert messages == []
    assert warn_if_much_reduced(decode_records(records[:1], 128, 1, progress=False), 160) is False  # 3.75×


def test_at_the_largest_decode_the_warning_says_to_cut_the_images(tmp_path, caplog):
    path = write_image(tmp_path / "huge.png", np.full((1000, 2100), 128, np.uint8))
    decoded = decode_records([Record(name=path.name, label=0, split="train", image=path)], 64, 1, progress=False)
    with caplog.at_level("WARNING", logger="twostage_ad.data.images"):
        assert warn_if_much_reduced(decoded, 512) is True
        assert warn_if_much_reduced(decoded, 128) is True
    first, second = (r.getMessage() for r in caplog.records if "larger than stage 1's input" in r.getMessage())
    assert "cut them into parts smaller than 2048 px (512 px is the largest decode)" in first
    assert "larger data.image_size" not in first
    assert "try a run with a larger data.image_size" in second and "synthetic_val" in second
