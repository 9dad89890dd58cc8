"""SEG and autoguidance beside NPO (the appendix's tables 5-6) against diffusers' guiders and the hooks they install
on diffusers' UNet, run step by step with DDIMScheduler; the CLI's flags, PNG parameters and bad input."""
import copy
import math
import os

import pytest
import torch
from PIL import Image

from npo import guided
from npo import guiders
from npo import images
from npo import lora
import npo
from npo import pipeline
from npo.checkpoint import UserError
from conftest import diffusers_pipeline

ATOL = 1e-4  # images in [0, 1], as tests/test_sample.py: fp32 agreement ~1e-6, a visible difference is 4e-3


def to01(images):
    return (images / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# The query blur alone.

@pytest.mark.parametrize("side", [8, 5, 4, 32])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 100.0, math.inf])
def test_smooth_query_is_diffusers_seg_blur(side, sigma):
    """`guiders.smooth_query` against diffusers' `_gaussian_blur_2d` on square grids, σ with and without the kernel cap.
    diffusers 0.42 swaps the function's two branches (σ above its threshold blurs, below takes the mean), so the
    threshold is set here to make it run the branch that the SEG authors' code runs for σ."""
    from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d
    q = torch.randn(2, side * side, 12, generator=torch.Generator().manual_seed(side))
    s = 9999999.0 if sigma == math.inf else sigma  # the authors' and diffusers' default "infinite" σ
    size = math.ceil(6 * s) + 1 - math.ceil(6 * s) % 2
    ref = _gaussian_blur_2d(q.clone(), size, s, 1e8 if sigma == math.inf else 0.0)
    ours = guiders.smooth_query(q, side, side, sigma)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert (ours - q).abs().max() > 0.1  # and it blurs


def test_smooth_query_infinite_blur_is_the_mean_on_any_grid():
    """σ > 9999 gives every token the mean query of the whole (H, W) grid, a non-square one included (diffusers
    assumes a square grid; our attention knows its H and W)."""
    q = torch.randn(3, 4 * 6, 8)
    for sigma in (10000.0, math.inf):
        assert torch.allclose(guiders.smooth_query(q, 4, 6, sigma), q.mean(1, keepdim=True).expand_as(q), atol=1e-6)


