"""DAVIS-2017 scorer (sslcli.eval.davis_score): J, F, statistics, palette PNGs, real masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslcli.errors import DataError, UsageError
from sslcli.eval import davis_score as ds

# Real DAVIS-2017 masks shipped with the tests (see tests/data/davis-sample/README.md).
SAMPLE = Path(__file__).resolve().parent / "data" / "davis-sample"
SEQUENCES = ["car-shadow", "horsejump-high", "judo", "kite-surf", "shooting"]


def square(y0: int, x0: int, size: int = 4, shape=(10, 10)) -> np.ndarray:
    """[H, W] bool with a size x size square whose top-left pixel is (y0, x0)."""
    m = np.zeros(shape, bool)
    m[y0 : y0 + size, x0 : x0 + size] = True
    return m


# ----------------------------------------------------------------------------- boundary map


def test_seg2bmap_single_pixel_by_hand():
    # Pixel (1, 1): boundary = itself (differs from E) + (0,0) via SE, (0,1) via S, (1,0) via E.
    seg = np.zeros((4, 4), bool)
    seg[1, 1] = True
    expected = np.zeros((4, 4), bool)
    expected[[0, 0, 1, 1], [0, 1, 0, 1]] = True
    np.testing.assert_array_equal(ds.seg2bmap(seg), expected)


def test_seg2bmap_square_is_outline_offset_towards_origin():
    # Square rows/cols 2..5 -> boundary = outline of the 5x5 square rows/cols 1..5 (16 pixels).
    outline = square(1, 1, 5) & ~square(2, 2, 3)
    np.testing.assert_array_equal(ds.seg2bmap(square(2, 2)), outline)


def test_seg2bmap_image_border_is_never_boundary():
    assert not ds.seg2bmap(np.ones((6, 7), bool)).any()
    corner = np.zeros((5, 5), bool)
    corner[-1, -1] = True  # last row compares east only, last column south only, corner never
    expected = np.zeros((5, 5), bool)
    expected[[3, 3, 4], [3, 4, 3]] = True
    np.testing.assert_array_equal(ds.seg2bmap(corner), expected)


def official_seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Literal transcription of davis2017/metrics.py `_seg2bmap` (mask size = image size)."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def test_seg2bmap_matches_official_transcription_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (7, 1), (2, 2), (9, 13), (31, 17)]:
        seg = rng.random(shape) < 0.4
        np.testing.assert_array_equal(ds.seg2bmap(seg), official_seg2bmap(seg))
    batch = rng.random((3, 12, 15)) < 0.5
    np.testing.assert_array_equal(ds.seg2bmap(batch), np.stack([official_seg2bmap(m) for m in batch]))


# ----------------------------------------------------------------------------- disk dilation


def naive_disk_dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """cv2.dilate(mask, skimage disk(radius)) written out: OR of the mask shifted by every offset."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    kernel = x**2 + y**2 <= radius**2
    anchor, (h, w), r = kernel.shape[0] // 2, mask.shape, kernel.shape[0]
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for i, j in zip(*np.nonzero(kernel)):
        dy, dx = i - anchor, j - anchor
        out |= padded[r + dy : r + dy + h, r + dx : r + dx + w]
    return out


def test_disk_rows_radius_2_by_hand():
    # disk(2): x² + y² <= 4 -> rows of half-width 0, 1, 2, 1, 0.
    assert ds.disk_rows(2.0) == [(-2, 0, 0), (-1, -1, 1), (0, -2, 2), (1, -1, 1), (2, 0, 0)]


@pytest.mark.parametrize("radius", [0.0, 1.0, 1.5, 2.0, 3.0, 4.7, 8.0])
def test_dilate_matches_naive_disk_dilation(radius):
    rng = np.random.default_rng(int(radius * 10))
    mask = rng.random((23, 29)) < 0.05
    got = ds.dilate(mask, ds.disk_rows(radius))
    np.testing.assert_array_equal(got, naive_disk_dilate(mask, radius))


def test_boundary_radius():
    assert ds.boundary_radius(480, 854) == 8.0  # ceil(0.008 * 979.6)
    assert ds.boundary_radius(480, 1152) == 10.0  # ceil(0.008 * 1248.0) = ceil(9.984)
    assert ds.boundary_radius(10, 10, bound_th=3) == 3.0
    with pytest.raises(UsageError):
        ds.boundary_radius(10, 10, bound_th=-1)


# ----------------------------------------------------------------------------- J and F by hand


