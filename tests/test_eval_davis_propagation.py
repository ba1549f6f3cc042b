"""DAVIS label propagation (sslcli.eval.davis): DINO transcription checks, tracking on a synthetic DAVIS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sslcli.config import ModelConfig
from sslcli.errors import DataError, UsageError
from sslcli.eval import davis as dv
from sslcli.eval.davis_score import davis_palette, evaluate_davis, read_mask, write_indexed_png

H, W = 64, 96  # original frame size; short_side=128 -> 128 x 192, a 16 x 24 grid of 8-px patches
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 60, 230)}
BACKGROUND = (90, 90, 90)


class ColourBackbone(nn.Module):
    """Backbone-like: patch feature = fixed random projection of the patch's mean (normalised) RGB."""

    patch_size = 8

    def __init__(self, dim: int = 32):
        super().__init__()
        self.proj = nn.Linear(3, dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(dim, 3, generator=torch.Generator().manual_seed(0)))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, 3, H, W] -> {"cls": [B, D], "patch": [B, N, D]} (row-major grid)."""
        mean = F.avg_pool2d(x, self.patch_size).flatten(2).transpose(1, 2)  # [B, N, 3]
        patch = self.proj(mean)
        return {"cls": patch.mean(1), "patch": patch}


def draw(objects: dict[int, tuple[int, int, int]], shape=(H, W)) -> tuple[Image.Image, np.ndarray]:
    """Frame and id mask with squares {id: (y0, x0, side)}."""
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = BACKGROUND
    mask = np.zeros(shape, np.uint8)
    for k, (y0, x0, side) in objects.items():
        rgb[y0 : y0 + side, x0 : x0 + side] = COLOURS[k]
        mask[y0 : y0 + side, x0 : x0 + side] = k
    return Image.fromarray(rgb), mask


def moving_squares(seq: str, t: int) -> dict[int, tuple[int, int, int]]:
    """Objects of frame t: squares moving 4 px (one processed patch) per frame."""
    if seq == "alpha":
        return {1: (8, 4 + 4 * t, 16), 2: (36, 72 - 4 * t, 20)}
    return {1: (4 + 4 * t, 40, 20)}


def write_davis(root: Path, sequences=("alpha", "beta"), frames: int = 6, shape=(H, W)) -> Path:
    """Synthetic DAVIS root: JPEGs (quality 95), palette annotations of every frame, val.txt."""
    for seq in sequences:
        for t in range(frames):
            image, mask = draw(moving_squares(seq, t), shape)
            folder = root / "JPEGImages/480p" / seq
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{t:05d}.jpg", quality=95)
            write_indexed_png(mask, root / "Annotations/480p" / seq / f"{t:05d}.png")
    (root / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/2017/val.txt").write_text("\n".join(sequences) + "\n")
    return root


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    return write_davis(tmp_path_factory.mktemp("davis"))


# ----------------------------------------------------------------------------- DINO transcriptions


def dino_restrict_neighborhood(h: int, w: int, size: int) -> torch.Tensor:
    """Literal DINO `restrict_neighborhood` (without .cuda())."""
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if i - size + p < 0 or i - size + p >= h:
                        continue
                    if j - size + q < 0 or j - size + q >= w:
                        continue
                    mask[i, j, i - size + p, j - size + q] = 1
    return mask.reshape(h * w, h * w)


def dino_label_propagation(feat_tar, feat_sources, segs, h, w, size, topk):
    """Literal DINO `label_propagation` after feature extraction: feat_tar [hw, dim],
    feat_sources [ncontext, dim, hw], segs [ncontext, C, h, w] -> [1, C, h, w]."""
    ncontext = feat_sources.shape[0]
    feat_tar = F.normalize(feat_tar, dim=1, p=2)
    feat_sources = F.normalize(feat_sources, dim=1, p=2)
    feat_tar = feat_tar.unsqueeze(0).repeat(ncontext, 1, 1)
    aff = torch.exp(torch.bmm(feat_tar, feat_sources) / 0.1)
    if size > 0:
        aff *= dino_restrict_neighborhood(h, w, size).unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, h * w)
    tk_val, _ = torch.topk(aff, dim=0, k=topk)
    tk_val_min, _ = torch.min(tk_val, dim=0)
    aff[aff < tk_val_min] = 0
    aff = aff / torch.sum(aff, keepdim=True, axis=0)
    nmb_context, C = segs.shape[:2]
    segs = segs.reshape(nmb_context, C, -1).transpose(2, 1).reshape(-1, C).T
    return torch.mm(segs, aff).reshape(1, C, h, w)


def dino_norm_mask(mask):
    c, h, w = mask.size()
    for cnt in range(c):
        mask_cnt = mask[cnt, :, :]
        if mask_cnt.max() > 0:
            mask_cnt = mask_cnt - mask_cnt.min()
            mask_cnt = mask_cnt / mask_cnt.max()
            mask[cnt, :, :] = mask_cnt
    return mask


@pytest.mark.parametrize("h,w,r", [(5, 7, 2), (4, 4, 1), (3, 6, 12)])
def test_neighbourhood_mask_equals_dino(h, w, r):
    expected = dino_restrict_neighborhood(h, w, r).bool()
    assert torch.equal(dv.neighbourhood_mask(h, w, r), expected)


@pytest.mark.parametrize("size", [0, 2])
def test_propagate_labels_equals_dino(size):
    g = torch.Generator().manual_seed(1)
    h, w, dim, ctx, n_cls = 5, 6, 16, 3, 4
    feat_tar, feat_src = torch.randn(h * w, dim, generator=g), torch.randn(ctx, h * w, dim, generator=g)
    segs = torch.rand(ctx, n_cls, h, w, generator=g)
    expected = dino_label_propagation(feat_tar, feat_src.transpose(1, 2), segs, h, w, size, topk=5)
    window = dv.neighbourhood_mask(h, w, size) if size > 0 else None
    got = dv.propagate_labels(F.normalize(feat_tar, dim=1), F.normalize(feat_src, dim=2),
                              segs.flatten(2).transpose(1, 2), window, topk=5, temperature=0.1)
    torch.testing.assert_close(got.T.reshape(1, n_cls, h, w), expected, rtol=1e-4, atol=1e-6)


def test_norm_mask_equals_dino():
    x = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(2))
    x[2] = 0  # max 0: untouched
    assert torch.equal(dv.norm_mask(x.clone()), dino_norm_mask(x.clone()))


def test_target_size_follows_dino_read_frame():
    assert dv.target_size(480, 854) == (480, 832)
    assert dv.target_size(854, 480) == (832, 480)
    assert dv.target_size(64, 96, short_side=64) == (64, 64)
    assert dv.target_size(64, 96, short_side=128) == (128, 192)
    with pytest.raises(UsageError):
        dv.target_size(64, 96, short_side=16)


# ----------------------------------------------------------------------------- neighbourhood


def test_target_cannot_take_labels_from_outside_the_window():
    # Grid 1 x 30. The target patch 0 looks exactly like source patch 20 (label 1), 20 > r = 12
    # patches away; every other source patch is orthogonal to it and labelled 0.
    n, e1, e2 = 30, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feat_tar = e2.repeat(n, 1)
    feat_tar[0] = e1
    labels = torch.zeros(1, n, 2)
    labels[0, :, 0] = 1

    def label_of_target0(source_at: int, window) -> torch.Tensor:
        feat_src = e2.repeat(1, n, 1)
        feat_src[0, source_at] = e1
        lab = labels.clone()
        lab[0, source_at] = torch.tensor([0.0, 1.0])
        return dv.propagate_labels(feat_tar, feat_src, lab, window)[0]

    window = dv.neighbourhood_mask(1, n, 12)
    assert label_of_target0(20, None)[1] > 0.99  # unrestricted: the similar patch wins
    assert label_of_target0(20, window)[1] == 0  # outside the window: never used
    assert label_of_target0(12, window)[1] > 0.99  # on the window's edge: used


def test_sequence_object_jumping_beyond_window_is_lost():
    # Frame 1's red square is 8 patches right of frame 0's: tracked without restriction only.
    frames, masks = zip(*(draw({1: (8, x0, 16)}) for x0 in (4, 68)))
    kwargs = dict(frames=list(frames), first_mask=masks[0], short_side=64, topk=3)
    unrestricted = dv.propagate_sequence(ColourBackbone(), size_mask_neighborhood=0, **kwargs)
    restricted = dv.propagate_sequence(ColourBackbone(), size_mask_neighborhood=2, **kwargs)
    assert (unrestricted[1] == 1).sum() > 0.8 * (masks[1] == 1).sum()
    assert not (restricted[1] == 1).any()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def predictions(davis_root, tmp_path_factory) -> Path:
    calls = []
    out = dv.run_davis(ColourBackbone(), davis_root, tmp_path_factory.mktemp("pred"), short_side=128,
                       on_frame=lambda: calls.append(1))
    assert len(calls) == 12
    return out


def test_propagation_tracks_moving_squares(davis_root, predictions):
    metrics = evaluate_davis(davis_root, predictions)
    assert metrics["J-Mean"] > 80, metrics
    assert set(metrics["per_object"]) == {"alpha_1", "alpha_2", "beta_1"}


def test_outputs_are_palette_pngs_named_as_frames(davis_root, predictions):
    for seq in ("alpha", "beta"):
        jpgs = sorted(p.stem for p in (davis_root / "JPEGImages/480p" / seq).glob("*.jpg"))
        pngs = sorted(p.stem for p in (predictions / seq).glob("*.png"))
        assert pngs == jpgs
        with Image.open(predictions / seq / "00003.png") as image:
            assert image.mode == "P" and image.size == (W, H)
            assert image.getpalette()[:48] == davis_palette()[:48]


def test_frame0_output_equals_annotation(davis_root, predictions):
    for seq in ("alpha", "beta"):
        expected = read_mask(davis_root / "Annotations/480p" / seq / "00000.png")
        np.testing.assert_array_equal(read_mask(predictions / seq / "00000.png"), expected)


def test_void_is_kept_in_frame0_and_never_propagated():
    frames, masks = zip(*(draw({1: (8, 4 + 4 * t, 16)}) for t in range(3)))
    first = masks[0].copy()
    first[0:4, 0:8] = 255
    out = dv.propagate_sequence(ColourBackbone(), list(frames), first, short_side=64)
    np.testing.assert_array_equal(out[0], first)
    assert all(m.shape == (H, W) and m.max() <= 1 for m in out[1:])


def test_tiny_timm_vit_runs_end_to_end(davis_root, tmp_path):
    from sslcli.models import create_backbone

    tiny = dict(depth=1, embed_dim=32, num_heads=2, img_size=64, patch_size=8)
    backbone = create_backbone(ModelConfig(arch="vit_small_patch16_224", kwargs=tiny))
    out = dv.run_davis(backbone, davis_root, tmp_path / "out", sequences=["beta"], short_side=64)
    assert out == tmp_path / "out" and sorted(p.name for p in out.iterdir()) == ["beta"]
    files = sorted(p.name for p in (out / "beta").iterdir())
    assert files == [f"{t:05d}.png" for t in range(6)]
    assert all(read_mask(out / "beta" / f).shape == (H, W) for f in files)
    assert backbone.training  # mode restored


# ----------------------------------------------------------------------------- errors


def test_unknown_sequence_suggests_close_names(davis_root, tmp_path):
    with pytest.raises(DataError, match="did you mean: alpha"):
        dv.run_davis(ColourBackbone(), davis_root, tmp_path, sequences=["alpah"], short_side=64)


def test_missing_layout_pieces_name_the_path(tmp_path):
    root = write_davis(tmp_path / "d", sequences=("alpha",), frames=3)
    (root / "Annotations/480p/alpha/00000.png").unlink()
    with pytest.raises(DataError, match="00000.png"):
        dv.run_davis(ColourBackbone(), root, tmp_path / "o", short_side=64)
    for path in sorted((root / "JPEGImages/480p/alpha").iterdir()):
        path.unlink()
    with pytest.raises(DataError, match="no .jpg frame"):
        dv.run_davis(ColourBackbone(), root, tmp_path / "o", short_side=64)
    (root / "JPEGImages/480p/alpha").rmdir()
    with pytest.raises(DataError, match="JPEGImages/480p/alpha"):
        dv.run_davis(ColourBackbone(), root, tmp_path / "o", short_side=64)
    with pytest.raises(DataError, match="test-dev.txt"):
        dv.run_davis(ColourBackbone(), root, tmp_path / "o", split="test-dev")


def test_frame_size_must_match_annotation():
    frames = [draw({1: (8, 4, 16)})[0], draw({1: (8, 4, 16)}, shape=(64, 64))[0]]
    with pytest.raises(DataError, match="frame 1"):
        dv.propagate_sequence(ColourBackbone(), frames, draw({1: (8, 4, 16)})[1], short_side=64)
