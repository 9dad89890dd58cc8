"""Tiny reference models: diffusers / transformers modules with random weights, saved as a diffusers folder.

Nothing is downloaded: the configs are written here and the tokenizer is the CLIP vocabulary in weights/.
"""
import contextlib
import copy
import os
import shutil
import signal

import pytest
import torch

# `randomize` (every weight random, diffusers' zero-initialised layers too) and the tokenizer folder are shared with
# the benchmarks; the repository root is importable (pyproject's pytest pythonpath).
from benchmarks.random_weights import TOKENIZER_DIR, randomize  # noqa: F401 -- tests import them from here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=49407)

# SDXL's shape at toy size: no attention in the first down block, transformer depth per block (the up blocks take
# it reversed), linear projections, two text encoders (penultimate widths 32 + 48 = the UNet's context 80) and the
# "text_time" embedding of [pooled (24); 6 time ids x 8 features] = 72.
TINY_SDXL_UNET = dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=80,
                      attention_head_dim=(2, 4, 8), norm_num_groups=8, transformer_layers_per_block=[1, 1, 2],
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=24 + 6 * 8)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)
TINY_SDXL_TEXT = dict(TINY_TEXT, num_hidden_layers=3, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL's ids
TINY_SDXL_TEXT_2 = dict(TINY_SDXL_TEXT, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=24)


def make_model_dir(path, unet_kwargs=TINY_UNET, vae_kwargs=TINY_VAE, text_kwargs=TINY_TEXT, seed=0):
    """Write a diffusers model folder with random weights into `path`; return the reference modules."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    ref_unet = randomize(UNet2DConditionModel(**unet_kwargs), seed + 1).eval()
    ref_vae = randomize(AutoencoderKL(**vae_kwargs), seed + 2).eval()
    ref_text = CLIPTextModel(CLIPTextConfig(**text_kwargs)).eval()
    ref_unet.save_pretrained(os.path.join(path, "unet"))
    ref_vae.save_pretrained(os.path.join(path, "vae"))
    ref_text.save_pretrained(os.path.join(path, "text_encoder"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(path, "tokenizer"))
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(path, "scheduler"))
    return dict(unet=ref_unet, vae=ref_vae, text_encoder=ref_text)


# ModelScope's text-to-video UNet at toy size: two levels (cross-attention in the first down and last up block, the
# mid block always), heads of 8 dims (so 4 and 8 heads; transformer_in 8 heads of 8 on 32 channels), 3D blocks.
TINY_VIDEO_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                       attention_head_dim=8, norm_num_groups=8,
                       down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))


def make_video_dir(path, seed=0, unet_kwargs=TINY_VIDEO_UNET):
    """Write a tiny TextToVideoSDPipeline (ModelScope's text-to-video-ms layout: unet/ of UNet3DConditionModel, vae/,
    text_encoder/, tokenizer/, scheduler/ with DDIM, model_index.json) with random weights; return the pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    pipe = TextToVideoSDPipeline(
        unet=randomize(UNet3DConditionModel(**unet_kwargs), seed + 1).eval(),
        vae=randomize(AutoencoderKL(**TINY_VAE), seed + 2).eval(),
        text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), seed + 3).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1))
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_offset(model, name, seed):
    """Non-zero lora_up (a fresh offset is ΔW = 0), at a size that changes the output clearly but not wildly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        from npo import lora
        for offset in lora.offsets(model, name).values():
            for p in (offset.lora_down.weight, offset.lora_up.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.6 / p[0].numel() ** 0.5)


def make_rl_sdxl_dir(tmp_path_factory, name, scheduler):
    """A tiny SDXL folder for the RL methods' tests, with SDXL base's scheduler config (`scheduler` "sdxl_base",
    set_alpha_to_one false) or the Euler config as diffusers saves it (no set_alpha_to_one field)."""
    import json
    from ldm import SDXL_SCHEDULER
    model = str(tmp_path_factory.mktemp(name))
    refs = make_sdxl_dir(model)
    config = os.path.join(model, "scheduler", "scheduler_config.json")
    if scheduler == "sdxl_base":
        with open(config, "w") as f:
            json.dump(SDXL_SCHEDULER, f)
    else:
        assert "set_alpha_to_one" not in json.load(open(config))
    return model, refs


def make_sdxl_dir(path, seed=0, scheduler=None, unet_kwargs=TINY_SDXL_UNET, vae_kwargs=TINY_SDXL_VAE,
                  text_kwargs=TINY_SDXL_TEXT, text_2_kwargs=TINY_SDXL_TEXT_2):
    """Write a tiny SDXL folder as diffusers lays it out (model_index.json with force_zeros_for_empty_prompt,
    tokenizer_2 padding with "!", SDXL's EulerDiscreteScheduler config unless `scheduler` is given)."""
    import json
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    refs = dict(unet=randomize(UNet2DConditionModel(**unet_kwargs), seed + 1).eval(),
                vae=randomize(AutoencoderKL(**vae_kwargs), seed + 2).eval(),
                text_encoder=randomize(CLIPTextModel(CLIPTextConfig(**text_kwargs)), seed + 3).eval(),
                text_encoder_2=randomize(CLIPTextModelWithProjection(CLIPTextConfig(**text_2_kwargs)), seed + 4).eval())
    for name, model in refs.items():
        model.save_pretrained(os.path.join(path, name))
    shutil.copytree(TOKENIZER_DIR, os.path.join(path, "tokenizer"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(path, "tokenizer_2"))
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # SDXL's tokenizer_2 pads with "!"
        f = os.path.join(path, "tokenizer_2", name)
        with open(f) as fp:
            settings = json.load(fp)
        with open(f, "w") as fp:
            json.dump(dict(settings, pad_token="!"), fp)
    (scheduler or EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading")).save_pretrained(
        os.path.join(path, "scheduler"))
    with open(os.path.join(path, "model_index.json"), "w") as fp:
        json.dump({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}, fp)
    return refs


def diffusers_sdxl_pipeline(path, refs, force_zeros=True):
    """StableDiffusionXLPipeline with DDIMScheduler from the folder's scheduler config, on the reference modules."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionXLPipeline(
        vae=refs["vae"], text_encoder=refs["text_encoder"], text_encoder_2=refs["text_encoder_2"],
        unet=copy.deepcopy(refs["unet"]), tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_2")),
        scheduler=DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")),
        force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipeline(path, refs):
    """StableDiffusionPipeline on the reference modules (private copies of the UNet and the text encoder, which tests
    load LoRAs into)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=copy.deepcopy(refs["text_encoder"]),
                                   unet=copy.deepcopy(refs["unet"]),
                                   tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
                                   scheduler=DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_reference(model, refs, files, prompts, gens, steps, trainable, sdxl=False):
    """The diffusers side of a training step compared with ours: the pipeline with each LoRA file of `files` as a
    peft adapter named by its role (a parameter requires grad where `trainable(name)`), each example's prompt and x_T
    drawn from its generator in `gens` as training draws them, the prompts' and the empty negative's embeddings, and
    DDIMScheduler from the folder's config at `steps`; a namespace of those (and the adapter names). `sdxl`:
    StableDiffusionXLPipeline's, whose pos / neg are the UNet's keyword arguments (encoder_hidden_states and
    added_cond_kwargs: the pooled embeddings, zeros for no negative prompt, and the time ids of a 16 x 16 image)."""
    from types import SimpleNamespace
    from diffusers import DDIMScheduler
    pipe = diffusers_sdxl_pipeline(model, refs) if sdxl else diffusers_pipeline(model, refs)
    for role, path in files.items():
        pipe.load_lora_weights(path, adapter_name=role)
    for name, p in pipe.unet.named_parameters():
        p.requires_grad_(trainable(name))
    chosen = [prompts[int(torch.randint(len(prompts), (1,), generator=g))] for g in gens]
    x = torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens])
    with torch.no_grad():
        if sdxl:
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(chosen, device="cpu", do_classifier_free_guidance=True)
            time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), pos.dtype,
                                              pipe.text_encoder_2.config.projection_dim).repeat(len(gens), 1)
            pos = dict(encoder_hidden_states=pos, added_cond_kwargs=dict(text_embeds=pooled, time_ids=time_ids))
            neg = dict(encoder_hidden_states=neg, added_cond_kwargs=dict(text_embeds=neg_pooled, time_ids=time_ids))
        else:
            pos, _ = pipe.encode_prompt(chosen, "cpu", 1, False)
            neg, _ = pipe.encode_prompt([""] * len(gens), "cpu", 1, False)
    scheduler = DDIMScheduler.from_pretrained(os.path.join(model, "scheduler"))
    scheduler.set_timesteps(steps)
    return SimpleNamespace(pipe=pipe, chosen=chosen, x=x, pos=pos, neg=neg, scheduler=scheduler, names=list(files))


