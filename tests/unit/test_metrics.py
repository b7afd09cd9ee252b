"""Evaluation metrics against independent implementations: scikit-image (PSNR, SSIM, Lab,
CIEDE2000), OpenCV (Sobel, Canny: the ASUKA Grad formula re-derived with cv2 as its
evaluation script does), SciPy (matrix square root, Student's t, dilation, an SVM solved
by a different optimiser), published CIEDE2000 test data and hand-computed cases."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.optimize
import scipy.stats
import skimage.color
import skimage.data
import skimage.metrics
import torch

from asuka_core import metrics
from asuka_core.errors import InputError
from asuka_core.masks import EVALUATION_SHARES, MaskGenerator


def _photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    img = getattr(skimage.data, name)()
    if size is not None:
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return img


def _pairs():
    """(result uint8, truth uint8, mask float) on real photos: a blurred, noisy, colour-cast
    fill inside generated masks, and a raw output that drifts outside the hole too."""
    out = []
    for k, (name, size) in enumerate([("astronaut", (128, 128)), ("chelsea", (96, 144)),
                                      ("coffee", (120, 180))]):
        truth = _photo(name, size)
        mask = MaskGenerator(size, seed=5, shares=EVALUATION_SHARES, hole_ratio=(0.2, 0.8)).numpy(k)
        rng = np.random.default_rng(k)
        fill = cv2.GaussianBlur(truth, (7, 7), 2.0).astype(np.float64) + [12.0, -6.0, 3.0]
        fill += rng.normal(0, 8, truth.shape)
        drift = truth.astype(np.float64) * 0.97 + [4.0, 2.0, -3.0]
        result = np.where(mask[..., None] > 0, fill, drift)
        out.append((np.clip(np.rint(result), 0, 255).astype(np.uint8), truth, mask.astype(np.float32)))
    return out


PAIRS = _pairs()


def _pasted(result, truth, mask):
    return np.where(mask[..., None] >= 0.5, result, truth).astype(np.float64) / 255.0


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_psnr_matches_scikit_image(k):
    result, truth, mask = PAIRS[k]
    ref = skimage.metrics.peak_signal_noise_ratio(truth / 255.0, _pasted(result, truth, mask), data_range=1.0)
    # the ASUKA evaluation adds 1e-7 to the MSE: undo skimage's log to add it
    expected = -10 * math.log10(10 ** (-ref / 10) + 1e-7)
    assert metrics.psnr(result, truth, mask) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr(truth, truth, mask) == pytest.approx(70.0)


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_ssim_matches_scikit_image_on_grey(k):
    result, truth, mask = PAIRS[k]
    w = np.array([0.2989, 0.587, 0.114])
    ref = skimage.metrics.structural_similarity(_pasted(result, truth, mask) @ w, truth / 255.0 @ w,
                                                data_range=1.0)
    assert metrics.ssim(result, truth, mask) == pytest.approx(ref, abs=1e-9)
    assert metrics.ssim(truth, truth, mask) == pytest.approx(1.0)


def test_mask_boundary_is_exactly_opencv_canny():
    checked = 0
    for size in [(64, 64), (96, 160), (131, 77)]:
        gen = MaskGenerator(size, seed=9, hole_ratio=(0.05, 0.9))
        masks = [gen.numpy(i) for i in range(12)]
        border = np.zeros(size, bool)
        border[: size[0] // 3, size[1] // 2:] = True       # touches two image borders
        masks.append(border)
        for m in masks:
            ref = cv2.Canny(m.astype(np.uint8) * 255, 100, 200) > 0
            got = metrics.mask_boundary(torch.from_numpy(m.astype(np.float32))).numpy()
            assert ref.sum() > 0
            np.testing.assert_array_equal(got, ref)
            checked += 1
    assert checked == 39


def _official_grad(result, truth, mask):
    """The ASUKA Grad formula written out with OpenCV, as its evaluation script does."""
    m255 = (mask >= 0.5).astype(np.uint8) * 255
    pasted = result * (m255[..., None] / 255.0) + truth * (1 - m255[..., None] / 255.0)
    edges = cv2.Canny(m255, 100, 200) > 0
    per_channel = []
    for c in range(3):
        p, g = pasted[..., c].astype(np.float64), truth[..., c].astype(np.float64)
        dx = cv2.Sobel(p, cv2.CV_64F, 1, 0, ksize=3) - cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3)
        dy = cv2.Sobel(p, cv2.CV_64F, 0, 1, ksize=3) - cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3)
        per_channel.append(np.sqrt(dx ** 2 + dy ** 2)[edges].mean())
    return float(np.mean(per_channel))


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_grad_matches_the_official_formula_with_opencv(k):
    result, truth, mask = PAIRS[k]
    expected = _official_grad(result, truth, mask)
    assert expected > 1.0
    assert metrics.grad(result, truth, mask) == pytest.approx(expected, rel=1e-9)
    assert metrics.grad(truth, truth, mask) == 0.0


def _grey_masks(size, seed):
    """Grey-level masks: generated holes blurred (soft edges whose Canny magnitudes fall
    between the thresholds, so hysteresis decides) and the same with noise."""
    rng = np.random.default_rng(seed)
    gen = MaskGenerator(size, seed=seed, hole_ratio=(0.1, 0.8))
    for i in range(4):
        m = gen.numpy(i).astype(np.uint8) * 255
        for k in (3, 9):
            g = cv2.GaussianBlur(m, (k, k), 0)
            yield g
            yield np.clip(g.astype(int) + rng.integers(-40, 41, g.shape), 0, 255).astype(np.uint8)


def test_canny_is_exactly_opencv_on_grey_masks():
    weak_only = 0
    for size in [(64, 64), (96, 160), (131, 77)]:
        for g in _grey_masks(size, 2):
            ref = cv2.Canny(g, 100, 200) > 0
            got = metrics.canny(torch.from_numpy(g)).numpy()
            np.testing.assert_array_equal(got, ref)
            # edges kept only through hysteresis (magnitude between the thresholds) exist
            gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
            gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
            weak_only += int((ref & (np.abs(gx) + np.abs(gy) <= 200)).sum())
    assert weak_only > 0


def _official_soft_grad(result, truth, mask_u8):
    """The MISATO ``cal_grad.py`` definition restated with OpenCV: the result blended into the
    ground truth by the grey mask, Canny of the mask as given."""
    m = mask_u8[..., None] / 255.0
    blended = result * m + truth * (1 - m)
    edges = cv2.Canny(mask_u8, 100, 200) > 0
    per_channel = []
    for c in range(3):
        p, g = blended[..., c], truth[..., c]
        dx = cv2.Sobel(p, cv2.CV_64F, 1, 0, ksize=3) - cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3)
        dy = cv2.Sobel(p, cv2.CV_64F, 0, 1, ksize=3) - cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3)
        edge = np.sqrt(dx ** 2 + dy ** 2)[edges]
        per_channel.append(edge.mean() if edge.size else 0)
    return float(np.mean(per_channel))


def test_soft_grad_is_the_official_script_on_grey_masks():
    truth = _photo("astronaut", (96, 96))
    result = _photo("chelsea", (96, 96))
    checked = 0
    for g in _grey_masks((96, 96), 5):
        expected = _official_soft_grad(result, truth, g)
        assert expected > 1.0
        assert metrics.grad(result, truth, g, soft=True) == pytest.approx(expected, rel=1e-9)
        assert metrics.grad(result, truth, g.astype(np.float32) / 255, soft=True) == pytest.approx(expected, rel=1e-9)
        checked += 1
    assert checked == 16
    # on a 0/255 mask the two definitions agree; on a grey one they do not
    binary = (g >= 128).astype(np.uint8) * 255
    assert metrics.grad(result, truth, binary, soft=True) == pytest.approx(metrics.grad(result, truth, binary),
                                                                            rel=1e-12)
    assert abs(metrics.grad(result, truth, g, soft=True) - metrics.grad(result, truth, g)) > 1.0


def test_grad_hand_computed_step():
    # grey 100 everywhere, the hole (right half) filled with 110: at the boundary the pasted
    # image has a vertical step of 10, Sobel x = 10 * (1 + 2 + 1) = 40 on both boundary
    # columns, and Canny marks one of them; the truth has no gradient.
    truth = np.full((32, 32, 3), 100, np.uint8)
    result = np.full((32, 32, 3), 110, np.uint8)
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1
    assert metrics.grad(result, truth, mask) == pytest.approx(40.0)


def test_lab_matches_scikit_image():
    rng = np.random.default_rng(0)
    rgb = np.concatenate([rng.random((500, 3)), np.eye(3), [[0, 0, 0], [1, 1, 1], [0.03, 0.02, 0.04]]])
    np.testing.assert_allclose(metrics.rgb_to_lab(rgb).numpy(), skimage.color.rgb2lab(rgb), atol=1e-9)


# Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula", test data rows
SHARMA = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, 3.1571, -77.2803), (50.0, 0.0, -82.7485), 2.8615),
    ((50.0, 0.0, 0.0), (50.0, -1.0, 2.0), 2.3669),
    ((50.0, 2.49, -0.001), (50.0, -2.49, 0.0011), 7.2195),
    ((50.0, -0.001, 2.49), (50.0, 0.0009, -2.49), 4.8045),
    ((50.0, -0.001, 2.49), (50.0, 0.0011, -2.49), 4.7461),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def test_ciede2000_matches_published_data_and_scikit_image():
    lab1 = np.array([r[0] for r in SHARMA])
    lab2 = np.array([r[1] for r in SHARMA])
    np.testing.assert_allclose(metrics.ciede2000(lab1, lab2).numpy(), [r[2] for r in SHARMA], atol=5e-5)
    rng = np.random.default_rng(1)
    a = np.stack([rng.uniform(0, 100, 2000), rng.uniform(-90, 90, 2000), rng.uniform(-90, 90, 2000)], -1)
    b = a + rng.normal(0, 6, a.shape)
    b[:50] = a[:50]                                                  # zero differences too
    np.testing.assert_allclose(metrics.ciede2000(a, b).numpy(), skimage.color.deltaE_ciede2000(a, b),
                               atol=1e-9)


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_unmasked_de2000_matches_scikit_image(k):
    result, truth, mask = PAIRS[k]
    de = skimage.color.deltaE_ciede2000(skimage.color.rgb2lab(result), skimage.color.rgb2lab(truth))
    expected = de[mask < 0.5].mean()
    assert expected > 0.5
    assert metrics.unmasked_de2000(result, truth, mask) == pytest.approx(expected, rel=1e-9)
    # pasting the original back removes the drift entirely
    assert metrics.unmasked_de2000(_pasted(result, truth, mask), truth, mask) == pytest.approx(0.0, abs=1e-9)


def test_seam_bands_are_square_dilations():
    mask = MaskGenerator((80, 120), seed=2).numpy(3)
    inside, outside = metrics.seam_bands(mask, band=5)
    square = np.ones((11, 11), bool)
    np.testing.assert_array_equal(inside.numpy(), mask & scipy.ndimage.binary_dilation(~mask, square))
    np.testing.assert_array_equal(outside.numpy(), ~mask & scipy.ndimage.binary_dilation(mask, square))


def test_seam_hand_computed_colour_cast():
    # a flat grey picture, the hole filled with a flat other colour: the step across the seam
    # is the Lab distance of the two colours; the truth has no step.
    grey, cast = np.array([0.5, 0.5, 0.5]), np.array([0.6, 0.5, 0.4])
    truth = np.broadcast_to(grey, (64, 64, 3)).copy()
    result = np.broadcast_to(cast, (64, 64, 3)).copy()
    mask = np.zeros((64, 64), np.float32)
    mask[20:44, 16:40] = 1
    expected = np.linalg.norm(skimage.color.rgb2lab(cast[None]) - skimage.color.rgb2lab(grey[None]))
    assert expected > 5
    assert metrics.seam(result, truth, mask) == pytest.approx(expected, rel=1e-9)
    assert metrics.seam(truth, truth, mask) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", range(len(PAIRS)))
def test_seam_on_photos_against_a_numpy_rederivation(k):
    result, truth, mask = PAIRS[k]
    hole = mask >= 0.5
    square = np.ones((17, 17), bool)
    inside = hole & scipy.ndimage.binary_dilation(~hole, square)
    outside = ~hole & scipy.ndimage.binary_dilation(hole, square)
    lab_p = skimage.color.rgb2lab(_pasted(result, truth, mask))
    lab_t = skimage.color.rgb2lab(truth)
    step_p = lab_p[inside].mean(0) - lab_p[outside].mean(0)
    step_t = lab_t[inside].mean(0) - lab_t[outside].mean(0)
    assert metrics.seam(result, truth, mask) == pytest.approx(np.linalg.norm(step_p - step_t), rel=1e-9)


def test_colour_cast_moves_seam_far_more_than_psnr():
    truth = _photo("astronaut", (128, 128))
    mask = np.zeros((128, 128), np.float32)
    mask[32:96, 40:104] = 1
    cast = np.clip(truth.astype(np.int16) + [18, 0, -18], 0, 255).astype(np.uint8)
    assert metrics.seam(truth, truth, mask) == 0.0
    assert metrics.seam(cast, truth, mask) > 8.0
    assert metrics.grad(cast, truth, mask) > metrics.grad(truth, truth, mask)


def test_mean_interval_matches_student_t():
    rng = np.random.default_rng(3)
    for n in (2, 5, 31, 60):
        v = rng.normal(3, 2, n)
        m, lo, hi = metrics.mean_interval(v)
        if n <= 31:
            ref = scipy.stats.t.interval(0.95, n - 1, loc=v.mean(), scale=scipy.stats.sem(v))
        else:
            ref = scipy.stats.norm.interval(0.95, loc=v.mean(), scale=scipy.stats.sem(v))
        assert m == pytest.approx(v.mean())
        assert (lo, hi) == pytest.approx(ref, rel=1e-3)
    assert metrics.mean_interval([4.0]) == (4.0, 4.0, 4.0)
    assert all(math.isnan(x) for x in metrics.mean_interval([]))


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(4)
    a = rng.normal(0, 1, (300, 16))
    b = rng.normal(0.3, 1.3, (250, 16)) @ rng.normal(0, 0.4, (16, 16))
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(sa + sb - 2 * root)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions (singular covariances): the eigenvalues of S_a S_b
    few_a, few_b = a[:5] * 1e3, b[:7] * 1e3
    sa, sb = np.cov(few_a, rowvar=False), np.cov(few_b, rowvar=False)
    ev = np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)
    expected = np.sum((few_a.mean(0) - few_b.mean(0)) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(ev).sum()
    assert metrics.frechet_distance(few_a, few_b) == pytest.approx(expected, rel=1e-6)
    assert abs(metrics.frechet_distance(few_a, few_a)) < 1e-9 * np.trace(sa)
    with pytest.raises(InputError):
        metrics.frechet_distance(a, b[:, :8])


def test_discriminative_scores_match_an_svm_solved_by_scipy():
    rng = np.random.default_rng(5)
    real = rng.normal(0, 1, (120, 6))
    fake = real + rng.normal(0, 0.6, real.shape) + [0.4, 0, 0, 0, 0, 0]
    u, p = metrics.discriminative_scores(real, fake)
    # the same primal (squared hinge, L2 on weights and bias, C = 1) by L-BFGS-B in SciPy
    x = np.hstack([np.vstack([real, fake]), np.ones((240, 1))])
    y = np.r_[np.ones(120), -np.ones(120)]

    def f(w):
        margin = np.maximum(1 - y * (x @ w), 0)
        return 0.5 * w @ w + np.sum(margin ** 2), w - 2 * x.T @ (y * margin)

    w = scipy.optimize.minimize(f, np.zeros(7), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}).x
    d = x @ w
    assert u == pytest.approx(np.mean((d > 0) != (y > 0)), abs=1 / 240 + 1e-9)
    assert p == pytest.approx(np.mean(d[120:] > d[:120]), abs=1 / 120 + 1e-9)
    assert 0.05 < u < 0.5 and 0.0 < p < 0.5
    # separable sets: no errors, no fake above its real counterpart; identical sets: chance
    assert metrics.discriminative_scores(real, real + 10.0) == (0.0, 0.0)
    assert metrics.discriminative_scores(real, real) == (0.5, 0.0)


def _feature_sets(n, d, noise, seed):
    """Inception-like pool features (non-negative, low-rank structure plus noise, float32) of
    ``n`` ground truths and of their ``n`` inpainted counterparts."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0, 1, (n, 24)) @ (rng.normal(0, 1, (24, d)) / 5)
    real = np.maximum(latent + rng.normal(0, 0.3, (n, d)), 0).astype(np.float32)
    fake = np.maximum(real + rng.normal(0, noise, real.shape) * real.std() + 0.004, 0).astype(np.float32)
    return real, fake


