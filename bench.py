"""Benchmarks against diffusers / transformers on identical SD1.5-shaped random weights (not a test).

    python bench.py models [--sizes 32,64] [--repeats 3] [--threads 2]
    python bench.py sampling [--size 32] [--repeats 3]
    python bench.py train [--size 32] [--steps 6]
    python bench.py reward [--size 32]
    python bench.py sdxl [--preset full|small] [--size 32] [--repeats 3]

Builds SD1.5-shaped random weights once (diffusers / transformers modules saved with save_pretrained, so
this needs the test extra), then times each model in a fresh process so that peak memory is that
process's own: the time of one forward (median of --repeats after a warm-up) and the peak resident memory
during it (Linux VmHWM, reset just before the forward). Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

WEIGHTS = os.environ.get("NPO_BENCH_DIR", "/tmp/npo-bench/sd15")


def make_weights(path):
    """SD1.5 shapes, random weights, diffusers folder layout (the tokenizer is ours from weights/)."""
    if os.path.exists(os.path.join(path, "done")):
        return
    import shutil
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768).save_pretrained(f"{path}/unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(f"{path}/vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                 hidden_act="quick_gelu")).save_pretrained(f"{path}/text_encoder")
    shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tokenizer"), f"{path}/tokenizer",
                    dirs_exist_ok=True)
    open(os.path.join(path, "done"), "w").close()


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load(impl, part):
    if impl == "ours":
        import clip
        import unet
        loader = {"unet": unet.load_unet, "vae": unet.load_vae, "text": clip.load_text_encoder}[part]
        return loader(f"{WEIGHTS}/{dict(text='text_encoder').get(part, part)}")
    if part == "text":
        from transformers import CLIPTextModel
        return CLIPTextModel.from_pretrained(f"{WEIGHTS}/text_encoder").eval()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    return cls.from_pretrained(f"{WEIGHTS}/{part}").eval()


def forward_fn(impl, part, model, size, batch):
    g = torch.Generator().manual_seed(0)
    if part == "unet":
        x, c = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 77, 768, generator=g)
        return (lambda: model(x, 500, c)) if impl == "ours" else (lambda: model(x, 500, c).sample)
    if part == "vae":
        z = torch.randn(1, 4, size, size, generator=g)
        return (lambda: model.decode(z)) if impl == "ours" else (lambda: model.decode(z).sample)
    ids = torch.randint(0, 49408, (batch, 77), generator=g)
    return (lambda: model(ids)) if impl == "ours" else (lambda: model(ids).last_hidden_state)


def measure_one(impl, part, size, batch, repeats, threads):
    torch.set_num_threads(threads)
    model = load(impl, part)
    fn = forward_fn(impl, part, model, size, batch)
    with torch.inference_mode():
        fn()  # warm-up
        reset_peak_rss()
        base = rss_kib("VmRSS")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        peak = rss_kib("VmHWM")
        flops = 0
        if impl == "ours":
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                fn()
            flops = counter.get_total_flops()
    return dict(impl=impl, part=part, size=size, batch=batch, seconds=statistics.median(times),
                peak_gib=peak / 2**20, forward_extra_gib=(peak - base) / 2**20, flops=flops)


def matmul_peak_gflops(threads, n=2048, repeats=5):
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / t / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_child(kind, *args):
    """Run `bench.py _KIND ARGS...` in a fresh process (so its peak memory is its own); return its JSON result."""
    out = subprocess.run([sys.executable, __file__, kind, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_models(args):
    make_weights(WEIGHTS)
    peak = matmul_peak_gflops(args.threads)
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak:.0f} GFLOP/s\n")
    print("| model | input | ours s | diffusers s | time ratio | ours peak GiB | ref peak GiB | memory ratio | ours forward +GiB | ref forward +GiB | ours GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [("unet", s, 2) for s in args.sizes] + [("vae", 32, 1), ("text", 0, 2)]
    for part, size, batch in jobs:
        ours = run_child("_one", "ours", part, size, batch, args.repeats, args.threads)
        ref = run_child("_one", "ref", part, size, batch, args.repeats, args.threads)
        what = {"unet": f"latent {size}x{size}, batch {batch}", "vae": f"decode latent {size}x{size}",
                "text": f"77 tokens, batch {batch}"}[part]
        gflops = ours["flops"] / ours["seconds"] / 1e9
        print(f"| {part} | {what} | {ours['seconds']:.2f} | {ref['seconds']:.2f} | {ours['seconds'] / ref['seconds']:.2f}x "
              f"| {ours['peak_gib']:.2f} | {ref['peak_gib']:.2f} | {ours['peak_gib'] / ref['peak_gib']:.2f}x "
              f"| {ours['forward_extra_gib']:.2f} | {ref['forward_extra_gib']:.2f} | {gflops:.0f} ({100 * gflops / peak:.0f}%) |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Sampling: one denoising step of CFG / NPO on the SD1.5-shaped UNet.

def sampling_one(variant, size, steps, threads):
    """Seconds per denoising step and whole-process peak memory for one way of running the guided UNet."""
    torch.set_num_threads(threads)
    import lora
    import pipeline
    import unet
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    model = unet.load_unet(f"{WEIGHTS}/unet", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    if variant != "plain":
        for name in ("eta", "delta"):  # two rank-8 offsets on to_q, to_k, to_v, to_out.0 (the authors' targets)
            lora.add_offset(model, name, rank=8)
            with torch.no_grad():
                for p in lora.parameters(model, name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    x = torch.randn(1, 4, size, size, generator=g).to(dtype)
    neg, pos = (torch.randn(1, 77, 768, generator=g).to(dtype) for _ in range(2))
    if variant.startswith("merged"):
        denoise = pipeline.merged_denoiser(*pipeline.merged_unets(model, 1.0, 1.0), neg, pos, 7.5)
    else:
        if "compile" in variant:
            model = torch.compile(model)
        denoise = pipeline.npo_denoiser(model, neg, pos, 7.5, 1.0, 1.0)  # plain: no offsets, so plain CFG
    t = torch.tensor(500)
    with torch.inference_mode():
        denoise(x, t)  # warm-up (and compilation)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            denoise(x, t)
            times.append(time.perf_counter() - t0)
    return dict(variant=variant, seconds=statistics.median(times), peak_gib=rss_kib("VmHWM") / 2**20)


SAMPLING_VARIANTS = {
    "plain": "(a) plain CFG, batch [x; x]",
    "npo": "(b) NPO batched, η and δ unmerged (rank 8)",
    "merged": "(c) authors' way: two merged UNets, two passes",
    "npo-bf16": "(b) in bfloat16",
    "npo-compile": "(b) with torch.compile",
}


def cmd_sampling(args):
    make_weights(WEIGHTS)
    rows = {}
    for variant in args.variants:
        rows[variant] = run_child("_sampling", variant, args.size, args.repeats, args.threads)
    base = rows.get("plain")
    print("| way | s / step | x (a) | peak GiB | x (a) |\n|---|---|---|---|---|")
    for variant, r in rows.items():
        ratio_t = f"{r['seconds'] / base['seconds']:.3f}x" if base else "-"
        ratio_m = f"{r['peak_gib'] / base['peak_gib']:.3f}x" if base else "-"
        print(f"| {SAMPLING_VARIANTS[variant]} | {r['seconds']:.2f} | {ratio_t} | {r['peak_gib']:.2f} | {ratio_m} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Training: one Diffusion-DPO step (1 pair, rank 8) on the SD1.5-shaped weights, ours vs the diffusers recipe.

def random_pair_dataset(folder, pixels):
    """One preference pair of random images; `npo.py train` reads it like any JSONL dataset."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("w", "l"):
        Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(f"{folder}/{name}.png")
    with open(f"{folder}/pairs.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "a photo of a cat", "chosen": "w.png", "rejected": "l.png"}) + "\n")
    return f"{folder}/pairs.jsonl"


def train_ours(variant, size, steps, threads):
    """Our whole training loop (`npo.py train`, in this process): seconds per step from its own log, which times
    everything a step does (data, text encoder, VAE encode unless cached, both UNet passes, backward, AdamW)."""
    import tempfile
    torch.set_num_threads(threads)
    import pipeline
    import train
    tmp = tempfile.mkdtemp()
    data = random_pair_dataset(f"{tmp}/data", 8 * size)
    flags = ["train", "--model", WEIGHTS, "--data", data, "--out", f"{tmp}/run", "--steps", str(steps),
             "--resolution", str(8 * size), "--rank", "8", "--log-every", "1", "--checkpoint-every", "0",
             "--device", "cpu"]
    flags += {"ours": [], "ours-gc": ["--gradient-checkpointing"], "ours-cache": ["--cache-latents"],
              "ours-cache-gc": ["--cache-latents", "--gradient-checkpointing"]}[variant]
    train.main(train.parse_args(flags[1:]))
    with open(f"{tmp}/run/log.jsonl") as f:
        seconds = [1 / line["it_per_s"] for line in map(json.loads, f) if "it_per_s" in line]
    # step 1 fills the cache; the one pair comes flipped or not, so a later step may encode once more: the median
    # of steps 3.. is a step that reads the cache
    return dict(variant=variant, seconds=statistics.median(seconds[2:]), encode_seconds=0.0,
                peak_gib=rss_kib("VmHWM") / 2**20)


def train_recipe(variant, size, steps, threads):
    """diffusers' Diffusion-DPO recipe (train_diffusion_dpo.py) reduced to its step: peft LoRA r=8 on
    to_q/k/v/out.0, the reference by disabling the adapters, loss −log σ(−β/2 · (Δθ − Δref)), AdamW, grad clip.
    Reports the step (text encoder, both UNet passes, backward, update) and its VAE encode of the pair separately."""
    torch.set_num_threads(threads)
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(f"{WEIGHTS}/unet").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(f"{WEIGHTS}/vae").requires_grad_(False)
    text = CLIPTextModel.from_pretrained(f"{WEIGHTS}/text_encoder").requires_grad_(False)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if variant == "recipe-gc":
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 8 * size, 8 * size, generator=g) * 2 - 1  # [x_w; x_l]
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    step_times, encode_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        t1 = time.perf_counter()
        with torch.no_grad():
            context = text(ids)[0].repeat(2, 1, 1)
        noise = torch.randn_like(latents[:1]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (1,)).repeat(2)
        noisy = scheduler.add_noise(latents, noise, t)
        model_pred = unet(noisy, t, context).sample
        with torch.no_grad():
            unet.disable_adapters()
            ref_pred = unet(noisy, t, context).sample
            unet.enable_adapters()
        mse = ((model_pred - noise) ** 2).mean(dim=(1, 2, 3))
        ref_mse = ((ref_pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = -F.logsigmoid(-0.5 * 5000 * ((mse[0] - mse[1]) - (ref_mse[0] - ref_mse[1])))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t1)
        encode_times.append(t1 - t0)
    return dict(variant=variant, seconds=statistics.median(step_times[1:]),
                encode_seconds=statistics.median(encode_times[1:]), peak_gib=rss_kib("VmHWM") / 2**20)


TRAIN_VARIANTS = {
    "recipe": "diffusers recipe (peft, adapters disabled for the reference)",
    "ours": "ours, VAE encode every step",
    "ours-cache": "ours, --cache-latents",
    "recipe-gc": "diffusers recipe, gradient checkpointing",
    "ours-gc": "ours, --gradient-checkpointing",
    "ours-cache-gc": "ours, --cache-latents --gradient-checkpointing",
}


def cmd_train(args):
    make_weights(WEIGHTS)
    rows = {}
    for variant in args.variants:
        rows[variant] = run_child("_train", variant, args.size, args.steps, args.threads)
    print(f"latent {args.size}x{args.size} ({8 * args.size} px), 1 pair, rank 8, fp32, {args.threads} threads; "
          "median of steps 2.. of one process each\n")
    print("| run | step s | + VAE encode s | = s per step with data | peak GiB | time vs recipe (same checkpointing) "
          "| with data vs recipe + encode | memory vs recipe |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, r in rows.items():
        ref = rows.get("recipe-gc" if variant.endswith("gc") else "recipe")
        total = r["seconds"] + r["encode_seconds"]
        cells = ["-", "-", "-"]
        if ref and variant.startswith("ours"):
            ref_total = ref["seconds"] + ref["encode_seconds"]
            cells = [f"{r['seconds'] / ref['seconds']:.2f}x", f"{total / ref_total:.2f}x",
                     f"{r['peak_gib'] / ref['peak_gib']:.2f}x"]
        encode = f"{r['encode_seconds']:.2f}" if variant.startswith("recipe") else "(in step)"
        print(f"| {TRAIN_VARIANTS[variant]} | {r['seconds']:.2f} | {encode} | {total:.2f} | {r['peak_gib']:.2f} | "
              + " | ".join(cells) + " |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Reward training (DRaFT-K): time and memory of one step against K and the number of sampling steps.

def reward_one(sample_steps, grad_steps, size, threads):
    """`npo.py train --method reward` for one step in this process (its many UNet calls amortize any warm-up): the
    step's time from its log, and the process's peak memory (the model load included, the same for every row)."""
    import tempfile
    torch.set_num_threads(threads)
    import pipeline
    import train
    tmp = tempfile.mkdtemp()
    with open(f"{tmp}/prompts.txt", "w") as f:
        f.write("a photo of a cat\n")
    flags = ["train", "--method", "reward", "--reward", "rewards:brightness", "--model", WEIGHTS, "--prompts-file",
             f"{tmp}/prompts.txt", "--out", f"{tmp}/run", "--steps", "1", "--resolution", str(8 * size),
             "--sample-steps", str(sample_steps), "--grad-steps", str(grad_steps), "--log-every", "1",
             "--checkpoint-every", "0", "--device", "cpu"]
    train.main(train.parse_args(flags[1:]))
    with open(f"{tmp}/run/log.jsonl") as f:
        seconds = [1 / line["it_per_s"] for line in map(json.loads, f) if "it_per_s" in line]
    return dict(sample_steps=sample_steps, grad_steps=grad_steps, seconds=seconds[-1], peak_gib=rss_kib("VmHWM") / 2**20)


def cmd_reward(args):
    make_weights(WEIGHTS)
    print(f"latent {args.size}x{args.size}, batch 1 (CFG: 2 rows per UNet call), rank 8, fp32, {args.threads} threads\n")
    print("| sampling steps | K (grad steps) | s / training step | peak GiB |\n|---|---|---|---|")
    for sample_steps, grad_steps in ((20, 1), (20, 2), (20, 4), (10, 1), (50, 1)):
        r = run_child("_reward", sample_steps, grad_steps, args.size, args.threads)
        print(f"| {sample_steps} | {grad_steps} | {r['seconds']:.1f} | {r['peak_gib']:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# SDXL (issue 11): the UNet against diffusers, the NPO step against plain CFG, and the two text encoders.

SDXL_PRESETS = {  # base channels, transformer depth per level, (width, layers, heads) of each text encoder
    "full": dict(channels=320, depth=[1, 2, 10], text=(768, 12, 12), text_2=(1280, 32, 20)),  # SDXL base's shapes
    "small": dict(channels=64, depth=[1, 1, 2], text=(64, 2, 2), text_2=(128, 2, 2)),  # to check the benchmark
}


def make_sdxl_weights(path, preset):
    """SDXL-shaped random weights in a diffusers layout: unet/, text_encoder/, text_encoder_2/, the tokenizers."""
    if os.path.exists(os.path.join(path, "done")):
        return
    import shutil
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    p = SDXL_PRESETS[preset]
    c, (w1, l1, h1), (w2, l2, h2) = p["channels"], p["text"], p["text_2"]
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=128, block_out_channels=(c, 2 * c, 4 * c), layers_per_block=2, cross_attention_dim=w1 + w2,
        attention_head_dim=(c // 64, 2 * c // 64, 4 * c // 64), transformer_layers_per_block=p["depth"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=w2 + 6 * 256).save_pretrained(f"{path}/unet")
    ids = dict(vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(hidden_size=w1, intermediate_size=4 * w1, num_hidden_layers=l1, num_attention_heads=h1,
                                 hidden_act="quick_gelu", **ids)).save_pretrained(f"{path}/text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=w2, intermediate_size=4 * w2, num_hidden_layers=l2,
                                               num_attention_heads=h2, hidden_act="gelu", projection_dim=w2, **ids)
                                ).save_pretrained(f"{path}/text_encoder_2")
    tokenizer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tokenizer")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tokenizer, f"{path}/{name}", dirs_exist_ok=True)
    with open(f"{path}/tokenizer_2/special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "!"}, f)  # SDXL's tokenizer_2 pads with "!"
    open(os.path.join(path, "done"), "w").close()


def timed_with_peak(fn, repeats):
    """(median seconds of `repeats` calls after a warm-up, whole-process peak GiB, peak GiB above the start)."""
    fn()
    reset_peak_rss()
    base = rss_kib("VmRSS")
    times = [_timed(fn) for _ in range(repeats)]
    peak = rss_kib("VmHWM")
    return statistics.median(times), peak / 2**20, (peak - base) / 2**20


def sdxl_unet_inputs(model_config, batch, size):
    g = torch.Generator().manual_seed(0)
    context = torch.randn(batch, 77, model_config.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, model_config.projection_class_embeddings_input_dim - 6 * 256, generator=g)
    time_ids = torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]] * batch)
    return torch.randn(batch, 4, size, size, generator=g), context, pooled, time_ids


def sdxl_unet_fn(impl, path, size):
    """One forward of the CFG batch (2 rows) through our UNet or diffusers'."""
    if impl == "ours":
        import unet
        model = unet.load_unet(f"{path}/unet")
        x, c, pooled, ids = sdxl_unet_inputs(model.config, 2, size)
        return lambda: model(x, 500, c, text_embeds=pooled, time_ids=ids)
    from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(f"{path}/unet").eval()
    x, c, pooled, ids = sdxl_unet_inputs(model.config, 2, size)
    return lambda: model(x, 500, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def sdxl_text_fn(impl, path):
    """Both text encoders on 2 prompts, as each pipeline encodes them (penultimate states, pooled projection)."""
    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon"]
    if impl == "ours":
        import clip
        encoders = [clip.load_text_encoder(f"{path}/text_encoder"),
                    clip.load_text_encoder(f"{path}/text_encoder_2", projection=True)]
        tokenizers = [clip.load_tokenizer(f"{path}/tokenizer"), clip.load_tokenizer(f"{path}/tokenizer_2")]
        return lambda: [e.penultimate_and_pooled(t(prompts)) for e, t in zip(encoders, tokenizers)]
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, add_watermarker=False,
        text_encoder=CLIPTextModel.from_pretrained(f"{path}/text_encoder").eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(f"{path}/text_encoder_2").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(f"{path}/tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(f"{path}/tokenizer_2"))
    return lambda: pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)


def sdxl_guided_fn(variant, path, size):
    """One guided denoising step (CFG 5) of ours: plain CFG, NPO with η and δ unmerged (rank 8), or two merged UNets."""
    import lora
    import pipeline
    import unet
    model = unet.load_unet(f"{path}/unet")
    g = torch.Generator().manual_seed(0)
    if variant != "plain":
        for name in ("eta", "delta"):
            lora.add_offset(model, name, rank=8)
            with torch.no_grad():
                for p in lora.parameters(model, name):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    x, c, pooled, ids = sdxl_unet_inputs(model.config, 2, size)
    neg, pos = ({"encoder_hidden_states": c[i:i + 1], "text_embeds": pooled[i:i + 1], "time_ids": ids[i:i + 1]}
                for i in (0, 1))
    if variant == "merged":
        denoise = pipeline.merged_denoiser(*pipeline.merged_unets(model, 1.0, 1.0), neg, pos, 5.0)
    else:
        denoise = pipeline.npo_denoiser(model, neg, pos, 5.0, 1.0, 1.0)  # plain: no offsets, so plain CFG
    return lambda: denoise(x[:1], torch.tensor(500))


def sdxl_one(what, impl, path, size, repeats, threads):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        if what == "unet":
            fn = sdxl_unet_fn(impl, path, size)
        elif what == "text":
            fn = sdxl_text_fn(impl, path)
        else:
            fn = sdxl_guided_fn(impl, path, size)
        seconds, peak, extra = timed_with_peak(fn, repeats)
    return dict(what=what, impl=impl, seconds=seconds, peak_gib=peak, forward_extra_gib=extra)


def cmd_sdxl(args):
    path = os.path.join(os.path.dirname(WEIGHTS), f"sdxl-{args.preset}")
    make_sdxl_weights(path, args.preset)

    def run(what, impl):
        return run_child("_sdxl", what, impl, path, args.size, args.repeats, args.threads)
    print(f"SDXL-shaped random weights ({args.preset}), fp32, latent {args.size}x{args.size}, {args.threads} threads; "
          "each row a fresh process (peak: whole process, weights included)\n")
    print("| part | ours s | diffusers s | time ratio | ours peak GiB | diffusers peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for what, label in (("unet", "UNet, CFG batch of 2"), ("text", "both text encoders, 2 prompts")):
        ours, ref = run(what, "ours"), run(what, "ref")
        print(f"| {label} | {ours['seconds']:.3f} | {ref['seconds']:.3f} | {ours['seconds'] / ref['seconds']:.2f}x | "
              f"{ours['peak_gib']:.2f} | {ref['peak_gib']:.2f} | {ours['peak_gib'] / ref['peak_gib']:.2f}x |", flush=True)
    rows = {v: run("guided", v) for v in ("plain", "npo", "merged")}
    print("\n| guided step (CFG 5) | s / step | x plain | peak GiB | x plain |\n|---|---|---|---|---|")
    for variant, label in (("plain", "plain CFG"), ("npo", "NPO, one copy of θ, η and δ unmerged (rank 8)"),
                           ("merged", "authors' way: two merged UNets, two passes")):
        r, base = rows[variant], rows["plain"]
        print(f"| {label} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.3f}x | {r['peak_gib']:.2f} | "
              f"{r['peak_gib'] / base['peak_gib']:.3f}x |", flush=True)
    from safetensors import safe_open
    with safe_open(f"{path}/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"\nUNet weights in fp16 ({n / 1e9:.2f}B parameters): {2 * n / 2**30:.2f} GiB for one copy of θ (NPO here, "
          f"plus the fp32 LoRAs); {4 * n / 2**30:.2f} GiB for the authors' two fp16 UNets.")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_sdxl":
        what, impl, path, size, repeats, threads = sys.argv[2:8]
        print(json.dumps(sdxl_one(what, impl, path, int(size), int(repeats), int(threads))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_sampling":
        variant, size, repeats, threads = sys.argv[2:6]
        print(json.dumps(sampling_one(variant, int(size), int(repeats), int(threads))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_reward":
        sample_steps, grad_steps, size, threads = map(int, sys.argv[2:6])
        print(json.dumps(reward_one(sample_steps, grad_steps, size, threads)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_train":
        variant, size, steps, threads = sys.argv[2:6]
        run = train_recipe if variant.startswith("recipe") else train_ours
        print(json.dumps(run(variant, int(size), int(steps), int(threads))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        impl, part, size, batch, repeats, threads = sys.argv[2:8]
        print(json.dumps(measure_one(impl, part, int(size), int(batch), int(repeats), int(threads))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="UNet / VAE / text encoder forward: ours vs diffusers / transformers")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64], help="UNet latent sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("sampling", help="one guided denoising step: plain CFG vs batched NPO vs two merged UNets")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per way (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(SAMPLING_VARIANTS),
                   help=f"comma-separated subset of {','.join(SAMPLING_VARIANTS)}")
    p.set_defaults(func=cmd_sampling)
    p = sub.add_parser("train", help="one Diffusion-DPO step: ours vs the diffusers recipe, with and without checkpointing")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32: 256 px images)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the median of steps 2.. (3.. for ours) is reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(TRAIN_VARIANTS),
                   help=f"comma-separated subset of {','.join(TRAIN_VARIANTS)}")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("reward", help="reward training (DRaFT-K): time and peak memory against K and sampling steps")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_reward)
    p = sub.add_parser("sdxl", help="SDXL: UNet and both text encoders vs diffusers; NPO step vs plain CFG")
    p.add_argument("--preset", choices=sorted(SDXL_PRESETS), default="full",
                   help="full: SDXL base's shapes (about 14 GiB of fp32 weights); small: the layout at toy size")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_sdxl)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
