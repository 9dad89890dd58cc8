"""VideoCrafter2: its pieces against references written here from the authors' formulas (AILab-CVC/VideoCrafter, lvdm/),
its key layout against an enumeration of their construction order (vc2_layout.py), a tiny synthetic model.ckpt
loaded and sampled, and the files npo refuses."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm
from benchmarks.ldm import ldm_open_clip, ldm_vae
import npo
from npo import guided
from npo import pipeline
from npo import sampler
from npo import video
from npo import videocrafter
from npo.checkpoint import UserError

import vc2_layout

# VideoCrafter2's layout at toy size: two levels (the first attends), one ResBlock each, heads of 16, a context of
# ldm's tiny SD2 text encoder (128); GroupNorm's 32 groups as lvdm hard-codes them
TINY = vc2_layout.Layout(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,),
                         num_head_channels=16, context_dim=128)


# ----------------------------------------------------------------------------------------------------------
# The x̂0 rescale: lvdm's DDIMSampler (lvdm/models/samplers/ddim.py, lvdm/models/utils_diffusion.py), rewritten here.

def lvdm_ddim(eps_fn, x, steps, eta, noises, scale_a=1.0, scale_b=0.7, mid_step=400):
    """lvdm's DDIM loop with use_scale, in float64 numpy schedules as there: timesteps range(0, 1000, 1000 // S) + 1;
    ᾱ_prev = [ᾱ_0] + ᾱ[ts[:-1]]; scale_arr = [linspace(a, b, mid_step); b ...]; pred_x0 /= s_t;
    x_prev = √ᾱ_prev s_prev pred_x0 + √(1 − ᾱ_prev − σ²) e_t + σ z."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    ac = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32).numpy()  # lvdm registers it as float32
    ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    alphas, alphas_prev = ac[ts], np.asarray([ac[0]] + ac[ts[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    scale_arr = np.concatenate((np.linspace(scale_a, scale_b, mid_step), np.full(1000, scale_b)))
    scale_arr = torch.tensor(scale_arr, dtype=torch.float32).numpy()
    s, s_prev = scale_arr[ts], np.asarray([scale_arr[0]] + scale_arr[ts[:-1]].tolist())
    for i, step in enumerate(np.flip(ts)):
        index = len(ts) - i - 1
        e_t = eps_fn(x, int(step))
        pred_x0 = (x - float(np.sqrt(1 - alphas[index])) * e_t) / float(np.sqrt(alphas[index]))
        pred_x0 = pred_x0 / float(s[index])
        dir_xt = float(np.sqrt(1 - alphas_prev[index] - sigmas[index] ** 2)) * e_t
        noise = float(sigmas[index]) * noises[i] if eta else 0
        x = float(np.sqrt(alphas_prev[index]) * s_prev[index]) * pred_x0 + dir_xt + noise
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_rescale_is_lvdms(eta):
    """VideoCrafter2's scheduler config (videocrafter.SCHEDULER) in sampler.ddim_sample gives lvdm's DDIM, x̂0 rescale
    and all, for a fixed ε function (steps that cross mid_step = 400)."""
    steps, shape = 10, (1, 4, 2, 3, 3)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def eps_fn(x, t):  # any smooth function of (x, t)
        return torch.einsum("oc,bcfhw->bofhw", weight, x) * (1 + t / 1000)

    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    noises = [torch.randn(shape, generator=gen) for _ in range(steps)]
    expected = lvdm_ddim(eps_fn, x_T, steps, eta, noises)
    cfg = sampler.pipeline_config(videocrafter.SCHEDULER)
    got = sampler.ddim_sample(lambda x, t: eps_fn(x, int(t)), x_T, cfg, steps, eta,
                              generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = sampler.ddim_sample(lambda x, t: eps_fn(x, int(t)), x_T, sampler.pipeline_config(
        {**videocrafter.SCHEDULER, "use_scale": False}), steps, eta, generator=torch.Generator().manual_seed(2))
    assert (plain - expected).abs().max() > 1e-2  # the rescale matters at this size


def test_other_samplers_refuse_the_rescale():
    for name in ("dpmpp-2m", "euler"):
        with pytest.raises(UserError, match="--sampler ddim"):
            sampler.sampler_config(name, videocrafter.SCHEDULER)


# ----------------------------------------------------------------------------------------------------------
# lvdm's UNetModel.forward (openaimodel3d.py:534-576) as plain functions of the LDM state dict, walking vc2_layout.plan.

def lvdm_sinusoid(t, dim):
    """timestep_embedding (lvdm/models/utils_diffusion.py:8-28): [cos, sin] of t · 10000^(−i/half)."""
    half = dim // 2
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def lvdm_mlp(sd, p, x):  # Linear, SiLU, Linear (time_embed, fps_embedding)
    x = F.silu(F.linear(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"]))
    return F.linear(x, sd[f"{p}.2.weight"], sd[f"{p}.2.bias"])


def lvdm_emb(sd, t, fps, mc):
    """emb = time_embed(sin(t)) + fps_embedding(sin(fps)) (openaimodel3d.py:535-542)."""
    dtype = sd["time_embed.0.weight"].dtype
    return (lvdm_mlp(sd, "time_embed", lvdm_sinusoid(t, mc).to(dtype))
            + lvdm_mlp(sd, "fps_embedding", lvdm_sinusoid(fps, mc).to(dtype)))


def gn(sd, p, x, eps=1e-5):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def lvdm_attention(sd, p, x, context, heads):
    """CrossAttention.forward (attention.py:76-127) without the relative position (VC2)."""
    q, k, v = (F.linear(y, sd[f"{p}.to_{n}.weight"]) for n, y in (("q", x), ("k", context), ("v", context)))
    q, k, v = (y.reshape(*y.shape[:2], heads, -1).transpose(1, 2) for y in (q, k, v))
    sim = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = (sim.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return F.linear(out, sd[f"{p}.to_out.0.weight"], sd[f"{p}.to_out.0.bias"])


def lvdm_block(sd, p, x, context, heads):
    """BasicTransformerBlock._forward (attention.py:216-220); FeedForward with GEGLU (l.376-403)."""
    ln = lambda n, y: F.layer_norm(y, y.shape[-1:], sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"])
    x = lvdm_attention(sd, f"{p}.attn1", ln("norm1", x), ln("norm1", x), heads) + x
    y = ln("norm2", x)
    x = lvdm_attention(sd, f"{p}.attn2", y, y if context is None else context, heads) + x
    a, gate = F.linear(ln("norm3", x), sd[f"{p}.ff.net.0.proj.weight"], sd[f"{p}.ff.net.0.proj.bias"]).chunk(2, -1)
    return F.linear(a * F.gelu(gate), sd[f"{p}.ff.net.2.weight"], sd[f"{p}.ff.net.2.bias"]) + x


def lvdm_spatial(sd, p, x, context, heads):
    """SpatialTransformer with use_linear (attention.py:262-278), on (b·f, c, h, w)."""
    n, c, h, w = x.shape
    y = gn(sd, f"{p}.norm", x, 1e-6).flatten(2).transpose(1, 2)
    y = lvdm_block(sd, f"{p}.transformer_blocks.0", F.linear(y, sd[f"{p}.proj_in.weight"], sd[f"{p}.proj_in.bias"]),
                   context, heads)
    y = F.linear(y, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return y.transpose(1, 2).reshape(n, c, h, w) + x


def lvdm_temporal(sd, p, x, b, heads):
    """TemporalTransformer (attention.py:331-373) on '(b f) c h w' rearranged to 'b c f h w' (l.42-45): GroupNorm over
    the 5-D tensor, rows (b h w) of f tokens, self-attention twice; Conv1d projections when the weight is 3-D
    (init_attn), Linear ones otherwise."""
    bf, c, h, w = x.shape
    x5 = x.reshape(b, bf // b, c, h, w).transpose(1, 2)
    y = gn(sd, f"{p}.norm", x5, 1e-6).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, bf // b)  # (b h w) c t
    proj = lambda n, y: (F.conv1d(y, sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]) if sd[f"{p}.{n}.weight"].ndim == 3
                         else F.linear(y.transpose(1, 2), sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"]).transpose(1, 2))
    y = lvdm_block(sd, f"{p}.transformer_blocks.0", proj("proj_in", y).transpose(1, 2), None, heads)
    y = proj("proj_out", y.transpose(1, 2))  # (b h w) c t
    y = y.reshape(b, h, w, c, bf // b).permute(0, 3, 4, 1, 2)  # b c t h w
    return (y + x5).transpose(1, 2).reshape(bf, c, h, w)


def lvdm_resblock(sd, p, x, emb, b):
    """ResBlock._forward (openaimodel3d.py:208-234), then its TemporalConvBlock (l.269-276) on 'b c t h w'."""
    h = F.conv2d(F.silu(gn(sd, f"{p}.in_layers.0", x)), sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"],
                 padding=1)
    h = h + F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
    h = F.conv2d(F.silu(gn(sd, f"{p}.out_layers.0", h)), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"],
                 padding=1)
    skip = x if f"{p}.skip_connection.weight" not in sd else F.conv2d(
        x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    h = skip + h
    bf, c, hh, ww = h.shape
    t = h.reshape(b, bf // b, c, hh, ww).transpose(1, 2)
    y = t
    for n, last in ((1, 2), (2, 3), (3, 3), (4, 3)):
        q = f"{p}.temopral_conv.conv{n}"
        y = F.conv3d(F.silu(gn(sd, f"{q}.0", y)), sd[f"{q}.{last}.weight"], sd[f"{q}.{last}.bias"], padding=(1, 0, 0))
    return (t + y).transpose(1, 2).reshape(bf, c, hh, ww)


def lvdm_layer(sd, p, kind, x, emb, context, b, d):
    if kind == "conv_in":
        return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
    if kind == "init_attn":
        return lvdm_temporal(sd, p, x, b, 8)
    if kind == "res":
        return lvdm_resblock(sd, p, x, emb, b)
    if kind == "spatial":
        return lvdm_spatial(sd, p, x, context, x.shape[1] // d)
    if kind == "temporal":
        return lvdm_temporal(sd, p, x, b, x.shape[1] // d)
    if kind == "down":
        return F.conv2d(x, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"],
                    padding=1)


def lvdm_unet(sd, layout, x, t, context, fps):
    """UNetModel.forward: emb and context repeated per frame, x as (b f) c h w, skips after input_blocks.0's init_attn."""
    b, _, f, hh, ww = x.shape
    emb = lvdm_emb(sd, t, fps, layout.model_channels).repeat_interleave(f, 0)
    context = context.repeat_interleave(f, 0)
    h, skips = x.transpose(1, 2).reshape(b * f, -1, hh, ww), []
    for prefix, layers in vc2_layout.plan(layout):
        if prefix.startswith("output_blocks"):
            h = torch.cat([h, skips.pop()], dim=1)
        for j, (kind, _, _) in enumerate(layers):
            h = lvdm_layer(sd, f"{prefix}.{j}", kind, h, emb, context, b, layout.num_head_channels)
        if prefix.startswith("input_blocks") and prefix != "input_blocks.0" or prefix == "init_attn":
            skips.append(h)
    y = F.conv2d(F.silu(gn(sd, "out.0", h)), sd["out.2.weight"], sd["out.2.bias"], padding=1)
    return y.reshape(b, f, -1, hh, ww).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Random LDM weights of a layout, and our UNet of them.

def random_ldm_unet(layout, seed=0):
    """{key: tensor} of vc2_layout's keys: weights ~ N(0, 1/fan_in), norms near 1, biases small; all nonzero (the
    zero-initialised conv4 / proj_out of a fresh model would hide the layers behind them)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in vc2_layout.unet_keys(layout).items():
        x = torch.randn(shape, generator=g)
        if len(shape) == 1:
            sd[key] = 1 + 0.1 * x if "norm" in key or "layers.0" in key or ".0.weight" in key else 0.1 * x
        else:
            sd[key] = x / float(np.prod(shape[1:])) ** 0.5
    return sd


def ours_of(sd):
    return videocrafter.build_unet(videocrafter.rename_unet(dict(sd)), "test")


def test_published_layout_is_consumed_whole():
    """Every key of a file with VideoCrafter2's published UNet (inference_t2v_512_v2.0.yaml; keys enumerated from
    openaimodel3d.py, vc2_layout) fills exactly one parameter of ours, shapes equal, none left over; the config read
    from the shapes is the published one."""
    meta = {k: torch.empty(s, device="meta") for k, s in vc2_layout.unet_keys().items()}
    renamed = videocrafter.rename_unet(meta)
    assert len(renamed) == len(meta)  # no two keys renamed onto one
    cfg = video.unet3d_config(videocrafter.unet_config(renamed), "test")
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.attention_head_dim, cfg.cross_attention_dim) == (
        [320, 640, 1280, 1280], 2, 64, 1024)
    assert cfg.down_block_types == ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    assert cfg.up_block_types == ["UpBlock3D"] + ["CrossAttnUpBlock3D"] * 3
    with torch.device("meta"):
        model = videocrafter.VideoCrafterUNet(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in renamed.items()}
    assert sum(np.prod(s) for s in ours.values()) == 1_413_284_420  # VideoCrafter2's 1.41 B UNet parameters


def test_fps_embedding_is_lvdms():
    """emb = time_embed(sin t) + fps_embedding(sin fps), the sinusoid [cos, sin] (utils_diffusion.py:8-28); an int fps
    broadcasts, and no fps is the UNet's own default, 16 (openaimodel3d.py:534-542)."""
    sd = random_ldm_unet(TINY, seed=1)
    model = ours_of(sd)
    t, fps = torch.tensor([1, 981]), torch.tensor([8, 28])
    torch.testing.assert_close(model.time_features(t, torch.float32, fps), lvdm_emb(sd, t, fps, 32))
    torch.testing.assert_close(model.time_features(t, torch.float32, 28), lvdm_emb(sd, t, torch.tensor([28, 28]), 32))
    torch.testing.assert_close(model.time_features(t, torch.float32), lvdm_emb(sd, t, torch.tensor([16, 16]), 32))
    assert (lvdm_emb(sd, t, fps, 32) - lvdm_emb(sd, t, fps + 1, 32)).abs().max() > 1e-3  # fps matters


def test_init_attn_conv1d_projections():
    """init_attn's kernel-1 Conv1d projections (use_linear not passed, attention.py:298-302), squeezed into
    transformer_in's Linear ones, give lvdm's TemporalTransformer (F.conv1d here) on (b f) c h w."""
    sd = random_ldm_unet(TINY, seed=2)
    model = ours_of(sd)
    x = torch.randn(2 * 3, 32, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.transformer_in(x, 3), lvdm_temporal(sd, "init_attn.0", x, 2, 8),
                               rtol=1e-5, atol=1e-5)


def test_unet_is_lvdms():
    """The whole UNet against lvdm's forward written above (on the LDM state dict itself): batch of 2, 3 frames, the
    two samples at different t and fps."""
    sd = random_ldm_unet(TINY, seed=4)
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 7, 128, generator=g)
    t, fps = torch.tensor([10, 700]), torch.tensor([8, 28])
    expected = lvdm_unet(sd, TINY, x, t, context, fps)
    got = ours_of(sd)(x, t, context, fps=fps)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().mean() > 0.1


# ----------------------------------------------------------------------------------------------------------
# A tiny synthetic model.ckpt: the UNet's LDM keys (vc2_layout, random), SD2's VAE and OpenCLIP text tower in LDM
# names (ldm's tiny SD2 family, converted by benchmarks/ldm.py), the DDPM buffers and lvdm's scale_arr beside them.

def vc2_file(path, layout=TINY, seed=0, drop=()):
    folder = os.path.join(os.path.dirname(path), f"sd2-{seed}")
    sd2 = ldm.make_family_dir(folder, "sd2", seed=seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in random_ldm_unet(layout, seed).items()}
    sd.update({f"first_stage_model.{k}": v for k, v in ldm_vae(sd2.vae).items()})
    sd.update(ldm_open_clip(sd2.text_encoder, seed))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0), scale_arr=torch.ones(1400))
    sd = {k: v for k, v in sd.items() if not any(d in k for d in drop)}
    return ldm.save_ldm(sd, path), folder


@pytest.fixture(scope="module")
def tiny_vc2(tmp_path_factory):
    return vc2_file(str(tmp_path_factory.mktemp("vc2") / "model.ckpt"))


def test_file_loads_into_the_pipeline(tiny_vc2):
    """load_pipeline reads the file by its rules: the UNet is lvdm's (above), the VAE and text encoder are those of
    the SD2 folder they were written from, the scheduler and defaults are the authors'."""
    path, folder = tiny_vc2
    pipe, sd2 = pipeline.load_pipeline(path), pipeline.load_pipeline(folder)
    assert pipe.is_video and isinstance(pipe.unet, videocrafter.VideoCrafterUNet)
    assert pipe.origin.startswith("single file model.ckpt: VideoCrafter2")
    for part in ("vae", "text_encoder"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(sd2, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert torch.equal(pipe.tokenizer(["a cat!"]), sd2.tokenizer(["a cat!"]))  # OpenCLIP pads with "!", as SD2
    assert pipe.scheduler_config["use_scale"] and pipe.default_guidance == 12.0
    assert (pipe.default_fps, pipe.default_frames) == (28, 16) and (sd2.default_fps, sd2.default_frames) == (None, None)
    assert isinstance(pipeline.load_unet(path), videocrafter.VideoCrafterUNet)


def test_a_deepspeed_save_loads_as_lvdms_loader_reads_it(tiny_vc2, tmp_path):
    """A DeepSpeed (Lightning) save holds the model under "module", each key led by "_forward_module." (VideoCrafter's
    scripts/evaluation/funcs.py drops those 16 characters): it loads as the plain file does."""
    path, _ = tiny_vc2
    plain = torch.load(path, weights_only=True)["state_dict"]
    wrapped = str(tmp_path / "deepspeed.ckpt")
    torch.save({"module": {f"_forward_module.{k}": v for k, v in plain.items()}}, wrapped)
    ours, theirs = pipeline.load_pipeline(wrapped), pipeline.load_pipeline(path)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, part).state_dict(), getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_file_samples_a_video_as_lvdm(tiny_vc2):
    """A 2-frame video from the loaded file (CFG with fps in both branches' conditioning, DDIM with the x̂0 rescale at
    η = 1, frames decoded one by one) equals lvdm's: its UNet forward and DDIM loop above, on the file's tensors.
    In float64, so that CFG's 12x does not amplify float32 rounding past the tolerance."""
    path, _ = tiny_vc2
    pipe = pipeline.load_pipeline(path, dtype=torch.float64)
    sd = {k[len("model.diffusion_model."):]: v.double() for k, v in
          torch.load(path, weights_only=True)["state_dict"].items() if k.startswith("model.diffusion_model.")}
    pos, neg = pipe.conditioning(["a red circle", "a cat"]), pipe.conditioning(["", ""])
    fps, guidance, steps = torch.tensor([28, 28]), 12.0, 4
    x_T = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoise = guided.npo_denoiser(pipe.unet, {**neg, "fps": fps}, {**pos, "fps": fps}, guidance)
    latents = sampler.sample("ddim", denoise, x_T, pipe.scheduler_config, steps, ddim_eta=1.0,
                             generator=torch.Generator().manual_seed(1))
    frames = video.decode_frames(pipe.vae, latents)

    def lvdm_eps(x, t):
        tt = torch.full((2,), t)
        e_c = lvdm_unet(sd, TINY, x, tt, pos["encoder_hidden_states"], fps)
        e_u = lvdm_unet(sd, TINY, x, tt, neg["encoder_hidden_states"], fps)
        return e_u + guidance * (e_c - e_u)  # ddim.py:236

    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(x_T.shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    expected = lvdm_ddim(lvdm_eps, x_T, steps, 1.0, noises)
    torch.testing.assert_close(latents, expected, rtol=1e-6, atol=1e-6)
    # decode_first_stage_2DAE (ddpm3d.py:556-562): each frame z[:, :, i] / scale_factor through the VAE
    with torch.no_grad():
        want = torch.stack([pipe.vae.decode(expected[:, :, i] / 0.18215) for i in range(2)], dim=1)
    assert frames.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(frames, want.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["t2v_512_v1", "t2v_1024_v1", "i2v_512_v1"])
def test_videocrafter1_is_refused(tmp_path, kind):
    """VideoCrafter1's files (relative-position temporal attention, no temporal convs; the i2v model's image
    cross-attention) are one sentence, also through the command line (exit 2, nothing written)."""
    layout = vc2_layout.Layout(**{**TINY.__dict__, "temporal_conv": kind == "i2v_512_v1",
                                  "relative_position": kind != "i2v_512_v1"})
    path, _ = vc2_file(str(tmp_path / f"{kind}.ckpt"), layout)
    if kind == "i2v_512_v1":  # its image cross-attention (attention.py:62-64)
        sd = torch.load(path, weights_only=True)["state_dict"]
        key = next(k for k in sd if k.endswith("attn2.to_k.weight"))
        sd[key.replace("to_k", "to_k_ip")] = sd[key]
        ldm.save_ldm(sd, path)
    with pytest.raises(UserError, match=r"VideoCrafter1 checkpoint .*; pass VideoCrafter2's text-to-video model.ckpt\.$"):
        pipeline.load_pipeline(path)
    assert npo.main(["sample", "--model", path, "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_truncated_and_partial_files(tiny_vc2, tmp_path, capsys):
    """A truncated file, a file without its text encoder or with a UNet short of a layer, and --ema (VideoCrafter2 keeps
    no EMA copy) are one sentence each (exit 2 on the command line)."""
    path, _ = tiny_vc2
    data = open(path, "rb").read()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        pipeline.load_pipeline(str(cut))
    assert npo.main(["sample", "--model", str(cut), "--prompt", "a cat", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cut.ckpt is not a readable checkpoint") and "Traceback" not in err
    partial, _ = vc2_file(str(tmp_path / "partial.safetensors"), seed=1, drop=("cond_stage_model.",))
    with pytest.raises(UserError, match="VideoCrafter2 checkpoint without its text_encoder"):
        pipeline.load_pipeline(partial)
    broken, _ = vc2_file(str(tmp_path / "broken.safetensors"), seed=1, drop=("middle_block.1.",))
    with pytest.raises(UserError, match=r"has a VideoCrafter UNet without mid_block\.attentions\.0\..*; pass"):
        pipeline.load_pipeline(broken)
    for load in (pipeline.load_pipeline, pipeline.load_unet):
        with pytest.raises(UserError, match="drop --ema"):
            load(path, ema=True)