def test_j_and_f_one_pixel_shift_of_a_square():
    gt, pred = square(2, 2), square(2, 3)
    # Intersection 4 x 3 = 12, union 16 + 16 - 12 = 20 -> J = 0.6.
    assert float(ds.db_eval_iou(gt, pred)) == pytest.approx(0.6)
    # Radius ceil(0.008 * 14.1) = 1 (cross): boundaries are the outlines of rows/cols 1..5 and of
    # rows 1..5 x cols 2..6; every pixel of either is within 1 pixel of the other -> P = R = F = 1.
    assert float(ds.db_eval_boundary(gt, pred)) == pytest.approx(1.0)
    # Exact matching (radius 0): the outlines share rows 1 and 5 at cols 2..5 only (their vertical
    # sides are cols 1, 5 vs 2, 6) -> 8 of 16 pixels on each side -> P = R = F = 0.5.
    assert float(ds.db_eval_boundary(gt, pred, bound_th=0)) == pytest.approx(0.5)


def test_j_and_f_two_pixel_shift_with_one_pixel_tolerance():
    gt, pred = square(2, 2), square(2, 4)
    # Intersection 4 x 2 = 8, union 24 -> J = 1/3.
    assert float(ds.db_eval_iou(gt, pred)) == pytest.approx(1 / 3)
    # Cross tolerance (radius 1). gt outline: rows 1, 5 x cols 1..5 and cols 1, 5 x rows 2..4;
    # pred outline: rows 1, 5 x cols 3..7 and cols 3, 7 x rows 2..4. Pred pixels within 1 pixel
    # of gt's: rows 1 and 5 at cols 3..6 (8) + (2, 3) and (4, 3), next to (1, 3) and (5, 3) (2);
    # (3, 3) and col 7 are 2 pixels away -> P = 10/16. Symmetrically R = 10/16 -> F = 0.625.
    assert float(ds.db_eval_boundary(gt, pred, bound_th=1)) == pytest.approx(0.625)


def test_empty_cases():
    empty, sq = np.zeros((10, 10), bool), square(2, 2)
    # Both empty: J = 1; P = R = 1 -> F = 1.
    assert float(ds.db_eval_iou(empty, empty)) == 1.0
    assert float(ds.db_eval_boundary(empty, empty)) == 1.0
    # Predicted empty: J = 0/16; P = 1, R = 0 -> F = 0.
    assert float(ds.db_eval_iou(sq, empty)) == 0.0
    assert float(ds.db_eval_boundary(sq, empty)) == 0.0
    # True empty: J = 0/16; P = 0, R = 1 -> F = 0.
    assert float(ds.db_eval_iou(empty, sq)) == 0.0
    assert float(ds.db_eval_boundary(empty, sq)) == 0.0
    # Both non-empty, disjoint and > 1 pixel apart: P = R = 0 -> F = 0 (not a division by zero).
    far = square(7, 7, 2)
    assert float(ds.db_eval_iou(square(0, 0, 2), far)) == 0.0
    assert float(ds.db_eval_boundary(square(0, 0, 2), far)) == 0.0
    # A mask filling the image has no boundary: true boundary empty -> F = 0 against a square,
    # both boundaries empty -> F = 1 against itself.
    full = np.ones((10, 10), bool)
    assert float(ds.db_eval_boundary(full, sq)) == 0.0
    assert float(ds.db_eval_boundary(full, full)) == 1.0


def test_void_pixels_are_ignored():
    gt, pred = square(2, 2), square(2, 3)
    void = np.zeros((10, 10), bool)
    void[2:6, 6] = True  # the 4 pixels only pred covers: union 20 -> 16, J = 12/16
    assert float(ds.db_eval_iou(gt, pred, void)) == pytest.approx(0.75)
    # With everything void both masks are empty: J = F = 1.
    assert float(ds.db_eval_iou(gt, pred, np.ones((10, 10)))) == 1.0
    assert float(ds.db_eval_boundary(gt, pred, np.ones((10, 10)))) == 1.0


def test_batched_shapes_and_mismatch():
    gt = np.stack([square(2, 2), square(2, 2), np.zeros((10, 10), bool)])
    pred = np.stack([square(2, 3), square(2, 4), np.zeros((10, 10), bool)])
    np.testing.assert_allclose(ds.db_eval_iou(gt, pred), [0.6, 1 / 3, 1.0])
    np.testing.assert_allclose(ds.db_eval_boundary(gt, pred, bound_th=1), [1.0, 0.625, 1.0])
    with pytest.raises(DataError, match="differ"):
        ds.db_eval_iou(gt, pred[:, :9])


