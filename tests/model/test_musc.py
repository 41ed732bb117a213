"""Tests of the MuSc math against hand-checkable cases and a naive transcription of the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from musc_stream.model.musc import (
    MuscSettings,
    fuse_patch_scores,
    interval_count,
    lnamd,
    musc_from_tokens,
    mutual_scores,
    nearest_distances,
    rscin,
    upsample_maps,
)


def _reference_lnamd(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD as the reference spells it: LayerNorm([C,h,w]), Unfold, adaptive_avg_pool1d, L2 norm."""
    n, num_patches, c = tokens.shape
    side = int(math.sqrt(num_patches))
    x = tokens.reshape(n, side, side, c).permute(0, 3, 1, 2)
    x = torch.nn.LayerNorm([c, side, side], elementwise_affine=False)(x)
    if r == 1:
        out = x.reshape(n, c, -1).permute(0, 2, 1)
    else:
        pad = (r - 1) // 2
        unfolded = torch.nn.Unfold(kernel_size=r, stride=1, padding=pad)(x)  # (N, C·r·r, L)
        unfolded = unfolded.reshape(n, c, r, r, -1).permute(0, 4, 1, 2, 3)  # (N, L, C, r, r)
        flat = unfolded.reshape(n * num_patches, 1, -1)
        out = F.adaptive_avg_pool1d(flat, c).reshape(n, num_patches, c)
    return out / out.norm(dim=-1, keepdim=True)


def _reference_msm(z: torch.Tensor, topmin_max: float = 0.3) -> torch.Tensor:
    """compute_scores_slow of the reference, with k kept ≥ 1 (issue #41)."""
    n = z.shape[0]
    rows = []
    for i in range(n):
        per_ref = [torch.cdist(z[i], z[j]).min(dim=1).values for j in range(n) if j != i]
        d = torch.stack(per_ref, dim=1)  # (L, N-1)
        k = max(1, int(d.shape[1] * topmin_max))
        rows.append(torch.topk(d, k, largest=False).values.mean(dim=1))
    return torch.stack(rows)


def _reference_rscin(scores, feats, windows):
    """MMO/RsCIN of the reference (loop form)."""
    s = (scores - scores.min()) / (scores.max() - scores.min())
    w = (feats.double() @ feats.double().T).float()
    n = w.shape[0]
    outs = []
    for k in windows:
        drop = torch.topk(w, n - k, largest=False).indices
        wm = w.clone()
        for i in range(n):
            wm[i, drop[i]] = 0
        d = torch.diag(1 / wm.sum(dim=1))
        outs.append(d @ wm @ s.float())
    return torch.stack(outs, -1).mean(-1)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_matches_reference_transcription(r):
    torch.manual_seed(0)
    tokens = torch.randn(3, 49, 16) * 2 + 0.5
    assert torch.allclose(lnamd(tokens, r), _reference_lnamd(tokens, r), atol=1e-5)


def test_lnamd_is_unit_norm_and_uses_scalar_mean():
    tokens = torch.zeros(1, 4, 2)
    tokens[0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = lnamd(tokens, 1)
    # scalar mean over all 8 values is 1.25; patch 0 = (1-1.25, 0-1.25) → direction (-0.25, -1.25)
    expected = torch.tensor([-0.25, -1.25]) / math.hypot(0.25, 1.25)
    assert torch.allclose(out[0, 0], expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(1, 4), atol=1e-6)


def test_lnamd_counts_zero_padding_in_border_average():
    # one channel is constant → after mean subtraction zero; the other is a ramp
    tokens = torch.arange(9, dtype=torch.float32).reshape(1, 9, 1).repeat(1, 1, 2)
    tokens[..., 1] = 0
    pooled = lnamd(tokens, 3)
    ref = _reference_lnamd(tokens, 3)
    assert torch.allclose(pooled, ref, atol=1e-6)


def test_lnamd_rejects_even_degree_and_non_square_grid():
    with pytest.raises(ValueError):
        lnamd(torch.randn(1, 9, 4), 2)
    with pytest.raises(ValueError):
        lnamd(torch.randn(1, 10, 4), 1)


def test_interval_count_floors_and_keeps_one():
    assert interval_count(199, 0.3) == 59
    assert interval_count(3, 0.3) == 1  # reference would give 0 → NaN (issue #41)
    assert interval_count(1, 0.3) == 1
    assert interval_count(10, 4) == 4


def test_nearest_distances_by_hand():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    refs = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, -1.0], [-1.0, 0.0]]])  # (2, 2, 2)
    d = nearest_distances(q, refs)
    expected = torch.tensor([[[0.0, math.sqrt(2)], [math.sqrt(2), math.sqrt(2)]]])
    assert torch.allclose(d, expected, atol=1e-6)


