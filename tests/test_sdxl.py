"""SDXL end to end on a tiny SDXL-shaped model with random weights (conftest.TINY_SDXL_*), against diffusers'
StableDiffusionXLPipeline, two diffusers UNets with peft adapters, diffusers' LoRA loader and its SDXL Diffusion-DPO
script; and the published SDXL configs on the meta device."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from npo import checkpoint
from npo import clip
from npo import data
from npo import guided
from npo import images
from npo import lora
from npo import machinery
from npo import method_reward
import npo
from npo import pipeline
from npo import trainconfig
from npo import trainflags
from npo import unet
from npo.checkpoint import UserError
from conftest import diffusers_sdxl_pipeline, write_random_pairs

# Images in [0, 1]: same reasoning as test_sample.py (fp32 reordering noise ~1e-6, a visible change 4e-3).
ATOL = 1e-4


def to01(images):
    return (images / 2 + 0.5).clamp(0, 1)


def reference_images(ref, prompt, seed, steps, **kw):
    return ref(prompt, num_inference_steps=steps, output_type="pt", generator=torch.Generator("cpu").manual_seed(seed),
               **kw).images


# ----------------------------------------------------------------------------------------------------------
# The parts.

def test_parts_match_references(tiny_sdxl):
    from transformers import CLIPTokenizer
    path, refs = tiny_sdxl
    pipe = pipeline.load_pipeline(path)
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt and pipe.vae.scaling_factor == 0.13025
    assert pipe.default_guidance == 5.0 and pipe.image_size == 16
    prompts = ["a red circle", "", "wow!! an astronaut riding a horse, 4k"]
    ids = pipe.tokenizer_2(prompts)
    assert ids.tolist() == CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))(
        prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[1, 2:].eq(0).all() and pipe.tokenizer(prompts)[1, 2:].eq(49407).all()  # "!" pads, not EOS
    ref = diffusers_sdxl_pipeline(path, refs)
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        ours, ours_pooled = pipe.encode_sdxl(prompts)
        assert context.shape == ours.shape == (3, 77, 80) and pooled.shape == ours_pooled.shape == (3, 24)
        torch.testing.assert_close(ours, context, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_pooled, pooled, rtol=1e-5, atol=1e-5)
        x, time_ids = torch.randn(3, 4, 8, 8), torch.tensor([[64, 48, 4, 8, 16, 16]] * 3)
        expected = refs["unet"](x, 981, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = pipe.unet(x, 981, context, text_embeds=pooled, time_ids=time_ids)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        pipe.unet(x, 981, context)


@pytest.mark.parametrize("negative", [None, "", "blurry"])
def test_pixels_match_stable_diffusion_xl_pipeline(tiny_sdxl, negative):
    """DDIM from the folder's (Euler) scheduler config; no negative prompt is zeros (force_zeros_for_empty_prompt),
    an explicit "" is the encoded empty prompt."""
    path, refs = tiny_sdxl
    ref = reference_images(diffusers_sdxl_pipeline(path, refs), "a red circle", 3, 5, height=32, width=32,
                           negative_prompt=negative)
    pipe = pipeline.load_pipeline(path)
    ours = guided.generate(pipe, ["a red circle"], [3], negative, steps=5, height=32, width=32)
    assert (to01(ours) - ref).abs().max() <= ATOL
    if negative is None:  # the zeros are not the empty prompt: "" gives another image
        empty = guided.generate(pipe, ["a red circle"], [3], "", steps=5, height=32, width=32)
        assert (to01(empty) - ref).abs().max() > 10 / 255


def test_size_conditioning_and_force_zeros_off(tiny_sdxl, tmp_path):
    path, refs = tiny_sdxl
    sizes = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(24, 24))
    ref = reference_images(diffusers_sdxl_pipeline(path, refs), "a cat", 1, 4, height=32, width=40,
                           guidance_scale=3.0, **sizes)
    pipe = pipeline.load_pipeline(path)
    kw = dict(steps=4, guidance=3.0, height=32, width=40)
    ours = guided.generate(pipe, ["a cat"], [1], original_size=(64, 48), crop_top_left=(4, 8), target_size=(24, 24), **kw)
    assert (to01(ours) - ref).abs().max() <= ATOL
    assert (to01(guided.generate(pipe, ["a cat"], [1], **kw)) - ref).abs().max() > 10 / 255  # the sizes matter

    copy_path = tmp_path / "model"  # force_zeros_for_empty_prompt false: no negative prompt is the empty prompt
    shutil.copytree(path, copy_path)
    (copy_path / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    ref = reference_images(diffusers_sdxl_pipeline(path, refs, force_zeros=False), "a cat", 1, 4, height=32, width=40,
                           guidance_scale=3.0)
    ours = guided.generate(pipeline.load_pipeline(str(copy_path)), ["a cat"], [1], **kw)
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_half_precision_keeps_a_force_upcast_vae_in_float32(tiny_sdxl, tmp_path):
    path, _ = tiny_sdxl
    pipe = pipeline.load_pipeline(path, dtype=torch.bfloat16)
    assert next(pipe.unet.parameters()).dtype == next(pipe.text_encoder_2.parameters()).dtype == torch.bfloat16
    assert next(pipe.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows in fp16: it decodes in fp32
    assert torch.isfinite(guided.generate(pipe, ["a cat"], [0], steps=2, height=16, width=16)).all()
    copy_path = tmp_path / "model"  # the fp16-fix VAE says force_upcast false and runs in the model's dtype
    shutil.copytree(path, copy_path)
    cfg = json.loads((copy_path / "vae" / "config.json").read_text())
    (copy_path / "vae" / "config.json").write_text(json.dumps(dict(cfg, force_upcast=False)))
    assert next(pipeline.load_pipeline(str(copy_path), dtype=torch.bfloat16).vae.parameters()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# NPO (eq. 10) against two diffusers SDXL UNets with peft adapters.

def peft_offsets(refs, folder):
    """Random peft adapters η (attention) and δ (attention and resnet convs) on diffusers' SDXL UNet, saved by
    diffusers (`save_lora_adapter`); returns the files and the UNet carrying both."""
    from peft import LoraConfig
    model = copy.deepcopy(refs["unet"])
    targets = {"eta": ["to_q", "to_k", "to_v", "to_out.0"], "delta": ["to_q", "to_v", "conv1"]}
    g, files = torch.Generator().manual_seed(7), {}
    for name, modules in targets.items():
        model.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=modules, init_lora_weights=False), name)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f"lora_B.{name}." in key or f"lora_A.{name}." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5)
        model.save_lora_adapter(str(folder / name), adapter_name=name)
        files[name] = str(folder / name / "pytorch_lora_weights.safetensors")
    return files, model


def two_unet_reference(path, refs, model, negative, alpha, beta, g, steps, seed):
    """Eq. 10 from diffusers parts: ε_pos from one UNet with η at 1, ε_neg from another with η at α and δ at β,
    conditioning from StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids, DDIMScheduler, the VAE."""
    from diffusers import DDIMScheduler
    unet_pos, unet_neg = copy.deepcopy(model), copy.deepcopy(model)
    unet_pos.set_adapters(["eta", "delta"], weights=[1.0, 0.0])
    unet_neg.set_adapters(["eta", "delta"], weights=[alpha, beta])
    pipe = diffusers_sdxl_pipeline(path, refs)
    scheduler = DDIMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt("a red circle", device="cpu", negative_prompt=negative)
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), pos.dtype, text_encoder_projection_dim=24)
        x = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            eps_neg = unet_neg(x, t, neg, added_cond_kwargs={"text_embeds": neg_pooled, "time_ids": time_ids}).sample
            eps_pos = unet_pos(x, t, pos, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
            x = scheduler.step(eps_neg + g * (eps_pos - eps_neg), t, x).prev_sample
        return to01(refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample)


@pytest.mark.parametrize("negative, alpha, beta", [(None, 0.3, 0.7), ("ugly", 1.0, 1.0)])
def test_npo_matches_two_unet_reference(tiny_sdxl, tmp_path, negative, alpha, beta):
    path, refs = tiny_sdxl
    files, model = peft_offsets(refs, tmp_path)
    ref = two_unet_reference(path, refs, model, negative, alpha, beta, 6.0, 5, 11)
    pipe = pipeline.load_pipeline(path)
    lora.load_lora(pipe.unet, files["eta"], "eta")
    lora.load_lora(pipe.unet, files["delta"], "delta")
    for mode in ("batched", "merged"):
        ours = guided.generate(pipe, ["a red circle"], [11], negative, steps=5, guidance=6.0, alpha=alpha,
                                 beta=beta, height=32, width=32, mode=mode)
        assert (to01(ours) - ref).abs().max() <= ATOL, mode
    plain = guided.generate(pipe, ["a red circle"], [11], negative, steps=5, guidance=6.0, alpha=1.0, beta=0.0,
                              height=32, width=32)
    assert (to01(plain) - ref).abs().max() > 10 / 255  # δ does something


# ----------------------------------------------------------------------------------------------------------
# LoRA files: kohya's SDXL form (SGM names) written, read in both key styles, loaded by diffusers.

def random_offset(model, targets, seed=3):
    """A random η, frozen as a loaded one is (torch's matmul folds a 3-D input only for frozen weights: a float
    reordering, but bit-equality between the two needs the same path)."""
    lora.add_offset(model, "eta", rank=4, alpha=2, targets=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters(model, "eta"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p[0].numel() ** 0.5).requires_grad_(False)


def unet_inputs(pipe):
    c = pipe.conditioning(["a cat", "a dog"], pipe.time_ids(16, 16))
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700]), c


def test_written_sdxl_lora_loads_in_diffusers_in_both_key_styles(tiny_sdxl, tmp_path):
    path, refs = tiny_sdxl
    pipe = pipeline.load_pipeline(path)
    targets = ("to_q,to_k,to_v,to_out.0,proj_in,ff.net.2,conv1,conv_shortcut,time_emb_proj,"
               "downsamplers.0.conv,upsamplers.0.conv")
    random_offset(pipe.unet, targets)
    file = str(tmp_path / "sgm.safetensors")
    lora.save_lora(pipe.unet, "eta", file, role="eta")
    with safe_open(file, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert {"lora_unet_input_blocks_3_0_op.alpha", "lora_unet_output_blocks_2_2_conv.alpha",
            "lora_unet_middle_block_2_in_layers_2.alpha", "lora_unet_output_blocks_3_0_skip_connection.alpha"} <= keys

    x, t, c = unet_inputs(pipe)
    with torch.no_grad():
        ours = pipe.unet(x, t, **c)
        base = refs["unet"](x, t, c["encoder_hidden_states"], added_cond_kwargs={
            "text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}).sample
    assert (ours - base).abs().max() > 0.01 * base.abs().max()  # the offset changes the output
    # the same offsets under diffusers-style kohya names (`lora_unet_down_blocks_1_attentions_0_...`)
    diffusers_style = str(tmp_path / "diffusers_style.safetensors")
    save_file({f"{lora.kohya_name(layer)}.{k}": v.contiguous() for layer, o in lora.offsets(pipe.unet, "eta").items()
               for k, v in o.state_dict().items()}, diffusers_style)
    for f in (file, diffusers_style):
        ref = diffusers_sdxl_pipeline(path, refs)
        ref.load_lora_weights(f)
        other = pipeline.load_pipeline(path)
        lora.load_lora(other.unet, f, "eta")
        with torch.no_grad():
            expected = ref.unet(x, t, c["encoder_hidden_states"], added_cond_kwargs={
                "text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}).sample
            assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max(), f
            assert torch.equal(other.unet(x, t, **c), ours), f


# ----------------------------------------------------------------------------------------------------------
# Training: the first DPO step against diffusers' SDXL Diffusion-DPO script; the trained LoRA in diffusers' pipeline.

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two pairs of random 20x24 (W x H) images: resized to 16x19, center-cropped at top 2."""
    return write_random_pairs(tmp_path_factory.mktemp("sdxl_pairs"), 2, seed=1)