def _official_ids(real, fake, dim, seed):
    """The MISATO ``cal_ids.py`` definition restated with scikit-learn (test-only oracle):
    ``PCA(dim)`` (seeded here) unless dim = the feature width, ``LinearSVC(dual=False)``,
    real = 1, fake = 0."""
    from sklearn.decomposition import PCA
    from sklearn.svm import LinearSVC

    x = np.concatenate([real, fake])
    if dim != real.shape[1]:
        x = PCA(dim, random_state=seed).fit_transform(x)
    y = np.array([1] * len(real) + [0] * len(fake))
    svm = LinearSVC(dual=False).fit(x, y)
    d = svm.decision_function(x)
    return 1 - svm.score(x, y), float(np.mean(d[len(real):] > d[:len(real)]))


def test_linear_svm_reaches_liblinears_optimum():
    from sklearn.svm import LinearSVC

    real, fake = _feature_sets(500, 256, 0.5, 1)
    x = np.concatenate([real, fake]).astype(np.float64)
    y = np.r_[np.ones(500), -np.ones(500)]
    w = metrics.linear_svm(x, y).numpy()
    ref = LinearSVC(dual=False, tol=1e-12, max_iter=10000).fit(x, y > 0)
    ref_w = np.r_[ref.coef_[0], ref.intercept_]
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-6 * np.abs(ref_w).max())
    # its optimality: the gradient of the primal vanishes
    z = np.hstack([x, np.ones((1000, 1))])
    margin = np.maximum(1 - y * (z @ w), 0)
    assert np.abs(w - 2 * z.T @ (y * margin)).max() < 1e-8 * np.abs(w).max()