def test_mutual_scores_hand_case_outlier_patch_scores_high():
    # 5 images, 1 patch each on the unit circle; image 4 is the odd one out.
    angles = torch.tensor([0.0, 0.05, -0.05, 0.02, math.pi / 2])
    z = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(1)  # (5, 1, 2)
    s = mutual_scores(z, 0.3)  # k = int(0.3·4) = 1 → nearest other image
    assert s.shape == (5, 1)
    assert s[4, 0] > 5 * s[:4, 0].max()
    # image 0's nearest other image is image 3 at angle 0.02: chord 2·sin(0.01)
    assert s[0, 0].item() == pytest.approx(2 * math.sin(0.01), abs=1e-5)


@pytest.mark.parametrize("n", [2, 3, 7, 12])
def test_mutual_scores_matches_reference_and_is_finite(n):
    torch.manual_seed(n)
    z = F.normalize(torch.randn(n, 16, 8), dim=-1)
    ours = mutual_scores(z, 0.3)
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, _reference_msm(z), atol=2e-5)


def test_mutual_scores_small_blocks_give_same_result():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(9, 25, 12), dim=-1)
    full = mutual_scores(z)
    tiny = mutual_scores(z, block_bytes=4 * 25 * 25)  # one query image and one reference per block
    assert torch.allclose(full, tiny, atol=1e-6)


def test_mutual_scores_reduced_precision_close():
    torch.manual_seed(2)
    z = F.normalize(torch.randn(6, 16, 32), dim=-1)
    low = mutual_scores(z, distance_dtype=torch.bfloat16)
    assert torch.allclose(low, mutual_scores(z), atol=2e-2)


def test_mutual_scores_needs_two_images():
    with pytest.raises(ValueError):
        mutual_scores(torch.randn(1, 4, 3))


def test_rscin_raw_mode_matches_reference():
    torch.manual_seed(3)
    scores = torch.rand(10)
    feats = torch.rand(10, 6)  # positive dot products, as the reference's DINO path sees them
    ours = rscin(scores, feats, (1, 2, 3), features="raw")
    assert torch.allclose(ours, _reference_rscin(scores, feats, (1, 2, 3)), atol=1e-6)
    assert not torch.allclose(ours, rscin(scores, feats, (1, 2, 3)), atol=1e-3)  # the default differs


def test_rscin_normalised_mode_is_the_reference_on_unit_features():
    torch.manual_seed(7)
    scores = torch.rand(12)
    feats = torch.randn(12, 8) * torch.rand(12, 1) * 5  # norms vary, like DINO CLS tokens
    unit = F.normalize(feats, dim=-1)  # what the reference hands RsCIN for CLIP
    expected = _reference_rscin(scores, unit, (1, 2, 3))
    assert torch.allclose(rscin(scores, feats, (1, 2, 3)), expected, atol=1e-6)
    # features that are already unit (CLIP's encode_image): both modes give the reference
    assert torch.allclose(rscin(scores, unit, (1, 2, 3), features="raw"), expected, atol=1e-6)


def test_rscin_raw_mode_lets_a_large_norm_feature_be_everyones_neighbour():
    torch.manual_seed(8)
    feats = F.normalize(torch.rand(8, 16) + 1.0, dim=-1)  # one product: all cosines high
    feats[0] *= 3.0  # one large-norm image feature (a "hub")
    scores = torch.zeros(8)
    scores[5] = 1.0  # image 5 is the defect
    raw = rscin(scores, feats, (1, 2, 3), features="raw")
    normalised = rscin(scores, feats, (1, 2, 3))
    # raw: every row's top similarity is the hub, so even k=1 replaces each score by the hub's
    assert torch.equal(torch.topk(feats @ feats.T, 1, dim=1).indices[:, 0], torch.zeros(8, dtype=torch.long))
    assert torch.equal(rscin(scores, feats, (1,), features="raw"), torch.zeros(8))  # the hub's score 0
    assert raw[5] < 0.5  # the defect's 1.0 diluted by the hub and its neighbours
    # normalised: an image is its own nearest neighbour, so the defect keeps the top score
    assert int(normalised.argmax()) == 5 and normalised[5] > 0.5


