"""NPO sampling against references built from diffusers components, and the `sample` command's contract."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from npo import guided
from npo import images
from npo import lora
import npo
from npo import pipeline
from npo import sampler
from conftest import ROOT, diffusers_pipeline

# Images in [0, 1]. Ours and diffusers' agree to ~1e-6 (same fp32 ops; batching the two CFG branches in one
# forward only reorders float sums). 1e-4 is far below a visible difference (1/255 = 4e-3) and far above noise.
ATOL = 1e-4


def to01(images):
    return (images / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("ddim_eta", [0.0, 1.0])
def test_plain_cfg_matches_stable_diffusion_pipeline(tiny_model, ddim_eta):
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref = diffusers_pipeline(path, refs)(prompts, num_inference_steps=8, guidance_scale=7.5, eta=ddim_eta, height=32,
                                         width=32, negative_prompt=["blurry"] * 2, output_type="pt",
                                         generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ours = guided.generate(pipeline.load_pipeline(path), prompts, seeds, "blurry", steps=8, guidance=7.5, ddim_eta=ddim_eta,
                        height=32, width=32)
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_lora_matches_diffusers_load_lora_weights(tiny_model, offsets):
    path, refs = tiny_model
    ref_pipe = diffusers_pipeline(path, refs)
    ref_pipe.load_lora_weights(offsets["eta"])
    ref = ref_pipe(["a green triangle"], num_inference_steps=6, guidance_scale=5.0, height=32, width=32,
                   output_type="pt", generator=[torch.Generator().manual_seed(0)]).images
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    ours = guided.generate(pipe, ["a green triangle"], [0], steps=6, guidance=5.0, height=32, width=32)
    assert (to01(ours) - ref).abs().max() <= ATOL


def two_unet_reference(path, refs, files, prompts, seeds, negative, steps, g, alpha, beta, scheduler=None):
    """Eq. 10 built independently from diffusers parts: two pipelines with the offsets at (1, 0) and (α, β) (on the
    UNet and, for LoRAs with text-encoder keys, on transformers' text encoder, which encodes c' at (α, β) and c at
    (1, 0)), DDIMScheduler or the given `scheduler`, two passes per step, run as StableDiffusionPipeline runs a
    scheduler: x_T · init_noise_sigma, the UNets on scale_model_input, the seeded generators passed to each step."""
    from diffusers import DDIMScheduler
    pipe_pos, pipe_neg = diffusers_pipeline(path, refs), diffusers_pipeline(path, refs)
    pipe_pos.load_lora_weights(files["eta"], adapter_name="eta")
    pipe_pos.fuse_lora(lora_scale=1.0)
    pipe_neg.load_lora_weights(files["eta"], adapter_name="eta")
    pipe_neg.load_lora_weights(files["delta"], adapter_name="delta")
    pipe_neg.set_adapters(["eta", "delta"], adapter_weights=[alpha, beta])
    scheduler = scheduler or DDIMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        pos, _ = pipe_pos.encode_prompt(prompts, "cpu", 1, False)
        neg, _ = pipe_neg.encode_prompt([negative] * len(prompts), "cpu", 1, False)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn((1, 4, 16, 16), generator=gen) for gen in gens]) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps_neg = pipe_neg.unet(x_in, t, neg).sample
            eps_pos = pipe_pos.unet(x_in, t, pos).sample
            x = scheduler.step(eps_neg + g * (eps_pos - eps_neg), t, x, generator=gens).prev_sample
        return to01(refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.3, 0.7)])
def test_npo_matches_two_unet_reference(tiny_model, offsets, alpha, beta):
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a yellow square"], [5, 9]
    ref = two_unet_reference(path, refs, offsets, prompts, seeds, "ugly", 6, 6.0, alpha, beta)
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    for mode in ("batched", "merged"):
        ours = guided.generate(pipe, prompts, seeds, "ugly", steps=6, guidance=6.0, alpha=alpha, beta=beta,
                            height=32, width=32, mode=mode)
        assert (to01(ours) - ref).abs().max() <= ATOL, mode
    # and δ does something: the same run without it differs visibly
    plain = guided.generate(pipe, prompts, seeds, "ugly", steps=6, guidance=6.0, alpha=1.0, beta=0.0, height=32, width=32)
    assert (to01(plain) - ref).abs().max() > 10 / 255


# stable-diffusion-v1-5's scheduler_config.json: it names no timestep_spacing, so DPM-Solver spaces by "linspace"
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


def dpm_scheduler(config):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(config)


@pytest.mark.parametrize("spacing, prediction, steps", [
    (None, "epsilon", 7), ("leading", "epsilon", 16), (None, "v_prediction", 5), ("leading", "v_prediction", 9),
    ("trailing", "epsilon", 4)])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_dpm_matches_stable_diffusion_pipeline(tiny_model, spacing, prediction, steps):
    """DPM-Solver++ (2M) pixels against StableDiffusionPipeline with DPMSolverMultistepScheduler.from_config: the
    SD1.5 config (linspace) or one naming its spacing, ε or v (the same random UNet read as a v-model), odd and
    even step counts below and above lower_order_final's 15."""
    path, refs = tiny_model
    config = {**SD15_SCHEDULER, "prediction_type": prediction, **({"timestep_spacing": spacing} if spacing else {})}
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref_pipe = diffusers_pipeline(path, refs)
    ref_pipe.scheduler = dpm_scheduler(config)
    ref = ref_pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                   negative_prompt=["blurry"] * 2, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    pipe = pipeline.load_pipeline(path)
    pipe.scheduler_config = config
    ours = guided.generate(pipe, prompts, seeds, "blurry", steps=steps, guidance=7.5, height=32, width=32,
                             sampler="dpmpp-2m")
    assert (to01(ours) - ref).abs().max() <= ATOL
    if spacing is None and prediction == "epsilon":  # and the reference tells the samplers apart
        ddim = guided.generate(pipe, prompts, seeds, "blurry", steps=steps, guidance=7.5, height=32, width=32)
        assert (to01(ddim) - ref).abs().max() > 100 * ATOL  # (measured 0.036: same model, near-converged paths)


