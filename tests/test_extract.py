"""extract-lora: η = θ_ft − θ cut to rank r per layer. Its error must be the Eckart–Young optimum, computed here from
the singular values of the difference of the two diffusers UNets, and its file must load in diffusers."""
import json

import pytest
import torch

from npo import extract
from npo import guided
from npo import lora
import npo
from npo import pipeline
from npo.checkpoint import read_safetensors_metadata
from conftest import TINY_UNET, diffusers_pipeline, make_model_dir
from test_eta_model import perturbed

TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,conv1"  # attention Linears, SD1's 1x1-conv proj_in, 3x3 convs


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    """θ_ft: the tiny model's UNet with every weight moved, saved as a unet/ folder."""
    model = perturbed(tiny_model[1]["unet"], seed=21)
    folder = str(tmp_path_factory.mktemp("tuned") / "unet")
    model.save_pretrained(folder)
    return folder, model


def optimum(tiny_model, tuned_model, layer, rank):
    """min over rank-r X of ‖ΔW − X‖_F / ‖ΔW‖_F = √(Σ_{i>r} s_i²) / √(Σ s_i²), from diffusers' own weights."""
    base = tiny_model[1]["unet"].get_submodule(layer).weight.double()
    delta = (tuned_model.get_submodule(layer).weight.double() - base).flatten(1)
    s = torch.linalg.svdvals(delta)
    return (s[rank:].square().sum() / s.square().sum()).sqrt().item()


@pytest.mark.parametrize("rank, conv_rank", [(2, 3), (4, None)])
def test_error_is_the_truncated_svd_optimum(tiny_model, tuned, rank, conv_rank):
    base = pipeline.load_unet(tiny_model[0])
    stats = extract.extract_offset(base, pipeline.load_unet(tuned[0]), "eta", rank, conv_rank, TARGETS)
    assert len(stats) == len(lora.select_layers(base, TARGETS))
    for layer, (residual, norm) in stats.items():
        offset = lora.offsets(base, "eta")[layer]
        r = (conv_rank or rank) if layer.endswith("conv1") else rank
        assert offset.rank == min(r, *offset.delta_weight().flatten(1).shape) and float(offset.alpha) == rank
        best = optimum(tiny_model, tuned[1], layer, offset.rank)
        assert abs((residual / norm) ** 0.5 - best) <= 1e-5 + 1e-4 * best, layer
    # per block and overall: over all the entries of the layers together
    errors = extract.relative_errors(stats)
    assert list(errors)[-1] == "overall" and "mid_block" in errors
    total = sum(r for r, _ in stats.values()) / sum(n for _, n in stats.values())
    assert errors["overall"] == pytest.approx(total ** 0.5)


def test_full_rank_is_exact(tiny_model, tuned):
    base = pipeline.load_unet(tiny_model[0])
    stats = extract.extract_offset(base, pipeline.load_unet(tuned[0]), "eta", 10_000, None, "to_q,conv1")
    assert max(r / n for r, n in stats.values()) < 1e-10


def test_file_loads_in_diffusers(tiny_model, tuned, tmp_path, capsys):
    """The kohya file written by the command gives diffusers' load_lora_weights the images ours gives."""
    path, refs = tiny_model
    out = str(tmp_path / "eta.safetensors")
    errors = npo.main(["extract-lora", "--base", path, "--tuned", tuned[0], "--rank", "3", "--conv-rank", "5",
                       "--targets", TARGETS, "--out", out])
    assert errors == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "down_blocks.0" in printed
    meta = read_safetensors_metadata(out)
    assert meta["npo_role"] == "eta" and meta["npo_source_tuned"] == tuned[0] and meta["npo_rank"] == "3"
    per_layer = json.loads(meta["npo_relative_errors"])
    assert set(per_layer) == set(lora.select_layers(pipeline.load_unet(path), TARGETS))
    ref_pipe = diffusers_pipeline(path, refs)
    ref_pipe.load_lora_weights(out)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt")
    ref = ref_pipe(["a green triangle"], generator=[torch.Generator().manual_seed(0)], **kw).images
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, out, "eta")
    ours = guided.generate(pipe, ["a green triangle"], [0], steps=4, guidance=5.0, height=32, width=32)
    assert ((ours / 2 + 0.5).clamp(0, 1) - ref).abs().max() <= 1e-4
    # and the offset is the fine-tune's: without it the image differs
    plain = guided.generate(pipeline.load_pipeline(path), ["a green triangle"], [0], steps=4, guidance=5.0,
                              height=32, width=32)
    assert (plain - ours).abs().max() > 0.05


