"""Masked-decoder training (SD1.5) on CPU with a tiny Asymmetric-VQGAN-layout decoder:

* the colour augmentation is torchvision's ColorJitter (the oracle) with the paper's
  strengths, applied to the image that is encoded, never to the known pixels or the target;
* the latent augmentation is the paper's one-step estimate: checked against ComfyUI's own
  x0 prediction (``apply_model``) of a tiny SD1.5 inpainting UNet, with the all-zero mask and
  the clean latent as conditions, t in [500, 1000), for about half of the images;
* the held-out loss falls, the GAN starts at ``disc_start``, resume is bit-identical, the
  export loads with the pack's decoder loader and decodes, and bad inputs are refused.
The same recipe through a real server (CLI, node, SD1.5 graph) is in
tests/host/test_host_decoder_training.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asuka_core import checkpoint as ckpt_mod
from asuka_core.decoder import KIND_AVQ, load_decoder
from asuka_core.errors import CheckpointError, InputError
from asuka_core.imaging import image_to_model
from asuka_core.lpips import LPIPS
from asuka_core.training import (DecoderFrozen, DecoderTrainConfig, DecoderTrainer, decoder_from_vae, image_sets,
                                 ldm_state_dict, start_decoder)
from asuka_core.training import decoder_augment as aug
from asuka_core.training.decoder_losses import adaptive_weight
from tests.fixtures import decoder_files, tiny_sd
from tests.unit.test_evaluate_learned import lpips_files  # noqa: F401  (fixture: the lpips package's weights)

RES = 64


def sd_sigmas(steps: int = 1000) -> torch.Tensor:
    """SD1.5's scaled-linear schedule as k-diffusion sigmas (independent of ComfyUI)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt().float()


class TinyEncoder(nn.Module):
    """A fixed 8x-down 'VAE encoder' (IMAGE -> 4-channel latent)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 8, stride=8)
        self.requires_grad_(False)
        self.seen: list[torch.Tensor] = []

    def __call__(self, images):
        self.seen.append(images.clone())
        return self.conv(image_to_model(images))


class TinyEps(nn.Module):
    """A fixed stand-in epsilon model with the denoiser signature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(9, 4, 3, padding=1)
        self.requires_grad_(False)
        self.calls: list[dict] = []

    def __call__(self, x, sigma, context, masked_latent, mask):
        self.calls.append({"sigma": sigma.clone(), "masked": masked_latent.clone(), "mask": mask.clone()})
        m = F.interpolate(mask[:, None].float(), size=x.shape[-2:])
        inp = torch.cat([x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), m, masked_latent], 1)
        return self.conv(inp) + context.mean()


def frozen(latent_aug: bool = True) -> DecoderFrozen:
    return DecoderFrozen(encode=TinyEncoder(), denoiser=TinyEps() if latent_aug else None,
                         sigmas=sd_sigmas() if latent_aug else None,
                         context=torch.zeros(1, 77, 768) if latent_aug else None)


def tiny_decoder(seed: int = 31):
    return start_decoder(decoder_files.avq_ldm_state_dict(seed, z_channels=4, ch=32, num_res_blocks=1))


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("decoder-photos"))
    tiny_sd.write_synthetic_photos(d, count=6)
    return image_sets(d, RES)


def config(**kw) -> DecoderTrainConfig:
    base = dict(steps=4, batch_size=2, grad_accum=1, lr=1e-3, resolution=RES, precision="fp32", lpips_weight=0.0,
                disc_start=2, disc_width=16, disc_layers=2, val_every=0, save_every=0, sample_every=0,
                sample_count=0, log_every=0)
    base.update(kw)
    return DecoderTrainConfig(**base)


def trainer(photo_sets, tmp_path, cfg=None, decoder=None, fz=None, **kw) -> DecoderTrainer:
    train, val = photo_sets
    return DecoderTrainer(cfg or config(), fz or frozen(), decoder or tiny_decoder(), train, val,
                          out_dir=str(tmp_path), log=lambda s: None, **kw)


# ------------------------------------------------------------------------------ colour

def test_colour_jitter_is_torchvision_colorjitter():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    img = torch.rand(24, 20, 3, generator=torch.Generator().manual_seed(0))
    img[:4, :4] = 0.5                                    # grey pixels: hue undefined
    rng = np.random.default_rng(0)
    for _ in range(25):
        j = aug.draw_jitter(rng, (0.15, 0.2, 0.1, 0.3))
        ref = img.permute(2, 0, 1)
        for op in j.order:
            fn = {"brightness": (tvf.adjust_brightness, j.brightness), "contrast": (tvf.adjust_contrast, j.contrast),
                  "saturation": (tvf.adjust_saturation, j.saturation), "hue": (tvf.adjust_hue, j.hue)}
            f, v = fn[aug.OPERATIONS[op]]
            ref = f(ref, v)
        assert torch.allclose(aug.apply_jitter(img, j), ref.permute(1, 2, 0), atol=1e-5), j