def record_calls(monkeypatch, part, method, record):
    """Make every pipeline that pipeline.load_pipeline loads from now on call `record(*args)` before each
    `pipe.<part>.<method>(*args)`: a recorder of what training asks of a model (UNet calls, VAE encodes)."""
    from npo import pipeline
    load = pipeline.load_pipeline

    def recording_pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)
        module = getattr(pipe, part)
        original = getattr(module, method)

        def recorded(*call_args, **call_kwargs):
            record(*call_args, **call_kwargs)
            return original(*call_args, **call_kwargs)
        setattr(module, method, recorded)
        return pipe
    monkeypatch.setattr(pipeline, "load_pipeline", recording_pipeline)


def write_random_pairs(folder, n, seed):
    """A JSONL dataset of n pairs of random 24x20 (H x W) images, so the resize and crop do something; its path."""
    import json

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for side in "wl":
            Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}{side}.png"))
        rows.append({"prompt": f"pair number {i}", "chosen": f"{i}w.png", "rejected": f"{i}l.png"})
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    return path


class Hung(BaseException):
    """Raised by `within` (a BaseException, so no `except Exception` on the way can swallow it)."""


@contextlib.contextmanager
def within(seconds):
    """Fail, instead of hanging, when the block runs longer than `seconds` (a stream that never yields a pair)."""
    def stop(*_):
        raise Hung(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def prompts_file(request, tmp_path_factory):
    """A prompts file (one per line) of the requesting test module's PROMPTS."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(request.module.PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(folder, reference modules) of a tiny SD1-shaped model with random weights."""
    path = str(tmp_path_factory.mktemp("tiny_model"))
    refs = make_model_dir(path)
    return path, refs


@pytest.fixture(scope="session")
def tiny_video_dir(tmp_path_factory):
    """The folder of a tiny ModelScope-shaped TextToVideoSDPipeline with random weights (`make_video_dir`); diffusers'
    own copy is `TextToVideoSDPipeline.from_pretrained(tiny_video_dir)`."""
    path = str(tmp_path_factory.mktemp("tiny_video"))
    make_video_dir(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(folder, reference modules) of a tiny SDXL-shaped model with random weights."""
    path = str(tmp_path_factory.mktemp("tiny_sdxl"))
    return path, make_sdxl_dir(path)


def random_lora_files(model, folder, specs, seed):
    """LoRA files made by our writer with random, non-zero up weights (a fresh offset is zero): {name: path}, one per
    (name, add_offset keyword arguments) in `specs`, the k-th drawn from a generator seeded seed + k."""
    from npo import lora
    from npo import pipeline
    pipe = pipeline.load_pipeline(model)
    files = {}
    for k, (name, kwargs) in enumerate(specs):
        lora.add_offset(pipe.unet, name, rank=4, **kwargs)
        g = torch.Generator().manual_seed(seed + k)
        with torch.no_grad():
            for p in lora.parameters(pipe.unet, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        files[name] = os.path.join(folder, f"{name}.safetensors")
        lora.save_lora(pipe.unet, name, files[name], role=name)
    return files


@pytest.fixture(scope="session")
def offsets(tiny_model, tmp_path_factory):
    """Two random LoRA files for the tiny model: η on attention, δ on to_q, to_v and a conv."""
    specs = [("eta", dict(alpha=2)), ("delta", dict(alpha=2, targets=("to_q", "to_v", "conv1")))]
    return random_lora_files(tiny_model[0], str(tmp_path_factory.mktemp("loras")), specs, seed=10)


# ----------------------------------------------------------------------------------------------------------
# Tiny CLIP scorers: transformers' CLIPModel and open_clip's CLIP with random weights. 224 px input (patch 32) so
# that preprocessing runs at the real size; towers of different widths so that no shape can be confused.

TINY_CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, hidden_act="gelu", eos_token_id=2)
TINY_CLIP_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                        patch_size=32, hidden_act="gelu")


def make_clip_dir(path, seed=0, projection_dim=16, text=TINY_CLIP_TEXT, vision=TINY_CLIP_VISION, tokenizer=True):
    """A transformers CLIPModel with random weights (logit_scale included) saved into `path`, with the CLIP tokenizer
    files beside it; returns the model."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    ref = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)), seed)
    ref.eval().save_pretrained(path)
    if tokenizer:
        shutil.copytree(TOKENIZER_DIR, path, dirs_exist_ok=True)
    return ref


def open_clip_modules():
    """open_clip's `model` and `tokenizer` modules, or a skip when open_clip_torch is not installed.

    open_clip's package __init__ imports torchvision (for its image transforms), and torchvision's wheels here are
    CUDA builds that cannot load beside the CPU torch. So where `import open_clip` fails, its model and tokenizer
    modules are imported on their own, with the one torchvision name they reach for (FrozenBatchNorm2d, used by
    ResNet towers only) stubbed for the duration of the import."""
    import importlib.util
    import sys
    import types
    import transformers  # noqa: F401 -- imported first: it probes for torchvision, which must not see the stub
    try:
        import open_clip
        return open_clip.model, open_clip.tokenizer
    except ImportError:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch is not installed (pip install --no-deps open_clip_torch ftfy wcwidth)")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    stubs = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    stubs["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    sys.modules["open_clip"] = package
    sys.modules.update({k: v for k, v in stubs.items() if k not in sys.modules})
    try:
        import open_clip.model
        import open_clip.tokenizer
    finally:
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]
    return open_clip.model, open_clip.tokenizer


def make_open_clip(seed=0):
    """open_clip's CLIP (the architecture of HPSv2's ViT-H-14 at toy size: GELU, argmax pooling) with random weights.
    Heads of 64 as in OpenCLIP's published towers, so that `clip.openclip_configs` finds them from the widths."""
    model, _ = open_clip_modules()
    torch.manual_seed(seed)
    vision = model.CLIPVisionCfg(layers=2, width=192, head_width=64, mlp_ratio=2, patch_size=32, image_size=224)
    text = model.CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2, mlp_ratio=2)
    return randomize(model.CLIP(16, vision, text), seed).eval()


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as each rank of a gloo test runs (OMP_NUM_THREADS=1): the one-process side of a DDP
    comparison then sums in the same order, so what differs is DDP's alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