@pytest.mark.parametrize("n, d, dim", [(1200, 512, 128), (300, 800, 128), (240, 160, 140)])
def test_pca_project_is_scikit_learns_seeded_pca(n, d, dim):
    """Randomized (samples > features and < features: sklearn transposes) and exact paths;
    compared by the projections' Gram matrices (independent of the axes' signs)."""
    from sklearn.decomposition import PCA

    real, fake = _feature_sets(n // 2, d, 0.4, 2)
    x = np.concatenate([real, fake])
    for seed in (0, 7):
        ours = metrics.pca_project(x, dim, seed).numpy().astype(np.float64)
        ref = PCA(dim, random_state=seed).fit_transform(x).astype(np.float64)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, rtol=0, atol=2e-4 * np.abs(ref @ ref.T).max())
    # a randomized solver depends on its seed (the official PCA has none)
    if dim < 0.8 * min(x.shape):
        a, b = metrics.pca_project(x, dim, 0).numpy(), metrics.pca_project(x, dim, 1).numpy()
        assert np.abs(a @ a.T - b @ b.T).max() > 1e-3 * np.abs(a @ a.T).max()
    with pytest.raises(InputError, match="image pairs"):
        metrics.pca_project(x[:dim - 1], dim)


@pytest.mark.parametrize("n, d, dim, noise", [(300, 512, 256, 0.25), (200, 1024, 64, 0.6), (160, 64, 64, 0.1)])
def test_misato_ids_equal_the_official_definition(n, d, dim, noise):
    real, fake = _feature_sets(n, d, noise, 3)
    for seed in (0, 5):
        u, p = metrics.discriminative_scores(real, fake, pca_dim=dim, seed=seed)
        ou, op = _official_ids(real, fake, dim, seed)
        # liblinear stops at a relative gradient of 1e-4, this solver at the optimum: a
        # sample within that tolerance of the boundary may fall on the other side
        assert u == pytest.approx(ou, abs=1 / (2 * n) + 1e-12)
        assert p == pytest.approx(op, abs=1 / n + 1e-12)
    assert 0.02 < u < 0.5, u


