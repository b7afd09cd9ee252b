"""HD-Painter inside ComfyUI's own UNet and sampler code (in process, no server).

A tiny SD1.5-layout inpainting UNet (ComfyUI's ``UNetModel``, SD15 config, reduced width,
random weights, float64) runs through ``comfy.sample.sample_custom`` with ComfyUI's CFG
batching, concat mask and model patcher. Probe samplers record what the UNet sees.

Oracles: PAIntA's attention re-computed here from the block's own modules with the full
n x n ``painta_rescale`` matrix (the patch computes hole rows only, through hooks); RASG's
gradient against central finite differences of the score; ComfyUI's Euler sampler for
RASG with eta 0 (deterministic DDIM).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS = [1, 2, 3, 6]
LATENT = 16                      # latent 16x16 -> maps 16, 8, 4, 2


@pytest.fixture(scope="module")
def comfy():
    d = os.environ.get("ASUKA_COMFY_DIR")
    if not d:
        pytest.skip("needs the ComfyUI tree: run with `scripts/host.sh test`")
    if d not in sys.path:
        sys.path.append(d)
    from comfy.cli_args import args

    args.cpu = True                      # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    return comfy


@pytest.fixture(scope="module")
def pack(comfy):
    """The pack imported as a package (its nodes use relative imports)."""
    name = "comfyui_asuka_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "__init__.py"),
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(name + ".nodes.hd_painter"), importlib.import_module(name + ".asuka_core.hd_painter")


@pytest.fixture(scope="module")
def glue(pack):
    """The ComfyUI plumbing of HD-Painter and the gradient helpers."""
    name = "comfyui_asuka_under_test"
    return importlib.import_module(name + ".nodes.hd_painter_glue"), importlib.import_module(name + ".nodes.gradients")


def tiny_unet_config() -> dict:
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 9, "model_channels": 32,
        "num_res_blocks": [1, 1, 1, 1], "transformer_depth": [1, 1, 1, 0], "channel_mult": [1, 2, 2, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
        "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


@pytest.fixture(scope="module")
def patcher(comfy):
    from tests.fixtures.sd15_checkpoint import _reinit

    config = comfy.supported_models.SD15(tiny_unet_config())
    config.set_inference_dtype(torch.float64, None)
    with torch.inference_mode():                       # as ComfyUI's executor loads models
        model = config.get_model({})
        _reinit(model.diffusion_model, seed=7)
        model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conds(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    neg = torch.randn(1, 77, 768, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, LATENT * 8, LATENT * 8)
    mask[:, 24:88, 40:104] = 1.0
    image_latent = torch.randn(1, 4, LATENT, LATENT, generator=g, dtype=torch.float64)
    extra = {"concat_latent_image": image_latent, "concat_mask": mask}
    return [[pos, dict(extra)]], [[neg, dict(extra)]], mask


def run_probe(comfy, model, probe, *, batch=1, seed=1, sigmas=None, split=False, sampler=None):
    """sample_custom with a probe sampler function (or a given SAMPLER), under inference mode."""
    positive, negative, _ = conds()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    latent = torch.zeros(batch, 4, LATENT, LATENT)
    ms = model.get_model_object("model_sampling")
    sigmas = sigmas if sigmas is not None else torch.stack([ms.sigmas[600], ms.sigmas[580]])
    base = model.model
    original = base.memory_required
    if split:                                    # ComfyUI then runs negative and positive separately
        base.memory_required = lambda *a, **k: 1e30
    try:
        with torch.inference_mode():
            return comfy.sample.sample_custom(model, noise, 5.0, sampler or comfy.samplers.KSAMPLER(probe), sigmas,
                                              positive, negative, latent, seed=seed)
    finally:
        base.memory_required = original


# ---------------------------------------------------------------------------- PAIntA

def _blocks(unet):
    from itertools import chain

    out = []
    for kind, container in chain([("input", b) for b in unet.input_blocks], [("middle", unet.middle_block)],
                                 [("output", b) for b in unet.output_blocks]):
        for m in container:
            if hasattr(m, "transformer_blocks"):
                out.append(m.transformer_blocks[0])
    return out


def record_blocks(unet, log: list):
    """Pre-hooks: the block's input x (norm1's input), x + y (norm2's input) and the UNet's own input."""
    handles = []
    for blk in _blocks(unet):
        for tag in ("n1", "n2"):
            norm = blk.norm1 if tag == "n1" else blk.norm2
            handles.append(norm.register_forward_pre_hook(
                lambda m, a, blk=blk, tag=tag: log.append((tag, blk, a[0].detach().clone()))))

    def unet_hook(module, args, kwargs):
        opts = kwargs["transformer_options"]
        log.append(("unet", args[0].detach().clone(), kwargs["context"].detach().clone(),
                    list(opts["cond_or_uncond"]), args[1].detach().clone()))
    handles.append(unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
    return handles


def expected_self_attention(blk, x_in, context, cond_or_uncond, hole, core, patched: bool):
    """y = to_out(softmax(A * C) V) with the full n x n matrix C; c from the conditional rows."""
    heads = blk.attn1.heads
    n = blk.norm1(x_in)

    def split(t):
        b, m, inner = t.shape
        return t.reshape(b, m, heads, inner // heads).transpose(1, 2)

    q, k, v = split(blk.attn1.to_q(n)), split(blk.attn1.to_k(n)), split(blk.attn1.to_v(n))
    A = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    y_std = blk.attn1.to_out((A.softmax(-1) @ v).transpose(1, 2).reshape(n.shape))
    if not patched:
        return y_std
    side = int(round(n.shape[1] ** 0.5))
    per = x_in.shape[0] // len(cond_or_uncond)
    cond_rows = [i * per + s for i, f in enumerate(cond_or_uncond) if f == 0 for s in range(per)]
    hidden = blk.norm2(x_in + y_std)
    qc, kc = split(blk.attn2.to_q(hidden)), split(blk.attn2.to_k(context))
    probs = (qc @ kc.transpose(-1, -2) / qc.shape[-1] ** 0.5).softmax(-1).mean(1)
    out = []
    for b in range(x_in.shape[0]):
        c = core.painta_factors(probs[cond_rows[b % per]], TOKENS, side, side)
        Ab = core.painta_rescale(A[b], c, hole[b])
        out.append(blk.attn1.to_out((Ab.softmax(-1) @ v[b]).transpose(0, 1).reshape(1, n.shape[1], -1))[0])
    return torch.stack(out)


def _plain_attn1_replace(q, k, v, extra_options):
    """Another node's attn1 replace (explicit attention, not through ComfyUI's kernels)."""
    heads = extra_options["n_heads"]

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    a = (split(q) @ split(k).transpose(-1, -2) / extra_options["dim_head"] ** 0.5).softmax(-1)
    return (a @ split(v)).transpose(1, 2).reshape(q.shape)


@pytest.mark.parametrize("timestep,active,other_replace", [(900, True, False), (300, False, False),
                                                           (900, True, True)])
def test_painta_changes_only_hole_rows_at_the_patched_levels_while_active(comfy, pack, patcher, timestep, active,
                                                                          other_replace):
    """other_replace: another node replaced attn1 of every block, so PAIntA cannot reuse the
    kernels' q, k, v and projects them itself."""
    nodes, core = pack
    if other_replace:
        patcher = patcher.clone()
        unet = patcher.model.diffusion_model
        def has_attention(b):
            return any(hasattr(m, "transformer_blocks") for m in b)
        keys = [("input", i) for i, b in enumerate(unet.input_blocks) if has_attention(b)]
        keys += [("output", i) for i, b in enumerate(unet.output_blocks) if has_attention(b)]
        keys += [("middle", 0)]
        assert len(keys) == 10
        for kind, number in keys:
            patcher.set_model_attn1_replace(_plain_attn1_replace, kind, number)
    patched = nodes.PAIntA.execute(patcher, nodes.PromptTokens(tuple(TOKENS), "t"), 500).args[0]
    unet = patcher.model.diffusion_model
    ms = patcher.get_model_object("model_sampling")
    sigmas = torch.stack([ms.sigmas[timestep], torch.tensor(0.0)])
    outputs = {}
    for name, model in (("plain", patcher), ("painta", patched)):
        log = []
        handles = record_blocks(unet, log)

        def probe(m, x, sigmas, extra_args, callback, disable, name=name):
            outputs[name] = m(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args)
            return outputs[name]
        try:
            run_probe(comfy, model, probe, sigmas=sigmas)
        finally:
            for h in handles:
                h.remove()
        outputs[name + "_log"] = log
    if not active:
        torch.testing.assert_close(outputs["painta"], outputs["plain"], rtol=0, atol=1e-12)
        return
    assert (outputs["painta"] - outputs["plain"]).abs().max() > 1e-6, "PAIntA had no effect while active"
    log = outputs["painta_log"]
    _, x_unet, context, cond_or_uncond, _ = next(e for e in log if e[0] == "unet")
    assert sorted(cond_or_uncond) == [0, 1], "expected one joint CFG batch"
    # per block: the input x and the last norm2 input (PAIntA's own norm2 call on the
    # conditional rows comes first)
    seen = {}
    for entry in log:
        if entry[0] in ("n1", "n2"):
            seen.setdefault(id(entry[1]), {"blk": entry[1]})[entry[0]] = entry[2]
    checked = {0: 0, 1: 0, 2: 0, 3: 0}
    changed_hole = 0
    for item in seen.values():
        blk, x_in, x_mid = item["blk"], item["n1"], item["n2"]
        assert x_mid.shape == x_in.shape
        side = int(round(x_in.shape[1] ** 0.5))
        level = int(round(torch.log2(torch.tensor(LATENT / side)).item()))
        hole = core.mask_at_level(x_unet[:, 4], side, side)
        y_obs = x_mid - x_in
        with torch.no_grad():
            y_exp = expected_self_attention(blk, x_in, context, cond_or_uncond, hole, core, level in (1, 2))
            y_std = expected_self_attention(blk, x_in, context, cond_or_uncond, hole, core, False)
        torch.testing.assert_close(y_obs, y_exp, rtol=1e-7, atol=1e-9)
        known = ~hole
        torch.testing.assert_close(y_obs[known], y_std[known], rtol=1e-7, atol=1e-9)
        if level in (1, 2):
            changed_hole += int((y_obs[hole] - y_std[hole]).abs().max() > 1e-6)
        checked[level] += 1
    assert checked == {0: 3, 1: 3, 2: 3, 3: 1}, checked      # input+output blocks per level, middle
    assert changed_hole == 6, "PAIntA must change the hole rows of every patched block"