def test_smooth_query_on_a_non_square_grid_blurs_each_axis():
    """A Gaussian blur is separable: on a (H, W) grid, blurring rows then columns with the 1-D kernels of the
    square case gives the same result."""
    h, w, sigma = 6, 10, 1.0
    q = torch.randn(1, h * w, 4)
    ours = guiders.smooth_query(q, h, w, sigma)
    # each axis on its own: a grid of width 1 (kernel 1, the identity) across, the full side along
    grid = q.reshape(1, h, w, 4)
    rows = guiders.smooth_query(grid.permute(0, 2, 1, 3).reshape(w, h, 4), h, 1, sigma).reshape(w, h, 4)
    cols = guiders.smooth_query(rows.permute(1, 0, 2).reshape(h, w, 4), 1, w, sigma).reshape(1, h * w, 4)
    assert torch.allclose(ours, cols, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Whole samples against diffusers' guiders.

def reference_loop(path, refs, seeds, steps, predict):
    """StableDiffusionPipeline's DDIM loop on diffusers parts, ε from predict(t, x_in)."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    scheduler.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        x = torch.cat([torch.randn((1, 4, 16, 16), generator=g) for g in gens]) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(predict(t, scheduler.scale_model_input(x, t)), t, x, generator=gens).prev_sample
        return to01(refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample)


def branch_pipelines(path, refs, files, alpha, beta):
    """Eq. 10's two weight sets as diffusers pipelines: θ + η (fused, then plain Linear layers again, which the SEG
    hook needs) and θ + α·η + β·δ; without `files` both are θ."""
    pos, neg = diffusers_pipeline(path, refs), diffusers_pipeline(path, refs)
    if files:
        pos.load_lora_weights(files["eta"])
        pos.fuse_lora(lora_scale=1.0)
        pos.unload_lora_weights()
        neg.load_lora_weights(files["eta"], adapter_name="eta")
        neg.load_lora_weights(files["delta"], adapter_name="delta")
        neg.set_adapters(["eta", "delta"], adapter_weights=[alpha, beta])
    return pos, neg


def seg_unet(model, layers, sigma):
    """A copy of diffusers' UNet with diffusers' SEG hook on the query of the self-attention of `layers`
    ([(fqn, indices)] of transformer blocks), its threshold set as in test_smooth_query_is_diffusers_seg_blur."""
    from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,
                                                                 SmoothedEnergyGuidanceHook,
                                                                 _apply_smoothed_energy_guidance_hook)
    model = copy.deepcopy(model)
    s = 9999999.0 if sigma == math.inf else sigma
    for k, (fqn, indices) in enumerate(layers):
        _apply_smoothed_energy_guidance_hook(model, SmoothedEnergyGuidanceConfig(indices, fqn=fqn), s, name=f"seg{k}")
    hooks = [h for m in model.modules() if hasattr(m, "_diffusers_hook")
             for h in m._diffusers_hook.hooks.values() if isinstance(h, SmoothedEnergyGuidanceHook)]
    assert len(hooks) == sum(len(i) for _, i in layers)  # one per block, on its self-attention's to_q
    for h in hooks:
        h.blur_threshold_inf = 1e8 if sigma == math.inf else 0.0
    return model


def seg_reference(path, refs, prompts, seeds, negative, steps, g, s, sigma, layers, files=None, alpha=1.0, beta=1.0):
    """SEG from diffusers' parts: `SmoothedEnergyGuidance.forward` combines ε_uncond (θ + α·η + β·δ, c'), ε_cond
    (θ + η, c) and ε_seg (θ + η with the SEG hook, c), each from its own UNet pass. Without CFG (g ≤ 1 for us) the
    guider runs its `use_original_formulation` at g = 0, which is the SEG authors' ε_c + s·(ε_c − ε_seg) (its default
    formulation would give ε_seg + s·(ε_c − ε_seg)). No schedule is set, so SEG runs on every step as the authors'."""
    from diffusers import SmoothedEnergyGuidance
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
    pos, neg = branch_pipelines(path, refs, files, alpha, beta)
    perturbed = seg_unet(pos.unet, layers, sigma)
    cfg = g > 1
    guider = SmoothedEnergyGuidance(guidance_scale=g if cfg else 0.0, seg_guidance_scale=s,
                                    seg_guidance_config=[SmoothedEnergyGuidanceConfig(i, fqn=f) for f, i in layers],
                                    use_original_formulation=not cfg)
    with torch.no_grad():
        c, _ = pos.encode_prompt(prompts, "cpu", 1, False)
        u, _ = neg.encode_prompt([negative] * len(prompts), "cpu", 1, False)

    def predict(t, x):
        guider.set_state(step=0, num_inference_steps=None, timestep=t)
        eps_u = neg.unet(x, t, u).sample if cfg else None
        return guider.forward(pos.unet(x, t, c).sample, eps_u, perturbed(x, t, c).sample).pred
    return reference_loop(path, refs, seeds, steps, predict)


# the tiny UNet's four transformer blocks as diffusers' (fqn, indices): d0, m0, u0, u1 in our names
D0 = [("down_blocks.0.attentions.0.transformer_blocks", [0])]
MID = [("mid_block.attentions.0.transformer_blocks", [0])]
U0, U1 = ([(f"up_blocks.1.attentions.{i}.transformer_blocks", [0])] for i in (0, 1))


@pytest.mark.parametrize("g, s, sigma, names, layers", [
    (6.0, 3.0, math.inf, ("down", "mid", "up"), D0 + MID + U0 + U1), (6.0, 3.0, 1.0, ("d0", "u1"), D0 + U1),
    (1.0, 10.0, 2.0, ("m0", "u1"), MID + U1)])  # g ≤ 1: SEG alone, the SEG authors' README example (at g = 1)