def test_rscin_rejects_unknown_feature_mode():
    with pytest.raises(ValueError, match="rscin_features"):
        MuscSettings(rscin_features="cosine")
    with pytest.raises(ValueError, match="features"):
        rscin(torch.rand(3), torch.rand(3, 2), (1, 2), features="cosine")


def test_musc_from_tokens_applies_the_rscin_feature_mode():
    torch.manual_seed(9)
    layers = [torch.randn(6, 16, 8) for _ in range(2)]
    feats = torch.randn(6, 4) * torch.arange(1, 7)[:, None]
    for mode in ("normalised", "raw"):
        result = musc_from_tokens(layers, feats, MuscSettings(r_list=(1,), rscin_features=mode), (8, 8))
        assert torch.allclose(result.scores, rscin(result.raw_scores, feats, (1, 2, 3), features=mode))


def test_rscin_window_one_is_minmax_normalised_scores():
    scores = torch.tensor([2.0, 4.0, 3.0])
    feats = torch.eye(3)
    assert torch.allclose(rscin(scores, feats, (1,)), torch.tensor([0.0, 1.0, 0.5]))


def test_rscin_constant_scores_do_not_give_nan():
    out = rscin(torch.ones(4), torch.rand(4, 3), (1, 2, 3))
    assert torch.isfinite(out).all()


def test_upsample_align_corners_keeps_corner_values():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]], dtype=torch.float64)
    up = upsample_maps(maps, (5, 7))
    assert up.shape == (1, 5, 7)
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 3 and up[0, 0, -1] == 1


def test_fuse_is_mean_of_twelve_maps():
    torch.manual_seed(4)
    layers = [torch.randn(5, 16, 8) for _ in range(4)]
    settings = MuscSettings()
    expected = torch.stack(
        [mutual_scores(lnamd(t, r)).double() for r in settings.r_list for t in layers]
    ).mean(0)
    assert torch.allclose(fuse_patch_scores(layers, settings), expected, atol=1e-9)


def test_musc_from_tokens_finds_the_defective_image():
    torch.manual_seed(5)
    base = torch.randn(1, 1, 32)
    layers = []
    for _ in range(2):
        t = base + 0.05 * torch.randn(8, 36, 32)  # 8 images of one "product"
        t[6, 14] += 3.0 * torch.randn(32)  # a defect patch in image 6
        layers.append(t)
    feats = torch.randn(8, 4)
    result = musc_from_tokens(layers, feats, MuscSettings(rscin_windows=(1,)), score_size=(12, 12))
    assert result.patch_maps.shape == (8, 6, 6)
    assert int(result.raw_scores.argmax()) == 6
    assert int(result.patch_maps[6].flatten().argmax()) == 14
    assert torch.isfinite(result.scores).all()


def test_aligned_distances_radius_covering_grid_equals_full_search():
    torch.manual_seed(6)
    q = F.normalize(torch.randn(2, 16, 8), dim=-1)
    refs = F.normalize(torch.randn(3, 16, 8), dim=-1)
    from musc_stream.model.musc import aligned_nearest_distances

    assert torch.allclose(aligned_nearest_distances(q, refs, radius=3), nearest_distances(q, refs), atol=1e-5)


def test_aligned_distances_radius_zero_compares_same_position_only():
    from musc_stream.model.musc import aligned_nearest_distances

    q = torch.zeros(1, 4, 2)
    q[0, :, 0] = 1.0
    refs = torch.zeros(1, 4, 2)
    refs[0, :, 1] = 1.0
    refs[0, 3] = torch.tensor([1.0, 0.0])  # only position 3 matches
    d = aligned_nearest_distances(q, refs, radius=0)[0, :, 0]
    assert torch.allclose(d, torch.tensor([math.sqrt(2)] * 3 + [0.0]), atol=1e-6)


def test_rscin_window_zero_turns_it_off_as_in_the_reference():
    scores = torch.tensor([0.3, 0.9, 0.5])
    assert torch.equal(rscin(scores, torch.rand(3, 4), (0,)), scores)
