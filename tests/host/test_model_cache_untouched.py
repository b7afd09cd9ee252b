"""RASG and aligner training leave ComfyUI's cached model as they found it (in process).

ComfyUI keeps a loaded MODEL for every later prompt; other nodes' LoRA and weight patches
keep their own backups of its weights. After a RASG sampling or a training run the model
must hold the same Parameter and buffer objects with the same flags and values, no
instance ``forward`` override, unchanged patches and ``model_options``, and a plain
sampler must give bit-identical results to the same run before. Checked here on
ComfyUI's own UNet, sampler, LoraLoader code and model patcher (tiny SD1.5-layout
inpainting UNet, random weights, float64, loaded under inference mode as ComfyUI loads).
"""

from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import pytest
import torch

from tests.fixtures.tensor_memory import TensorMemory
from tests.host.test_hd_painter_unet import TOKENS, comfy, glue, pack, patcher, run_probe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.host


def model_state(model_patcher) -> dict:
    """What must not change: tensor objects, flags, values; instance forwards; patches."""
    base = model_patcher.model
    tensors = [(name, t, t.requires_grad, t.is_inference(), t.detach().clone())
               for name, t in list(base.named_parameters()) + list(base.named_buffers())]
    return {
        "tensors": tensors,
        "forwards": sorted(name for name, m in base.named_modules() if "forward" in m.__dict__),
        "patches": {k: [id(p) for p in v] for k, v in model_patcher.patches.items()},
        "backup": sorted(model_patcher.backup),
        "model_options": repr(model_patcher.model_options),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert len(before["tensors"]) == len(after["tensors"])
    for (name, t, rg, inf, value), (name2, t2, rg2, inf2, value2) in zip(before["tensors"], after["tensors"]):
        assert name == name2
        assert t is t2, f"{name} was replaced"
        assert (rg, inf) == (rg2, inf2), f"{name}: requires_grad / inference flags changed"
        assert torch.equal(value, value2), f"{name}: values changed"
    for key in ("forwards", "patches", "backup", "model_options"):
        assert before[key] == after[key], key


def sigmas_of(model_patcher, steps=(999, 600, 300)):
    ms = model_patcher.get_model_object("model_sampling")
    return torch.stack([ms.sigmas[t] for t in steps] + [torch.tensor(0.0, dtype=ms.sigmas.dtype)]).float()


def euler(comfy, model_patcher):
    return run_probe(comfy, model_patcher, None, sigmas=sigmas_of(model_patcher),
                     sampler=comfy.samplers.ksampler("euler"))


def rasg(comfy, pack, model_patcher, eta=0.1):
    nodes, _ = pack
    sampler = nodes.RASGSampler.execute(nodes.PromptTokens(tuple(TOKENS), "t"), eta, "official_code").args[0]
    return run_probe(comfy, model_patcher, None, sigmas=sigmas_of(model_patcher), sampler=sampler)


def weight_bytes(model_patcher) -> int:
    return sum(p.numel() * p.element_size() for p in model_patcher.model.diffusion_model.parameters())


def test_rasg_leaves_the_cached_model_and_memory_as_they_were(comfy, pack, patcher):
    plain_before = euler(comfy, patcher)
    before = model_state(patcher)
    with TensorMemory() as memory:
        out = rasg(comfy, pack, patcher)
    assert torch.isfinite(out).all()
    print(f"\n[host] RASG, 3 steps: UNet weights {weight_bytes(patcher) / 2**20:.1f} MiB; tensor memory made during "
          f"the call: peak {memory.peak / 2**20:.1f} MiB, still alive after it {memory.current / 2**20:.2f} MiB")
    # the differentiable copies existed during the call, and were freed with it
    assert memory.peak >= weight_bytes(patcher)
    assert memory.current < 0.02 * weight_bytes(patcher), (memory.current, weight_bytes(patcher))
    assert_same_state(before, model_state(patcher))
    assert torch.equal(euler(comfy, patcher), plain_before), "a plain sampler gives other results after RASG"


def test_rasg_restores_the_model_when_interrupted(comfy, pack, patcher):
    before = model_state(patcher)

    class Stop(BaseException):        # ComfyUI 0.33's InterruptProcessingException is a BaseException
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:           # inside the first gradient pass
            raise Stop
    nodes, _ = pack
    hd_glue = importlib.import_module(nodes.__package__ + ".hd_painter_glue")
    real = hd_glue.rasg_sampler

    def with_interrupt(*args, **kwargs):
        kwargs["check_interrupt"] = interrupt
        return real(*args, **kwargs)
    with mock.patch.object(hd_glue, "rasg_sampler", with_interrupt), pytest.raises(Stop):
        rasg(comfy, pack, patcher)
    assert_same_state(before, model_state(patcher))


def _lora_for(comfy, model_patcher, rank=2, seed=11):
    """A LoRA (kohya key names) on every attention projection of the UNet."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    sd = dict(model_patcher.model.state_dict())
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for lora_key, weight_key in key_map.items():
        if not lora_key.startswith("lora_unet_") or not any(f"attn{i}.to_" in weight_key for i in (1, 2)):
            continue
        w = sd[weight_key]
        if w.ndim != 2 or "to_out" in weight_key:
            continue
        lora[f"{lora_key}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
        lora[f"{lora_key}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
        lora[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    assert len(lora) >= 3 * 20
    return lora


@contextlib.contextmanager
def partial_loading(comfy, budget_fraction=0.3):
    """Make ComfyUI load models partly (as with --lowvram on a small GPU): its memory
    manager sees a non-CPU device with little free memory."""
    import comfy.model_management as mm

    def free(dev=None, torch_free_too=False):        # a fixed budget, less what is loaded
        value = max(0, int(free.budget - sum(m.model.loaded_size() for m in mm.current_loaded_models)))
        return (value, value) if torch_free_too else value
    free.budget = 0
    with mock.patch.object(mm, "vram_state", mm.VRAMState.LOW_VRAM), \
            mock.patch.object(mm, "is_device_cpu", lambda device: False), \
            mock.patch.object(mm, "get_free_memory", free), \
            mock.patch.object(mm, "minimum_inference_memory", lambda: 0), \
            mock.patch.object(mm, "extra_reserved_memory", lambda: 0):
        yield free


def test_lora_with_rasg_runs_and_leaves_both_models_as_they_were(comfy, pack, patcher):
    import comfy.sd

    lora_model, _ = comfy.sd.load_lora_for_models(patcher, None, _lora_for(comfy, patcher), 1.0, 0.0)
    base_plain = euler(comfy, patcher)
    base_rasg = rasg(comfy, pack, patcher)
    lora_plain = euler(comfy, lora_model)
    before = model_state(lora_model)
    lora_rasg = rasg(comfy, pack, lora_model)
    assert torch.isfinite(lora_rasg).all()
    assert (lora_rasg - base_rasg).abs().max() > 1e-4, "the LoRA had no effect on RASG"
    # RASG on the LoRA model differs from plain sampling of it by the guidance only (eta 0 = plain DDIM)
    torch.testing.assert_close(rasg(comfy, pack, lora_model, eta=0.0), lora_plain, rtol=1e-5, atol=1e-5)
    assert_same_state(before, model_state(lora_model))
    assert torch.equal(euler(comfy, lora_model), lora_plain)
    assert torch.equal(euler(comfy, patcher), base_plain), "the base model is not as it was after LoRA + RASG"


def test_rasg_with_partial_loading_and_lora(comfy, pack, patcher):
    import comfy.model_management as mm
    import comfy.sd

    lora_model, _ = comfy.sd.load_lora_for_models(patcher, None, _lora_for(comfy, patcher, seed=12), 1.0, 0.0)
    full, plain_full = rasg(comfy, pack, lora_model), euler(comfy, lora_model)
    mm.unload_all_models()
    with partial_loading(comfy) as free:
        free.budget = lora_model.model_size() * 0.4
        partial = rasg(comfy, pack, lora_model)
        loaded = [m for m in mm.current_loaded_models if m.model is lora_model]
        assert loaded and loaded[0].model.loaded_size() < lora_model.model_size(), "the model was loaded fully"
        # ComfyUI re-plans a partial load on each prompt; hold its plan so that what RASG
        # does to the partly loaded model is all that could change it
        with mock.patch.object(mm, "load_models_gpu", lambda *args, **kwargs: None):
            before = model_state(lora_model)
            again = rasg(comfy, pack, lora_model)
            assert_same_state(before, model_state(lora_model))
        plain_partial = euler(comfy, lora_model)
    mm.unload_all_models()
    # A partly loaded model applies the LoRA layer by layer as it streams the weights, a fully
    # loaded one has it merged: ComfyUI 0.3.75 gives the same numbers, 0.33.0 rounds them
    # differently (seen: 3e-4 after RASG). So RASG's partial-vs-full gap may be as large as
    # the plain sampler's own, a few times over (RASG's gradient step follows it), never more.
    host_gap = (plain_partial - plain_full).abs().max().item()
    tol = max(1e-6, 10 * host_gap)
    torch.testing.assert_close(partial, full, rtol=1e-6, atol=tol)
    torch.testing.assert_close(again, partial, rtol=1e-6, atol=1e-6)


def _forward_only_backend(comfy_attention, calls):
    """A kernel without a backward pass (as sage, flash or an int8 kernel), wrapped like
    ComfyUI's own backends so that attention overrides see it."""
    def attention_sage(q, k, v, *args, **kwargs):
        calls.append(1)
        with torch.no_grad():
            return comfy_attention.attention_pytorch(q, k, v, *args, **kwargs)
    return comfy_attention.wrap_attn(attention_sage)


def test_backends_without_backward_are_replaced_and_other_overrides_still_run(comfy, pack, patcher):
    from comfy.ldm.modules import attention as comfy_attention

    reference = rasg(comfy, pack, patcher)
    forward_only = []
    backend = _forward_only_backend(comfy_attention, forward_only)
    other = []

    def other_override(func, *args, **kwargs):                # another pack's patch, chained
        other.append(getattr(func, "__name__", ""))
        return func(*args, **kwargs)
    model = patcher.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    with mock.patch.object(comfy_attention, "optimized_attention", backend):
        plain = euler(comfy, model)                           # the forward-only kernel serves plain passes
        assert forward_only, "the test backend was not used"
        out = rasg(comfy, pack, model)
    assert other, "the other pack's attention override was bypassed"
    assert torch.isfinite(plain).all()
    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_an_override_that_forces_a_kernel_without_backward_is_a_clear_error(comfy, pack, patcher):
    from comfy.ldm.modules import attention as comfy_attention

    backend = _forward_only_backend(comfy_attention, [])

    def forcing(func, *args, **kwargs):                       # ignores the kernel it is given
        return backend(*args, **kwargs)
    model = patcher.clone()
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = forcing
    before = model_state(model)
    with pytest.raises(ValueError, match="without autograd.*Remove that patch") as info:
        rasg(comfy, pack, model)
    assert type(info.value).__name__ == "GradientError"
    assert_same_state(before, model_state(model))


def test_dynamic_vram_models_are_refused_with_the_flag_to_use(comfy, pack, patcher):
    nodes, _ = pack
    gradients = importlib.import_module(nodes.__package__ + ".gradients")
    dynamic = patcher.clone()
    dynamic.is_dynamic = lambda: True                         # what ModelPatcherDynamic reports
    with pytest.raises(ValueError, match="DynamicVRAM.*--disable-dynamic-vram") as info:
        rasg(comfy, pack, dynamic)
    assert type(info.value).__name__ == "ModelStateError"
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        gradients.refuse_streamed_weights(dynamic, "Aligner training")
    gradients.refuse_streamed_weights(patcher, "Aligner training")        # a normal model passes


# ---------------------------------------------------------------------------- training

def _tiny_euler(comfy, model_patcher, context_dim: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0
    extra = {"concat_latent_image": torch.randn(1, 4, 8, 8, generator=g), "concat_mask": mask}
    positive = [[torch.randn(1, 77, context_dim, generator=g), dict(extra)]]
    negative = [[torch.randn(1, 77, context_dim, generator=g), dict(extra)]]
    noise = torch.randn(1, 4, 8, 8, generator=g)
    with torch.inference_mode():
        return comfy.sample.sample(model_patcher, noise, 3, 5.0, "euler", "normal", positive, negative,
                                   torch.zeros(1, 4, 8, 8), denoise=1.0, disable_pbar=True, seed=seed)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_leaves_the_cached_model_as_it_was(comfy, tmp_path, checkpointing):
    """The glue's training session, as the training node runs it (make_trainable in
    frozen_models ... release_trainable), on a UNet loaded under inference mode."""
    from tests.fixtures import tiny_sd

    glue = tiny_sd.pack_module("nodes.training_glue")
    training = tiny_sd.pack_module("asuka_core.training")
    photos = tmp_path / "photos"
    photos.mkdir()
    tiny_sd.write_synthetic_photos(str(photos))
    with torch.inference_mode():                                   # as ComfyUI's executor loads models
        mp = tiny_sd.tiny_inpaint_patcher(seed=4, context_dim=64)
    vae = tiny_sd.tiny_vae()
    plain_before = _tiny_euler(comfy, mp, 64)
    before = model_state(mp)
    try:
        glue.make_trainable(mp, gradient_checkpointing=checkpointing)
        unet = mp.model.diffusion_model
        assert not any(p.is_inference() for p in unet.parameters())
        assert bool([m for m in unet.modules() if "forward" in m.__dict__]) == checkpointing
        models = training.FrozenModels(prior=tiny_sd.pooled_prior, encode=tiny_sd.direct_encoder(vae),
                                       denoiser=glue.make_denoiser(mp), sigmas=mp.model.model_sampling.sigmas.float(),
                                       latent_in=mp.model.process_latent_in)
        cfg = training.TrainConfig(steps=2, batch_size=2, lr=3e-3, warmup=0, resolution=64, precision="fp32",
                                   val_every=0, save_every=0, sample_every=0, log_every=0, p_steps=10)
        train, val = training.image_sets(str(photos), 64, holdout=0.25)
        trainer = training.AlignerTrainer(cfg, models, train, val, out_dir=str(tmp_path / "run"),
                                          aligner=training.new_aligner(3, width=64, depth=1), log=lambda s: None)
        start = [p.detach().clone() for p in trainer.aligner.parameters()]
        with glue.training_mode():
            for _ in range(2):
                loss = trainer.train_step()
        assert loss == loss and any(not torch.equal(a, p) for a, p in zip(start, trainer.aligner.parameters()))
    finally:
        glue.release_trainable(mp)
    assert_same_state(before, model_state(mp))
    assert torch.equal(_tiny_euler(comfy, mp, 64), plain_before), "a plain sampler gives other results after training"


def test_weights_in_a_reused_cast_buffer_are_saved_as_copies(comfy, pack):
    """What ComfyUI 0.33 does with partly loaded weights on a GPU: each layer's weight is
    cast into the same per-stream byte buffer (``STREAM_CAST_BUFFERS``) and viewed from
    there, then overwritten by the next layer's. Without the hook the backward pass fails;
    with it, the gradient is right and the copies are freed."""
    import comfy.model_management as mm

    nodes, _ = pack
    gradients = importlib.import_module(nodes.__package__ + ".gradients")
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 4, generator=g) for _ in range(3)]
    buffer = torch.empty(64, dtype=torch.int8)

    def streamed(x):
        for w in weights:
            view = buffer[:64].view(torch.float32).view(4, 4)
            view.copy_(w)
            x = torch.tanh(x @ view.T)
        return x.sum()

    def reference(x):
        for w in weights:
            x = torch.tanh(x @ w.T)
        return x.sum()

    x0 = torch.randn(2, 4, generator=g)
    xr = x0.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference(xr), xr)
    with mock.patch.object(mm, "STREAM_CAST_BUFFERS", {None: buffer}, create=True):
        xs = x0.clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(streamed(xs), xs)
        xg = x0.clone().requires_grad_(True)
        with TensorMemory() as memory:
            with gradients.saved_cast_buffers_copied():
                loss = streamed(xg)
            (got,) = torch.autograd.grad(loss, xg)
            del loss
    torch.testing.assert_close(got, want)
    assert memory.peak >= 3 * 64 and memory.current <= 2 * got.numel() * 4