def test_discriminative_scores_need_enough_pairs_for_the_pca():
    real, fake = _feature_sets(100, 2048, 0.3, 4)
    with pytest.raises(InputError, match="256 image pairs"):
        metrics.discriminative_scores(real, fake, pca_dim=512)


def test_score_refuses_mismatched_inputs():
    result, truth, mask = PAIRS[0]
    with pytest.raises(InputError, match="mask"):
        metrics.score(result, truth, mask[:-1])
    with pytest.raises(InputError, match="ground truth"):
        metrics.score(result[:-1], truth, mask)
    with pytest.raises(InputError, match="Unknown metrics"):
        metrics.score(result, truth, mask, metrics=["fid"])
    assert set(metrics.score(result, truth, mask)) == set(metrics.METRICS)


def test_metrics_module_needs_no_oracle_or_comfyui():
    import subprocess
    import sys

    code = ("import sys, asuka_core.metrics; print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'cv2', 'skimage', 'scipy', 'comfy', 'folder_paths', 'lpips'})))")
    repo = __file__.rsplit("/tests/", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"asuka_core.metrics imported: {proc.stdout.strip()}"


def test_clip_score_is_the_official_scripts_evident_meaning():
    """Restated with torch as ``cal_clip_score.py`` computes it, its bug (averaging each
    embedding to a scalar before ``.diagonal()``) removed: the diagonal of the normalised
    embeddings' products."""
    rng = np.random.default_rng(8)
    a, b = rng.normal(0, 1, (6, 768)), rng.normal(0, 1, (6, 768))
    b[:3] = a[:3] * 2.0 + rng.normal(0, 0.1, (3, 768))
    ta, tb = torch.tensor(a), torch.tensor(b)
    ta, tb = ta / ta.norm(dim=-1, keepdim=True), tb / tb.norm(dim=-1, keepdim=True)
    expected = (ta @ tb.T).diagonal().mean().item()
    assert metrics.clip_score(a, b) == pytest.approx(expected, rel=1e-12)
    as_published = (ta.mean(1)[:, None] @ tb.mean(1)[None]).diagonal().mean().item()
    assert abs(as_published) < 1e-3 < expected        # the published script's number means nothing
    # the images compared: the hole only, where the mask is exactly 255
    result, truth, _ = PAIRS[0]
    mask = np.zeros(truth.shape[:2], np.uint8)
    mask[10:40, 10:50] = 255
    mask[10:40, 50] = 254
    r, g = metrics.clip_inputs(result, truth, mask)
    assert (r[10:40, 10:50] == result[10:40, 10:50]).all() and (g[10:40, 10:50] == truth[10:40, 10:50]).all()
    assert r[:, 50:].max() == 0 and g[:10].max() == 0
    r2, _ = metrics.clip_inputs(result, truth, mask == 255)
    assert (r2 == r).all()


def test_linear_svm_on_fewer_samples_than_dimensions():
    """16 samples of 2048-d features (an evaluation of a few photos): the push-through form
    of the Newton step. At the features' scale it reaches liblinear's optimum; at a scale of
    1e3 (an uncalibrated net) liblinear stops early and this solver's objective is lower;
    at 1e8 the Hessian is numerically singular and it still separates the sets."""
    from sklearn.svm import LinearSVC

    real, fake = _feature_sets(8, 2048, 0.5, 6)
    y = np.r_[np.ones(8), -np.ones(8)]

    def objective(x, w):
        z = np.hstack([x, np.ones((len(x), 1))]) @ w
        return 0.5 * w @ w + np.sum(np.maximum(0, 1 - y * z) ** 2)

    for scale in (1.0, 1e3):
        x = np.concatenate([real, fake]).astype(np.float64) * scale
        w = metrics.linear_svm(x, y).numpy()
        ref = LinearSVC(dual=False, tol=1e-12, max_iter=10000).fit(x, y > 0)
        ref_w = np.r_[ref.coef_[0], ref.intercept_]
        if scale == 1.0:
            np.testing.assert_allclose(x @ w[:-1] + w[-1], ref.decision_function(x), rtol=0, atol=1e-6)
        assert objective(x, w) <= objective(x, ref_w) * (1 + 1e-9)
    assert metrics.discriminative_scores(real * 1e8, fake * 1e8) == (0.0, 0.0)