def test_seg_matches_diffusers_guider(tiny_model, g, s, sigma, names, layers):
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref = seg_reference(path, refs, prompts, seeds, "blurry", 5, g, s, sigma, layers)
    pipe = pipeline.load_pipeline(path)
    guider = guiders.Guider("seg", names, s, sigma)
    ours = guided.generate(pipe, prompts, seeds, "blurry", steps=5, guidance=g, height=32, width=32, guider=guider)
    assert (to01(ours) - ref).abs().max() <= ATOL
    plain = guided.generate(pipe, prompts, seeds, "blurry", steps=5, guidance=g, height=32, width=32)
    assert (to01(plain) - ref).abs().max() > 1 / 255  # SEG changes the picture visibly (its mid block alone
    # changes the tiny model's picture less than 1/255, so each case includes a block of the larger grid)


def test_seg_beside_npo_matches_diffusers(tiny_model, offsets):
    """SEG composes with NPO: the SEG rows run the conditional branch's weights θ + η, the unconditional rows
    eq. 10's."""
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a yellow square"], [5, 9]
    ref = seg_reference(path, refs, prompts, seeds, "ugly", 5, 6.0, 2.0, 1.0, MID + U1, offsets, 0.3, 0.7)
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    ours = guided.generate(pipe, prompts, seeds, "ugly", steps=5, guidance=6.0, alpha=0.3, beta=0.7, height=32,
                             width=32, guider=guiders.Guider("seg", ("mid", "u1"), 2.0, 1.0))
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_seg_on_sdxl_matches_diffusers(tiny_sdxl):
    """Table 5's SEG row runs on SDXL: the SEG rows carry the conditional branch's pooled text and time ids (the
    authors' [c'; c; c] batch), here with SDXL's zeros as c'."""
    from diffusers import SmoothedEnergyGuidance
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
    from conftest import diffusers_sdxl_pipeline
    path, refs = tiny_sdxl
    layers = [("down_blocks.1.attentions.0.transformer_blocks", [0]),  # d0 and both of the mid block's: "d0,mid"
              ("mid_block.attentions.0.transformer_blocks", [0, 1])]
    ref_pipe = diffusers_sdxl_pipeline(path, refs)
    perturbed = seg_unet(ref_pipe.unet, layers, math.inf)
    guider = SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_scale=3.0,
                                    seg_guidance_config=[SmoothedEnergyGuidanceConfig(i, fqn=f) for f, i in layers])
    with torch.no_grad():
        c, u, pooled, u_pooled = ref_pipe.encode_prompt("a red circle", device="cpu")  # c': zeros
        time_ids = ref_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), c.dtype, text_encoder_projection_dim=24)

    def predict(t, x):
        guider.set_state(step=0, num_inference_steps=None, timestep=t)
        eps = [m(x, t, e, added_cond_kwargs={"text_embeds": p, "time_ids": time_ids}).sample
               for m, e, p in ((ref_pipe.unet, c, pooled), (ref_pipe.unet, u, u_pooled), (perturbed, c, pooled))]
        return guider.forward(*eps).pred
    ref = reference_loop(path, refs, [6], 5, predict)
    pipe = pipeline.load_pipeline(path)
    ours = guided.generate(pipe, ["a red circle"], [6], steps=5, guidance=5.0, height=32, width=32,
                             guider=guiders.Guider("seg", ("d0", "mid"), 3.0, math.inf))
    assert (to01(ours) - ref).abs().max() <= ATOL
    plain = guided.generate(pipe, ["a red circle"], [6], steps=5, guidance=5.0, height=32, width=32)
    assert (to01(plain) - ref).abs().max() > 1 / 255


