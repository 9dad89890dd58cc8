"""VADER (issue 21 §3): `npo.py train --method reward` on a video model. One micro-step's LoRA gradients against plain
autograd unrolled through diffusers' UNet3DConditionModel (the same LoRA file applied by hand), DDIMScheduler and
the VAE on the scored frames; --npo's sign; resuming; the flags a video run refuses."""
import pytest
import torch
from safetensors.torch import load_file

import npo
from conftest import random_lora_files
from npo import lora, machinery, method_reward, pipeline, rewards, trainconfig, trainflags
from npo.checkpoint import read_safetensors

PROMPTS = ["a red circle", "a blue square"]
FAST = ["--method", "reward", "--resolution", "16", "--log-every", "1", "--device", "cpu", "--guidance", "3",
        "--reward", "rewards:brightness"]
CLIP_REWARD = '''
import torch


def brightening(videos, prompts):
    """A reward of whole clips (B, F, 3, H, W) in [0, 1]: the frames' brightness weighted by their place in the clip,
    frame f by f + 1, so that the later frames count more."""
    weights = torch.arange(1, videos.shape[1] + 1, dtype=videos.dtype)
    return (videos.mean(dim=(2, 3, 4)) * weights).sum(1) / weights.sum()


brightening.video = True
'''


@pytest.fixture(scope="module")
def video_loras(tiny_video_dir, tmp_path_factory):
    """Random non-zero LoRA files on the tiny video UNet, written by our writer: η on VADER's targets (to_q, to_k,
    to_v of every spatial and temporal attention), δ on the default ones."""
    specs = [("eta", dict(alpha=2, targets=("to_q", "to_k", "to_v"))), ("delta", dict(alpha=2))]
    return random_lora_files(tiny_video_dir, str(tmp_path_factory.mktemp("video_loras")), specs, seed=20)


@pytest.fixture
def clip_reward(tmp_path, monkeypatch):
    """`--reward clip_reward:brightening`, a user's reward of whole clips, importable from the working folder."""
    (tmp_path / "clip_reward.py").write_text(CLIP_REWARD)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(CLIP_REWARD, namespace)
    return namespace["brightening"]


def our_gradients(model, files, prompts_file, tmp_path, flags):
    """One micro-step (batch 2) of `npo.py train --method reward` on a video model with the given offsets, all of
    them trainable: {(role, layer, "down"|"up"): grad}."""
    config = trainflags.parse_args(["--model", model, "--out", str(tmp_path / "unused"), "--prompts-file", prompts_file,
                                    "--batch-size", "2", *FAST, *flags])
    trainconfig.check(config)
    pipe = pipeline.load_pipeline(model)
    assert pipe.is_video
    for role, path in files.items():
        lora.load_lora(pipe.unet, path, role)
        for p in lora.parameters(pipe.unet, role):
            p.requires_grad_(True)
    run = machinery.Run(config, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files=files)
    method_reward.micro_step(run, PROMPTS)(0, 1.0)
    return {(role, layer, part): getattr(o, f"lora_{part}").weight.grad
            for role in files for layer, o in lora.offsets(pipe.unet, role).items() for part in ("down", "up")}