# ---------------------------------------------------------------------------- RASG

def _probe_gradient(glue, store, h=1e-5, directions=3):
    hd_glue, gradients = glue

    def probe(model, x, sigmas, extra_args, callback, disable):
        unet = model.inner_model.inner_model.diffusion_model
        with gradients.differentiable_unet(unet):
            return _probe_inside(hd_glue, model, x, sigmas, extra_args, unet, store, h, directions)
    return probe


def _probe_inside(core, model, x, sigmas, extra_args, unet, store, h, directions):
    options, capture = core.rasg_options(extra_args["model_options"])
    sigma = sigmas[0] * x.new_ones([x.shape[0]])
    x = x.double()                     # the sampler state is fp32; fp64 for finite differences
    denoised, grad, score = core.rasg_gradient(model, x, sigma, extra_args, options, capture, TOKENS)
    store.update(grad=grad, score=score, x=x, denoised=denoised)
    store["weight_grads"] = [p for p in unet.parameters() if p.requires_grad or p.grad is not None]

    def score_at(xx):
        args = dict(extra_args, model_options=options)
        capture.start()
        model(xx, sigma, **args)
        value = capture.score(None, TOKENS)
        capture.start()
        return float(value)

    g = torch.Generator().manual_seed(3)
    fd = []
    for _ in range(directions):
        v = torch.randn(x.shape, generator=g, dtype=x.dtype)
        v = v / v.norm()
        fd.append(((score_at(x + h * v) - score_at(x - h * v)) / (2 * h), float((grad * v).sum())))
    store["fd"] = fd
    return x


