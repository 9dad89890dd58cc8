"""`pipeline.load_pipeline` on a diffusers folder of random weights, its bad inputs, and the CLI's exit code 2."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from npo import checkpoint
import npo
from npo import pipeline
from npo.checkpoint import UserError
from conftest import ROOT

RTOL = 1e-4  # see test_unet.py: fp32 reordering noise is ~1e-7 relative, real bugs are O(1)


def assert_close(ours, ref):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= RTOL * scale, f"max |ours - ref| = {err:.3g} > {RTOL} * {scale:.3g}"


def test_pipeline_parts_match_references(tiny_model):
    from transformers import CLIPTokenizer
    path, refs = tiny_model
    pipe = pipeline.load_pipeline(path)
    prompts = ["a red circle", "", "A photo of an astronaut riding a horse on the moon, 4k, trending"]
    ids = pipe.tokenizer(prompts)
    assert ids.dtype == torch.long and ids.shape == (3, 77)
    ref_tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    assert ids.tolist() == ref_tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)
        assert_close(text, refs["text_encoder"](ids).last_hidden_state)
        x = torch.randn(3, 4, 8, 8)
        assert_close(pipe.unet(x, 981, text), refs["unet"](x, 981, text).sample)
        z = torch.randn(1, 4, 8, 8)
        assert_close(pipe.vae.decode(z), refs["vae"].decode(z).sample)
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        assert_close(pipe.vae.encode(images).mean, refs["vae"].encode(images).latent_dist.mean)
    assert pipe.scheduler_config["steps_offset"] == 1


def test_fp16_variant_and_bf16_dtype(tiny_model, tmp_path):
    path, refs = tiny_model
    copy = tmp_path / "model"
    shutil.copytree(path, copy)
    src = copy / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(src).items()}, copy / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    src.unlink()  # only the variant remains: loading it must not need the fp32 file
    for part, name in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        os.rename(copy / part / f"{name}.safetensors", copy / part / f"{name}.fp16.safetensors")
    pipe = pipeline.load_pipeline(str(copy), dtype=torch.bfloat16, variant="fp16")
    assert all(p.dtype == torch.bfloat16 for p in pipe.unet.parameters())
    # the outputs: float32 from the fp16 UNet file equals the reference UNet with its weights rounded to fp16 (the
    # other parts' variant files hold their float32 weights); bfloat16 is that within bfloat16's precision (8 bits
    # of mantissa: 1.3% of the output's scale measured here, after a dozen layers)
    import copy as copying
    rounded = copying.deepcopy(refs["unet"]).half().float()
    fp32 = pipeline.load_pipeline(str(copy), dtype=torch.float32, variant="fp16")
    ids = fp32.tokenizer(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = refs["text_encoder"](ids).last_hidden_state
        assert_close(fp32.text_encoder(ids), text)
        ref = rounded(x, 500, text).sample
        assert_close(fp32.unet(x, 500, text), ref)
        low = pipe.unet(x.bfloat16(), 500, text.bfloat16()).float()
        assert (low - ref).abs().max() <= 0.03 * ref.abs().max()
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors"):
        pipeline.load_pipeline(str(copy))  # no plain files: the message names what it looked for


def test_parameter_counts_are_the_references(tiny_model):
    path, refs = tiny_model
    pipe = pipeline.load_pipeline(path)
    for name in ("unet", "vae", "text_encoder"):
        assert pipeline.count_parameters(getattr(pipe, name)) == sum(p.numel() for p in refs[name].parameters())


# ---- bad input: one sentence, the right class, nothing half-done ----------------------------------------

def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        pipeline.load_pipeline(str(tmp_path / "nope"))


def test_folder_without_unet(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    shutil.rmtree(copy / "unet")
    with pytest.raises(UserError, match="no unet/"):
        pipeline.load_pipeline(str(copy))


def test_unsupported_config_value(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    cfg_path = copy / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["addition_embed_type"] = "text_image"  # Kandinsky's (SDXL's "text_time" is supported)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="addition_embed_type"):
        pipeline.load_pipeline(str(copy))


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "empty"])
def test_damaged_safetensors(tiny_model, tmp_path, damage):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    f = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "not_safetensors": b"PK\x03\x04 a zip, not weights", "empty": b""}[damage])
    with pytest.raises(UserError, match="not a readable safetensors file"):
        pipeline.load_pipeline(str(copy))


@pytest.mark.parametrize("change, words", [("missing", "missing keys"), ("unexpected", "unexpected keys"),
                                           ("misshaped", "misshaped keys")])
def test_key_problems_are_listed(tiny_model, tmp_path, change, words):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    f = copy / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    if change == "missing":
        victims = [k for k in sd if "attn2.to_k" in k]
        for k in victims:
            del sd[k]
    elif change == "unexpected":
        victims = [f"extra.layer{i}.weight" for i in range(9)]
        sd.update({k: torch.zeros(2) for k in victims})
    else:
        victims = ["conv_in.weight"]
        sd["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(sd, f)
    with pytest.raises(UserError) as e:
        pipeline.load_pipeline(str(copy))
    msg = str(e.value)
    assert words in msg and sorted(victims)[0] in msg
    if change == "unexpected":  # a few keys at most, plus a count of the rest
        assert "9 unexpected keys" in msg and "and 4 more" in msg and sorted(victims)[-1] not in msg


def test_ckpt_instead_of_safetensors_is_refused(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    os.rename(copy / "unet" / "diffusion_pytorch_model.safetensors", copy / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors only"):
        pipeline.load_pipeline(str(copy))


def test_tokenizer_folder_without_vocab(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model[0], copy)
    for name in os.listdir(copy / "tokenizer"):
        os.remove(copy / "tokenizer" / name)
    with pytest.raises(UserError):
        pipeline.load_pipeline(str(copy))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "npo.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_bad_model_exits_2_without_traceback(tmp_path):
    r = run_cli("info", "--model", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and "does not exist" in r.stderr


def test_cli_info(tiny_model):
    r = run_cli("info", "--model", tiny_model[0])
    assert r.returncode == 0, r.stderr
    assert "unet" in r.stdout and "text_encoder" in r.stdout


def test_atomic_write_leaves_the_whole_file_or_nothing(tmp_path):
    import stat
    path = tmp_path / "a.bin"
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write(str(path), lambda f: f.write(b"new"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o644

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(str(path), fails)
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.bin"]  # the old file, no temporary left
    with pytest.raises(UserError, match="cannot write"):
        checkpoint.atomic_write(str(tmp_path / "missing" / "b.bin"), lambda f: f.write(b"x"))


def test_atomic_write_has_normal_permissions_and_leaves_the_umask_alone(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("atomic_write changed the process-wide umask")
        monkeypatch.setattr(os, "umask", no_umask)
        checkpoint.atomic_write(str(tmp_path / "f.bin"), lambda f: f.write(b"x"))
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o640  # 0666 less the umask, as open() would give

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(str(tmp_path / "g.bin"), broken)
    assert os.listdir(tmp_path) == ["f.bin"]  # no half-written file, no temporary left behind


def test_inpainting_unet_is_refused_at_load(tmp_path, capsys):
    """A 9-channel UNet (sd-v1-5-inpainting: noisy latents, masked-image latents and the mask) is refused in one
    sentence when the model loads, as a folder and as a single file, instead of failing at the first step."""
    from diffusers import UNet2DConditionModel
    import ldm
    from conftest import TINY_UNET, make_model_dir, randomize
    folder = str(tmp_path / "inpaint")
    make_model_dir(folder, unet_kwargs=dict(TINY_UNET, in_channels=9))
    with pytest.raises(UserError, match="9 input channels"):
        pipeline.load_pipeline(folder)
    ref = ldm.make_family_dir(str(tmp_path / "sd1"), "sd1")
    ref.unet = randomize(UNet2DConditionModel(**dict(ldm.FAMILIES["sd1"]["unet"], in_channels=9)), 1)
    single = ldm.save_ldm(ldm.to_ldm(ref, "sd1"), str(tmp_path / "sd-v1-5-inpainting.safetensors"))
    capsys.readouterr()  # diffusers' saving progress
    for model in (folder, single):
        assert npo.main(["sample", "--model", model, "--steps", "1", "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err
        assert "9 input channels" in err and "inpainting" in err and err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()
