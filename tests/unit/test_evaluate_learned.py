"""Learned metrics of the evaluation script against their reference code: LPIPS against the
``lpips`` package (its real v0.1 linear layers, a random AlexNet shared by both), Inception
features against torchvision's own model and ImageNet preprocessing. No weights are
downloaded."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import evaluate_learned  # noqa: E402  (scripts/evaluate_learned.py)

from asuka_core.errors import InputError  # noqa: E402


def _photos(size=96):
    return [np.asarray(Image.fromarray(getattr(skimage.data, n)()).resize((size, size), Image.LANCZOS))
            for n in ("astronaut", "chelsea")]


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    lpips = pytest.importorskip("lpips")
    import torchvision

    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    torch.save(alex.state_dict(), d / "alexnet.pth")
    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    assert os.path.isfile(lin)
    return str(d / "alexnet.pth"), lin, alex


def test_lpips_matches_the_lpips_package(lpips_files):
    import lpips

    alex_path, lin_path, alex = lpips_files
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    # give the package the same (random) AlexNet: its slices keep torchvision's module indices
    for name, module in ref.net.named_children():
        for idx, layer in module.named_children():
            layer.load_state_dict(alex.features[int(idx)].state_dict())
    ours = evaluate_learned.LearnedMetrics(lpips=lin_path, alexnet=alex_path)
    a, b = _photos()
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    for x, y in [(a, b), (a, noisy)]:
        tx = torch.tensor(x).permute(2, 0, 1)[None].float() / 127.5 - 1
        ty = torch.tensor(y).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = ref(tx, ty).item()
        assert expected > 0
        assert ours.lpips(x, y) == pytest.approx(expected, rel=1e-5)
    assert ours.lpips(a, a) == pytest.approx(0.0, abs=1e-7)
    assert ours.has_lpips and not ours.has_inception
    assert any("FID and U-IDS/P-IDS not computed" in n for n in ours.notes)


def _photo(name: str, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.LANCZOS))


@pytest.fixture(scope="module")
def calibrated_inception(tmp_path_factory):
    """torchvision's Inception v3 with its own random initialisation, whose batch-norm
    statistics are then measured on real photos (torchvision's preset applied): every
    normalised activation has about unit scale, so the pool features of photos are of the
    size a trained net gives (means of ReLUs, ~0.1-1), not the ~1e-8 of an uncalibrated one."""
    import torchvision
    from torchvision.models import Inception_V3_Weights

    torch.manual_seed(3)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    prep = Inception_V3_Weights.IMAGENET1K_V1.transforms()        # builds the preset; downloads nothing
    calib = [_photo(n, (320, 320)) for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                                     # a plain average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.stack([prep(Image.fromarray(p)) for p in calib]))
    net.eval()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    net.fc = torch.nn.Identity()
    return str(path), net, prep


def test_inception_features_are_torchvisions_preset_exactly(calibrated_inception):
    path, net, prep = calibrated_inception
    # a square 512 px photo (MISATO's size: 342 side, crop offset round(21.5) = 22), a
    # landscape and a portrait one (the long side int(342 * long / short)), one under 299 px
    photos = [_photo("astronaut", (512, 512)), _photo("chelsea", (451, 300)), _photo("coffee", (250, 377)),
              _photo("rocket", (200, 200))]
    with torch.no_grad():
        expected = np.stack([net(prep(Image.fromarray(p))[None]).numpy()[0] for p in photos])
    scale = np.abs(expected).mean()
    assert 0.05 < scale < 5, f"features of mean size {scale}: the net is not calibrated"
    ours = evaluate_learned.InceptionFeatures(evaluate_learned._state(path, "x"), batch=3)
    got = ours(photos)
    assert got.shape == (4, 2048) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
    # the preprocessing itself, tensor for tensor
    for p in photos:
        np.testing.assert_allclose(evaluate_learned.inception_preprocess(p).numpy(),
                                   prep(Image.fromarray(p)).numpy(), rtol=0, atol=1e-6)
    # float inputs (pasted results) are the same uint8 image
    np.testing.assert_allclose(ours([photos[0] / 255.0]), got[:1], rtol=1e-6, atol=1e-7 * scale)


def test_inception_test_sees_a_one_pixel_crop_shift_and_a_float_resize(calibrated_inception):
    """What this test set guards against: the crop at 21 instead of 22, or resizing float
    tensors instead of the PIL uint8 image, moves the features far beyond the tolerance."""
    import torch.nn.functional as F

    path, net, prep = calibrated_inception
    img = _photo("astronaut", (512, 512))
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255.0
    mean = torch.tensor(evaluate_learned.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(evaluate_learned.IMAGENET_STD).view(1, 3, 1, 1)
    resized = F.interpolate(x, size=(342, 342), mode="bilinear", align_corners=False, antialias=True)
    pil = prep(Image.fromarray(img))[None]
    with torch.no_grad():
        good = net(pil).numpy()[0]
        shifted = net((resized[..., 21:320, 21:320] - mean) / std).numpy()[0]
        float_resize = net((resized[..., 22:321, 22:321] - mean) / std).numpy()[0]
    for bad in (shifted, float_resize):
        rel = np.abs(bad - good).mean() / np.abs(good).mean()
        assert rel > 1e-2, rel           # the tolerance above is 1e-4


def test_missing_or_wrong_weight_files_are_explained(tmp_path):
    with pytest.raises(InputError, match="needs both"):
        evaluate_learned.LearnedMetrics(lpips="alex.pth")
    with pytest.raises(InputError, match="no file"):
        evaluate_learned.LearnedMetrics(inception=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="Inception v3"):
        evaluate_learned.LearnedMetrics(inception=str(tmp_path / "wrong.pth"))