# ----------------------------------------------------------------------------- statistics


def test_statistics_short_sequence_by_hand():
    # n = 5: ids = [0, 1, 2, 3, 4]; bin 0 = v[0:2], bin 3 = v[3:5] -> decay = 0.9 - 0.3.
    mean, recall, decay = ds.db_statistics(np.array([1.0, 0.8, 0.6, 0.4, 0.2]))
    assert (mean, recall, decay) == pytest.approx((0.6, 0.6, 0.6))


def test_statistics_more_than_256_frames_linear_curve():
    # n = 301, v[i] = 1 - i/300: ids = [0, 75, 150, 225, 300] (the official uint8 cast wraps
    # these). bin 0 = v[0..75] (mean 1 - 37.5/300), bin 3 = v[225..300] (mean 1 - 262.5/300)
    # -> decay 0.75; recall = #{i < 150} / 301; mean 0.5.
    n = 301
    mean, recall, decay = ds.db_statistics(1 - np.arange(n) / 300)
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(150 / 301)
    assert decay == pytest.approx(0.75)


def test_statistics_bin_edges_round_half_up():
    # n = 259: linspace(1, 259, 5) = [1, 65.5, 130, 194.5, 259] -> rounded half up (as the
    # official +1e-10) [1, 66, 130, 195, 259] -> ids [0, 65, 129, 194, 258]; bin 0 = v[0:66],
    # bin 3 = v[194:259]. Ones at 0..9 and at 193 (just outside bin 3; inside with banker's
    # rounding) -> decay = 10/66 - 0.
    v = np.zeros(259)
    v[:10] = 1
    v[193] = 1
    mean, recall, decay = ds.db_statistics(v)
    assert mean == pytest.approx(11 / 259) and recall == pytest.approx(11 / 259)
    assert decay == pytest.approx(10 / 66)


def test_statistics_rejects_empty():
    with pytest.raises(UsageError):
        ds.db_statistics(np.array([]))


# ----------------------------------------------------------------------------- palette PNGs

VOC_FIRST = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128),
             (128, 0, 128), (0, 128, 128), (128, 128, 128), (64, 0, 0)]  # fmt: skip


def test_palette_is_voc():
    palette = ds.davis_palette()
    assert len(palette) == 768 and all(0 <= c <= 255 for c in palette)
    assert [tuple(palette[3 * i : 3 * i + 3]) for i in range(9)] == VOC_FIRST
    assert tuple(palette[3 * 255 :]) == (224, 224, 192)  # VOC's void colour


def test_indexed_png_round_trip(tmp_path):
    mask = np.zeros((7, 11), np.uint8)
    mask[1:3, 2:5], mask[4, :], mask[6, 10] = 1, 2, 255
    path = tmp_path / "seq" / "00000.png"
    ds.write_indexed_png(mask, path)
    with Image.open(path) as image:
        assert image.mode == "P"
        assert image.getpalette()[:27] == [c for rgb in VOC_FIRST for c in rgb]
    got = ds.read_mask(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, mask)


def test_read_mask_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ds.read_mask(tmp_path / "missing.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png"):
        ds.read_mask(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="junk.png"):
        ds.read_mask(tmp_path / "junk.png")
    with pytest.raises(UsageError):
        ds.write_indexed_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "x.png")


# ----------------------------------------------------------------------------- real DAVIS masks

def needs_sample(test):
    """The real-mask tests need tests/data/davis-sample: fail loudly when it is missing rather
    than skip (a skipped check proves nothing)."""
    assert (SAMPLE / "osvos").is_dir(), f"DAVIS sample masks not found at {SAMPLE}"
    return test


def shifted(mask: np.ndarray, d: int) -> np.ndarray:
    """mask [H, W] moved d pixels down and right (zeros come in)."""
    out = np.zeros_like(mask)
    out[d:, d:] = mask[:-d, :-d]
    return out


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory) -> Path:
    """Temp DAVIS root: OSVOS masks as Annotations/480p, val.txt listing the 5 sequences."""
    root = tmp_path_factory.mktemp("davis")
    (root / "Annotations").mkdir()
    (root / "Annotations/480p").symlink_to(SAMPLE / "osvos", target_is_directory=True)
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("\n".join(SEQUENCES) + "\n")
    return root


def shifted_predictions(root: Path, out: Path, d: int, sequences: list[str]) -> Path:
    """PRED/<seq>/<frame>.png = annotation shifted by d pixels."""
    for seq in sequences:
        for path in sorted((root / "Annotations/480p" / seq).glob("*.png")):
            ds.write_indexed_png(shifted(ds.read_mask(path), d), out / seq / path.name)
    return out


