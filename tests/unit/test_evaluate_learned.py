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


# ------------------------------------------------------------------------------ CLIP score

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small random CLIP vision tower with projection (OpenAI's layout: quick-GELU, 224 px
    input), saved as transformers saves it: a folder with config.json + model.safetensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=224, patch_size=32,
                                        projection_dim=24, hidden_act="quick_gelu")
    net = transformers.CLIPVisionModelWithProjection(cfg).eval()
    d = tmp_path_factory.mktemp("clip") / "clip-tiny"
    net.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    return str(d), net


def _openai_clip_embeddings(net, photos):
    """Oracle: OpenAI's clip.load preprocessing (torchvision Resize(224, bicubic) on the PIL
    image, CenterCrop(224), ToTensor, CLIP mean / std) and encode_image (the final layer
    norm of the class token times the projection), written out from the hidden states."""
    import torchvision.transforms as T

    prep = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    x = torch.stack([prep(Image.fromarray(p)) for p in photos])
    with torch.no_grad():
        h = net.vision_model(pixel_values=x).last_hidden_state
        return net.visual_projection(net.vision_model.post_layernorm(h[:, 0])).numpy()


def _clip_pairs():
    truths = [_photo("astronaut", (512, 512)), _photo("chelsea", (451, 300)), _photo("coffee", (150, 200))]
    results = [np.ascontiguousarray(t[::-1]) for t in truths[:2]] + [_photo("rocket", (150, 200))]
    masks = []
    for t in truths:
        m = np.zeros(t.shape[:2], np.uint8)
        h, w = m.shape
        m[h // 5:4 * h // 5, w // 4:3 * w // 4] = 255
        m[h // 5:4 * h // 5, 3 * w // 4] = 200          # a grey edge: outside the hole (mask // 255 == 0)
        masks.append(m)
    return truths, results, masks


def _official_clip_score(net, truths, results, masks):
    """The official cal_clip_score.py with its averaging bug fixed: images times
    ``mask // 255``, embeddings normalised, per-pair dot products, their mean."""
    hole = [(m // 255)[..., None] for m in masks]
    a = _openai_clip_embeddings(net, [r * h for r, h in zip(results, hole)])
    b = _openai_clip_embeddings(net, [g * h for g, h in zip(truths, hole)])
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean()), (a * b).sum(1)


def test_clip_features_are_openai_preprocessing_and_encode_image(tiny_clip):
    path, net = tiny_clip
    truths, results, _ = _clip_pairs()
    photos = truths + results
    expected = _openai_clip_embeddings(net, photos)
    ours = evaluate_learned.ClipImageFeatures(path, batch=4)
    assert ours.size == 224
    got = ours(photos)
    assert got.shape == (6, 24) and got.dtype == np.float32
    scale = np.abs(expected).mean()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
    # the file's path inside the folder is the folder
    np.testing.assert_allclose(evaluate_learned.ClipImageFeatures(os.path.join(path, "model.safetensors"))(photos[:1]),
                               got[:1], rtol=1e-6, atol=1e-7 * scale)
    # what the tolerance guards against: a bilinear resize or ImageNet's constants
    for wrong in (lambda p: evaluate_learned._normalise(evaluate_learned._resize_crop(p, 224, 224, Image.BILINEAR),
                                                         evaluate_learned.CLIP_MEAN, evaluate_learned.CLIP_STD),
                  lambda p: evaluate_learned._normalise(evaluate_learned._resize_crop(p, 224, 224, Image.BICUBIC),
                                                         evaluate_learned.IMAGENET_MEAN, evaluate_learned.IMAGENET_STD)):
        with torch.no_grad():
            bad = ours.net(pixel_values=torch.stack([wrong(p) for p in photos])).image_embeds.numpy()
        rel = np.abs(bad - expected).mean() / scale
        assert rel > 1e-3, rel           # the tolerance above is 1e-4


def test_clip_loads_the_vision_half_of_a_whole_clip_model(tmp_path):
    """openai/clip-vit-large-patch14 is a whole CLIPModel (text tower too): its vision tower and
    projection are what is read."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=24)
    whole = transformers.CLIPModel(cfg).eval()
    whole.save_pretrained(tmp_path / "whole")
    photo = _photo("astronaut", (512, 512))
    got = evaluate_learned.ClipImageFeatures(str(tmp_path / "whole"))([photo])
    np.testing.assert_allclose(got, _openai_clip_embeddings(whole, [photo]), rtol=1e-4, atol=1e-6)


def test_clip_score_is_the_official_formula_without_its_bug(tiny_clip):
    path, net = tiny_clip
    truths, results, masks = _clip_pairs()
    expected, per_pair = _official_clip_score(net, truths, results, masks)
    assert np.ptp(per_pair) > 1e-3, per_pair          # the pairs differ: a mean of them says something
    ours = evaluate_learned.LearnedMetrics(clip=path)
    assert ours.has_clip and not ours.has_inception and not ours.has_lpips
    got = ours.clip_score(truths, results, masks)
    assert abs(got - expected) < 1e-5
    # the whole image instead of the hole only is another number
    whole = ours.clip_score(truths, results, [np.full_like(m, 255) for m in masks])
    assert abs(whole - expected) > 1e-3


def test_clip_report_column_end_to_end(tiny_clip, tmp_path):
    """dataset_scores -> write_summary, as evaluate.run calls them: a CLIP column under the
    MISATO protocol, rounded to 3 decimals, and none without the protocol."""
    from types import SimpleNamespace

    import evaluate

    path, net = tiny_clip
    truths, results, masks = _clip_pairs()
    stems = ["a", "b", "c"]
    wfs = [SimpleNamespace(name="w1"), SimpleNamespace(name="w2")]
    inputs, mk = dict(zip(stems, truths)), dict(zip(stems, masks))
    res = {("w1", s): r for s, r in zip(stems, results)}
    res.update({("w2", s): t for s, t in zip(stems[:2], truths[:2])})        # w2: perfect, one pair missing
    learned = evaluate_learned.LearnedMetrics(clip=path)
    notes = []
    ds = evaluate.dataset_scores(learned, wfs, stems, inputs, mk, res, True, 0, notes)
    expected, _ = _official_clip_score(net, truths, results, masks)
    assert set(ds) == {"w1", "w2"} and abs(ds["w1"]["CLIP"] - expected) < 1e-5
    assert abs(ds["w2"]["CLIP"] - 1.0) < 1e-5
    rows = {(w.name, s): {"status": "ok", "psnr": "20"} for w in wfs for s in stems if (w.name, s) in res}
    summary = evaluate.summarise(rows, wfs, stems, ["psnr"])
    md = evaluate.write_summary(str(tmp_path), summary, ["psnr"], ds, notes + [evaluate.clip_note(path)], [],
                                protocol="misato")
    head = next(line for line in md.splitlines() if line.startswith("| workflow"))
    assert head.rstrip(" |").endswith("CLIP ↑")
    w1 = next(line for line in md.splitlines() if line.startswith("| w1 "))
    assert w1.rstrip(" |").endswith(f"{round(expected, 3):.3f}")
    assert "CLIP: mean cosine similarity" in md
    assert evaluate.dataset_scores(learned, wfs, stems, inputs, mk, res, False, 0, []) == {}


def test_clip_weights_problems_are_explained(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(InputError, match="config.json"):
        evaluate_learned.LearnedMetrics(clip=str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(InputError, match="does not load as a CLIP vision model"):
        evaluate_learned.LearnedMetrics(clip=str(tmp_path))


def test_clip_weights_that_do_not_fit_their_config_are_refused(tiny_clip, tmp_path):
    """A projection of another size, or a tensor missing from the file: transformers would
    initialise it at random; the loader refuses."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = tiny_clip
    d = tmp_path / "clip"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "projection_dim": 32}))
    with pytest.raises(InputError, match="does not load as a CLIP vision model"):
        evaluate_learned.ClipImageFeatures(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(d / "model.safetensors")
    del state["vision_model.post_layernorm.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="lacks or misshapes vision_model.post_layernorm.weight"):
        evaluate_learned.ClipImageFeatures(str(d))
