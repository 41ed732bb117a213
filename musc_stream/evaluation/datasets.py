"""Evaluation datasets on disk: MVTec and magnetic-tile discovery, image and mask loading, seeded subsets.

Two layouts are recognised (see ../shared/data/README.md for the magnetic tiles):

- MVTec AD: `<root>/<cat>/test/<type>/<stem>.png` with masks at
  `<root>/<cat>/ground_truth/<type>/<stem>_mask.png`; `<type>` "good" is normal. `root` may also be
  one category folder itself.
- Magnetic tile (MTD): `<root>/MT_<class>/Imgs/<stem>.jpg` with mask `<stem>.png` beside it;
  MT_Free is normal. All classes form one category "magnetic_tile". `root` may be the folder holding
  the MT_* folders or its parent.

Normal samples get defect_type "good" in both layouts.

Ground-truth masks are binarised per layout (``MASK_RULES``), after a bilinear resize to the
evaluation size S×S:

- MVTec: only pixels still at 255 count. The reference (datasets/mvtec.py + ToTensor, then
  ``astype(int32)``) truncates every fractional edge value to 0; ``>= 128`` would add the blurred
  rim and 0.9–1.5 AUPRO points on a real MVTec category.
- Magnetic tile: ``>= 128``. Its masks are anti-aliased (edge values 1–254 even at the original
  size), and the dataset's README binarises at 128; "only 255" would shave every defect.

The reference's VisA rule (``> 0`` after the resize) has no layout here: VisA's meta.json split
is not read.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAGNETIC_TILE = "magnetic_tile"
NORMAL_TYPE = "good"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MT_PREFIX = "MT_"
_MT_NORMAL_CLASS = "MT_Free"
_MVTEC_MASK_SUFFIX = "_mask"
MVTEC = "mvtec"
_MASK_FULL = 255  # MVTec: a defect pixel after the resize is one still at full value
_MT_MASK_THRESHOLD = 128  # magnetic tile: the dataset README's rule for its anti-aliased masks
# RsCIN windows per layout when the caller does not choose (the reference, too, picks them per
# dataset: {1,2,3} for MVTec/BTAD, {1,8,9} for VisA). Magnetic tiles: off. Within one camera set-up
# the image-level neighbours of a defect are defective at chance rate, so RsCIN only mixes noise in;
# on normalised features it cost up to 3 image-AUROC points per set-up, on raw ones 10–23
# (benchmarks/results/rscin_magnetic_tile.md). 0 turns RsCIN off.
RSCIN_WINDOWS = {MVTEC: (1, 2, 3), MAGNETIC_TILE: (0,)}
MASK_RULES = {
    MVTEC: "bilinear resize to S×S, then only pixels still at 255 (the reference truncates with astype(int32))",
    MAGNETIC_TILE: "bilinear resize to S×S, then >= 128 (anti-aliased masks; the dataset README's rule)",
}


class DatasetError(Exception):
    """A dataset folder or file that cannot be used; the message names the path."""


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 normal / 1 anomalous; mask_path None when no mask exists."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None
    category: str
    layout: str = MVTEC  # which MASK_RULES entry binarises its mask


def load_image(path: Path) -> Image.Image:
    """Decode an image fully as RGB (grayscale tiles are replicated to 3 channels for CLIP)."""
    return _open(path, "RGB")


def load_mask(sample: Sample, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask of a sample as (H, W) bool, resized to size_hw = (H, W) if given.

    Resizing is bilinear on the 8-bit mask (PIL, as torchvision's Resize in the reference), then the
    layout's rule (``MASK_RULES``) binarises it. A normal sample without a mask file is all False
    (the image header gives the size when size_hw is None); an anomalous one without a mask is an
    error, since an all-False mask would silently corrupt pixel metrics. So is an MVTec-layout mask
    with marks below 255 only (e.g. 0/1 masks): the 255 rule would see no defect in it.
    """
    if sample.mask_path is None:
        if sample.label == 1:
            raise DatasetError(f"anomalous image {sample.path} has no mask")
        if size_hw is None:
            with _open_lazy(sample.path) as img:
                size_hw = (img.height, img.width)
        return np.zeros(size_hw, dtype=bool)
    mask = _open(sample.mask_path, "L")
    if sample.layout == MVTEC:
        peak = int(np.asarray(mask).max())
        if 0 < peak < _MASK_FULL:
            raise DatasetError(
                f"mask {sample.mask_path} marks defects with {peak}, not 255: MVTec-layout masks must be "
                "0 (normal) / 255 (defect); rescale it (e.g. mask * 255)"
            )
    if size_hw is not None and (mask.height, mask.width) != tuple(size_hw):
        mask = mask.resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return binarise_mask(np.asarray(mask), sample.layout)