def auto_reference(path, refs, prompts, seeds, negative, steps, g, layers, files=None, alpha=1.0, beta=1.0):
    """Autoguidance driven through diffusers' `AutoGuidance` guider: per step its prepare_models / cleanup_models
    around each pass (it installs its layer-skip hooks, dropout 1, for the unconditional pass only) and its forward."""
    from diffusers import AutoGuidance
    from diffusers.hooks.layer_skip import LayerSkipConfig
    pos, neg = branch_pipelines(path, refs, files, alpha, beta)
    guider = AutoGuidance(guidance_scale=g, auto_guidance_config=[LayerSkipConfig(i, fqn=f, dropout=1.0)
                                                                 for f, i in layers])
    with torch.no_grad():
        c, _ = pos.encode_prompt(prompts, "cpu", 1, False)
        u, _ = neg.encode_prompt([negative] * len(prompts), "cpu", 1, False)

    def predict(t, x):
        guider.set_state(step=0, num_inference_steps=None, timestep=t)
        eps = []
        for model, context in ((pos.unet, c), (neg.unet, u)):  # its order: conditional, then unconditional
            guider.prepare_models(model)
            eps.append(model(x, t, context).sample)
            guider.cleanup_models(model)
        return guider.forward(*eps).pred
    return reference_loop(path, refs, seeds, steps, predict)


@pytest.mark.parametrize("names, layers", [(("mid", "u0"), MID + U0), (("d0", "u1"), D0 + U1)])
def test_autoguidance_matches_diffusers_guider(tiny_model, names, layers):
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref = auto_reference(path, refs, prompts, seeds, "blurry", 5, 4.0, layers)
    pipe = pipeline.load_pipeline(path)
    ours = guided.generate(pipe, prompts, seeds, "blurry", steps=5, guidance=4.0, height=32, width=32,
                             guider=guiders.Guider("autoguidance", names))
    assert (to01(ours) - ref).abs().max() <= ATOL
    plain = guided.generate(pipe, prompts, seeds, "blurry", steps=5, guidance=4.0, height=32, width=32)
    assert (to01(plain) - ref).abs().max() > 1 / 255


def test_autoguidance_beside_npo_matches_diffusers(tiny_model, offsets):
    path, refs = tiny_model
    prompts, seeds = ["a red circle"], [7]
    ref = auto_reference(path, refs, prompts, seeds, "ugly", 5, 5.0, D0 + U1, offsets, 0.5, 1.0)
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    ours = guided.generate(pipe, prompts, seeds, "ugly", steps=5, guidance=5.0, alpha=0.5, beta=1.0, height=32,
                             width=32, guider=guiders.Guider("autoguidance", ("d0", "u1")))
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_perturbations_are_off_after_sampling(tiny_model):
    """The blur and the skip hold only inside a step: afterwards the UNet is plain θ again."""
    pipe = pipeline.load_pipeline(tiny_model[0])
    for guider in (guiders.Guider("seg", ("down", "mid", "up")), guiders.Guider("autoguidance", ("down", "mid", "up"))):
        guided.generate(pipe, ["a circle"], [0], steps=2, guidance=5.0, height=16, width=16, guider=guider)
        blocks = [b for part in guiders.transformer_blocks(pipe.unet).values() for b in part]
        assert len(blocks) == 4 and all(b.skip_rows is None and b.attn1.query_blur is None for b in blocks)


# ----------------------------------------------------------------------------------------------------------
# The command line.

def run(tiny_model, tmp_path, *flags):
    return npo.main(["sample", "--model", tiny_model[0], "--prompt", "a red circle", "--steps", "3", "--height", "32",
                     "--width", "32", "--seed", "2", "--device", "cpu", "--out", str(tmp_path / "x.png"), *flags])


def sample(tiny_model, tmp_path, *flags):
    assert run(tiny_model, tmp_path, *flags) == 0
    image = Image.open(tmp_path / "x.png")
    return torch.tensor(list(image.getdata()), dtype=torch.float32), image.text["parameters"]


def test_cli_seg_writes_generate_pixels_and_names_its_settings(tiny_model, tmp_path):
    pixels, params = sample(tiny_model, tmp_path, "--guidance-method", "seg", "--seg-sigma", "2", "--seg-layers",
                            "mid,u1", "--guidance", "5")
    pipe = pipeline.load_pipeline(tiny_model[0])
    ref = guided.generate(pipe, ["a red circle"], [2], steps=3, guidance=5.0, height=32, width=32,
                            guider=guiders.Guider("seg", ("mid", "u1"), 3.0, 2.0))
    ref = torch.tensor(list(images.to_pil(ref)[0].getdata()), dtype=torch.float32)
    assert torch.equal(pixels, ref)
    assert "Guidance method: SEG, SEG scale: 3.0, SEG sigma: 2.0, SEG layers: \"mid,u1\"" in params