def train_run(model, pairs, out, *flags):
    return npo.main(["train", "--model", model, "--data", pairs, "--out", str(out), "--resolution", "16",
                     "--log-every", "1", "--device", "cpu", *flags])


def script_time_ids(image_path, resolution):
    """train_diffusion_dpo_sdxl.py's compute_time_ids: original (H, W), the center crop's (y1, x1) after resizing
    the short side to the resolution, target (R, R)."""
    w, h = Image.open(image_path).size
    new_h, new_w = (int(resolution * h / w), resolution) if w <= h else (resolution, int(resolution * w / h))
    y1, x1 = max(0, int(round((new_h - resolution) / 2.0))), max(0, int(round((new_w - resolution) / 2.0)))
    return torch.tensor([[h, w, y1, x1, resolution, resolution]], dtype=torch.float32)


@pytest.mark.parametrize("swap", [False, True])
def test_first_dpo_step_matches_diffusers_sdxl_script(tiny_sdxl, pairs, tmp_path, swap):
    """The script's step with its β' = 2·β (L = −log σ(−0.5·β'·(d_θ − d_ref))), time ids, float32 VAE encode."""
    from diffusers import DDPMScheduler
    model, refs = tiny_sdxl
    init = str(tmp_path / "init.safetensors")
    pipe = pipeline.load_pipeline(model)
    random_offset(pipe.unet, lora.DEFAULT_TARGETS, seed=4)
    lora.save_lora(pipe.unet, "eta", init)
    assert train_run(model, pairs, tmp_path / "run", "--init-lora", init, "--steps", "1", "--beta-dpo", "10",
                     *["--npo"] * swap) == 0
    ours = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if '"loss"' in line][0]

    ref = diffusers_sdxl_pipeline(model, refs)
    ref.load_lora_weights(init)
    scheduler = DDPMScheduler.from_pretrained(os.path.join(model, "scheduler"))
    prompts, x_w, x_l = next(data.batches(data.open_pairs(pairs), 1, seed=0, resolution=16))
    time_ids = script_time_ids(os.path.join(os.path.dirname(pairs), "0w.png"), 16).repeat(2, 1)  # all one size
    g = machinery.example_generator(0, 0)
    t = torch.randint(0, 1000, (1,), generator=g)
    eps, n = torch.randn((1, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    with torch.no_grad():
        posterior = refs["vae"].float().encode(torch.cat([x_w, x_l])).latent_dist
        z = (posterior.mean + posterior.std * n) * refs["vae"].config.scaling_factor
        z = z.flip(0) if swap else z
        z_t = scheduler.add_noise(z, eps.repeat(2, 1, 1, 1), t.repeat(2))
        context, _, pooled, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        added = {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids}
        model_pred = ref.unet(z_t, t.repeat(2), context.repeat(2, 1, 1), added_cond_kwargs=added).sample
        ref.unet.disable_lora()
        ref_pred = ref.unet(z_t, t.repeat(2), context.repeat(2, 1, 1), added_cond_kwargs=added).sample
    mse = F.mse_loss(model_pred, eps.repeat(2, 1, 1, 1), reduction="none").mean(dim=(1, 2, 3))
    ref_mse = F.mse_loss(ref_pred, eps.repeat(2, 1, 1, 1), reduction="none").mean(dim=(1, 2, 3))
    loss = -F.logsigmoid(-0.5 * 20 * ((mse[0] - mse[1]) - (ref_mse[0] - ref_mse[1])))
    assert ours["loss"] == pytest.approx(loss.item(), rel=1e-4)
    assert ours["mse_w"] == pytest.approx(mse[0].item(), rel=1e-4)
    assert ours["ref_mse_l"] == pytest.approx(ref_mse[1].item(), rel=1e-4)
    assert 0.05 < ours["loss"] < 5  # in the loss's sensitive range


def test_trained_lora_loads_in_diffusers_sdxl_pipeline(tiny_sdxl, pairs, tmp_path):
    model, refs = tiny_sdxl
    assert train_run(model, pairs, tmp_path / "run", "--steps", "1", "--lr", "3e-2") == 0
    # resumed from its checkpoint (SGM-named LoRA keys) for a second step
    assert train_run(model, pairs, tmp_path / "run", "--steps", "2", "--lr", "3e-2", "--resume", "latest") == 0
    path = str(tmp_path / "run" / "lora.safetensors")
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    pipe = pipeline.load_pipeline(model)
    lora.load_lora(pipe.unet, path, "eta")
    ours = guided.generate(pipe, ["a red circle"], [2], steps=4, height=32, width=32)
    ref_pipe = diffusers_sdxl_pipeline(model, refs)
    base = reference_images(ref_pipe, "a red circle", 2, 4, height=32, width=32)
    ref_pipe.load_lora_weights(path)
    ref = reference_images(ref_pipe, "a red circle", 2, 4, height=32, width=32)
    assert (to01(ours) - ref).abs().max() <= ATOL
    assert (ref - base).abs().max() > 1 / 255  # the trained offset changes the image


def test_reward_step_gradient_equals_autograd_through_diffusers(tiny_sdxl, tmp_path):
    """DRaFT-K on SDXL: one step's LoRA gradient (η on both branches, the negative branch SDXL's zeros, time ids of
    the training resolution) against plain autograd through diffusers' UNet with a peft adapter."""
    from diffusers import DDIMScheduler
    from npo import rewards
    model, refs = tiny_sdxl
    files, peft_model = peft_offsets(refs, tmp_path)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red circle\n")
    args = trainflags.parse_args(["--model", model, "--out", str(tmp_path / "unused"), "--method", "reward", "--reward",
                             "rewards:brightness", "--prompts-file", str(prompts_file), "--resolution", "16",
                             "--device", "cpu", "--sample-steps", "2", "--grad-steps", "1", "--guidance", "3"])
    trainconfig.check(args)
    pipe = pipeline.load_pipeline(model)
    lora.load_lora(pipe.unet, files["eta"], "eta")
    for p in lora.parameters(pipe.unet, "eta"):
        p.requires_grad_(True)
    run = machinery.Run(args, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files={"eta": "lora.safetensors"})
    method_reward.micro_step(run, ["a red circle"])(0, 1.0)

    peft_model.set_adapters(["eta", "delta"], weights=[1.0, 0.0])
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name and ".eta." in name)
    ref = diffusers_sdxl_pipeline(model, refs)
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = ref.encode_prompt("a red circle", device="cpu")  # negative: zeros
    cond = dict(encoder_hidden_states=torch.cat([neg, pos]), added_cond_kwargs={
        "text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.tensor([[16, 16, 0, 0, 16, 16]] * 2)})
    scheduler = DDIMScheduler.from_pretrained(os.path.join(model, "scheduler"))
    scheduler.set_timesteps(2)
    g = machinery.example_generator(0, 0)  # the example's draws as training makes them: its prompt, then x_T
    torch.randint(1, (1,), generator=g)
    x = torch.randn((1, 4, 8, 8), generator=g)
    for i, t in enumerate(scheduler.timesteps):
        with torch.set_grad_enabled(i >= 1):
            eps_neg, eps_pos = peft_model(torch.cat([x, x]), t, **cond).sample.chunk(2)
            x = scheduler.step(eps_neg + 3 * (eps_pos - eps_neg), t, x).prev_sample
    images = to01(refs["vae"].decode(x / refs["vae"].config.scaling_factor).sample)
    (-rewards.brightness(images, ["a red circle"]).mean()).backward()
    for layer, o in lora.offsets(pipe.unet, "eta").items():
        for ours, part in ((o.lora_down.weight.grad, "lora_A"), (o.lora_up.weight.grad, "lora_B")):
            expected = getattr(peft_model.get_submodule(layer), part)["eta"].weight.grad.view_as(ours)
            assert (ours - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-12, (layer, part)


# ----------------------------------------------------------------------------------------------------------
# The command line and bad input.

def test_cli_sample_equals_generate_with_sdxl_defaults(tiny_sdxl, tmp_path):
    path, _ = tiny_sdxl
    out = tmp_path / "image.png"
    flags = ["--model", path, "--prompt", "a cat", "--steps", "3", "--height", "16", "--width", "16", "--seed", "4"]
    assert npo.main(["sample", *flags, "--original-size", "32", "24", "--crop-top-left", "2", "0", "--out", str(out)]) == 0
    image = Image.open(out)
    assert "CFG scale: 5.0" in image.text["parameters"]  # SDXL's default guidance
    expected = guided.generate(pipeline.load_pipeline(path), ["a cat"], [4], steps=3, height=16, width=16,
                                 original_size=(32, 24), crop_top_left=(2, 0))
    assert np.array_equal(np.array(image), np.array(images.to_pil(expected)[0]))


def test_dpm_solver_matches_stable_diffusion_xl_pipeline(tiny_sdxl):
    """--sampler dpmpp-2m on SDXL: DPMSolverMultistepScheduler.from_config of the folder's config, taken as it is
    (StableDiffusionXLPipeline does not apply StableDiffusionPipeline's fixes of old configs)."""
    from diffusers import DPMSolverMultistepScheduler
    path, refs = tiny_sdxl
    ref_pipe = diffusers_sdxl_pipeline(path, refs)
    ref_pipe.scheduler = DPMSolverMultistepScheduler.from_pretrained(os.path.join(path, "scheduler"))
    ref = reference_images(ref_pipe, "a red circle", 2, 6, height=32, width=32, negative_prompt="blurry")
    ours = guided.generate(pipeline.load_pipeline(path), ["a red circle"], [2], "blurry", steps=6, height=32,
                             width=32, sampler="dpmpp-2m")
    assert (to01(ours) - ref).abs().max() <= ATOL


def test_cli_refuses_what_sdxl_does_not_run(tiny_sdxl, tmp_path, capsys):
    """--clip-skip and SDXL text-encoder LoRA keys: one sentence each, exit 2."""
    path, _ = tiny_sdxl
    assert npo.main(["sample", "--model", path, "--clip-skip", "2", "--steps", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--clip-skip" in capsys.readouterr().err
    te = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 32),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 2)}, str(te))
    assert npo.main(["sample", "--model", path, "--lora", str(te), "--steps", "2", "--out", str(tmp_path / "b")]) == 2
    assert "lora_te1_" in capsys.readouterr().err


def test_cli_refuses_size_flags_for_sd15(tiny_model, tmp_path, capsys):
    assert npo.main(["sample", "--model", tiny_model[0], "--target-size", "64", "64", "--out", str(tmp_path)]) == 2
    assert "SDXL" in capsys.readouterr().err


def test_incomplete_or_mismatched_sdxl_folders(tiny_sdxl, tmp_path):
    path, _ = tiny_sdxl
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    shutil.rmtree(missing / "tokenizer_2")
    with pytest.raises(UserError, match="tokenizer_2/"):
        pipeline.load_pipeline(str(missing))
    refiner = tmp_path / "refiner"  # the refiner's added embedding: pooled + 5 time ids, which npo does not build
    shutil.copytree(path, refiner)
    cfg_path = refiner / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, projection_class_embeddings_input_dim=24 + 5 * 8)))
    sd = load_file(refiner / "unet" / "diffusion_pytorch_model.safetensors")
    sd["add_embedding.linear_1.weight"] = sd["add_embedding.linear_1.weight"][:, :64].contiguous()
    save_file(sd, refiner / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match="added embedding"):
        pipeline.load_pipeline(str(refiner))