def test_bad_input(tiny_model, tuned, tmp_path, capsys):
    path = tiny_model[0]
    common = ["extract-lora", "--base", path, "--out", str(tmp_path / "x.safetensors")]
    for flags, words in ((["--tuned", tuned[0], "--rank", "0"], "at least 1"),
                         (["--tuned", path, "--rank", "2"], "identical on the target layers (to_q, to_k, to_v, "
                                                            "to_out.0); there is no offset"),
                         (["--tuned", tuned[0], "--rank", "2", "--device", "tpu"], "--device 'tpu' is not a device"),
                         (["--tuned", tuned[0], "--rank", "2", "--targets", "nothing"], "match no Linear/Conv2d"),
                         (["--tuned", "/nonexistent", "--rank", "2"], "does not exist")):
        assert npo.main([*common, *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
    other = tmp_path / "other"
    make_model_dir(str(other), unet_kwargs=dict(TINY_UNET, block_out_channels=(16, 32)))
    assert npo.main([*common, "--tuned", str(other), "--rank", "2"]) == 2
    assert "is not a fine-tune of the base model" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_progress_per_layer(tiny_model, tuned, tmp_path, capsys):
    """extract-lora reports on stderr as it goes: layer i/N with elapsed time and an ETA, ending at N/N; the share of
    work it reports grows to 1, by each layer's SVD cost m·n·min(m, n)."""
    base, calls = pipeline.load_unet(tiny_model[0]), []
    extract.extract_offset(base, pipeline.load_unet(tuned[0]), "eta", 2, None, TARGETS, "cpu",
                        lambda *call: calls.append(call))
    names = lora.select_layers(base, TARGETS)
    assert [(i, n, layer) for i, n, layer, _ in calls] == [(i + 1, len(names), name) for i, name in enumerate(names)]
    costs = [w.shape[0] * w[0].numel() * min(w.shape[0], w[0].numel())
             for w in (base.get_submodule(n).weight for n in names)]
    assert [share for *_, share in calls] == pytest.approx([sum(costs[:i + 1]) / sum(costs) for i in range(len(costs))])
    assert npo.main(["extract-lora", "--base", tiny_model[0], "--tuned", tuned[0], "--rank", "2", "--device", "cpu",
                     "--out", str(tmp_path / "eta.safetensors")]) == 0
    err = capsys.readouterr().err.splitlines()
    n = len(lora.select_layers(base, lora.DEFAULT_TARGETS))
    assert err[-2].startswith(f"SVD of layer {n}/{n} (") and "s elapsed, ETA 0.0s" in err[-2]
    assert 2 <= len(err) - 1 <= 21  # a log gets a line every twentieth of the layers, and the last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_equals_cpu(tiny_model, tuned):
    """--device cuda runs the subtraction and the SVD there: the same factors' errors as on the CPU, in float32."""
    stats = {}
    for device in ("cpu", "cuda"):
        base = pipeline.load_unet(tiny_model[0])
        stats[device] = extract.extract_offset(base, pipeline.load_unet(tuned[0]), "eta", 3, None, TARGETS, device)
    for layer, (residual, norm) in stats["cpu"].items():
        on_gpu = stats["cuda"][layer]
        assert on_gpu[1] == pytest.approx(norm, rel=1e-5)
        assert (on_gpu[0] / on_gpu[1]) ** 0.5 == pytest.approx((residual / norm) ** 0.5, rel=1e-3, abs=1e-5), layer