def test_rasg_gradient_matches_finite_differences_and_skips_weight_grads(comfy, glue, patcher):
    store = {}
    run_probe(comfy, patcher, _probe_gradient(glue, store))
    assert float(store["grad"].abs().max()) > 0
    for fd, analytic in store["fd"]:
        assert fd == pytest.approx(analytic, rel=1e-5, abs=1e-10), store["fd"]
    assert store["weight_grads"] == [], "RASG must not compute weight gradients"


def test_rasg_gradient_same_for_split_and_joint_batches_and_per_sample(comfy, glue, patcher):
    joint, split, batch = {}, {}, {}
    run_probe(comfy, patcher, _probe_gradient(glue, joint, directions=0), seed=1)
    run_probe(comfy, patcher, _probe_gradient(glue, split, directions=0), seed=1, split=True)
    torch.testing.assert_close(split["grad"], joint["grad"], rtol=1e-9, atol=1e-12)
    # batch of 2: sample 0 gets the same noise as the single run above (same seed, first rows)
    run_probe(comfy, patcher, _probe_gradient(glue, batch, directions=0), seed=1, batch=2)
    single_x = joint["x"][0]
    assert torch.equal(batch["x"][0], single_x)
    torch.testing.assert_close(batch["grad"][:1], joint["grad"], rtol=1e-9, atol=1e-12)
    assert float((batch["grad"][1] - batch["grad"][0]).abs().max()) > 0