# ----------------------------------------------------------------------------------------------------------
# The published SDXL base configs (values of stabilityai/stable-diffusion-xl-base-1.0, written here) on the meta
# device: our modules have diffusers' / transformers' exact keys and shapes.

SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True}
SDXL_TEXT = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
             "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
             "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
             "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
             "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float16",
             "vocab_size": 49408}
SDXL_TEXT_2 = dict(SDXL_TEXT, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                   intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_published_sdxl_configs_build_the_exact_keys_and_shapes(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = checkpoint.config_from_dict(unet.UNetConfig, SDXL_UNET, "sdxl", unet.UNET_NOOP_FIELDS)
    ours = checkpoint.build_on_meta(lambda: unet.UNet2DCondition(cfg))
    with torch.device("meta"):
        ref = UNet2DConditionModel.from_config(SDXL_UNET)
    assert shapes(ours) == shapes(ref)
    assert pipeline.count_parameters(ours) == 2_567_463_684  # SDXL base's UNet
    for config, ref_cls, projection, count in ((SDXL_TEXT, CLIPTextModel, False, 123_060_480),
                                               (SDXL_TEXT_2, CLIPTextModelWithProjection, True, 694_659_840)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        text_cfg = clip.read_text_config(str(tmp_path / "config.json"))
        cls = clip.CLIPTextModelWithProjection if projection else clip.CLIPTextModel
        ours = checkpoint.build_on_meta(lambda: cls(text_cfg))
        with torch.device("meta"):
            ref = ref_cls(CLIPTextConfig(**{k: v for k, v in config.items() if k != "architectures"}))
        expected = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
                    for k, v in shapes(ref).items() if not k.endswith("position_ids")}
        assert shapes(ours) == expected and pipeline.count_parameters(ours) == count