def test_cli_paper_autoguidance_is_cfg_against_the_base_model(tiny_model, offsets, tmp_path):
    """The paper's autoguidance (tables 5-6): η's model on the conditional branch, the base θ on the unconditional
    one, which is eq. 10 at α = β = 0."""
    auto, params = sample(tiny_model, tmp_path, "--guidance-method", "autoguidance", "--lora", offsets["eta"])
    merged, _ = sample(tiny_model, tmp_path, "--lora", offsets["eta"], "--alpha", "0")
    plain, _ = sample(tiny_model, tmp_path, "--lora", offsets["eta"])
    assert torch.equal(auto, merged) and not torch.equal(auto, plain)
    assert "NPO alpha: 0.0, NPO beta: 0.0" in params
    assert "Guidance method: autoguidance, Autoguidance weak model: base" in params


def test_cli_layer_autoguidance_names_its_layers(tiny_model, tmp_path):
    _, params = sample(tiny_model, tmp_path, "--guidance-method", "autoguidance", "--auto-layers", "m0")
    assert "Guidance method: autoguidance, Autoguidance layers: m0" in params


def test_cli_cfg_parameters_name_no_guidance_method(tiny_model, tmp_path):
    _, params = sample(tiny_model, tmp_path)
    assert "Guidance method" not in params and "SEG" not in params


@pytest.mark.parametrize("flags, words", [
    (["--guidance-method", "seg", "--seg-layers", "m3"], "--seg-layers m3 names no transformer block"),
    (["--guidance-method", "seg", "--seg-layers", "middle"], "is not a layer name"),
    (["--guidance-method", "autoguidance", "--auto-layers", "u9"], "--auto-layers u9 names no transformer block"),
    (["--guidance-method", "seg", "--seg-sigma", "-1"], "--seg-sigma -1 is not a blur"),
    (["--guidance-method", "seg", "--seg-sigma", "nan"], "--seg-sigma nan is not a blur"),
    (["--guidance-method", "seg", "--seg-scale", "-2"], "--seg-scale -2 must be"),
    (["--seg-sigma", "3"], "--seg-sigma is a setting of --guidance-method seg"),
    (["--guidance-method", "seg", "--auto-layers", "mid"], "--auto-layers is a setting of --guidance-method auto"),
    (["--guidance-method", "seg", "--mode", "merged"], "drop --mode merged"),
    (["--guidance-method", "autoguidance", "--auto-layers", "mid", "--eta-model", "MODEL"], "drop --eta-model"),
    (["--guidance-method", "autoguidance"], "pass η with --lora or --eta-model"),
    (["--guidance-method", "autoguidance", "--auto-layers", "mid", "--guidance", "1"], "pass --guidance above 1"),
])
def test_cli_bad_guider_input_exits_2(tiny_model, tmp_path, capsys, flags, words):
    assert run(tiny_model, tmp_path, *[tiny_model[0] if f == "MODEL" else f for f in flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x.png")


@pytest.mark.parametrize("flag", [["--alpha", "0.5"], ["--npo", "DELTA"], ["--compare"]])
def test_cli_paper_autoguidance_refuses_npo_weights(tiny_model, offsets, tmp_path, capsys, flag):
    flag = [offsets["delta"] if f == "DELTA" else f for f in flag]
    assert run(tiny_model, tmp_path, "--guidance-method", "autoguidance", "--lora", offsets["eta"], *flag) == 2
    assert f"so {flag[0]} has no place" in capsys.readouterr().err


def test_generate_refuses_a_guider_with_a_fine_tuned_eta(tiny_model):
    pipe = pipeline.load_pipeline(tiny_model[0])
    guided.attach_eta_model(pipe, tiny_model[0], 1.0)
    with pytest.raises(UserError, match="give η as a --lora"):
        guided.generate(pipe, ["a circle"], [0], steps=2, guidance=5.0, height=16, width=16,
                          guider=guiders.Guider("seg"))
