"""Aligner training on CPU with tiny models built from ComfyUI's own classes: the epsilon
loss through ComfyUI's apply_model equals an independent re-derivation, the loss falls,
resume is bit-identical, gradient checkpointing changes nothing, bad inputs are refused
before training.

The tests use a narrow aligner (width 64, one block) with a UNet of 64-wide
cross-attention and a cheap stand-in prior (pooled masked pixels through a fixed random
projection) so they take seconds. The real layout (768 wide, four blocks, the MAE prior,
export and loading, samples) is trained end to end in tests/host/test_host_training.py.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asuka_core.errors import CheckpointError, InputError
from tests.fixtures import tiny_sd

RES = 64


@pytest.fixture(scope="module")
def comfy():
    tiny_sd.import_comfy()
    return tiny_sd.pack_module("nodes.training_glue")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("photos"))
    tiny_sd.write_synthetic_photos(d)
    return d


def narrow_models(glue, *, checkpointing=False, seed=0):
    from asuka_core.training import FrozenModels

    mp = tiny_sd.tiny_inpaint_patcher(seed=seed, context_dim=64)
    vae = tiny_sd.tiny_vae()
    glue.make_trainable(mp, gradient_checkpointing=checkpointing)
    tiny_sd.amplify_context(mp)
    return FrozenModels(prior=tiny_sd.pooled_prior, encode=tiny_sd.direct_encoder(vae), denoiser=glue.make_denoiser(mp),
                        sigmas=mp.model.model_sampling.sigmas.float(), latent_in=mp.model.process_latent_in), mp


def make_trainer(models, photos, out_dir, **overrides):
    from asuka_core.training import AlignerTrainer, TrainConfig, image_sets, new_aligner

    settings = dict(steps=30, batch_size=2, lr=3e-3, warmup=0, resolution=RES, precision="fp32",
                    val_every=0, save_every=0, sample_every=0, log_every=0, p_steps=10, ema_decay=0.9)
    settings.update(overrides)
    cfg = TrainConfig(**settings)
    train, val = image_sets(photos, RES, holdout=0.25)
    return AlignerTrainer(cfg, models, train, val, out_dir=str(out_dir), aligner=new_aligner(3, width=64, depth=1),
                          log=lambda s: None)


# ------------------------------------------------------------------------------ schedules

def test_training_package_imports_no_comfyui():
    import subprocess
    import sys

    code = ("import sys, asuka_core.training; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'comfy', 'comfy_api', 'folder_paths'}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tiny_sd.REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout



def test_substitution_probability_follows_the_paper_schedule():
    from asuka_core.training import substitution_probability as p

    # 100 % -> 10 % linearly over the first 2K steps, then frozen
    assert p(0) == 1.0
    assert p(1000) == pytest.approx(0.55)
    assert p(1999) == pytest.approx(1.0 - 0.9 * 1999 / 2000)
    assert p(2000) == pytest.approx(0.1) and p(50_000) == pytest.approx(0.1)


def test_learning_rate_warmup_and_cosine():
    from asuka_core.training import learning_rate as lr

    assert lr(0, 1e-3, warmup=10) == pytest.approx(1e-4)
    assert lr(9, 1e-3, warmup=10) == pytest.approx(1e-3)
    assert lr(500, 1e-3, warmup=10) == 1e-3                       # constant by default
    assert lr(10, 1e-3, warmup=10, total=110, final=0.1) == pytest.approx(1e-3)
    assert lr(60, 1e-3, warmup=10, total=110, final=0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr(110, 1e-3, warmup=10, total=110, final=0.1) == pytest.approx(1e-4)


# ------------------------------------------------------------------------------ the objective

def test_denoiser_gives_the_unets_epsilon_prediction(comfy):
    """eps_hat from apply_model/extra_conds equals the UNet called directly on the DDPM
    input sqrt(abar) z0 + sqrt(1 - abar) eps with [mask, masked latent] concatenated."""
    torch.manual_seed(0)
    mp = tiny_sd.tiny_inpaint_patcher(context_dim=64)
    comfy.make_trainable(mp, gradient_checkpointing=False)
    bm = mp.model
    denoiser = comfy.make_denoiser(mp)
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    sigma = ((1 - abar) / abar).sqrt()[t].float()         # SD1.5's scaled-linear schedule
    assert torch.allclose(sigma, bm.model_sampling.sigmas[t].float(), rtol=1e-4)
    raw_masked = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, RES, RES)
    mask[0, 8:40, 16:56] = 1
    mask[1, 30:, :] = 1
    ctx = torch.randn(2, 256, 64)
    with torch.no_grad():
        got = denoiser(z0 + sigma.view(-1, 1, 1, 1) * eps, sigma, ctx, raw_masked, mask)
        a = abar[t].float().view(-1, 1, 1, 1)
        x_ddpm = a.sqrt() * z0 + (1 - a).sqrt() * eps
        mask_lat = F.interpolate(mask[:, None], size=(8, 8), mode="bilinear", align_corners=False).round()
        unet_in = torch.cat([x_ddpm, mask_lat, raw_masked * 0.18215], 1)
        want = bm.diffusion_model(unet_in, t.float(), context=ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_aligner_only_and_checkpointing_changes_nothing(comfy, photos, tmp_path):
    grads = []
    for ckpt in (False, True):
        models, mp = narrow_models(comfy, checkpointing=ckpt)
        tr = make_trainer(models, photos, tmp_path / str(ckpt))
        tr.optimizer.zero_grad()
        mb = tr._micro_batch(0, 0)
        loss = tr._loss(tr.aligner, mb["images"], mb["masks"], mb["masks"], mb["t"], noise=mb["noise"])
        loss.backward()
        assert all(p.grad is None for p in mp.model.diffusion_model.parameters())
        assert not any(p.requires_grad for p in mp.model.diffusion_model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in tr.aligner.parameters()]))
        comfy.release_trainable(mp)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ the loop

def test_loss_falls_on_a_small_synthetic_set(comfy, photos, tmp_path):
    """The held-out loss (fixed images, masks, noise and timesteps) after 20 steps is
    clearly below its value for the initial aligner. (Through a random UNet the context
    can only remove a small part of the error, so the margin is a few per cent.)"""
    models, _ = narrow_models(comfy)
    tr = make_trainer(models, photos, tmp_path, steps=20)
    before = tr.validation_loss(tr.aligner)
    for _ in range(20):
        tr.train_step()
    after = tr.validation_loss(tr.aligner)
    assert all(math.isfinite(v) for _, v in tr.history["train"])
    assert after < 0.97 * before, (before, after)


def test_prior_is_computed_from_the_whole_image_with_probability_p(comfy, photos, tmp_path):
    """Step 0 (p = 1): every prior sees an empty mask; after the schedule (p = 0.1) about
    one in ten does, and the UNet always gets the real mask."""
    seen = []
    models, _ = narrow_models(comfy)
    base = models.prior

    def recording_prior(images, masks):
        seen.append(masks.flatten(1).amax(1))
        return base(images, masks)

    models.prior = recording_prior
    tr = make_trainer(models, photos, tmp_path, batch_size=8, p_steps=2, steps=4)
    mb = tr._micro_batch(0, 0)
    assert mb["substitute"].all() and mb["p"] == 1.0
    tr.train_step()
    assert (seen[-1] == 0).all()                       # whole image
    subs = [bool(s) for k in range(2, 60) for s in tr._micro_batch(k, 0)["substitute"]]
    assert 0.03 < np.mean(subs) < 0.2, np.mean(subs)
    tr.step = 2
    tr.train_step()
    assert (seen[-1] == 0).sum() == int(tr._micro_batch(2, 0)["substitute"].sum())


def test_resume_continues_bit_identically(comfy, photos, tmp_path):
    models, _ = narrow_models(comfy)
    kw = dict(steps=4, grad_accum=2, warmup=2, batch_size=1)
    straight = make_trainer(models, photos, tmp_path / "a", **kw)
    for _ in range(4):
        straight.train_step()

    first = make_trainer(models, photos, tmp_path / "b", **kw)
    for _ in range(2):
        first.train_step()
    state = first.save_state()
    del first
    resumed = make_trainer(models, photos, tmp_path / "b", **kw)
    resumed.resume(state)
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step()

    for (k, a), (_, b) in zip(straight.aligner.state_dict().items(), resumed.aligner.state_dict().items()):
        assert torch.equal(a, b), k
    for k in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[k], resumed.ema.shadow[k]), k
    assert straight.history == resumed.history
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])

    with pytest.raises(InputError, match="batch_size"):
        make_trainer(models, photos, tmp_path / "c", **{**kw, "batch_size": 3}).resume(state)


def test_bf16_autocast_and_fp16_scaler_steps_are_finite(comfy, photos, tmp_path):
    models, _ = narrow_models(comfy)
    for precision in ("bf16", "fp16"):
        tr = make_trainer(models, photos, tmp_path / precision, precision=precision, steps=2)
        assert math.isfinite(tr.train_step())
        assert all(torch.isfinite(p).all() for p in tr.aligner.parameters())


# ------------------------------------------------------------------------------ bad input

def test_bad_inputs_are_refused_before_training(comfy, photos, tmp_path):
    from asuka_core.training import TrainConfig, image_sets

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="No images"):
        image_sets(str(empty), RES)
    with pytest.raises(InputError, match="does not exist"):
        image_sets(str(tmp_path / "missing"), RES)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.png"):
        (broken / name).write_bytes((tmp_path.parent / "x").name.encode() if False else b"\x89PNG not really")
    with pytest.raises(InputError, match="Could not read training image .*a.png"):
        image_sets(str(broken), RES)
    with pytest.raises(InputError, match="smaller than"):
        image_sets(photos, 256)
    with pytest.raises(InputError, match="lr must be a positive"):
        TrainConfig(lr=0).check()

    pack_errors = tiny_sd.pack_module("asuka_core.errors")  # the glue's own copy of asuka_core
    four = tiny_sd.tiny_inpaint_patcher(in_channels=4)
    with pytest.raises(pack_errors.CheckpointError, match="non-inpainting.*9 input channels"):
        comfy.check_inpainting_model(four)
    wide = tiny_sd.tiny_inpaint_patcher(context_dim=64)
    with pytest.raises(pack_errors.CheckpointError, match="64-wide cross-attention"):
        comfy.check_inpainting_model(wide)

    # A UNet that does not fit the aligner fails in the pre-flight pass, not mid-run.
    models, _ = narrow_models(comfy)
    from asuka_core.training import new_aligner

    tr = make_trainer(models, photos, tmp_path / "mismatch")
    tr.aligner = new_aligner(0, width=128, depth=1)
    with pytest.raises(CheckpointError, match="failed on a test batch"):
        tr.run()
    assert not os.path.exists(tr.state_path)


def test_an_interrupted_run_saves_a_resumable_state(comfy, photos, tmp_path):
    """What Cancel does: the progress callback raises (ComfyUI's bar does on Cancel); the
    run saves its state at the last finished step and re-raises."""
    class Cancelled(Exception):
        pass

    def progress(done, total):
        if done == 2:
            raise Cancelled

    models, _ = narrow_models(comfy)
    tr = make_trainer(models, photos, tmp_path, steps=10, batch_size=1)
    tr.progress = progress
    with pytest.raises(Cancelled):
        tr.run()
    assert torch.load(tr.state_path, weights_only=True)["step"] == 2
    assert not os.path.exists(tr.export_path)


# ------------------------------------------------------------------------------ data pipeline

def _maker(photos, **kw):
    from asuka_core.masks import MaskGenerator
    from asuka_core.training import image_sets
    from asuka_core.training.data import BatchMaker

    train, _ = image_sets(photos, RES, holdout=0.25, **kw)
    return BatchMaker(train, MaskGenerator(RES, seed=0), batch_size=3, grad_accum=2, seed=4, timesteps=1000,
                      latent_shape=(4, RES // 8, RES // 8), p_steps=4)


def test_worker_processes_give_the_same_batches_in_order(photos):
    from asuka_core.training.data import BatchStream, workers_supported

    if not workers_supported():
        pytest.skip("DataLoader workers need fork (Linux)")
    maker = _maker(photos)
    stream = BatchStream(maker, workers=2, prefetch=2)
    try:
        assert stream.workers == 2
        for n in [5, 6, 7, 8, 2, 3]:          # in order, then a jump back (restarts the workers there)
            got, want = stream.get(n), maker(n)
            assert got["n"] == n and got["p"] == want["p"]
            for key in ("images", "masks", "substitute", "t", "noise"):
                assert torch.equal(got[key], want[key]), (n, key)
    finally:
        stream.close()
    a, b = maker(0), maker(1)
    assert not torch.equal(a["images"], b["images"]) and not torch.equal(a["noise"], b["noise"])


def test_prescaled_cache_keeps_crops_close_and_is_reused(photos, tmp_path):
    from asuka_core.training.data import load_image, prescaled_side

    assert prescaled_side(512, 0.7) == 732                  # 0.7 * 732 >= 512: crops never upscaled
    cache = tmp_path / "cache"
    plain, cached = _maker(photos), _maker(photos, cache_dir=str(cache))
    a, b = plain(0)["images"], cached(0)["images"]
    files = sorted(cache.rglob("*.png"))
    assert files and cached.images.cache_dir == str(cache)
    # the test photos are small (80x96 < 92 px side needed at 64 px), so the copies keep their size
    assert load_image(str(files[0])).shape[:2] == (80, 96)
    torch.testing.assert_close(a, b)                         # same source pixels -> same crops
    stamp = [f.stat().st_mtime_ns for f in files]
    torch.testing.assert_close(cached(0)["images"], b)
    assert [f.stat().st_mtime_ns for f in files] == stamp   # read back, not made again


def test_prescaled_copy_of_a_large_photo(tmp_path):
    from PIL import Image

    from asuka_core.training.data import load_image, prescaled_image

    rng = np.random.default_rng(0)
    big = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    src = tmp_path / "big.jpg"
    Image.fromarray(big).save(src, quality=95)
    out = prescaled_image(str(src), str(tmp_path / "c"), 150)
    assert out.shape == (150, 200, 3)
    want = np.asarray(Image.fromarray(load_image(str(src))).resize((200, 150), Image.Resampling.LANCZOS))
    assert np.array_equal(out, want)
    assert np.array_equal(prescaled_image(str(src), str(tmp_path / "c"), 150), out)


# ------------------------------------------------------------------------------ warm start

def test_warm_start_takes_the_released_clip_aligner_as_an_sd15_aligner(tmp_path):
    from asuka_core.aligner import TARGET_SD15, load_aligner, save_aligner
    from asuka_core.training import warm_start_aligner
    from tests.fixtures import aligner_files

    released = aligner_files.write_official_aligner_pt(tmp_path / "asuka_alignment_clip.pt", 768, seed=4)
    assert load_aligner(str(tmp_path / "asuka_alignment_clip.pt")).target == "flux_clip"
    model = warm_start_aligner(str(tmp_path / "asuka_alignment_clip.pt"))
    assert (model.target, model.width, model.depth, model.training) == (TARGET_SD15, 768, 4, True)
    got = model.state_dict()
    assert set(got) == set(aligner_files.without_modulation(released))
    for k, v in got.items():
        assert torch.equal(v, released[k].float()), k
    # an SD1.5 aligner file passes through as it is
    save_aligner(model, str(tmp_path / "sd15.safetensors"), target=TARGET_SD15)
    again = warm_start_aligner(str(tmp_path / "sd15.safetensors"))
    assert all(torch.equal(v, got[k]) for k, v in again.state_dict().items())