def test_rasg_sampler_with_eta_zero_is_euler_and_guides_otherwise(comfy, pack, patcher):
    nodes, _ = pack
    tokens = nodes.PromptTokens(tuple(TOKENS), "t")
    ms = patcher.get_model_object("model_sampling")
    sigmas = torch.stack([ms.sigmas[999], ms.sigmas[600], ms.sigmas[300], torch.tensor(0.0)]).float()
    euler = run_probe(comfy, patcher, None, sigmas=sigmas, sampler=comfy.samplers.ksampler("euler"))
    results = {}
    for eta, mode in ((0.0, "official_code"), (0.1, "official_code"), (0.1, "paper")):
        sampler = nodes.RASGSampler.execute(tokens, eta, mode).args[0]
        results[(eta, mode)] = run_probe(comfy, patcher, None, sigmas=sigmas, sampler=sampler)
        assert torch.isfinite(results[(eta, mode)]).all()
    torch.testing.assert_close(results[(0.0, "official_code")], euler, rtol=1e-5, atol=1e-5)
    d_code = (results[(0.1, "official_code")] - euler).abs().max()
    d_paper = (results[(0.1, "paper")] - euler).abs().max()
    assert d_code > 1e-5, "RASG (official_code) did not change the result"
    assert d_paper > 5 * d_code, "the paper's sigma at the same eta must guide much more strongly"


# ---------------------------------------------------------------------------- refusals