def binarise_mask(mask: np.ndarray, layout: str) -> np.ndarray:
    """(H, W) uint8 mask at the evaluation size → bool, by the layout's rule (``MASK_RULES``)."""
    if layout == MVTEC:
        return mask >= _MASK_FULL
    if layout == MAGNETIC_TILE:
        return mask >= _MT_MASK_THRESHOLD
    raise ValueError(f"unknown dataset layout {layout!r}; have {sorted(MASK_RULES)}")


def camera_setup(sample: Sample) -> str:
    """Capture set-up of a magnetic-tile sample: its file-name prefix (``exp1_num_…`` → ``exp1``).

    The MTD photos come from six set-ups (exp1…exp6, plus three stray exp0 files); a real line is one
    of them. Other layouts have no set-ups: the category stands for one.
    """
    if sample.layout != MAGNETIC_TILE:
        return sample.category
    return sample.path.stem.split("_", 1)[0]


def discover(root: Path) -> dict[str, list[Sample]]:
    """Find every test sample under root, grouped by category; samples sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    categories: dict[str, list[Sample]] = {}
    if _is_magnetic_tile(root):
        categories[MAGNETIC_TILE] = _discover_magnetic_tile(root)
    elif _is_mvtec_category(root):
        categories[root.name] = _discover_mvtec_category(root)
    else:
        for child in sorted(p for p in root.iterdir() if p.is_dir()):
            if _is_magnetic_tile(child):
                if MAGNETIC_TILE in categories:
                    raise DatasetError(f"two magnetic-tile folders under {root}, second at {child}")
                categories[MAGNETIC_TILE] = _discover_magnetic_tile(child)
            elif _is_mvtec_category(child):
                categories[child.name] = _discover_mvtec_category(child)
    categories = {name: samples for name, samples in categories.items() if samples}
    if not categories:
        raise DatasetError(
            f"no images found under {root}: expected <cat>/test/<type>/*.png (MVTec) or MT_<class>/Imgs/*.jpg"
        )
    for name, samples in categories.items():
        n_anomalous = sum(s.label for s in samples)
        logger.info("category %s: %d images, %d anomalous", name, len(samples), n_anomalous)
    return categories


def seeded_subset(samples: list[Sample], n_normal: int, n_anomalous: int, seed: int) -> list[Sample]:
    """Deterministic subset: n_normal normal + n_anomalous anomalous samples, in a seeded shuffled order.

    The anomalous part is stratified over defect types: each type gets its share of n_anomalous in
    proportion to its size (largest remainder, ties by type name), so small types such as Fray stay
    represented. The result depends only on the set of samples and the seed, not on input order.
    """
    if n_normal < 0 or n_anomalous < 0:
        raise ValueError(f"counts must be >= 0, got n_normal={n_normal}, n_anomalous={n_anomalous}")
    ordered = sorted(samples, key=lambda s: str(s.path))
    normal = [s for s in ordered if s.label == 0]
    by_type: dict[str, list[Sample]] = {}
    for s in ordered:
        if s.label == 1:
            by_type.setdefault(s.defect_type, []).append(s)
    n_available = sum(len(group) for group in by_type.values())
    if n_normal > len(normal):
        raise DatasetError(f"asked for {n_normal} normal samples, only {len(normal)} available")
    if n_anomalous > n_available:
        raise DatasetError(f"asked for {n_anomalous} anomalous samples, only {n_available} available")

    rng = random.Random(seed)
    chosen = rng.sample(normal, n_normal)
    for defect_type, count in _stratified_counts(by_type, n_anomalous).items():
        chosen += rng.sample(by_type[defect_type], count)
    rng.shuffle(chosen)
    return chosen


def _stratified_counts(by_type: dict[str, list[Sample]], total: int) -> dict[str, int]:
    """Split total over types in proportion to their sizes (largest remainder, ties by name)."""
    n_available = sum(len(group) for group in by_type.values())
    if total == 0 or n_available == 0:
        return {}
    names = sorted(by_type)
    quotas = {name: total * len(by_type[name]) / n_available for name in names}
    counts = {name: int(quotas[name]) for name in names}
    by_remainder = sorted(names, key=lambda name: (-(quotas[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _open(path: Path, mode: str) -> Image.Image:
    """Fully decode an image file in the given PIL mode, turning decode failures into DatasetError."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError/SyntaxError/ValueError depending on format.
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _open_lazy(path: Path) -> Image.Image:
    """Open an image header only (for its size), with the same error contract as _open."""
    try:
        return Image.open(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"image file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


def _is_magnetic_tile(folder: Path) -> bool:
    return any(p.is_dir() and p.name.startswith(_MT_PREFIX) for p in folder.iterdir())


def _is_mvtec_category(folder: Path) -> bool:
    return (folder / "test").is_dir()


def _discover_mvtec_category(folder: Path) -> list[Sample]:
    """Samples of one MVTec-layout category; every ground-truth mask must have its test image."""
    category = folder.name
    test_dir, gt_dir = folder / "test", folder / "ground_truth"
    samples = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect_type = type_dir.name
        label = 0 if defect_type == NORMAL_TYPE else 1
        images = {p.stem: p for p in _images_in(type_dir)}
        masks = {}
        if (gt_dir / defect_type).is_dir():
            for mask_path in _images_in(gt_dir / defect_type):
                stem = mask_path.stem.removesuffix(_MVTEC_MASK_SUFFIX)
                if stem not in images:
                    raise DatasetError(f"mask {mask_path} has no image {type_dir / stem}.* in {type_dir}")
                masks[stem] = mask_path
        for stem, path in images.items():
            mask_path = masks.get(stem)
            if label == 1 and mask_path is None:
                logger.warning("anomalous image %s has no mask under %s", path, gt_dir / defect_type)
            samples.append(Sample(path, label, defect_type, mask_path, category))
    if gt_dir.is_dir():
        for mask_type_dir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            if not (test_dir / mask_type_dir.name).is_dir() and _images_in(mask_type_dir):
                mask_path = _images_in(mask_type_dir)[0]
                raise DatasetError(f"mask {mask_path} has no image: {test_dir / mask_type_dir.name} is missing")
    return samples


def _discover_magnetic_tile(folder: Path) -> list[Sample]:
    """Samples of the magnetic-tile layout: `<stem>.jpg` image, `<stem>.png` mask in MT_<class>/Imgs."""
    samples = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_MT_PREFIX)):
        imgs_dir = class_dir / "Imgs"
        if not imgs_dir.is_dir():
            logger.warning("magnetic-tile class folder %s has no Imgs folder; skipped", class_dir)
            continue
        label = 0 if class_dir.name == _MT_NORMAL_CLASS else 1
        defect_type = NORMAL_TYPE if label == 0 else class_dir.name.removeprefix(_MT_PREFIX).lower()
        files = _images_in(imgs_dir)
        jpgs = {p.stem: p for p in files if p.suffix.lower() in (".jpg", ".jpeg")}
        pngs = {p.stem: p for p in files if p.suffix.lower() == ".png"}
        for stem, mask_path in pngs.items():
            if stem not in jpgs:
                raise DatasetError(f"mask {mask_path} has no image {stem}.jpg in {imgs_dir}")
        for stem, path in jpgs.items():
            mask_path = pngs.get(stem)
            if label == 1 and mask_path is None:
                logger.warning("anomalous image %s has no mask %s.png", path, stem)
            samples.append(Sample(path, label, defect_type, mask_path, MAGNETIC_TILE, MAGNETIC_TILE))
    return samples
