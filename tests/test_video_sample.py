"""Videos with NPO: the files (frames + WebP preview with their parameters, atomic, numbered on), `npo.py evaluate`
on video folders (frame-averaged scores, paired by prompt and seed), and, on tiny random video models, whole videos
against diffusers' TextToVideoSDPipeline and NPO video sampling against a two-UNet diffusers reference."""
import copy
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

import npo
from npo import evaluate
from npo import guided
from npo import images
from npo import lora
from npo import pipeline
from npo import sample
from npo import video
from npo import videos
from npo.checkpoint import UserError
from conftest import random_lora_files

TEXT = "a red circle moving left, ünïcode\nNegative prompt: blurry\nSteps: 5, Sampler: DDIM, Seed: 3, Frames: 4, FPS: 5"


def flat_frames(greys, size=(16, 8)):
    """One flat RGB frame per grey level (red channel = grey, green = k so that frames differ)."""
    return [Image.new("RGB", size, (g, k, 255 - g)) for k, g in enumerate(greys)]


def test_save_video_writes_frames_and_preview_with_parameters(tmp_path):
    frames = flat_frames([10, 80, 160, 240])
    folder = videos.save_video(frames, str(tmp_path), "00000-seed3", TEXT, fps=5)
    assert folder == str(tmp_path / "00000-seed3")
    assert sorted(os.listdir(tmp_path)) == ["00000-seed3", "00000-seed3.webp"]  # no temporary name left behind
    assert sorted(os.listdir(folder)) == ["000.png", "001.png", "002.png", "003.png"]
    for k, frame in enumerate(frames):
        with Image.open(os.path.join(folder, f"{k:03d}.png")) as png:
            assert png.text["parameters"] == TEXT  # A1111's PNG text chunk, as images.save_png writes it
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(frame))  # lossless
    with Image.open(tmp_path / "00000-seed3.webp") as webp:
        assert webp.format == "WEBP" and webp.n_frames == 4 and webp.info["loop"] == 0
        durations = []
        for k in range(webp.n_frames):
            webp.seek(k)
            # lossy, but a flat frame keeps its colour within a few levels
            assert np.abs(np.asarray(webp.convert("RGB"), dtype=int) - np.asarray(frames[k], dtype=int)).max() <= 4
            durations.append(webp.info["duration"])  # known once the frame is loaded
        assert durations == [200] * 4  # 1000 ms / 5 fps
        # the EXIF UserComment read by pillow alone, decoded as EXIF defines it: "UNICODE\0" + UCS-2 in the file's
        # byte order (big-endian, "MM", as piexif writes it for A1111)
        exif = webp.getexif()
        comment = exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert exif.endian == ">" and comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == TEXT
    assert videos.read_parameters(str(tmp_path / "00000-seed3.webp")) == TEXT
    assert videos.read_parameters(os.path.join(folder, "002.png")) == TEXT