def test_jitter_factors_follow_the_paper():
    assert aug.PAPER_JITTER == (0.15, 0.2, 0.1, 0.03)
    rng = np.random.default_rng(1)
    js = [aug.draw_jitter(rng) for _ in range(400)]
    for name, lo, hi in (("brightness", 0.85, 1.15), ("contrast", 0.8, 1.2), ("saturation", 0.9, 1.1),
                         ("hue", -0.03, 0.03)):
        v = np.array([getattr(j, name) for j in js])
        assert v.min() >= lo and v.max() <= hi, name
        assert v.min() < lo + 0.02 * (hi - lo) * 5 and v.max() > hi - 0.02 * (hi - lo) * 5, name   # spans the range
    assert all(sorted(j.order) == [0, 1, 2, 3] for j in js)
    assert len({j.order for j in js}) > 12                # random order


def test_colour_augmentation_corrupts_only_the_encoded_image(photo_sets, tmp_path):
    fz = frozen(latent_aug=False)
    t = trainer(photo_sets, tmp_path, cfg=config(latent_aug_prob=0.0, disc_factor=0.0), fz=fz)
    seen = {}
    forward = t.decoder.forward

    def spy(z, image, mask, stage=None):
        seen["image"], seen["z"] = image.detach().clone(), z.detach().clone()
        return forward(z, image, mask, stage)

    t.decoder.forward = spy
    mb = t._micro_batch(0, 0)
    t.train_step()
    encoded = fz.encode.seen[-1]
    assert torch.allclose(encoded, aug.jitter_batch(mb["images"], mb["jitters"]))
    assert (encoded - mb["images"]).abs().max() > 0.01                  # the latent's image is jittered
    assert torch.equal(seen["image"], image_to_model(mb["images"]))     # known pixels: the original
    assert torch.allclose(seen["z"], fz.encode.conv(image_to_model(encoded)))


# ------------------------------------------------------------------------------ latent

def test_one_step_estimate_is_comfyui_s_own_x0_prediction():
    """Eq. (1) in DDPM form against ComfyUI's denoised output (apply_model) of a tiny SD1.5
    inpainting UNet given the same conditions (clean latent as masked image, mask 0)."""
    tiny_sd.import_comfy()
    glue = tiny_sd.pack_module("nodes.training_glue")
    patcher = tiny_sd.tiny_inpaint_patcher(seed=2)
    bm = patcher.model
    gen = torch.Generator().manual_seed(0)
    z0_raw = torch.randn(2, 4, 8, 8, generator=gen) * 5
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([500, 999])
    context = torch.randn(1, 77, 768, generator=gen)
    sigmas = bm.model_sampling.sigmas.detach().float()
    with torch.no_grad():
        ours = aug.latent_augment(z0_raw, t, noise, denoiser=glue.make_denoiser(patcher), sigmas=sigmas,
                                  context=context, latent_in=bm.process_latent_in, latent_out=bm.process_latent_out)
        z0 = bm.process_latent_in(z0_raw)
        sigma = sigmas[t]
        x = z0 + sigma.view(-1, 1, 1, 1) * noise
        c_concat = bm.extra_conds(noise=x, device=x.device, concat_latent_image=z0_raw,
                                  concat_mask=torch.zeros(2, 64, 64))["c_concat"].cond
        denoised = bm.apply_model(x, sigma, c_concat=c_concat, c_crossattn=context.expand(2, -1, -1),
                                  transformer_options={})
    expected = bm.process_latent_out(denoised)
    assert torch.allclose(ours, expected, atol=1e-4 * expected.abs().max()), (ours - expected).abs().max()
    assert (ours - z0_raw).abs().mean() > 1e-3                # the UNet shifts the latent


def test_one_step_estimate_inverts_the_forward_process():
    """With the true noise as the prediction, eq. (1) gives back z0 exactly."""
    sig = sd_sigmas()
    gen = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([500, 700, 999])
    holder = {}

    def oracle(x, sigma, context, masked, mask):
        holder.update(sigma=sigma, masked=masked, mask=mask)
        return eps

    out = aug.latent_augment(z0, t, eps, denoiser=oracle, sigmas=sig, context=torch.zeros(1, 4, 768))
    assert torch.allclose(out, z0, atol=1e-5)
    assert torch.equal(holder["masked"], z0) and not holder["mask"].any()      # clean latent, all-zero mask
    assert torch.equal(holder["sigma"], sig[t])


