"""asuka_core.checkpoint and asuka_core.convert: no code from a model file ever runs.

Every malicious file here carries a live payload (it creates a marker file when unpickled
the ordinary way; ``test_payloads_are_live`` proves that), hidden inside an otherwise
valid checkpoint named like an official one. The loader must refuse each with a clear
message and the marker must never appear.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from asuka_core import convert as convert_mod
from asuka_core.checkpoint import (
    KIND_ALIGNER,
    KIND_ASUKA_DECODER,
    KIND_AVQ_DECODER,
    KIND_DIFFUSERS_ASYM_DECODER,
    KIND_FLUX,
    KIND_LORA,
    KIND_MAE,
    KIND_SD,
    KIND_SD_INPAINT,
    KIND_SDXL,
    KIND_TEXT_ENCODER,
    KIND_UNET,
    KIND_UNKNOWN,
    KIND_VAE,
    Checkpoint,
    UnsafeCheckpointError,
    as_checkpoint,
    expect_kind,
    identify,
    read_checkpoint,
    save_safetensors,
    unwrap_state_dict,
)
from asuka_core.errors import CheckpointError
from tests.fixtures.aligner_files import official_aligner_state_dict, write_official_aligner_pt
from tests.fixtures.decoder_files import avq_ldm_state_dict, write_official_asuka_decoder_ckpt
from tests.fixtures.mae_files import write_official_mae_pth

SMALL_MAE = dict(embed_dim=64, depth=1, decoder_dim=32, decoder_depth=1)
SMALL_DECODER = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.attn.qkv.weight": torch.randn(12, 4, generator=g),
            "blocks.0.attn.qkv.bias": torch.randn(12, generator=g),
            "norm.weight": torch.ones(4)}


# --------------------------------------------------------------------------------------
# Live payloads


class _System:
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"touch '{self.marker}'",))


class _Exec:
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _Eval:
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (subprocess.Popen, (["touch", self.marker],))


def _os_system_protocol0(marker) -> bytes:
    """Hand-written protocol-0 pickle naming ``os system`` literally (not ``posix``)."""
    return b"cos\nsystem\n(V" + f"touch '{marker}'".encode() + b"\ntR."


def _getattr_import_protocol4(marker) -> bytes:
    """STACK_GLOBAL form: getattr(__import__('os'), 'system')(cmd), protocol 4 opcodes."""
    cmd = f"touch '{marker}'".encode()
    return (
        b"\x80\x04"
        b"\x8c\x08builtins\x94\x8c\x07getattr\x94\x93\x94"      # builtins.getattr
        b"\x8c\x08builtins\x94\x8c\n__import__\x94\x93\x94"     # builtins.__import__
        b"\x8c\x02os\x94\x85\x94R\x94"                          # __import__('os')
        b"\x8c\x06system\x94\x86\x94R\x94"                      # getattr(os, 'system')
        + b"\x8c" + bytes([len(cmd)]) + cmd + b"\x94\x85\x94R\x94."  # system(cmd)
    )


PAYLOADS = {
    "os.system": (_System, f"{os.system.__module__}.system"),  # posix.system on Linux
    "builtins.exec": (_Exec, "builtins.exec"),
    "builtins.eval": (_Eval, "builtins.eval"),
    "subprocess.Popen": (_Popen, "subprocess.Popen"),
}
OFFICIAL_NAMES = ("mae_300.pth", "asuka_decoder.ckpt", "asuka_alignment_clip.pt")


def _wrapped(name: str, payload) -> dict:
    """An otherwise valid checkpoint of the kind the file name suggests, payload inside."""
    if name.endswith(".ckpt"):
        return {"state_dict": _weights(), "epoch": 3, "callbacks": {"cb": payload}}
    if name.startswith("mae"):
        return {"model": _weights(), "epoch": 300, "args": payload}
    sd = _weights()
    sd["payload"] = payload
    return sd


def _write(path, obj, fmt: str) -> None:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a raw pickle, as pickle.dump writes it
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def test_payloads_are_live(tmp_path):
    """Control: the payloads really do run under ordinary unpickling."""
    for i, (cls, _) in enumerate(PAYLOADS.values()):
        marker = tmp_path / f"ran{i}"
        result = pickle.loads(pickle.dumps(cls(marker)))
        if isinstance(result, subprocess.Popen):
            result.wait()
        assert marker.exists(), cls.__name__
    for i, raw in enumerate((_os_system_protocol0, _getattr_import_protocol4)):
        marker = tmp_path / f"raw{i}"
        pickle.loads(raw(marker))
        assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("name", OFFICIAL_NAMES)
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_malicious_checkpoints_are_refused_and_never_run(tmp_path, payload, name, fmt):
    cls, shown = PAYLOADS[payload]
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write(path, _wrapped(name, cls(marker)), fmt)
    with pytest.raises(UnsafeCheckpointError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert f"Refusing to load '{name}'" in msg
    assert shown in msg
    assert "Nothing from the file was run" in msg
    assert "malicious" in msg
    assert not marker.exists()


@pytest.mark.parametrize("maker,shown", [(_os_system_protocol0, "os.system"),
                                         (_getattr_import_protocol4, "builtins.getattr")])
def test_hand_written_pickles_are_refused(tmp_path, maker, shown):
    marker = tmp_path / "pwned"
    path = tmp_path / "asuka_alignment_t5.pt"
    path.write_bytes(maker(marker))
    with pytest.raises(CheckpointError, match="Refusing to load") as e:
        read_checkpoint(path)
    assert shown in str(e.value)
    assert not marker.exists()


def test_payload_deep_inside_optimizer_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "asuka_decoder.ckpt"
    torch.save({"state_dict": _weights(),
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 1e-4, "hook": [(1, _System(marker))]}]}]},
               path)
    with pytest.raises(CheckpointError, match="system"):
        read_checkpoint(path)
    assert not marker.exists()


def test_unknown_module_is_refused_without_alarm(tmp_path):
    mod = types.ModuleType("somepackage")

    class Config:
        pass

    Config.__module__, Config.__qualname__ = "somepackage", "Config"
    mod.Config = Config
    sys.modules["somepackage"] = mod
    try:
        torch.save({"model": _weights(), "cfg": Config()}, tmp_path / "x.pth")
    finally:
        del sys.modules["somepackage"]
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "x.pth")
    assert "somepackage.Config" in str(e.value) and "no reason to contain" in str(e.value)


# --------------------------------------------------------------------------------------
# Released-style training checkpoints still load


_FAKE_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks",
                 "pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.utilities",
                 "pytorch_lightning.utilities.parsing")


def _lightning_checkpoint(sd):
    """Build a Lightning-style checkpoint with classes from a fake ``pytorch_lightning``
    (registered only while pickling)."""
    mods = {n: types.ModuleType(n) for n in _FAKE_MODULES}

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.save_top_k, self.dirpath = "val/rec_loss", 3, "logs/checkpoints"
            self.best_model_score = torch.tensor(0.0123)

    class AttributeDict(dict):  # a dict subclass: filled item by item when unpickled
        pass

    for cls, mod in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                     (AttributeDict, "pytorch_lightning.utilities.parsing")):
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    hparams = AttributeDict(ddconfig={"z_channels": 16, "ch_mult": [1, 2, 4, 4]}, embed_dim=16)
    ckpt = {
        "epoch": 3,
        "global_step": 412154,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.0123),
                                        "best_model_path": "logs/epoch=3.ckpt"},
                      "instance": ModelCheckpoint()},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0]}]}],
        "lr_schedulers": [],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "args": argparse.Namespace(base=["configs/condition_decoder.yaml"], gpus="0,1", seed=23),
        "counts": collections.defaultdict(int, {"a": 1}),
        "counter": collections.Counter(a=2),
    }
    return mods, ckpt


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_lightning_checkpoint_loads_without_its_modules(tmp_path, fmt):
    sd = _weights(1)
    mods, ckpt = _lightning_checkpoint(sd)
    path = tmp_path / "asuka_decoder.ckpt"
    sys.modules.update(mods)
    try:
        _write(path, ckpt, fmt)
    finally:
        for n in _FAKE_MODULES:
            del sys.modules[n]
    with pytest.raises(ImportError):
        __import__("pytorch_lightning.callbacks.model_checkpoint")
    loaded = read_checkpoint(path)
    assert set(loaded.tensors) == set(sd)
    for k in sd:
        assert torch.equal(loaded.tensors[k], sd[k])
    assert "pytorch_lightning" not in sys.modules


def test_mae_training_checkpoint_with_namespace_args_loads(tmp_path):
    path = tmp_path / "mae_300.pth"
    sd = write_official_mae_pth(path, **SMALL_MAE)
    loaded = read_checkpoint(path)
    assert set(loaded.tensors) == set(sd)
    assert identify(loaded.tensors) == KIND_MAE
    assert all(torch.equal(loaded.tensors[k], v) for k, v in sd.items())


def test_whole_pickled_module_is_explained(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="whole pickled Python object"):
        read_checkpoint(tmp_path / "model.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused(tmp_path):
    try:
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
        torch.jit.save(scripted, str(tmp_path / "scripted.pt"))
    except Exception as e:  # pragma: no cover - TorchScript unavailable
        pytest.skip(f"TorchScript unavailable: {e}")
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_checkpoint(tmp_path / "scripted.pt")


# --------------------------------------------------------------------------------------
# Damaged and wrong files


@pytest.mark.parametrize("fmt,name", [("zip", "mae_300.pth"), ("legacy", "asuka_decoder.ckpt"),
                                      ("safetensors", "ae.safetensors")])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files(tmp_path, fmt, name, keep):
    path = tmp_path / name
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        _write(path, {"model": sd}, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        read_checkpoint(path)


def test_random_bytes_named_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        read_checkpoint(path)


def test_random_bytes_named_pth(tmp_path):
    path = tmp_path / "mae_300.pth"
    path.write_bytes(b"\x07" + os.urandom(4095))
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        read_checkpoint(path)


def test_text_file_named_pth(tmp_path):
    path = tmp_path / "mae_300.pth"
    path.write_text("these are not the weights you are looking for\n" * 20)
    with pytest.raises(CheckpointError, match="text file"):
        read_checkpoint(path)


@pytest.mark.parametrize("content,expected", [
    (b"", "empty"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>", "web page"),
])
def test_failed_downloads_are_named(tmp_path, content, expected):
    path = tmp_path / "asuka_decoder.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(CheckpointError, match="unknown extension"):
        read_checkpoint(tmp_path / "w.npz")


def test_content_decides_the_reader(tmp_path):
    sd = _weights()
    save_file(sd, str(tmp_path / "really_safetensors.pth"))
    assert set(read_checkpoint(tmp_path / "really_safetensors.pth").tensors) == set(sd)
    torch.save(sd, tmp_path / "really_pickle.safetensors")
    assert set(read_checkpoint(tmp_path / "really_pickle.safetensors").tensors) == set(sd)


def test_safetensors_metadata_is_read(tmp_path):
    save_file(_weights(), str(tmp_path / "a.safetensors"), metadata={"asuka.kind": "mae"})
    ckpt = read_checkpoint(tmp_path / "a.safetensors")
    assert ckpt.metadata == {"asuka.kind": "mae"} and ckpt.name == "a.safetensors"


def test_diffusers_folder(tmp_path):
    save_file(_weights(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert set(read_checkpoint(tmp_path).tensors) == set(_weights())
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no diffusers weights"):
        read_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------
# Unwrapping and identification


def test_unwrap_variants():
    sd = _weights()
    assert unwrap_state_dict(sd).keys() == sd.keys()
    assert unwrap_state_dict({"model": sd, "epoch": 3}).keys() == sd.keys()
    assert unwrap_state_dict({"state_dict": sd, "global_step": 1}).keys() == sd.keys()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert unwrap_state_dict(prefixed).keys() == sd.keys()
    assert unwrap_state_dict({"model": prefixed}).keys() == sd.keys()
    compiled = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    assert unwrap_state_dict({"state_dict": compiled}).keys() == sd.keys()
    assert unwrap_state_dict({"state_dict": {"model": sd}}).keys() == sd.keys()
    assert list(unwrap_state_dict({"model": {"only": torch.ones(1)}})) == ["only"]
    mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
    assert set(unwrap_state_dict(mixed)) == {"module.a", "b"}  # only strip a common prefix
    with pytest.raises(CheckpointError, match="no model weights"):
        unwrap_state_dict({"epoch": 3, "model": {"lr": 0.1}})
    with pytest.raises(CheckpointError):
        unwrap_state_dict([torch.ones(1)])


def test_as_checkpoint_accepts_paths_dicts_and_checkpoints(tmp_path):
    sd = _weights()
    ckpt = as_checkpoint({"model": sd})
    assert isinstance(ckpt, Checkpoint) and ckpt.name == "<state dict>"
    assert as_checkpoint(ckpt) is ckpt
    torch.save(sd, tmp_path / "w.pt")
    assert as_checkpoint(tmp_path / "w.pt").tensors.keys() == sd.keys()


def _keys(*names, shapes=None):
    shapes = shapes or {}
    return {n: torch.empty(shapes.get(n, (1,)), device="meta") for n in names}


@pytest.mark.parametrize("tensors,kind", [
    (_keys("pos_embed", "patch_embed.proj.weight", "decoder_embed.weight", "blocks.0.norm1.weight"), KIND_MAE),
    (official_aligner_state_dict(width=768, device="meta"), KIND_ALIGNER),
    (official_aligner_state_dict(width=4096, depth=1, device="meta"), KIND_ALIGNER),
    (_keys("decoder.encoder.layers.0.weight", "decoder.up.0.block.0.conv1.weight",
           shapes={"decoder.encoder.layers.0.weight": (64, 4, 3, 3)}), KIND_ASUKA_DECODER),
    (_keys("decoder.encoder.layers.0.weight", "decoder.up.0.block.0.conv1.weight", "post_quant_conv.weight",
           shapes={"decoder.encoder.layers.0.weight": (64, 3, 3, 3)}), KIND_AVQ_DECODER),
    (_keys("decoder.condition_encoder.layers.0.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"),
     KIND_DIFFUSERS_ASYM_DECODER),
    (_keys("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight",
           shapes={"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}), KIND_SD_INPAINT),
    (_keys("model.diffusion_model.input_blocks.0.0.weight",
           shapes={"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}), KIND_SD),
    (_keys("model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x"), KIND_SDXL),
    (_keys("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"), KIND_FLUX),
    (_keys("decoder.conv_in.weight", "encoder.conv_in.weight"), KIND_VAE),
    (_keys("text_model.encoder.layers.0.mlp.fc1.weight"), KIND_TEXT_ENCODER),
    (_keys("lora_unet_down_blocks_0.lora_down.weight"), KIND_LORA),
    (_keys("down_blocks.0.resnets.0.conv1.weight"), KIND_UNET),
    (_keys("something.else"), KIND_UNKNOWN),
])
def test_identify(tensors, kind):
    assert identify(tensors) == kind


def test_expect_kind_names_what_the_file_is():
    ckpt = Checkpoint(tensors=_keys("double_blocks.0.img_attn.qkv.weight"), path="/m/flux1-fill-dev.safetensors")
    with pytest.raises(CheckpointError) as e:
        expect_kind(ckpt, [KIND_MAE], "ASUKA MAE loader", "Choose mae_300.pth.")
    assert "'flux1-fill-dev.safetensors' looks like a FLUX diffusion model, not an ASUKA MAE" in str(e.value)
    assert "Choose mae_300.pth." in str(e.value)


def test_save_safetensors_handles_views_and_shared_memory(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "a_t": base.t(), "row": base[1], "same": base}
    save_safetensors(tensors, tmp_path / "v.safetensors", {"k": "v"})
    back = read_checkpoint(tmp_path / "v.safetensors")
    for k, v in tensors.items():
        assert torch.equal(back.tensors[k], v)
    assert back.metadata == {"k": "v"}


# --------------------------------------------------------------------------------------
# python -m asuka_core.convert


def _read_safetensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_convert_mae(tmp_path, capsys):
    src = tmp_path / "mae_300.pth"
    sd = write_official_mae_pth(src, **SMALL_MAE)
    assert convert_mod.main([str(src)]) == 0
    out = tmp_path / "mae_300.safetensors"
    tensors, meta = _read_safetensors(out)
    assert tensors.keys() == sd.keys()
    assert all(torch.equal(tensors[k], v) for k, v in sd.items())
    assert meta == {"asuka.kind": "mae", "asuka.source": "mae_300.pth"}
    printed = capsys.readouterr().out
    assert f"Wrote {out}" in printed and "an ASUKA MAE prior encoder" in printed
    assert read_checkpoint(out).tensors.keys() == sd.keys()


def test_convert_asuka_decoder_keeps_decoder_only(tmp_path, capsys):
    src = tmp_path / "asuka_decoder.ckpt"
    sd = write_official_asuka_decoder_ckpt(src, **SMALL_DECODER)
    out = tmp_path / "asuka_decoder_fp32.safetensors"
    assert convert_mod.main([str(src), str(out)]) == 0
    tensors, meta = _read_safetensors(out)
    expected = {k for k in sd if k.startswith("decoder.")}
    assert set(tensors) == expected and len(expected) < len(sd)
    assert all(torch.equal(tensors[k], sd[k]) for k in expected)
    assert meta["asuka.kind"] == "asuka_decoder" and meta["asuka.source"] == "asuka_decoder.ckpt"
    assert "left out" in capsys.readouterr().out


def test_convert_avq_decoder_keeps_post_quant_conv(tmp_path):
    sd = avq_ldm_state_dict(0, **SMALL_DECODER)
    src = tmp_path / "avq_x1_5.ckpt"
    torch.save({"state_dict": sd, "epoch": 10}, src)
    summary = convert_mod.convert(src)
    tensors, meta = _read_safetensors(summary["output"])
    assert set(tensors) == {k for k in sd if k.startswith(("decoder.", "post_quant_conv."))}
    assert "post_quant_conv.weight" in tensors and "quant_conv.weight" not in tensors
    assert meta["asuka.kind"] == "avq_decoder"


def test_convert_aligner_targets(tmp_path, capsys):
    src = tmp_path / "asuka_alignment_clip.pt"
    sd = write_official_aligner_pt(src, width=768, depth=1)
    assert convert_mod.main([str(src)]) == 0
    tensors, meta = _read_safetensors(tmp_path / "asuka_alignment_clip.safetensors")
    assert tensors.keys() == sd.keys() and all(torch.equal(tensors[k], v) for k, v in sd.items())
    assert meta == {"asuka.kind": "aligner", "asuka.source": "asuka_alignment_clip.pt",
                    "asuka.target": "flux_clip"}
    assert "--target sd15" in capsys.readouterr().out  # the note about SD1.5 aligners

    out = tmp_path / "mine_sd15.safetensors"
    assert convert_mod.main([str(src), str(out), "--target", "sd15"]) == 0
    assert _read_safetensors(out)[1]["asuka.target"] == "sd15"
    from asuka_core.aligner import load_aligner

    assert load_aligner(out).target == "sd15"

    assert convert_mod.main([str(src), str(tmp_path / "t5.safetensors"), "--target", "flux_t5"]) == 1
    assert "4096" in capsys.readouterr().err
    assert not (tmp_path / "t5.safetensors").exists()


def test_convert_refuses_malicious_input(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = tmp_path / "mae_300.pth"
    torch.save({"model": _weights(), "args": _System(marker)}, src)
    assert convert_mod.main([str(src)]) == 1
    assert "Refusing to load 'mae_300.pth'" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "mae_300.safetensors").exists()


def test_convert_refusals(tmp_path, capsys):
    src = tmp_path / "mae_300.pth"
    write_official_mae_pth(src, **SMALL_MAE)
    assert convert_mod.main([str(src), "--target", "sd15"]) == 1
    assert "aligners only" in capsys.readouterr().err
    assert convert_mod.main([str(src), str(tmp_path / "x.pt")]) == 1
    assert ".safetensors" in capsys.readouterr().err
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    assert convert_mod.main([str(src), str(tmp_path / "exists.safetensors")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert convert_mod.main([str(src), str(tmp_path / "exists.safetensors"), "--overwrite"]) == 0
    other = tmp_path / "unet.pt"
    torch.save(_keys_real("down_blocks.0.resnets.0.conv1.weight"), other)
    assert convert_mod.main([str(other)]) == 1
    assert "ASUKA files only" in capsys.readouterr().err


def _keys_real(*names):
    return {n: torch.zeros(2) for n in names}


def test_convert_runs_as_a_module(tmp_path):
    src = tmp_path / "asuka_decoder.ckpt"
    write_official_asuka_decoder_ckpt(src, **SMALL_DECODER)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "asuka_core.convert", str(src)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Wrote" in done.stdout and (tmp_path / "asuka_decoder.safetensors").exists()


def test_malformed_malicious_pickle_is_still_called_malicious(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "asuka_alignment_clip.pt"
    path.write_bytes(_os_system_protocol0(marker)[:-3])  # no call, no STOP: not even a valid pickle
    with pytest.raises(UnsafeCheckpointError, match="os.system"):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("loader_name,name", [("load_mae", "mae_300.pth"), ("load_decoder", "asuka_decoder.ckpt"),
                                              ("load_aligner", "asuka_alignment_clip.pt")])
def test_every_loader_refuses_a_malicious_official_name(tmp_path, loader_name, name, fmt):
    """The public loaders (what the ComfyUI nodes call) go through the same refusal."""
    import asuka_core

    cls, shown = PAYLOADS["os.system"]
    marker = tmp_path / "pwned"
    path = tmp_path / name
    _write(path, _wrapped(name, cls(marker)), fmt)
    with pytest.raises(UnsafeCheckpointError) as e:
        getattr(asuka_core, loader_name)(path)
    assert shown in str(e.value)
    assert not marker.exists()