def test_save_video_is_atomic(tmp_path, monkeypatch):
    """A failure halfway leaves neither the frames' folder nor the preview nor a temporary folder; an existing video
    is never overwritten."""
    calls = []
    real = images.save_png

    def failing(image, path, parameters=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(image, path, parameters)
    monkeypatch.setattr(images, "save_png", failing)
    with pytest.raises(UserError, match=r"cannot write the video .*00000-seed0 \(No space left on device\)"):
        videos.save_video(flat_frames([1, 2, 3, 4]), str(tmp_path), "00000-seed0", TEXT)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(images, "save_png", real)
    monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(UserError, match=r"cannot write the video .*00000-seed0 \(Input/output error\)"):
        videos.save_video(flat_frames([1, 2]), str(tmp_path), "00000-seed0", TEXT)
    assert os.listdir(tmp_path) == []  # the preview, written before the frames' rename, went with it
    monkeypatch.undo()
    videos.save_video(flat_frames([1, 2]), str(tmp_path), "00000-seed0", TEXT)
    with pytest.raises(UserError, match="00000-seed0 exists already"):
        videos.save_video(flat_frames([5, 6]), str(tmp_path), "00000-seed0", TEXT)
    with Image.open(tmp_path / "00000-seed0" / "000.png") as first:
        assert first.getpixel((0, 0))[0] == 1  # the first video's frame, untouched


def test_numbering_continues_after_videos_and_images(tmp_path):
    videos.save_video(flat_frames([1, 2]), str(tmp_path), "00004-seed1", TEXT)
    assert sample.next_number(str(tmp_path)) == 5
    images.save_png(Image.new("RGB", (8, 8)), str(tmp_path / "00007-seed0.png"), TEXT)
    assert sample.next_number(str(tmp_path)) == 8
    os.makedirs(tmp_path / ".00009-seed2.abc.tmp")  # a temporary folder of a video being written is not counted
    assert sample.next_number(str(tmp_path)) == 8


def test_parameters_carry_frames_and_fps():
    args = npo.build_parser().parse_args(["sample", "--prompt", "a red circle moving up", "--frames", "6", "--fps", "4"])
    job = dict(prompt="a red circle moving up", negative=None, seed=2, alpha=1.0, beta=1.0)
    text = sample.a1111_parameters(args, job, (32, 32))
    assert text.startswith("a red circle moving up\nNegative prompt: \nSteps: 50, Sampler: DDIM, CFG scale: None, "
                           "Seed: 2, Size: 32x32, Frames: 6, FPS: 4, Model: ")
    assert evaluate.prompt_and_seed(text, "x") == ("a red circle moving up", 2)
    args = npo.build_parser().parse_args(["sample"])
    assert "Frames" not in sample.a1111_parameters(args, job, (32, 32))  # images keep A1111's settings only


# ----------------------------------------------------------------------------------------------------------
# npo.py evaluate on video folders

PROMPTS = ["a red circle moving left", "a blue square moving up", "a red circle moving left"]
SEEDS = [0, 1, 7]


def parameters(prompt, seed, frames):
    args = npo.build_parser().parse_args(["sample", "--prompt", prompt, "--frames", str(frames), "--fps", "8"])
    return sample.a1111_parameters(args, dict(prompt=prompt, negative=None, seed=seed, alpha=1.0, beta=1.0), (16, 8))


def write_videos(folder, greys, shuffle_names=None):
    """One video per (prompt, seed) of PROMPTS × SEEDS, video i of flat grey frames greys[i] (a list, one grey per
    frame); numbered in another order when `shuffle_names` (a seed), so that pairing can only work through the
    parameters."""
    os.makedirs(folder, exist_ok=True)
    order = list(range(len(greys)))
    if shuffle_names is not None:
        random.Random(shuffle_names).shuffle(order)
    for number, i in zip(order, range(len(greys))):
        frames = [Image.new("RGB", (16, 8), (g,) * 3) for g in greys[i]]
        videos.save_video(frames, str(folder), f"{number:05d}-seed{SEEDS[i]}", parameters(PROMPTS[i], SEEDS[i],
                                                                                          len(frames)))
    return str(folder)


def test_evaluate_scores_videos_by_their_frame_mean(tmp_path):
    """rewards:brightness of a flat grey frame is grey / 255, so each video's score is the mean of its greys / 255;
    videos of different lengths in the two folders still pair by prompt and seed."""
    a_greys = [[10, 20, 30, 40], [100, 100, 100, 100], [0, 0, 0, 200]]  # means 25, 100, 50
    b_greys = [[30, 30], [90, 110, 120], [50, 50, 50, 50, 50, 50]]      # means 30, 106.67, 50
    a = write_videos(tmp_path / "a", a_greys)
    b = write_videos(tmp_path / "b", b_greys, shuffle_names=3)
    results = evaluate.evaluate([a, b], ["rewards:brightness"], str(tmp_path / "report"), batch_size=3)
    r = results["scorers"]["rewards:brightness"]
    assert results["pairs"] == 3
    a_means = sorted(zip(zip(PROMPTS, SEEDS), [sum(g) / len(g) / 255 for g in a_greys]))  # in (prompt, seed) order
    b_means = sorted(zip(zip(PROMPTS, SEEDS), [sum(g) / len(g) / 255 for g in b_greys]))
    assert r["mean"][a] == pytest.approx(np.mean([m for _, m in a_means]), rel=1e-6)
    assert r["mean"][b] == pytest.approx(np.mean([m for _, m in b_means]), rel=1e-6)
    # video by video: 25 < 30, 100 < 106.67, 50 = 50 -> a wins (0 + 0 + 0.5) / 3
    assert r["win_rate"][a][b] == pytest.approx(1 / 6) and r["win_rate"][b][a] == pytest.approx(5 / 6)
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == results


def test_evaluate_video_folders_bad_input(tmp_path):
    a = write_videos(tmp_path / "a", [[10, 20], [30, 40], [50, 60]])
    b = write_videos(tmp_path / "b", [[10, 20], [30, 40], [50, 60]])
    report = str(tmp_path / "report")
    os.remove(os.path.join(b, "00001-seed1", "000.png"))  # a frame deleted by hand: 001.png alone is left
    with pytest.raises(UserError, match=r"00001-seed1 lacks frame 000.png of its 2; sample the video again"):
        evaluate.evaluate([a, b], ["rewards:brightness"], report)
    assert not os.path.exists(report)
    whole = write_videos(tmp_path / "whole", [[10, 20], [30, 40], [50, 60]])
    with open(os.path.join(a, "00002-seed7", "001.png"), "wb") as f:
        f.write(b"not a png")  # a frame cut short
    with pytest.raises(UserError, match=r"00002-seed7/001.png is not a readable PNG"):
        evaluate.evaluate([whole, a], ["rewards:brightness"], report)
    assert not os.path.exists(report)
    c = tmp_path / "c"  # the same prompts and seeds as images, not videos
    os.makedirs(c)
    for i, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
        images.save_png(Image.new("RGB", (16, 8)), str(c / f"{i:05d}-seed{s}.png"), parameters(p, s, 2))
    with pytest.raises(UserError, match=r"a/00001-seed1 is a video but .*c/00001-seed1.png \(the same prompt and "
                                        r"seed\) is an image"):
        evaluate.evaluate([a, str(c)], ["rewards:brightness"], report)
    assert npo.main(["evaluate", a, str(c), "--scorer", "rewards:brightness", "--out", report]) == 2


# ----------------------------------------------------------------------------------------------------------
# Bad input, one sentence each (exit code 2), and nothing written

def run_cli(capsys, *argv):
    """npo.main's exit code and its stderr."""
    code = npo.main(list(argv))
    return code, capsys.readouterr().err


def test_video_flags_on_an_image_model(tiny_model, tmp_path, capsys):
    out = str(tmp_path / "out")
    for flags, words in ((["--frames", "0"], "--frames must be at least 1 (got 0)."),
                         (["--fps", "-2"], "--fps must be at least 1 (got -2)."),
                         (["--frames", "4"], "--frames is for video models and "),
                         (["--fps", "4"], "--fps is for video models and "),
                         (["--decode-chunk", "0"], "--decode-chunk must be at least 1 (got 0)."),
                         (["--decode-chunk", "2"], "--decode-chunk is for video models and ")):
        code, err = run_cli(capsys, "sample", "--model", tiny_model[0], "--steps", "1", *flags, "--out", out)
        assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------------------
# Whole videos on tiny random weights, against diffusers

ATOL = 1e-4  # in [0, 1]: well inside the 1/255 the issue asks, far above fp32 reordering noise (~1e-6)


def to01(x):
    return (x / 2 + 0.5).clamp(0, 1)


def video_pipeline(path, scheduler=None):
    """diffusers' TextToVideoSDPipeline of the folder (its own modules, read by diffusers)."""
    from diffusers import TextToVideoSDPipeline
    pipe = TextToVideoSDPipeline.from_pretrained(path)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_video_matches_text_to_video_pipeline(tiny_video_dir):
    """x_T (one seeded generator per video), every DDIM step with CFG, and the decode: every frame's pixels as
    diffusers' (its output_type "pt" is (B, F, 3, H, W) in [0, 1], ours the same in [-1, 1])."""
    prompts, seeds, frames = ["a red circle moving left", "a blue square moving up"], [3, 4], 3
    ref = video_pipeline(tiny_video_dir)(prompts, num_frames=frames, num_inference_steps=4, guidance_scale=7.5,
                                         height=32, width=32, negative_prompt=["blurry"] * 2, output_type="pt",
                                         generator=[torch.Generator().manual_seed(s) for s in seeds]).frames
    pipe = pipeline.load_pipeline(tiny_video_dir)
    ours = guided.generate(pipe, prompts, seeds, "blurry", steps=4, guidance=7.5, height=32, width=32, frames=frames)
    assert ours.shape == ref.shape == (2, frames, 3, 32, 32)
    assert (to01(ours) - ref).abs().max() <= ATOL
    # and the latents draw each video from its own generator: the first video alone is the same video
    alone = guided.generate(pipe, prompts[:1], seeds[:1], "blurry", steps=4, guidance=7.5, height=32, width=32,
                            frames=frames)
    assert (to01(alone) - ref[:1]).abs().max() <= ATOL


@pytest.fixture(scope="module")
def video_offsets(tiny_video_dir, tmp_path_factory):
    """Random η (attention, spatial and temporal) and δ (to_q, to_v and the resnets' conv1) for the tiny video UNet."""
    specs = [("eta", dict(alpha=2)), ("delta", dict(alpha=2, targets=("to_q", "to_v", "conv1")))]
    return random_lora_files(tiny_video_dir, str(tmp_path_factory.mktemp("video_loras")), specs, seed=20)


def merged_by_hand(unet, files_and_weights):
    """A copy of diffusers' UNet3DConditionModel with kohya LoRA files merged in, written independently of lora.py:
    W += w · (alpha / rank) · up @ down for each `lora_unet_<module path with _ for .>` key."""
    from safetensors.torch import load_file
    model = copy.deepcopy(unet)
    modules = {name.replace(".", "_"): m for name, m in model.named_modules()}
    with torch.no_grad():
        for path, w in files_and_weights:
            tensors = load_file(path)
            for key in (k for k in tensors if k.endswith(".lora_down.weight")):
                stem = key[:-len(".lora_down.weight")]
                down, up = tensors[key].float(), tensors[stem + ".lora_up.weight"].float()
                scale = float(tensors[stem + ".alpha"]) / down.shape[0]
                weight = modules[stem[len("lora_unet_"):]].weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
                weight += w * scale * delta
    return model


def two_unet_video_reference(path, files, prompts, seeds, negative, steps, g, alpha, beta, scheduler):
    """Eq. 10 built from diffusers parts: two UNet3DConditionModel copies, θ + η and θ + α·η + β·δ, two passes per
    step, CFG combined here, stepped by `scheduler` on the (B·F, C, h, w) fold as TextToVideoSDPipeline steps it."""
    ref = video_pipeline(path)
    unet_pos = merged_by_hand(ref.unet, [(files["eta"], 1.0)])
    unet_neg = merged_by_hand(ref.unet, [(files["eta"], alpha), (files["delta"], beta)])
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        pos, neg = ref.encode_prompt(prompts, "cpu", 1, True, [negative] * len(prompts))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        side = 32 // ref.vae_scale_factor  # 32 x 32 pixels, 3 frames
        x = torch.cat([torch.randn((1, 4, 3, side, side), generator=gen) for gen in gens]) * scheduler.init_noise_sigma
        b, c, f, h, w = x.shape
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps_neg, eps_pos = unet_neg(x_in, t, neg).sample, unet_pos(x_in, t, pos).sample
            eps = eps_neg + g * (eps_pos - eps_neg)
            fold = lambda v: v.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
            x = scheduler.step(fold(eps), t, fold(x)).prev_sample.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
        return ref.decode_latents(x).permute(0, 2, 1, 3, 4).add(1).div(2).clamp(0, 1)  # (B, F, 3, H, W) in [0, 1]


@pytest.mark.parametrize("sampler_name, alpha, beta", [("ddim", 1.0, 1.0), ("ddim", 0.3, 0.7),
                                                       ("dpmpp-2m", 0.3, 0.7), ("euler", 0.5, 1.0)])
@pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")
def test_npo_video_matches_two_unet_reference(tiny_video_dir, video_offsets, sampler_name, alpha, beta):
    """NPO on a video model (η and δ on spatial and temporal layers, per-row multipliers in one batched forward, and
    the merged two-set mode) against two diffusers UNet3D copies with the offsets merged by hand."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
    prompts, seeds, steps = ["a red circle moving left", "a green star moving down"], [5, 9], 5
    kind = {"ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    scheduler = kind[sampler_name].from_pretrained(os.path.join(tiny_video_dir, "scheduler"))
    ref = two_unet_video_reference(tiny_video_dir, video_offsets, prompts, seeds, "ugly", steps, 6.0, alpha, beta,
                                   scheduler)
    pipe = pipeline.load_pipeline(tiny_video_dir)
    lora.load_lora(pipe.unet, video_offsets["eta"], "eta")
    lora.load_lora(pipe.unet, video_offsets["delta"], "delta")
    for mode in ("batched", "merged"):
        ours = guided.generate(pipe, prompts, seeds, "ugly", steps=steps, guidance=6.0, alpha=alpha, beta=beta,
                               height=32, width=32, mode=mode, sampler=sampler_name, frames=3)
        assert (to01(ours) - ref).abs().max() <= ATOL, mode
    # δ does something: without it the videos differ visibly
    plain = guided.generate(pipe, prompts, seeds, "ugly", steps=steps, guidance=6.0, alpha=1.0, beta=0.0,
                            height=32, width=32, sampler=sampler_name, frames=3)
    assert (to01(plain) - ref).abs().max() > 10 / 255


# ----------------------------------------------------------------------------------------------------------
# npo.py sample on a video model, end to end

def test_cli_writes_frames_and_previews(tiny_video_dir, tmp_path, capsys):
    """Two videos in one batch: NNNNN-seedS/FFF.png (the pixels of `generate`'s frames) and NNNNN-seedS.webp, the
    parameters in both; a second run numbers on; evaluate pairs the two runs' videos."""
    out = str(tmp_path / "out")
    flags = ["--model", tiny_video_dir, "--prompt", "a red circle moving left", "--frames", "3", "--fps", "4",
             "--steps", "2", "--height", "32", "--width", "32", "--n", "2", "--batch-size", "2"]
    code, err = run_cli(capsys, "sample", *flags, "--out", out)
    assert code == 0 and "wrote 2 videos to" in err, err
    assert sorted(os.listdir(out)) == ["00000-seed0", "00000-seed0.webp", "00001-seed1", "00001-seed1.webp"]
    pipe = pipeline.load_pipeline(tiny_video_dir)
    expected = guided.generate(pipe, ["a red circle moving left"] * 2, [0, 1], steps=2, height=32, width=32, frames=3,
                               fps=4)  # guidance: the video model's default, 9
    for i, seed in enumerate([0, 1]):
        folder = os.path.join(out, f"0000{i}-seed{seed}")
        assert sorted(os.listdir(folder)) == ["000.png", "001.png", "002.png"]
        text = videos.read_parameters(os.path.join(folder, "000.png"))
        assert text.startswith(f"a red circle moving left\nNegative prompt: \nSteps: 2, Sampler: DDIM, CFG scale: 9.0, "
                               f"Seed: {seed}, Size: 32x32, Frames: 3, FPS: 4, Model: ")
        assert videos.read_parameters(folder + ".webp") == text
        for k in range(3):
            with Image.open(os.path.join(folder, f"{k:03d}.png")) as png:
                assert png.text["parameters"] == text
                assert np.array_equal(np.asarray(png), images.to_uint8(expected[i])[k])
        with Image.open(folder + ".webp") as webp:
            assert webp.n_frames == 3 and webp.size == (32, 32)
    code, err = run_cli(capsys, "sample", *flags, "--n", "1", "--seed", "5", "--out", out)
    assert code == 0 and os.path.isdir(os.path.join(out, "00002-seed5"))
    other = str(tmp_path / "other")
    assert run_cli(capsys, "sample", *flags, "--guidance", "3", "--out", other)[0] == 0
    shutil.rmtree(os.path.join(out, "00002-seed5"))
    os.remove(os.path.join(out, "00002-seed5.webp"))
    results = evaluate.evaluate([out, other], ["rewards:brightness"], str(tmp_path / "report"))
    assert results["pairs"] == 2


def test_decode_chunk_bounds_each_vae_call(tiny_video_dir, tmp_path, capsys, monkeypatch):
    """--decode-chunk N reaches the VAE as calls of at most N frames (default 8: one call for 2 videos of 3 frames),
    and the frames written are the same either way: the VAE decodes each frame on its own (test_video.py's
    test_decode_frames_is_the_vae_frame_by_frame), so they differ by float reordering only, at most one level of
    255 where a value sits on a rounding boundary."""
    rows, decode = [], video.decode_frames
    monkeypatch.setattr(video, "decode_frames", lambda vae, z, chunk=video.DECODE_CHUNK: rows.append(
        [len(part) for part in z.transpose(1, 2).flatten(0, 1).split(chunk)]) or decode(vae, z, chunk))
    flags = ["--model", tiny_video_dir, "--prompt", "a red circle moving left", "--frames", "3", "--steps", "1",
             "--height", "32", "--width", "32", "--n", "2", "--batch-size", "2"]
    outs = [str(tmp_path / "default"), str(tmp_path / "one")]
    assert run_cli(capsys, "sample", *flags, "--out", outs[0])[0] == 0
    assert run_cli(capsys, "sample", *flags, "--decode-chunk", "1", "--out", outs[1])[0] == 0
    assert rows == [[6], [1] * 6]
    for name in ("00000-seed0", "00001-seed1"):
        for k in range(3):
            a, b = (np.asarray(Image.open(os.path.join(out, name, f"{k:03d}.png")), dtype=int) for out in outs)
            assert np.abs(a - b).max() <= 1


def test_bad_input_on_a_video_model(tiny_video_dir, tiny_model, offsets, video_offsets, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["sample", "--model", tiny_video_dir, "--steps", "1", "--height", "32", "--width", "32", "--frames", "2"]
    for flags, words in ((["--height", "36"], "--height 36 is not a positive multiple of 8"),
                         (["--frames", "0"], "--frames must be at least 1 (got 0)."),
                         (["--decode-chunk", "-1"], "--decode-chunk must be at least 1 (got -1)."),
                         (["--original-size", "32", "32"], "--original-size is SDXL's size conditioning"),
                         (["--lora", offsets["eta"]], "has no temporal-layer keys"),
                         (["--npo", offsets["delta"]], "has no temporal-layer keys"),
                         (["--npo", video_offsets["delta"], "--compare"], "--compare and --sweep-* make grids"),
                         (["--npo", video_offsets["delta"], "--sweep-beta", "0,1"], "--compare and --sweep-* make"),
                         (["--guidance-method", "seg"], "--guidance-method seg perturbs blocks of an image UNet"),
                         (["--eta-model", tiny_model[0]], "--eta-model and --npo-model are not supported for video"),
                         (["--npo-model", tiny_model[0]], "--eta-model and --npo-model are not supported for video")):
        code, err = run_cli(capsys, *base, *flags, "--out", out)
        assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, (flags, err)
        assert not os.path.exists(out)
    code, err = run_cli(capsys, *base, "--out", str(tmp_path / "one.png"))
    assert code == 2 and "names one PNG, but a video is a folder of frames and a .webp" in err
    assert os.listdir(tmp_path) == []


def test_fps_reaches_a_unet_that_embeds_it(tiny_video_dir):
    """VideoCrafter2's UNet takes the frame rate (its fps_embedding): `fps` travels in each branch's conditioning, a
    (rows,) tensor beside the text, to `unet(..., fps=)`, with CFG and without; ModelScope's UNet (no fps_embedding)
    never gets it (its forward refuses an fps: the CLI test above passes --fps 4)."""
    pipe = pipeline.load_pipeline(tiny_video_dir)
    forward, seen = pipe.unet.forward, []

    def recording(x, t, context, fps=None):
        seen.append(fps)
        return forward(x, t, context)
    pipe.unet.fps_embedding = torch.nn.Identity()  # what marks VideoCrafter2's UNet (guided.takes_fps)
    pipe.unet.forward = recording
    plain = guided.generate(pipe, ["a", "b"], [0, 1], steps=2, guidance=7.5, height=32, width=32, frames=2)
    assert seen == [None, None]  # no --fps: no fps conditioning
    seen.clear()
    with_fps = guided.generate(pipe, ["a", "b"], [0, 1], steps=2, guidance=7.5, height=32, width=32, frames=2, fps=12)
    assert len(seen) == 2 and all(torch.equal(f, torch.full((4,), 12)) for f in seen)  # [negative; positive] rows
    assert torch.equal(plain, with_fps)  # the stand-in ignores it
    seen.clear()
    guided.generate(pipe, ["a", "b"], [0, 1], steps=1, guidance=1.0, height=32, width=32, frames=2, fps=8)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((2,), 8))  # the conditional branch alone


@pytest.mark.parametrize("sampler_name, ddim_eta", [("ddim", 1.0), ("euler-a", 0.0)])
def test_stochastic_samplers_draw_noise_per_video(tiny_video_dir, sampler_name, ddim_eta):
    """DDIM at η > 0 and Euler a draw each step's z from each video's own generator, (1, C, F, h, w) like x_T: a
    video is the same alone and beside another (diffusers' pipeline gives no reference: with one generator per video
    it fails at η > 0)."""
    pipe = pipeline.load_pipeline(tiny_video_dir)
    kw = dict(steps=3, guidance=5.0, height=32, width=32, frames=2, sampler=sampler_name, ddim_eta=ddim_eta)
    both = guided.generate(pipe, ["a red circle moving left", "a blue square moving up"], [3, 4], **kw)
    alone = guided.generate(pipe, ["a blue square moving up"], [4], **kw)
    assert (to01(both[1:]) - to01(alone)).abs().max() <= ATOL
    quiet = {"ddim_eta": 0.0, "sampler": {"ddim": "ddim", "euler-a": "euler"}[sampler_name]}  # the same, no noise
    deterministic = guided.generate(pipe, ["a blue square moving up"], [4], **{**kw, **quiet})
    assert (to01(deterministic) - to01(alone)).abs().max() > 10 / 255  # the noise does something


def test_videocrafter2_fps_and_defaults(tmp_path, capsys):
    """On VideoCrafter2's UNet (tests/test_videocrafter.py's tiny synthetic model.ckpt, whose UNet, fps embedding and
    DDIM with the x̂0 rescale are checked there against lvdm with fps in each branch's conditioning), `generate(fps=)`
    is that very path: the frame rate in both branches, every row; and `sample` defaults to the model's 16 frames
    and fps 28, which its parameters say."""
    from test_videocrafter import vc2_file
    from npo import sampler, video
    path, _ = vc2_file(str(tmp_path / "model.ckpt"))
    pipe = pipeline.load_pipeline(path)
    kw = dict(steps=2, guidance=12.0, height=16, width=16, frames=2)
    ours = guided.generate(pipe, ["a red circle", "a cat"], [0, 1], "ugly", fps=8, **kw)
    pos, neg = pipe.conditioning(["a red circle", "a cat"]), pipe.conditioning(["ugly", "ugly"])
    fps = torch.tensor([8, 8])
    x_T = sampler.initial_latents([0, 1], 16, 16, 4, vae_scale=pipe.vae.downscale, frames=2)
    denoise = guided.npo_denoiser(pipe.unet, {**neg, "fps": fps}, {**pos, "fps": fps}, 12.0)
    want = video.decode_frames(pipe.vae, sampler.sample("ddim", denoise, x_T, pipe.scheduler_config, 2))
    assert (to01(ours) - to01(want)).abs().max() <= ATOL
    at_28 = guided.generate(pipe, ["a red circle", "a cat"], [0, 1], "ugly", fps=28, **kw)
    assert (to01(at_28) - to01(ours)).abs().max() > 1 / 255  # the frame rate conditions the video
    out = str(tmp_path / "out")
    code, err = run_cli(capsys, "sample", "--model", path, "--prompt", "a cat", "--steps", "1", "--height", "16",
                        "--width", "16", "--out", out)
    assert code == 0, err
    text = videos.read_parameters(os.path.join(out, "00000-seed0.webp"))
    assert "CFG scale: 12.0, Seed: 0, Size: 16x16, Frames: 16, FPS: 28, " in text
    assert len(os.listdir(os.path.join(out, "00000-seed0"))) == 16
    # the authors' 320 x 512 at DDIM η 1 when no size or η is given; given ones win (checked without sampling)
    for flags, want in (([], (320, 512, 1.0)), (["--height", "64", "--width", "32", "--ddim-eta", "0.5"], (64, 32, 0.5))):
        args = npo.build_parser().parse_args(["sample", "--model", path, *flags])
        sample.check_sample_arguments(args)
        sample.check_model_arguments(args, pipe)
        assert (args.height, args.width, args.ddim_eta) == want
    args = npo.build_parser().parse_args(["sample", "--sampler", "euler"])
    sample.check_sample_arguments(args)
    sample.check_model_arguments(args, pipe)
    assert args.ddim_eta == 0.0  # η is DDIM's: another sampler keeps 0 (VideoCrafter2 itself refuses one)
