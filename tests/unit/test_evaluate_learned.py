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


def test_inception_features_match_torchvision(tmp_path):
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    torch.manual_seed(1)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    net.fc = torch.nn.Identity()
    net.eval()
    prep = ImageClassification(crop_size=299, resize_size=342)     # Inception_V3_Weights' transforms
    photos = _photos(160)
    with torch.no_grad():
        expected = np.stack([net(prep(Image.fromarray(p))[None]).numpy()[0] for p in photos])
    ours = evaluate_learned.InceptionFeatures(evaluate_learned._state(str(tmp_path / "inception.pth"), "x"))
    got = ours(photos)
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_missing_or_wrong_weight_files_are_explained(tmp_path):
    with pytest.raises(InputError, match="needs both"):
        evaluate_learned.LearnedMetrics(lpips="alex.pth")
    with pytest.raises(InputError, match="no file"):
        evaluate_learned.LearnedMetrics(inception=str(tmp_path / "missing.pth"))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="Inception v3"):
        evaluate_learned.LearnedMetrics(inception=str(tmp_path / "wrong.pth"))