def lora_by_hand(unet, path, role, multiplier):
    """Our kohya LoRA file on a diffusers UNet, by hand: every Linear the file names computes
    y = W x + b + multiplier[role] · (alpha / r) · up · down · x, with `down` and `up` leaf tensors read from the file
    (their .grad is the reference gradient). The kohya name of a layer is its module path with "_" for ".".
    Returns {layer: {"down": tensor, "up": tensor}}."""
    tensors = load_file(path)
    linears = {"lora_unet_" + name.replace(".", "_"): name
               for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    leaves = {}
    for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up = (tensors[f"{stem}.lora_{part}.weight"].clone().requires_grad_(True) for part in ("down", "up"))
        scale = tensors[f"{stem}.alpha"].item() / down.shape[0]
        layer = unet.get_submodule(linears[stem])

        def forward(x, base=layer.forward, down=down, up=up, scale=scale):
            return base(x) + multiplier[role] * scale * (x @ down.t() @ up.t())
        layer.forward = forward
        leaves[linears[stem]] = {"down": down, "up": up}
    assert leaves, "the file names no layer of the UNet"
    return leaves


def reference_gradients(model, files, frames, scored, steps, k, guidance, neg_weights, pos_weights, clips=None):
    """The same micro-step from diffusers' parts: each example's prompt, x_T (1, C, F, h, w) and scored frames (a
    permutation's first `scored`, sorted) drawn from its generator in that order; DDIM (DDIMScheduler) with CFG as two
    forwards of UNet3DConditionModel, the LoRAs at `neg_weights` for ε_neg and `pos_weights` for ε_pos, the first
    steps − k under no_grad; each scored frame decoded alone; loss = −mean over videos of the frames' mean
    brightness (or of `clips`, a reward of the whole (1, F, 3, H, W) clip); a plain backward."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline
    pipe = TextToVideoSDPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet, vae, multiplier = pipe.unet, pipe.vae, {}
    leaves = {role: lora_by_hand(unet, path, role, multiplier) for role, path in files.items()}
    gens = [machinery.example_generator(0, j) for j in range(2)]
    chosen = [PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=g))] for g in gens]
    x = torch.cat([torch.randn((1, 4, frames, 8, 8), generator=g) for g in gens])
    picks = [torch.randperm(frames, generator=g)[:scored].sort().values for g in gens]
    with torch.no_grad():
        pos, _ = pipe.encode_prompt(chosen, "cpu", 1, False)
        neg, _ = pipe.encode_prompt([""] * 2, "cpu", 1, False)
    pipe.scheduler.set_timesteps(steps)
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.set_grad_enabled(i >= steps - k):
            multiplier.update(neg_weights)
            eps_neg = unet(x, t, neg).sample
            multiplier.update(pos_weights)
            eps_pos = unet(x, t, pos).sample
            x = pipe.scheduler.step(eps_neg + guidance * (eps_pos - eps_neg), t, x).prev_sample
    per_video = []
    for b in range(2):
        frames_b = [vae.decode(x[b:b + 1, :, f] / vae.config.scaling_factor).sample for f in picks[b].tolist()]
        images = (torch.cat(frames_b) / 2 + 0.5).clamp(0, 1)
        if clips is not None:
            per_video.append(clips(images[None], [chosen[b]])[0])
        else:
            per_video.append(rewards.brightness(images, [chosen[b]] * len(frames_b)).mean())
    (-torch.stack(per_video).mean()).backward()
    return leaves


def assert_gradients_equal(ours, ref):
    assert {(role, layer) for role, layer, _ in ours} == {(role, layer) for role in ref for layer in ref[role]}
    for (role, layer, part), g in ours.items():
        r = ref[role][layer][part].grad.view_as(g)
        assert r.abs().max() > 0, (role, layer, part)
        assert (g - r).abs().max() <= 1e-4 * r.abs().max() + 1e-12, (role, layer, part)


@pytest.mark.parametrize("frames, scored, steps, k, more", [(3, 1, 3, 1, []), (4, 2, 3, 2, ["--gradient-checkpointing"])])
def test_vader_gradient_equals_autograd_through_diffusers_unet3d(tiny_video_dir, video_loras, prompts_file, tmp_path,
                                                                 frames, scored, steps, k, more):
    """VADER's default (K = 1, one random frame), and K = 2 with two of four frames scored and every block of the
    UNet (spatial and temporal) checkpointed inside each checkpointed UNet call."""
    model, files = tiny_video_dir, {"eta": video_loras["eta"]}
    flags = ["--frames", str(frames), "--score-frames", str(scored), "--sample-steps", str(steps), "--grad-steps", str(k),
             *more]
    ours = our_gradients(model, files, prompts_file, tmp_path, flags)
    ref = reference_gradients(model, files, frames, scored, steps, k, 3.0, {"eta": 1.0}, {"eta": 1.0})
    assert_gradients_equal(ours, ref)


def test_a_reward_of_whole_clips_gets_every_frame_in_order(tiny_video_dir, video_loras, prompts_file, tmp_path,
                                                         clip_reward):
    """A reward marked `video = True` (shapes.video_reward) scores (B, F, 3, H, W): every frame decoded, in order."""
    model, files = tiny_video_dir, {"eta": video_loras["eta"]}
    flags = ["--frames", "3", "--sample-steps", "2", "--grad-steps", "1", "--reward", "clip_reward:brightening"]
    ours = our_gradients(model, files, prompts_file, tmp_path, flags)
    ref = reference_gradients(model, files, 3, 3, 2, 1, 3.0, {"eta": 1.0}, {"eta": 1.0}, clips=clip_reward)
    assert_gradients_equal(ours, ref)


def test_uncond_branch_gradients_on_video_equal_the_two_branch_computation(tiny_video_dir, video_loras, prompts_file,
                                                                          tmp_path):
    """DR-Video-NPO's reading, --train-branch uncond --lora ETA: η at α on ε_neg and 1 on ε_pos, δ at 1 and 0, on the
    5-D batch whose folds put each LoRA multiplier on its own video's rows. Both get gradients here, to check both
    multipliers."""
    model = tiny_video_dir
    flags = ["--frames", "3", "--score-frames", "2", "--sample-steps", "2", "--grad-steps", "1", "--train-branch",
             "uncond", "--lora", video_loras["eta"], "--alpha", "0.5"]
    ours = our_gradients(model, video_loras, prompts_file, tmp_path, flags)
    ref = reference_gradients(model, video_loras, 3, 2, 2, 1, 3.0, {"eta": 0.5, "delta": 1.0},
                              {"eta": 1.0, "delta": 0.0})
    assert_gradients_equal(ours, ref)


def test_npo_flips_the_gradient(tiny_video_dir, video_loras, prompts_file, tmp_path):
    """--npo maximizes 1 − R: from the same LoRA and the same streams, its gradient is exactly the negated one of R."""
    model = tiny_video_dir
    flags = ["--frames", "3", "--score-frames", "2", "--sample-steps", "2", "--grad-steps", "1"]
    plain = our_gradients(model, {"eta": video_loras["eta"]}, prompts_file, tmp_path, flags)
    negated = our_gradients(model, {"delta": video_loras["eta"]}, prompts_file, tmp_path, [*flags, "--npo"])
    assert len(plain) == len(negated) > 0
    for (_, layer, part), g in plain.items():
        assert g.abs().max() > 0 and torch.equal(negated[("delta", layer, part)], -g), (layer, part)


def test_video_reward_run_resumes_bit_for_bit(tiny_video_dir, prompts_file, tmp_path):
    model = tiny_video_dir
    flags = ["--frames", "3", "--score-frames", "2", "--sample-steps", "2", "--lr", "1e-3", "--batch-size", "2"]

    def run(out, *more):
        return npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(tmp_path / out),
                         *FAST, *flags, *more])
    assert run("whole", "--steps", "3") == 0
    assert run("split", "--steps", "2") == 0
    assert run("split", "--steps", "3", "--resume", "latest") == 0
    a, b = (read_safetensors(str(tmp_path / r / "lora.safetensors")) for r in ("whole", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("temp_attentions" in k for k in a)  # the temporal layers trained too


def test_video_flags_refused(tiny_model, tiny_video_dir, prompts_file, tmp_path, capsys, clip_reward):
    """--frames / --score-frames or a clip reward on an image model, more scored frames than frames, a zero,
    --score-frames with a clip reward: one sentence, exit 2, nothing left behind."""
    out = tmp_path / "never"

    def run(model, *flags):
        code = npo.main(["train", "--model", model, "--prompts-file", prompts_file, "--out", str(out), *FAST,
                         "--sample-steps", "2", "--steps", "1", *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and not out.exists(), err
        return err
    assert "image model" in run(tiny_model[0], "--score-frames", "1")
    assert "image model" in run(tiny_model[0], "--frames", "4")
    assert "--score-frames 5 exceeds --frames 4" in run(tiny_video_dir, "--frames", "4", "--score-frames", "5")
    assert "exceeds the 16 frames" in run(tiny_video_dir, "--score-frames", "17")
    assert "--frames must be at least 1" in run(tiny_video_dir, "--frames", "0")
    assert "scores videos, and" in run(tiny_model[0], "--reward", "clip_reward:brightening")
    assert "scores whole videos" in run(tiny_video_dir, "--reward", "clip_reward:brightening", "--score-frames", "2")
    assert "trains image models, and" in run(tiny_video_dir, "--method", "ddpo")
    assert "trains image models, and" in run(tiny_video_dir, "--method", "spo", "--spo-plain-steps", "1")
    assert "--score-frames does nothing with --method ddpo" in run(
        tiny_video_dir, "--score-frames", "1", "--method", "ddpo")


def test_videocrafter2_trains_on_the_video_its_sampler_makes(tmp_path, prompts_file, monkeypatch):
    """On VideoCrafter2 (test_videocrafter's tiny model.ckpt) the training sampler is sampling's: the frame rate in
    both branches' conditioning (the model's 28) and DDIM's x̂_0 rescale (use_scale). The video a training step
    decodes (all its frames scored) equals `sampler.sample("ddim", ...)` from the same x_T with the same guidance."""
    from test_videocrafter import vc2_file
    from npo import guided, sampler, video
    path, _ = vc2_file(str(tmp_path / "model.ckpt"))
    decoded = []
    decode = video.decode_frames
    monkeypatch.setattr(video, "decode_frames", lambda vae, z: decoded.append(z.detach().clone()) or decode(vae, z))
    config = trainflags.parse_args(["--model", path, "--out", str(tmp_path / "unused"), "--prompts-file", prompts_file,
                                    *FAST, "--frames", "2", "--score-frames", "2", "--sample-steps", "3"])
    trainconfig.check(config)
    pipe = pipeline.load_pipeline(path)
    lora.add_offset(pipe.unet, "eta", 4)
    run = machinery.Run(config, pipe, str(tmp_path), 0, 1, torch.device("cpu"), files={"eta": "lora.safetensors"})
    method_reward.micro_step(run, PROMPTS)(0, 1.0)
    g = machinery.example_generator(0, 0)
    prompt = PROMPTS[int(torch.randint(len(PROMPTS), (1,), generator=g))]
    x_T = torch.randn((1, 4, 2, 8, 8), generator=g)
    pos = pipe.conditioning([prompt])
    fps = {"fps": torch.tensor([28])}
    denoise = guided.npo_denoiser(pipe.unet, {**pipe.negative_conditioning(None, pos), **fps}, {**pos, **fps}, 3.0)
    with torch.no_grad():
        want = sampler.sample("ddim", denoise, x_T, pipe.scheduler_config, 3)
    assert pipe.scheduler_config["use_scale"] and pipe.default_fps == 28
    torch.testing.assert_close(decoded[0], want, rtol=1e-5, atol=1e-5)
