"""Tests of musc_stream/evaluation/datasets.py on tiny folders built in tmp_path and on the real magnetic tiles."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musc_stream.evaluation.datasets import (
    MASK_RULES,
    DatasetError,
    Sample,
    camera_setup,
    discover,
    load_image,
    load_mask,
    seeded_subset,
)

REAL_MT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "magnetic_tile"


def _write_image(path: Path, size_wh=(8, 6), mode="RGB", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size_wh, value if mode == "L" else (value, value, value)).save(path)


def _write_mask(path: Path, box, size_wh=(8, 6), value=255):
    """Mask with `value` inside box = (x0, y0, x1, y1), exclusive end."""
    array = np.zeros((size_wh[1], size_wh[0]), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for stem in ("000", "001"):
        _write_image(root / "bottle" / "test" / "good" / f"{stem}.png")
    _write_image(root / "bottle" / "test" / "broken" / "000.png")
    _write_mask(root / "bottle" / "ground_truth" / "broken" / "000_mask.png", (2, 1, 5, 3))
    _write_image(root / "cable" / "test" / "good" / "000.png")
    _write_image(root / "cable" / "test" / "cut" / "000.png")
    _write_mask(root / "cable" / "ground_truth" / "cut" / "000_mask.png", (0, 0, 8, 6))
    (root / "readme_dir").mkdir()  # unrelated folder: ignored
    return root


@pytest.fixture
def mt_root(tmp_path):
    root = tmp_path / "data" / "magnetic_tile"
    for stem in ("a", "b", "c"):
        _write_image(root / "MT_Free" / "Imgs" / f"{stem}.jpg", mode="L")
        _write_mask(root / "MT_Free" / "Imgs" / f"{stem}.png", (0, 0, 0, 0))
    _write_image(root / "MT_Crack" / "Imgs" / "k1.jpg", mode="L")
    # Anti-aliased mask: 127 must be background, 128 defect.
    mask = np.zeros((6, 8), np.uint8)
    mask[1, 1], mask[1, 2], mask[2, 2] = 127, 128, 255
    Image.fromarray(mask).save(root / "MT_Crack" / "Imgs" / "k1.png")
    _write_image(root / "MT_Uneven" / "Imgs" / "u1.jpg", mode="L")
    _write_mask(root / "MT_Uneven" / "Imgs" / "u1.png", (0, 0, 0, 0))  # empty mask, still anomalous
    return root


def test_discover_mvtec(mvtec_root):
    categories = discover(mvtec_root)
    assert sorted(categories) == ["bottle", "cable"]
    bottle = categories["bottle"]
    assert [(s.path.name, s.defect_type, s.label) for s in bottle] == [
        ("000.png", "broken", 1),
        ("000.png", "good", 0),
        ("001.png", "good", 0),
    ]
    assert bottle[0].mask_path == mvtec_root / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    assert bottle[1].mask_path is None
    assert {s.category for s in bottle} == {"bottle"}
    assert list(discover(mvtec_root / "cable")) == ["cable"]  # a category folder as root


def test_mvtec_masks(mvtec_root):
    broken, good = discover(mvtec_root)["bottle"][:2]
    mask = load_mask(broken)
    assert mask.dtype == bool and mask.shape == (6, 8)
    assert mask.sum() == 6 and mask[1:3, 2:5].all()
    resized = load_mask(broken, (12, 16))
    # 2× up: the bilinear rim falls below 255, so only the 4×2 core counts, as in the reference
    assert resized.shape == (12, 16) and resized.sum() == 8
    assert np.array_equal(resized, _reference_mvtec_mask(broken.mask_path, (12, 16)))
    assert load_mask(good, (12, 16)).shape == (12, 16) and not load_mask(good, (12, 16)).any()
    assert load_mask(good).shape == (6, 8)  # size read from the image


def test_load_image_is_rgb(mt_root):
    sample = discover(mt_root)["magnetic_tile"][0]
    image = load_image(sample.path)
    assert image.mode == "RGB" and image.size == (8, 6)


def test_discover_magnetic_tile_from_folder_and_parent(mt_root):
    for root in (mt_root, mt_root.parent):
        categories = discover(root)
        assert list(categories) == ["magnetic_tile"]
        samples = categories["magnetic_tile"]
        assert Counter((s.defect_type, s.label) for s in samples) == {
            ("crack", 1): 1,
            ("good", 0): 3,
            ("uneven", 1): 1,
        }
        assert all(s.mask_path == s.path.with_suffix(".png") for s in samples)


def test_magnetic_tile_mask_threshold_and_empty_mask(mt_root):
    samples = {s.path.stem: s for s in discover(mt_root)["magnetic_tile"]}
    mask = load_mask(samples["k1"])
    assert mask.sum() == 2 and mask[1, 2] and mask[2, 2] and not mask[1, 1]
    assert samples["u1"].label == 1 and not load_mask(samples["u1"]).any()


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        discover(tmp_path / "nowhere")


def test_no_images(tmp_path):
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        discover(tmp_path)


def test_mvtec_mask_without_image(mvtec_root):
    _write_mask(mvtec_root / "bottle" / "ground_truth" / "broken" / "007_mask.png", (0, 0, 1, 1))
    with pytest.raises(DatasetError, match="007_mask.png"):
        discover(mvtec_root)


def test_mvtec_mask_type_without_image_folder(mvtec_root):
    _write_mask(mvtec_root / "bottle" / "ground_truth" / "scratch" / "000_mask.png", (0, 0, 1, 1))
    with pytest.raises(DatasetError, match="000_mask.png"):
        discover(mvtec_root)


def test_magnetic_tile_mask_without_image(mt_root):
    _write_mask(mt_root / "MT_Crack" / "Imgs" / "orphan.png", (0, 0, 1, 1))
    with pytest.raises(DatasetError, match="orphan.png"):
        discover(mt_root)


def test_corrupt_image_raises_on_load(mvtec_root):
    bad = mvtec_root / "cable" / "test" / "good" / "000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    sample = next(s for s in discover(mvtec_root)["cable"] if s.path == bad)  # discovery does not decode
    with pytest.raises(DatasetError, match="000.png"):
        load_image(sample.path)


def test_truncated_mask_raises_on_load(mvtec_root):
    mask_path = mvtec_root / "cable" / "ground_truth" / "cut" / "000_mask.png"
    mask_path.write_bytes(mask_path.read_bytes()[:40])
    sample = next(s for s in discover(mvtec_root)["cable"] if s.label == 1)
    with pytest.raises(DatasetError, match="000_mask.png"):
        load_mask(sample)


def test_anomalous_without_mask_raises(tmp_path):
    sample = Sample(tmp_path / "x.png", 1, "crack", None, "c")
    with pytest.raises(DatasetError, match="x.png"):
        load_mask(sample, (4, 4))


def _fake_samples():
    samples = [Sample(Path(f"/d/good/{i:03d}.png"), 0, "good", None, "c") for i in range(30)]
    for defect_type, count in (("big", 20), ("mid", 12), ("small", 4)):
        samples += [Sample(Path(f"/d/{defect_type}/{i:03d}.png"), 1, defect_type, None, "c") for i in range(count)]
    return samples


def test_seeded_subset_is_deterministic_and_stratified():
    samples = _fake_samples()
    first = seeded_subset(samples, 10, 9, seed=42)
    assert first == seeded_subset(list(reversed(samples)), 10, 9, seed=42)  # input order irrelevant
    assert first != seeded_subset(samples, 10, 9, seed=43)
    assert len(first) == 19 and len(set(first)) == 19
    counts = Counter(s.defect_type for s in first)
    # Quotas 9·20/36 = 5, 9·12/36 = 3, 9·4/36 = 1.
    assert counts == {"good": 10, "big": 5, "mid": 3, "small": 1}
    assert [s.label for s in first] != sorted(s.label for s in first)  # normal and anomalous mixed


def test_seeded_subset_largest_remainder():
    counts = Counter(s.defect_type for s in seeded_subset(_fake_samples(), 0, 4, seed=0))
    # Quotas 2.22, 1.33, 0.44: floors 2, 1, 0 and the one left goes to the largest remainder (small).
    assert counts == {"big": 2, "mid": 1, "small": 1}


def test_seeded_subset_too_many():
    with pytest.raises(DatasetError, match="normal"):
        seeded_subset(_fake_samples(), 31, 0, seed=0)
    with pytest.raises(DatasetError, match="anomalous"):
        seeded_subset(_fake_samples(), 0, 37, seed=0)


@pytest.mark.skipif(not REAL_MT.is_dir(), reason="real magnetic-tile data not present at ../shared/data")
def test_discover_real_magnetic_tile():
    samples = discover(REAL_MT)["magnetic_tile"]
    labels = Counter(s.label for s in samples)
    assert labels == {0: 952, 1: 392}
    assert Counter(s.defect_type for s in samples if s.label == 1) == {
        "blowhole": 115,
        "break": 85,
        "crack": 57,
        "fray": 32,
        "uneven": 103,
    }
    by_stem = {s.path.stem: s for s in samples}
    for stem in ("exp3_num_45042", "exp4_num_124690", "exp4_num_352527", "exp4_num_45057"):
        sample = by_stem[stem]
        assert sample.defect_type == "uneven" and sample.label == 1
        assert not load_mask(sample).any()
    assert discover(REAL_MT.parent)["magnetic_tile"] == samples


def _reference_mvtec_mask(path: Path, size_hw) -> np.ndarray:
    """The reference's MVTec ground truth (datasets/mvtec.py): Resize((S,S)) + ToTensor on the PIL
    mask, then astype(int32) in the evaluation, so only pixels still at 1.0 count."""
    from torchvision import transforms

    tensor = transforms.Compose([transforms.Resize(size_hw), transforms.ToTensor()])(Image.open(path))
    return tensor[0].numpy().astype(np.int32).astype(bool)


def test_mvtec_mask_only_pixels_still_at_255_count(tmp_path):
    root = tmp_path / "mvtec" / "widget"
    _write_image(root / "test" / "good" / "000.png", size_wh=(53, 37))
    _write_image(root / "test" / "dent" / "000.png", size_wh=(53, 37))
    # a real-looking 0/255 mask: a disc and a thin line (both leave soft edges after the resize)
    yy, xx = np.mgrid[:37, :53]
    mask = (((yy - 15) ** 2 + (xx - 20) ** 2) < 64) | ((xx == 40) & (yy > 5))
    mask_path = root / "ground_truth" / "dent" / "000_mask.png"
    mask_path.parent.mkdir(parents=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    sample = next(s for s in discover(root)["widget"] if s.label == 1)
    assert sample.layout == "mvtec"
    for side in (24, 96):  # down- and up-sampling
        ours = load_mask(sample, (side, side))
        assert np.array_equal(ours, _reference_mvtec_mask(mask_path, (side, side)))
        resized = np.asarray(Image.open(mask_path).resize((side, side), Image.Resampling.BILINEAR))
        assert 0 < ours.sum() < (resized >= 128).sum()  # the soft rim is left out, the core kept
    assert np.array_equal(load_mask(sample), mask)  # at its own size the mask is the file


def test_mvtec_mask_that_is_not_0_255_is_a_clear_error(tmp_path):
    root = tmp_path / "widget"
    _write_image(root / "test" / "dent" / "000.png")
    _write_mask(root / "ground_truth" / "dent" / "000_mask.png", (1, 1, 4, 4), value=1)  # a 0/1 mask
    sample = discover(root)["widget"][0]
    with pytest.raises(DatasetError, match=r"000_mask.png marks defects with 1, not 255"):
        load_mask(sample, (8, 8))


@pytest.mark.skipif(not REAL_MT.is_dir(), reason="real magnetic-tile data not present at ../shared/data")
def test_real_magnetic_tile_mask_keeps_the_128_rule():
    sample = next(s for s in discover(REAL_MT)["magnetic_tile"] if s.path.stem == "exp1_num_249594")
    assert sample.layout == "magnetic_tile" and sample.defect_type == "crack"
    original = np.asarray(Image.open(sample.mask_path).convert("L"))
    assert ((original > 0) & (original < 255)).sum() > 100  # anti-aliased at its own size
    resized = np.asarray(Image.open(sample.mask_path).convert("L").resize((224, 224), Image.Resampling.BILINEAR))
    mask = load_mask(sample, (224, 224))
    assert np.array_equal(mask, resized >= 128)
    assert mask.sum() > (resized == 255).sum()  # the MVTec rule would shave this crack
    assert set(MASK_RULES) == {"mvtec", "magnetic_tile"}


@pytest.mark.skipif(not REAL_MT.is_dir(), reason="real magnetic-tile data not present at ../shared/data")
def test_camera_setup_is_the_file_name_prefix(mvtec_root):
    samples = discover(REAL_MT)["magnetic_tile"]
    assert Counter(camera_setup(s) for s in samples if s.label == 0) == {
        "exp0": 1, "exp1": 157, "exp2": 159, "exp3": 157, "exp4": 160, "exp5": 160, "exp6": 158,
    }
    assert {camera_setup(s) for s in discover(mvtec_root)["bottle"]} == {"bottle"}