def _tiny_model(comfy, family: str):
    cfg = tiny_unet_config()
    if family == "SD20":
        cfg.update(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=16)
        config = comfy.supported_models.SD20(cfg)
    else:
        cfg.update(context_dim=2048, adm_in_channels=2816, use_linear_in_transformer=True, in_channels=4,
                   num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 2], transformer_depth=[0, 1, 1],
                   transformer_depth_output=[0, 0, 1, 1, 1, 1], num_heads=-1, num_head_channels=16)
        config = comfy.supported_models.SDXL(cfg)
    model = config.get_model({})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("family", ["SD20", "SDXL"])
def test_sd2_and_sdxl_models_are_refused_by_painta_and_rasg(comfy, pack, family):
    nodes, _ = pack
    model = _tiny_model(comfy, family)
    tokens = nodes.PromptTokens((1, 2), "t")
    with pytest.raises(ValueError, match=r"SD1\.5 UNets only.*SD2, SDXL") as info:
        nodes.PAIntA.execute(model, tokens, 500)
    assert type(info.value).__name__ == "InputError"

    class Wrapped:                         # what a sampler function receives: model.inner_model.inner_model
        class inner_model:
            inner_model = model.model
    with pytest.raises(ValueError, match=r"SD1\.5 UNets only"):
        nodes._rasg_sampler_function(Wrapped, torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.0]),
                                     tokens=[1], eta=0.1, sigma_mode="official_code", mask=None)


def test_sdxl_clip_is_refused_by_the_prompt_node(comfy, pack):
    import types

    import comfy.sdxl_clip

    nodes, _ = pack
    clip = types.SimpleNamespace(tokenizer=comfy.sdxl_clip.SDXLTokenizer())
    with pytest.raises(ValueError, match=r"SD1\.5 only.*SD2, SDXL"):
        nodes.PromptTokens_.execute(clip, "a cat", "")


def test_painta_without_mask_on_a_plain_unet_is_refused(comfy, pack):
    nodes, _ = pack
    cfg = tiny_unet_config()
    cfg["in_channels"] = 4
    model = comfy.supported_models.SD15(cfg).get_model({})
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    with pytest.raises(ValueError, match=r"no mask.*MASK"):
        nodes.PAIntA.execute(patcher, nodes.PromptTokens((1,), "t"), 500)


def test_prompt_tokens_with_comfy_sd15_tokenizer_long_prompt_weights_and_suffix(comfy, pack):
    """Positions from the real SD1.5 tokenizer: the tokens there are the prompt's own tokens
    (in order, across 77-token chunks) and the end token right after the suffix."""
    import types

    import comfy.sd1_clip

    nodes, _ = pack
    tokenizer = comfy.sd1_clip.SD1Tokenizer()
    encoded = []
    clip = types.SimpleNamespace(tokenizer=tokenizer, tokenize=tokenizer.tokenize_with_weights,
                                 encode_from_tokens_scheduled=lambda t: encoded.append(t) or "cond")
    inner = tokenizer.clip_l
    prompt = "(a red vintage car:1.3) parked " + " ".join(f"word{i}" for i in range(60))
    suffix = "Full HD, 4K, high quality"
    out = nodes.PromptTokens_.execute(clip, prompt, suffix).args
    assert out[0] == "cond"
    positions = list(out[1].positions)
    alone = [t for chunk in tokenizer.tokenize_with_weights(prompt)["l"] for t, *_ in chunk
             if t not in (inner.start_token, inner.end_token)]
    flat = [t for chunk in encoded[0]["l"] for t, *_ in chunk]
    assert len(encoded[0]["l"]) >= 2, "the test prompt must span two chunks"
    assert len(positions) == len(alone) + 1
    assert [flat[p] for p in positions[:-1]] == alone
    assert flat[positions[-1]] == inner.end_token
    suffix_tokens = [t for t, *_ in tokenizer.tokenize_with_weights(suffix)["l"][0]
                     if t not in (inner.start_token, inner.end_token)]
    assert flat[positions[-1] - len(suffix_tokens):positions[-1]] == suffix_tokens
    assert all(flat[p] not in (inner.start_token, inner.end_token) for p in positions[:-1])