@needs_sample
def test_real_masks_palette_is_the_generated_one():
    with Image.open(next((SAMPLE / "osvos/judo").glob("*.png"))) as image:
        assert image.getpalette() == ds.davis_palette()


@needs_sample
def test_identical_predictions_score_100(davis_root):
    result = ds.evaluate_davis(davis_root, SAMPLE / "osvos")
    for key in ["J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall"]:
        assert result[key] == pytest.approx(100.0), key
    assert result["J-Decay"] == 0.0 and result["F-Decay"] == 0.0
    # Objects = ids of each first frame: 1 + 2 + 2 + 3 + 3.
    assert len(result["per_object"]) == 11
    assert {"judo_1", "judo_2", "kite-surf_3", "shooting_3", "car-shadow_1"} <= set(result["per_object"])
    assert result["per_object"]["judo_2"] == {"J-Mean": 100.0, "F-Mean": 100.0}


@needs_sample
def test_shifted_predictions_score_lower(davis_root, tmp_path):
    seqs = ["judo", "kite-surf"]
    one = ds.evaluate_davis(davis_root, shifted_predictions(davis_root, tmp_path / "d1", 1, seqs), sequences=seqs)
    six = ds.evaluate_davis(davis_root, shifted_predictions(davis_root, tmp_path / "d6", 6, seqs), sequences=seqs)
    for key in ["J-Mean", "F-Mean", "J&F-Mean"]:
        assert 0 < six[key] < 100, key
        assert six[key] < one[key], key
    assert six["J&F-Mean"] == pytest.approx((six["J-Mean"] + six["F-Mean"]) / 2)
    assert set(six["per_object"]) == {"judo_1", "judo_2", "kite-surf_1", "kite-surf_2", "kite-surf_3"}


@needs_sample
def test_vectorised_cropped_frame_equals_per_object_full_frame():
    gt_dir, rvos_dir = SAMPLE / "osvos/kite-surf", SAMPLE / "rvos/kite-surf"
    for name in ["00005.png", "00030.png"]:
        gt = ds.read_mask(gt_dir / name)
        pred = ds.read_mask(rvos_dir / name)
        pred[pred > 3] = 0
        rows = ds.disk_rows(ds.boundary_radius(*gt.shape))
        j, f = ds._score_frame(gt, pred, 3, rows)
        for k in range(1, 4):
            assert j[k - 1] == pytest.approx(float(ds.db_eval_iou(gt == k, pred == k)), abs=1e-12)
            assert f[k - 1] == pytest.approx(float(ds.db_eval_boundary(gt == k, pred == k)), abs=1e-12)


@needs_sample
def test_rvos_has_more_objects_than_the_annotation(davis_root):
    # RVOS (unsupervised, up to 20 proposals) uses ids up to 20 where OSVOS car-shadow has 1.
    assert ds.read_mask(SAMPLE / "rvos/car-shadow/00001.png").max() > 1
    with pytest.raises(UsageError, match="car-shadow") as err:
        ds.evaluate_davis(davis_root, SAMPLE / "rvos", sequences=["car-shadow"])
    assert not isinstance(err.value, DataError)
    assert "object id" in str(err.value)


@needs_sample
def test_missing_and_unknown_sequences(davis_root, tmp_path):
    with pytest.raises(DataError, match="judoo.*did you mean: judo"):
        ds.evaluate_davis(davis_root, SAMPLE / "osvos", sequences=["judoo"])
    with pytest.raises(DataError, match="split"):
        ds.evaluate_davis(davis_root, SAMPLE / "osvos", split="trian")
    with pytest.raises(DataError, match="prediction folder of sequence 'judo'"):
        ds.evaluate_davis(davis_root, tmp_path, sequences=["judo"])
    pred = shifted_predictions(davis_root, tmp_path / "pred", 1, ["judo"])
    (pred / "judo/00007.png").unlink()
    with pytest.raises(DataError, match="judo.*00007"):
        ds.evaluate_davis(davis_root, pred, sequences=["judo"])
    with pytest.raises(DataError, match="predictions folder not found"):
        ds.evaluate_davis(davis_root, tmp_path / "nowhere")


def test_missing_annotation_sequence(tmp_path):
    root = tmp_path / "davis"
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "Annotations/480p/bear").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("bears\n")
    (tmp_path / "pred").mkdir()
    with pytest.raises(DataError, match="'bears'.*did you mean: bear"):
        ds.evaluate_davis(root, tmp_path / "pred")