@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_npo_with_dpm_matches_two_unet_reference(tiny_model, offsets):
    """NPO guidance is the sampler's denoiser: with DPM-Solver++ it equals the two-UNet reference stepped by
    DPMSolverMultistepScheduler."""
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a yellow square"], [5, 9]
    ref = two_unet_reference(path, refs, offsets, prompts, seeds, "ugly", 7, 6.0, 0.3, 0.7,
                             scheduler=dpm_scheduler(SD15_SCHEDULER))
    pipe = pipeline.load_pipeline(path)
    pipe.scheduler_config = SD15_SCHEDULER
    guided.load_offset(pipe, [(offsets["eta"], 1.0)], "eta")
    guided.load_offset(pipe, [(offsets["delta"], 1.0)], "delta")
    ours = guided.generate(pipe, prompts, seeds, "ugly", steps=7, guidance=6.0, alpha=0.3, beta=0.7, height=32,
                             width=32, sampler="dpmpp-2m")
    assert (to01(ours) - ref).abs().max() <= ATOL


def k_scheduler(name, config):
    """The diffusers scheduler each of our samplers matches, built with from_config as a user swaps it in."""
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    if name == "dpmpp-2m-karras":
        return DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)
    return {"euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler}[name].from_config(config)


@pytest.mark.parametrize("name, spacing, prediction, steps", [
    ("dpmpp-2m-karras", None, "epsilon", 7), ("dpmpp-2m-karras", "leading", "v_prediction", 16),
    ("euler-a", None, "epsilon", 6), ("euler-a", "leading", "v_prediction", 5), ("euler-a", "trailing", "epsilon", 4),
    ("euler", None, "epsilon", 6), ("euler", "leading", "v_prediction", 5)])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_k_samplers_match_stable_diffusion_pipeline(tiny_model, name, spacing, prediction, steps):
    """DPM++ 2M Karras, Euler a and Euler pixels against StableDiffusionPipeline with that scheduler from_config of
    the SD1.5 config (linspace, as the Euler schedulers default to when it names none) or one naming its spacing;
    Euler a's noise comes from the same per-image generators as the initial latents."""
    path, refs = tiny_model
    config = {**SD15_SCHEDULER, "prediction_type": prediction, **({"timestep_spacing": spacing} if spacing else {})}
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ref_pipe = diffusers_pipeline(path, refs)
    ref_pipe.scheduler = k_scheduler(name, config)
    ref = ref_pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=32, width=32,
                   negative_prompt=["blurry"] * 2, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    pipe = pipeline.load_pipeline(path)
    pipe.scheduler_config = config
    ours = guided.generate(pipe, prompts, seeds, "blurry", steps=steps, guidance=7.5, height=32, width=32,
                             sampler=name)
    assert (to01(ours) - ref).abs().max() <= ATOL
    if spacing is None:  # and the reference tells the samplers apart
        other = "euler" if name != "euler" else "dpmpp-2m"
        theirs = guided.generate(pipe, prompts, seeds, "blurry", steps=steps, guidance=7.5, height=32, width=32,
                                   sampler=other)
        assert (to01(theirs) - ref).abs().max() > 100 * ATOL


@pytest.mark.parametrize("name", ["dpmpp-2m-karras", "euler-a", "euler"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_npo_with_k_samplers_matches_two_unet_reference(tiny_model, offsets, name):
    """NPO guidance (eq. 10, α = 0.3, β = 0.7) with each new sampler equals the two-UNet reference stepped by the
    matching diffusers scheduler (Euler a drawing its noise from the same generators)."""
    path, refs = tiny_model
    prompts, seeds = ["a red circle", "a yellow square"], [5, 9]
    ref = two_unet_reference(path, refs, offsets, prompts, seeds, "ugly", 6, 6.0, 0.3, 0.7,
                             scheduler=k_scheduler(name, SD15_SCHEDULER))
    pipe = pipeline.load_pipeline(path)
    pipe.scheduler_config = SD15_SCHEDULER
    guided.load_offset(pipe, [(offsets["eta"], 1.0)], "eta")
    guided.load_offset(pipe, [(offsets["delta"], 1.0)], "delta")
    for mode in ("batched", "merged"):
        ours = guided.generate(pipe, prompts, seeds, "ugly", steps=6, guidance=6.0, alpha=0.3, beta=0.7, height=32,
                                 width=32, sampler=name, mode=mode)
        assert (to01(ours) - ref).abs().max() <= ATOL, mode


@pytest.mark.parametrize("name", ["euler", "euler-a"])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_euler_on_sdxl_matches_stable_diffusion_xl_pipeline(tiny_sdxl, name):
    """SDXL ships an EulerDiscreteScheduler config ("leading", steps_offset 1: x_T scaled by √(σ_max² + 1)); Euler and
    Euler a built from it as it is, against StableDiffusionXLPipeline."""
    from conftest import diffusers_sdxl_pipeline
    path, refs = tiny_sdxl
    ref_pipe = diffusers_sdxl_pipeline(path, refs)
    ref_pipe.scheduler = k_scheduler(name, ref_pipe.scheduler.config)
    ref = ref_pipe("a red circle", num_inference_steps=5, height=32, width=32, negative_prompt="blurry",
                   guidance_scale=5.0, output_type="pt", generator=[torch.Generator().manual_seed(2)]).images
    ours = guided.generate(pipeline.load_pipeline(path), ["a red circle"], [2], "blurry", steps=5, height=32,
                             width=32, sampler=name)
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_npo_multipliers_are_eq_10():
    m = guided.npo_multipliers(2, 0.25, 0.75)
    assert m["eta"].tolist() == [0.25, 0.25, 1.0, 1.0] and m["delta"].tolist() == [0.75, 0.75, 0.0, 0.0]
    m = guided.npo_multipliers(2, [0.0, 1.0], [0.5, 1.0])  # one (α, β) per image: a sweep in one batch
    assert m["eta"].tolist() == [0.0, 1.0, 1.0, 1.0] and m["delta"].tolist() == [0.5, 1.0, 0.0, 0.0]


def test_npo_weights_are_eq_10():
    """ε_neg = ε(x_t, c'; θ + α·η + β·δ), ε_pos = ε(x_t, c; θ + η): per offset, (unconditional, conditional)."""
    w = sampler.npo_weights(0.25, 0.75)
    assert w == {"eta": (0.25, 1.0), "delta": (0.75, 0.0)}
    assert sampler.npo_branch(w, 0) == {"eta": 0.25, "delta": 0.75} and sampler.npo_branch(w, 1) == {"eta": 1, "delta": 0}
    assert sampler.npo_weights() == {"eta": (1.0, 1.0), "delta": (1.0, 0.0)}  # the authors' default α = β = 1


def test_every_guided_path_takes_its_weights_from_npo_weights(tiny_model, offsets, monkeypatch):
    """sampler.npo_weights is the one statement of eq. 10: with the rule changed (here its branches swapped), the
    batched rows, the two merged weight sets, guidance g <= 1 (the conditional branch alone) and a fine-tuned η all
    change with it, and batched and merged still agree."""
    pipe = pipeline.load_pipeline(tiny_model[0])
    guided.load_offset(pipe, [(offsets["eta"], 1.0)], "eta")
    guided.load_offset(pipe, [(offsets["delta"], 1.0)], "delta")
    dense = pipeline.load_pipeline(tiny_model[0])
    guided.load_offset(dense, [(offsets["delta"], 1.0)], "delta")
    guided.attach_eta_model(dense, tiny_model[0], 0.5)  # θ_ft = θ: what matters here is where δ runs
    kw = dict(steps=2, height=16, width=16, alpha=0.5, beta=0.8)

    def every_path():
        return [guided.generate(pipe, ["a circle"], [1], guidance=5.0, mode="batched", **kw),
                guided.generate(pipe, ["a circle"], [1], guidance=5.0, mode="merged", **kw),
                guided.generate(pipe, ["a circle"], [1], guidance=1.0, **kw),
                guided.generate(dense, ["a circle"], [1], guidance=5.0, **kw)]
    eq_10 = every_path()
    rule = sampler.npo_weights
    monkeypatch.setattr(sampler, "npo_weights", lambda alpha=1.0, beta=1.0: {
        name: (cond, uncond) for name, (uncond, cond) in rule(alpha, beta).items()})
    swapped = every_path()
    for images in (eq_10, swapped):
        assert (images[0] - images[1]).abs().max() <= 2 * ATOL
    for before, after in zip(eq_10, swapped):
        assert (before - after).abs().max() > 100 * ATOL


def test_sweep_rows_equal_single_runs(tiny_model, offsets):
    """Per-image (α, β) in one batch gives what separate runs at each (α, β) give."""
    pipe = pipeline.load_pipeline(tiny_model[0])
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    kw = dict(steps=4, guidance=5.0, height=32, width=32)
    both = guided.generate(pipe, ["a circle"] * 2, [1, 1], alpha=[0.0, 1.0], beta=[1.0, 0.5], **kw)
    for i, (a, b) in enumerate([(0.0, 1.0), (1.0, 0.5)]):
        one = guided.generate(pipe, ["a circle"], [1], alpha=a, beta=b, **kw)
        assert (both[i] - one[0]).abs().max() <= 2 * ATOL


# ---- the command line --------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "npo.py"), "sample", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_writes_pngs_equal_to_generate(tiny_model, offsets, tmp_path):
    path, _ = tiny_model
    r = run_cli("--model", path, "--prompt", "a red circle", "--lora", offsets["eta"], "--npo", offsets["delta"],
                "--alpha", "0.5", "--steps", "4", "--n", "2", "--batch-size", "2", "--height", "32", "--width", "32",
                "--seed", "7", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["00000-seed7.png", "00001-seed8.png"]
    assert "step 4/4" in r.stderr and "ETA" in r.stderr
    image = Image.open(tmp_path / "00001-seed8.png")
    params = image.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: \nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 8, Size: 32x32")
    assert 'Lora: "eta.safetensors:1"' in params and "NPO: delta.safetensors" in params and "NPO alpha: 0.5" in params
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    expected = images.to_pil(guided.generate(pipe, ["a red circle"], [8], steps=4, alpha=0.5, height=32, width=32))[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def cells(grid, rows, cols, size=32):
    """The rows x cols pictures of a labelled grid (images.labelled_grid puts them in its bottom-right corner)."""
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    top, left = pixels.shape[0] - rows * size, pixels.shape[1] - cols * size
    return [[pixels[top + i * size:top + (i + 1) * size, left + j * size:left + (j + 1) * size] for j in range(cols)]
            for i in range(rows)]


def ink(picture):
    """How much black a picture holds: Σ (255 − gray) over its pixels (white cells hold none)."""
    return (255 - np.asarray(picture.convert("L")).astype(np.int64)).sum()


MISSING = "\U0010fffd"  # a private-use code point that no font maps: drawn as the font's missing-glyph box


@pytest.mark.parametrize("system_fonts", [True, False])
def test_grid_labels_draw_greek_letters(monkeypatch, system_fonts):
    """α and β are drawn as letters, not as the font's missing-glyph box: a label of α differs from the same label
    of a code point no font has. Without a system font that has them, they are spelled out."""
    if not system_fonts:
        monkeypatch.setattr(images, "GREEK_FONTS", ())
        images.label_font.cache_clear()  # the font is chosen again, without the system's fonts
    cells = [Image.new("RGB", (64, 64), "white")] * 2

    def grid(a, b):
        return np.asarray(images.labelled_grid(cells, 2, 1, [f"{a}=0", f"{a}=1"], [f"{b}=0.5"]).convert("L"))
    missing = grid(MISSING, MISSING)
    for greek in (grid("α", "β"), grid("α", MISSING), grid(MISSING, "β")):
        assert greek.shape != missing.shape or (greek != missing).any()
    if not system_fonts:
        images.label_font.cache_clear()  # forget the choice made without them


@pytest.mark.parametrize("title", [None, "a photograph of an astronaut riding a horse on the moon, highly detailed, "
                                         "trending on artstation, by greg rutkowski and alphonse mucha"])
def test_grid_labels_are_never_cut(title):
    """A label longer than its 64-pixel column (--compare's) keeps all its ink inside its own column, as much as when
    the column is wide enough for it; so does a long title inside the picture."""
    labels = ["without NPO", "with NPO (α=0.75, β=0.25)"]
    narrow, wide = [images.labelled_grid([Image.new("RGB", (w, 64), "white")] * 2, 1, 2, (),
                                         [] if title else labels, title) for w in (64, 4000)]
    if title:
        assert ink(narrow) == pytest.approx(ink(wide), rel=0.03) and ink(wide) > 0
        return
    for j in range(2):  # label j's band cell: above the pictures, over column j (the cells fill the bottom right)
        band = [g.crop((j * g.width // 2, 0, (j + 1) * g.width // 2, g.height - 64)) for g in (narrow, wide)]
        assert ink(band[0]) == pytest.approx(ink(band[1]), rel=0.03) and ink(band[1]) > 0, labels[j]


def single(path, offsets, prompt, seed, alpha, beta):
    """One picture made on its own: what every cell of a grid must show."""
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    out = guided.generate(pipe, [prompt], [seed], steps=2, alpha=alpha, beta=beta, height=32, width=32)
    return images.to_uint8(out)[0].astype(int)


def test_cli_compare_and_sweep_cells_equal_single_runs(tiny_model, offsets, tmp_path):
    path, _ = tiny_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a blue square"}\n')
    common = ["sample", "--model", path, "--prompts-file", str(prompts), "--lora", offsets["eta"], "--npo",
              offsets["delta"], "--steps", "2", "--height", "32", "--width", "32", "--seed", "4"]
    # batches of 3 cut across prompts and rows; a cell may differ from its single run by float rounding: 1 level
    assert npo.main([*common, "--sweep-alpha", "0,1", "--sweep-beta", "0,0.5,1", "--batch-size", "3",
                     "--out", str(tmp_path / "sw")]) == 0
    assert sorted(os.listdir(tmp_path / "sw")) == ["sweep-0000.png", "sweep-0001.png"]
    for k, prompt in enumerate(["a red circle", "a blue square"]):
        grid = cells(Image.open(tmp_path / "sw" / f"sweep-{k:04d}.png"), 2, 3)
        for i, a in enumerate([0.0, 1.0]):
            for j, b in enumerate([0.0, 0.5, 1.0]):
                assert np.abs(grid[i][j] - single(path, offsets, prompt, 4, a, b)).max() <= 1, (prompt, a, b)
    assert npo.main([*common, "--compare", "--alpha", "0.5", "--batch-size", "2", "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(os.listdir(tmp_path / "cmp")) == ["compare-0000-seed4.png", "compare-0001-seed5.png"]
    for k, prompt in enumerate(["a red circle", "a blue square"]):
        (without, with_npo), = cells(Image.open(tmp_path / "cmp" / f"compare-{k:04d}-seed{4 + k}.png"), 1, 2)
        assert np.abs(without - single(path, offsets, prompt, 4 + k, 1.0, 0.0)).max() <= 1
        assert np.abs(with_npo - single(path, offsets, prompt, 4 + k, 0.5, 1.0)).max() <= 1


def test_compile_in_merged_mode(tiny_model, offsets, tmp_path, monkeypatch):
    """--compile --mode merged builds the two weight sets from the module inside torch.compile's wrapper. (The eager
    backend keeps the test fast; the wrapper and its `_orig_mod.` keys are the same under every backend.)"""
    path, _ = tiny_model
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    assert npo.main(["sample", "--model", path, "--lora", offsets["eta"], "--npo", offsets["delta"], "--mode", "merged",
                     "--compile", "--steps", "2", "--height", "32", "--width", "32", "--seed", "3", "--beta", "0.5",
                     "--out", str(tmp_path / "c.png")]) == 0
    picture = np.asarray(Image.open(tmp_path / "c.png").convert("RGB")).astype(int)
    assert np.abs(picture - single(path, offsets, "a red circle", 3, 1.0, 0.5)).max() <= 1


@pytest.mark.parametrize("args, words", [
    (["--height", "36"], "multiple of 8"),
    (["--width", "0"], "multiple of 8"),
    (["--steps", "0"], "at least 1"),
    (["--steps", "1001"], "training timesteps"),
    (["--npo", "/nonexistent/npo.safetensors"], "does not exist"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read"),
    (["--compare"], "--npo"),
    (["--sweep-alpha", "0,x"], "comma-separated"),
    (["--dtype", "float16"], "not supported on CPU"),
    (["--alpha", "0.5"], "--alpha weighs the offset given with --lora, and there is none"),
    (["--beta", "0.5"], "--beta weighs the offset given with --npo"),
    (["--sweep-alpha", "0,1"], "--sweep-alpha weighs the offset given with --lora"),
    (["--device", "cuda:99"], "--device cuda:99"),  # no CUDA here, or no 100th GPU
    (["--device", "tpu"], "is not a device"),
    (["--device", "meta"], "npo runs on cpu, cuda and mps devices"),
])
def test_cli_bad_input_exits_2(tiny_model, tmp_path, args, words):
    r = run_cli("--model", tiny_model[0], "--steps", "2", "--height", "32", "--width", "32",
                "--out", str(tmp_path / "o"), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr and r.stderr.count("\n") == 1  # one sentence, no traceback
    assert not (tmp_path / "o").exists()  # a failed run leaves no folder behind


def test_cli_warns_once_per_truncated_prompt_in_the_order_given(tiny_model, tmp_path):
    """Plain prompts past 77 tokens are truncated as diffusers truncates them: one warning per distinct prompt, in
    the prompts file's order, whatever order Python's string hashing would give a set of them."""
    long_b, long_a = ("red " * 80 + "b").strip(), ("blue " * 80 + "a").strip()
    (tmp_path / "p.txt").write_text("\n".join([long_b, long_a, long_b, "a red circle"]) + "\n")
    r = run_cli("--model", tiny_model[0], "--prompts-file", str(tmp_path / "p.txt"), "--steps", "1", "--height", "32",
                "--width", "32", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "tokens and is truncated" in line]
    assert len(warned) == 2 and "'red red" in warned[0] and "'blue blue" in warned[1], warned


def test_cli_empty_prompts_file(tiny_model, tmp_path):
    (tmp_path / "p.txt").write_text("\n  \n")
    r = run_cli("--model", tiny_model[0], "--prompts-file", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no prompts" in r.stderr


def test_cli_unwritable_out(tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("--model", tiny_model[0], "--out", str(tmp_path / "file" / "sub"))
    assert r.returncode == 2 and "--out" in r.stderr
    r = run_cli("--model", tiny_model[0], "--n", "2", "--out", str(tmp_path / "one.png"))
    assert r.returncode == 2 and "pass a folder" in r.stderr


def test_cli_lora_that_does_not_fit(tiny_model, tmp_path):
    """A LoRA made for another model (other widths) is refused with the keys named, before sampling."""
    from conftest import make_model_dir
    other = tmp_path / "other"
    make_model_dir(str(other), unet_kwargs=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    pipe = pipeline.load_pipeline(str(other))
    lora.add_offset(pipe.unet, "eta", rank=2)
    lora.save_lora(pipe.unet, "eta", str(tmp_path / "wrong.safetensors"))
    r = run_cli("--model", tiny_model[0], "--lora", str(tmp_path / "wrong.safetensors"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "lora_unet_" in r.stderr and "Traceback" not in r.stderr


def test_cli_warnings(tiny_model, tmp_path, offsets):
    r = run_cli("--model", tiny_model[0], "--prompt", "word " * 100, "--npo", offsets["delta"], "--beta", "1.5",
                "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 0, r.stderr
    assert "truncated" in r.stderr and "outside [0, 1]" in r.stderr and (tmp_path / "x.png").exists()