def test_latent_augmentation_replaces_half_of_the_latents(photo_sets, tmp_path):
    fz = frozen()
    t = trainer(photo_sets, tmp_path, cfg=config(batch_size=4), fz=fz)
    flags, steps = [], []
    for s in range(12):
        mb = t._micro_batch(s, 0)
        plain = fz.encode(aug.jitter_batch(mb["images"], mb["jitters"]))
        fz.denoiser.calls.clear()
        z = t.corrupted_latents(mb["images"], mb["jitters"], mb["augment"], mb["gen"])
        same = [(z[i] - plain[i]).abs().max().item() < 1e-6 for i in range(4)]
        assert same == [not bool(a) for a in mb["augment"]]
        if mb["augment"].any():
            sig = fz.denoiser.calls[-1]["sigma"]
            steps += [int(torch.argmin((sd_sigmas()[None] - s_[None, None]).abs())) for s_ in sig]
        flags += mb["augment"].tolist()
    assert 0.3 < np.mean(flags) < 0.7
    assert min(steps) >= 500 and max(steps) < 1000


# ------------------------------------------------------------------------------ training

def test_held_out_loss_falls(photo_sets, tmp_path, lpips_net):
    cfg = config(steps=25, lr=2e-3, lpips_weight=0.5, disc_start=10_000, val_every=25)
    t = trainer(photo_sets, tmp_path, cfg=cfg, perceptual=lpips_net)
    result = t.run()
    (s0, v0), (s1, v1) = t.history["val"][0], t.history["val"][-1]
    assert (s0, s1) == (0, 25)
    assert v1 < 0.8 * v0, t.history["val"]
    first = np.mean([v for _, v in t.history["train"][:5]])
    last = np.mean([v for _, v in t.history["train"][-5:]])
    assert last < first
    assert os.path.isfile(result["decoder"]) and os.path.isfile(result["loss_curve"])


def test_gan_starts_at_disc_start_with_the_adaptive_weight(photo_sets, tmp_path):
    t = trainer(photo_sets, tmp_path, cfg=config(disc_start=2, steps=3))
    d0 = {k: v.clone() for k, v in t.disc.state_dict().items()}
    t.train_step(), t.train_step()
    assert all(torch.equal(v, t.disc.state_dict()[k]) for k, v in d0.items())   # steps 0, 1: no GAN
    assert t.history["d"] == []
    t.train_step()
    assert [s for s, _ in t.history["d"]] == [2]
    assert any(not torch.equal(v, t.disc.state_dict()[k]) for k, v in d0.items() if "running" not in k)
    # the adaptive weight is the gradient-norm ratio at the last layer
    w = torch.randn(3, 5, requires_grad=True)
    x = torch.randn(5)
    nll, g = (w @ x).abs().sum(), (w @ x).sum() * 3
    expected = 0.8 * torch.autograd.grad(nll, w, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, w, retain_graph=True)[0].norm() + 1e-4)
    assert torch.allclose(adaptive_weight(nll, g, w, disc_weight=0.8), expected)


def test_resume_is_bit_identical(photo_sets, tmp_path):
    cfg = config(steps=4, disc_start=1)
    full = trainer(photo_sets, tmp_path / "a", cfg=cfg)
    for _ in range(4):
        full.train_step()
    half = trainer(photo_sets, tmp_path / "b", cfg=config(steps=4, disc_start=1))
    half.train_step(), half.train_step()
    half.save_state()
    again = trainer(photo_sets, tmp_path / "b", cfg=config(steps=4, disc_start=1), decoder=tiny_decoder())
    again.resume()
    assert again.step == 2
    again.train_step(), again.train_step()
    for a, b in ((full.decoder, again.decoder), (full.disc, again.disc)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    for k, v in full.ema.shadow.items():
        assert torch.equal(v, again.ema.shadow[k]), k
    assert torch.equal(full.logvar, again.logvar)
    assert full.history["train"] == again.history["train"]


def test_resume_refuses_changed_settings(photo_sets, tmp_path):
    t = trainer(photo_sets, tmp_path)
    t.train_step()
    t.save_state()
    other = trainer(photo_sets, tmp_path, cfg=config(latent_aug_prob=0.25))
    with pytest.raises(InputError, match="latent_aug_prob"):
        other.resume()


def test_export_is_an_avq_decoder_file_that_loads_and_decodes(photo_sets, tmp_path):
    t = trainer(photo_sets, tmp_path)
    t.train_step()
    path = t.export()
    ckpt = ckpt_mod.read_checkpoint(path)
    assert ckpt_mod.identify(ckpt.tensors) == ckpt_mod.KIND_AVQ_DECODER
    assert ckpt.tensors["decoder.mid.attn_1.q.weight"].ndim == 4        # ldm layout, 1x1 conv
    assert ckpt.metadata["asuka.decoder.family"] == "avq" and ckpt.metadata["asuka.training.steps"] == "1"
    loaded = load_decoder(path)
    assert loaded.kind == KIND_AVQ and loaded.latent_channels == 4
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, t.ema.shadow[k]), k
    image = photo_sets[1].sample(0)[None]
    mask = torch.zeros(1, RES, RES)
    mask[:, 16:48, 16:48] = 1
    out = loaded.decode(t.frozen.encode(image), image, mask)
    assert out.shape == (1, RES, RES, 3) and torch.isfinite(out).all()
    assert ldm_state_dict(loaded.state_dict()).keys() == ckpt.tensors.keys()


def test_start_from_the_sd_vae_decoder_with_a_new_condition_branch(photo_sets, tmp_path):
    tiny_sd.import_comfy()
    vae = tiny_sd.tiny_vae()
    state = vae.first_stage_model.state_dict()
    dec = decoder_from_vae(state, seed=0)
    assert dec.kind == KIND_AVQ
    ldm = ldm_state_dict(dec.state_dict())
    for k, v in state.items():                       # every VAE decoder weight is kept as it is
        if k.startswith(("decoder.", "post_quant_conv.")):
            assert torch.equal(ldm[k].reshape(v.shape), v.float()), k
    assert {k for k in ldm if k not in state} == {k for k in ldm if k.startswith("decoder.encoder.layers.")}
    t = trainer(photo_sets, tmp_path, decoder=dec, cfg=config(latent_aug_prob=0.0), fz=frozen(False),
                fresh_prefixes=("condition_encoder.",))
    t.train_step()
    scales = sorted(g["lr_scale"] for g in t.optimizer.param_groups)
    assert scales == [0.1, 1.0, 1.0]                 # old weights 0.1x, new branch and logvar 1x
    fresh = next(g for g in t.optimizer.param_groups if any(p is t.decoder.condition_encoder.layers[0].weight
                                                             for p in g["params"]))
    assert fresh["lr_scale"] == 1.0
    assert not t.decoder.post_quant_conv.weight.requires_grad


def test_starts_from_a_diffusers_asymmetric_vqgan_folder(photo_sets, tmp_path):
    pytest.importorskip("diffusers")
    folder = tmp_path / "x-1-5-small"
    ref = decoder_files.write_diffusers_folder(folder, seed=5, config=decoder_files.SMALL_DIFFUSERS_CONFIG)
    dec = start_decoder(str(folder))
    assert dec.kind == KIND_AVQ
    torch.testing.assert_close(dec.conv_out.weight, ref.decoder.conv_out.weight.float())
    t = trainer(photo_sets, tmp_path / "run", decoder=dec, cfg=config(latent_aug_prob=0.0), fz=frozen(False))
    t.train_step()
    reloaded = load_decoder(t.export())
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, t.ema.shadow[k]), k


def test_bf16_autocast_step_keeps_fp32_weights(photo_sets, tmp_path):
    t = trainer(photo_sets, tmp_path, cfg=config(precision="bf16", disc_start=0, steps=2))
    loss = t.train_step()
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in t.decoder.parameters())
    assert all(v.dtype == torch.float32 for v in t.ema.shadow.values())


# ------------------------------------------------------------------------------ bad input

def test_wrong_decoder_family_is_refused():
    flux = decoder_files.asuka_decoder_state_dict(0, ch=32)
    with pytest.raises(CheckpointError, match="16-channel.*4-channel SD1.5"):
        start_decoder(flux)
    with pytest.raises(CheckpointError, match="Start decoder.*Asymmetric VQGAN"):
        start_decoder({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)})


def test_missing_lpips_weights_are_a_clear_error(photo_sets, tmp_path):
    with pytest.raises(InputError, match="no file"):
        LPIPS.from_files(str(tmp_path / "nope.pth"), str(tmp_path / "alex.pth"))
    with pytest.raises(InputError, match="LPIPS"):
        trainer(photo_sets, tmp_path, cfg=config(lpips_weight=1.0))


def test_latent_augmentation_needs_the_inpainting_unet(photo_sets, tmp_path):
    with pytest.raises(InputError, match="inpainting"):
        trainer(photo_sets, tmp_path, fz=frozen(latent_aug=False))
    with pytest.raises(InputError, match="timesteps"):
        trainer(photo_sets, tmp_path, cfg=config(latent_aug_t=(500, 1200)))
    with pytest.raises(InputError, match="jitter"):
        config(jitter=(0.1, 0.1)).check()


@pytest.fixture(scope="module")
def lpips_net(lpips_files):
    alexnet, lin, _ = lpips_files
    return LPIPS.from_files(alexnet, lin)


def test_lpips_distance_is_the_metric_with_gradients(lpips_net):
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1).requires_grad_(True)
    b = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    d = lpips_net.distance(a, b)
    assert torch.allclose(d.detach(), lpips_net(a, b))
    d.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips_net.parameters())
