"""Benchmarks against diffusers / transformers on identical SD1.5-shaped random weights (not a test).

    python bench.py models [--sizes 32,64] [--repeats 3] [--threads 2]
    python bench.py sampling [--size 32] [--repeats 3]
    python bench.py solvers [--size 64] [--steps 25]
    python bench.py train [--size 32] [--steps 6]
    python bench.py reward [--size 32]
    python bench.py scorers [--shape clip-h] [--batch 4]
    python bench.py ddpo [--size 32] [--sample-steps 10,20,50]
    python bench.py data [--shards 4] [--workers 0,2]
    python bench.py gpu [--out gpu.md]
    python bench.py singlefile [--variants folder,safetensors,ckpt] [--small]
    python bench.py extract [--rank 64] [--conv-rank 32] [--targets ...] [--small]
    python bench.py sdxl [--preset full|small] [--size 32] [--repeats 3]

Builds SD1.5-shaped random weights once (diffusers / transformers modules saved with save_pretrained, so
this needs the test extra), then times each model in a fresh process so that peak memory is that
process's own: the time of one forward (median of --repeats after a warm-up) and the peak resident memory
during it (Linux VmHWM, reset just before the forward). Prints a Markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch

WEIGHTS = os.environ.get("NPO_BENCH_DIR", "/tmp/npo-bench/sd15")


def make_weights(path, tiny=False):
    """SD1.5 shapes (or, `tiny`, a few channels of them), random weights, diffusers folder layout (the tokenizer is
    ours from weights/)."""
    if os.path.exists(os.path.join(path, "done")):
        return
    import shutil
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    widths = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, attention_head_dim=4) if tiny else {}
    width = 32 if tiny else 768
    UNet2DConditionModel(sample_size=64, cross_attention_dim=width, **widths).save_pretrained(f"{path}/unet")
    AutoencoderKL(block_out_channels=(32, 32, 64, 64) if tiny else (128, 256, 512, 512), layers_per_block=2,
                  sample_size=512, norm_num_groups=8 if tiny else 32, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(f"{path}/vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_attention_heads=4 if tiny else 12,
                                 num_hidden_layers=2 if tiny else 12, hidden_act="quick_gelu")).save_pretrained(f"{path}/text_encoder")
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
    width = model.config.per_block("cross_attention_dim")[0]
    neg, pos = (torch.randn(1, 77, width, generator=g).to(dtype) for _ in range(2))
    if variant == "eta-model":  # a dense η: θ_ft as a second UNet, θ + α·η in place of θ, δ a LoRA on it
        tuned = unet.load_unet(f"{WEIGHTS}/unet", dtype=dtype)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 1e-3)
        pipeline.dense_eta(model, tuned, 1.0)
        lora.remove(model, "eta")
        dense = types.SimpleNamespace(unet=model, eta_unet=tuned, eta_alpha=1.0)
        denoise = pipeline.dense_eta_denoiser(dense, neg, pos, 7.5, 1.0, 1.0)
    elif variant.startswith("merged"):
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
    "eta-model": "(d) --eta-model: a dense η (θ_ft and θ + α·η, two passes), δ unmerged",
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


def cmd_solvers(args):
    """The samplers' own arithmetic per step (DDIM vs DPM-Solver++ 2M) at SD's latent shape, with a denoiser that
    costs nothing, so what is timed is the update alone; compare it with a UNet step (`bench.py sampling`)."""
    import sampler
    torch.set_num_threads(args.threads)
    x = torch.randn(2, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    out = torch.randn_like(x) * 0.1
    print(f"| sampler | ms / step (latent 2x4x{args.size}x{args.size}, {args.steps} steps, median of {args.repeats}) |")
    print("|---|---|")
    for name in sampler.SAMPLERS:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sampler.sample(name, lambda x_t, t: out, x, {}, args.steps)
            times.append((time.perf_counter() - t0) / args.steps)
        print(f"| {sampler.SAMPLERS[name]} | {1000 * statistics.median(times):.2f} |", flush=True)


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


def train_ours(variant, size, steps, threads, device="cpu", extra=(), weights=None):
    """Our whole training loop (`npo.py train`, in this process): seconds per step from its own log, which times
    everything a step does (data, text encoder, VAE encode unless cached, both UNet passes, backward, AdamW)."""
    import tempfile
    torch.set_num_threads(threads)
    import pipeline
    import train
    tmp = tempfile.mkdtemp()
    data = random_pair_dataset(f"{tmp}/data", 8 * size)
    flags = ["train", "--model", weights or WEIGHTS, "--data", data, "--out", f"{tmp}/run", "--steps", str(steps),
             "--resolution", str(8 * size), "--rank", "8", "--log-every", "1", "--checkpoint-every", "0",
             "--device", device, *extra]
    flags += {"ours": [], "ours-gc": ["--gradient-checkpointing"], "ours-cache": ["--cache-latents"],
              "ours-cache-gc": ["--cache-latents", "--gradient-checkpointing"]}[variant]
    train.main(train.parse_args(flags[1:]))
    with open(f"{tmp}/run/log.jsonl") as f:
        seconds = [1 / line["it_per_s"] for line in map(json.loads, f) if "it_per_s" in line]
    # step 1 fills the cache; the one pair comes flipped or not, so a later step may encode once more: the median
    # of steps 3.. is a step that reads the cache
    return dict(variant=variant, seconds=statistics.median(seconds[2:]), encode_seconds=0.0,
                peak_gib=rss_kib("VmHWM") / 2**20)


def train_recipe(variant, size, steps, threads, device="cpu", weights=None):
    """diffusers' Diffusion-DPO recipe (train_diffusion_dpo.py) reduced to its step: peft LoRA r=8 on
    to_q/k/v/out.0, the reference by disabling the adapters, loss −log σ(−β/2 · (Δθ − Δref)), AdamW, grad clip.
    Reports the step (text encoder, both UNet passes, backward, update) and its VAE encode of the pair separately."""
    torch.set_num_threads(threads)
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel
    weights = weights or WEIGHTS
    unet = UNet2DConditionModel.from_pretrained(f"{weights}/unet").requires_grad_(False).to(device)
    vae = AutoencoderKL.from_pretrained(f"{weights}/vae").requires_grad_(False).to(device)
    text = CLIPTextModel.from_pretrained(f"{weights}/text_encoder").requires_grad_(False).to(device)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if variant == "recipe-gc":
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 3, 8 * size, 8 * size, generator=g) * 2 - 1).to(device)  # [x_w; x_l]
    ids = torch.randint(0, 49408, (1, 77), generator=g).to(device)
    wait = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    step_times, encode_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        wait()
        t1 = time.perf_counter()
        with torch.no_grad():
            context = text(ids)[0].repeat(2, 1, 1)
        noise = torch.randn_like(latents[:1]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (1,)).repeat(2).to(device)
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
        wait()
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
# GPU: one command that times ours against diffusers in one process on a CUDA machine (a CPU run checks it works).

def _synchronized(device, fn, repeats):
    """Median seconds of `fn()` over `repeats` calls after one warm-up, waiting for the device each time."""
    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()
    wait()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_gib(device, fn):
    """Peak device memory of one `fn()` call above what was allocated before it (CUDA); NaN on the CPU."""
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def gpu_unet_rows(device, weights, size, repeats):
    """One UNet forward (batch 2) in fp16 and bf16, ours vs diffusers; and ours under torch.compile (fp16)."""
    import unet as ours_unet
    from diffusers import UNet2DConditionModel
    rows = []
    for dtype in (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.bfloat16,):
        ours = ours_unet.load_unet(f"{weights}/unet", dtype=dtype, device=device)
        ref = UNet2DConditionModel.from_pretrained(f"{weights}/unet", torch_dtype=dtype).to(device).eval()
        x = torch.randn(2, 4, size, size, device=device, dtype=dtype)
        c = torch.randn(2, 77, ours.config.cross_attention_dim, device=device, dtype=dtype)
        with torch.inference_mode():
            fns = {"ours": lambda: ours(x, 500, c), "diffusers": lambda: ref(x, 500, c).sample}
            if dtype == torch.float16:  # CUDA only: inductor's CPU compile takes minutes, for no GPU figure
                compiled = torch.compile(ours)
                fns["ours, torch.compile"] = lambda: compiled(x, 500, c)
            timed = {k: (_synchronized(device, f, repeats), _peak_gib(device, f)) for k, f in fns.items()}
        name = str(dtype).removeprefix("torch.")
        rows += [(f"UNet forward, {name}, {k}", t, m, timed["diffusers"]) for k, (t, m) in timed.items()]
        del ours, ref
    return rows


def gpu_sampling_rows(device, weights, size, repeats):
    """One guided step: plain CFG vs NPO (η and δ as unmerged rank-8 offsets, one batched forward), fp16 (bf16 on CPU)."""
    import lora
    import pipeline
    import unet as ours_unet
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    model = ours_unet.load_unet(f"{weights}/unet", dtype=dtype, device=device)
    x = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    neg, pos = (torch.randn(1, 77, model.config.cross_attention_dim, device=device, dtype=dtype) for _ in range(2))
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        plain = pipeline.npo_denoiser(model, neg, pos, 7.5)
        timed = {"plain CFG": (_synchronized(device, lambda: plain(x, t), repeats), _peak_gib(device, lambda: plain(x, t)))}
        for name in ("eta", "delta"):
            lora.add_offset(model, name, rank=8)
        npo = pipeline.npo_denoiser(model, neg, pos, 7.5, 1.0, 1.0)
        timed["NPO (η, δ unmerged)"] = (_synchronized(device, lambda: npo(x, t), repeats),
                                        _peak_gib(device, lambda: npo(x, t)))
    name = str(dtype).removeprefix("torch.")
    return [(f"guided step, {name}, {k}", tm, m, timed["plain CFG"]) for k, (tm, m) in timed.items()]


def gpu_train_rows(device, weights, size):
    """One Diffusion-DPO step (1 pair, rank 8): ours (`npo.py train`, --mixed-precision fp16 on CUDA, bf16 on the CPU)
    vs the diffusers recipe in fp32 (what its script runs without accelerate's mixed precision)."""
    mode = "fp16" if device.type == "cuda" else "bf16"
    threads = torch.get_num_threads()
    ours = train_ours("ours", size, 4, threads, str(device), ["--mixed-precision", mode], weights)
    ours_fp32 = train_ours("ours", size, 4, threads, str(device), weights=weights)
    recipe = train_recipe("recipe", size, 4, threads, str(device), weights)
    return [(f"DPO step, ours, --mixed-precision {mode}", ours["seconds"], float("nan"), (recipe["seconds"], 0)),
            ("DPO step, ours, fp32", ours_fp32["seconds"], float("nan"), (recipe["seconds"], 0)),
            ("DPO step, diffusers recipe, fp32", recipe["seconds"], float("nan"), (recipe["seconds"], 0))]


def gpu_sdxl_rows(device, weights, preset, size, repeats):
    """SDXL (latent 128: 1024 px): one UNet forward (batch 2), ours vs diffusers, and a guided step, NPO (η and δ
    unmerged, rank 8) vs plain CFG; fp16 (bf16 on the CPU). `preset` "small" is SDXL's layout at toy size."""
    import lora
    import pipeline
    import unet as ours_unet
    from diffusers import UNet2DConditionModel
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), f"sdxl-{preset}")  # beside the SD1.5 weights
    make_sdxl_weights(path, preset)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    ours = ours_unet.load_unet(f"{path}/unet", dtype=dtype, device=device)
    ref = UNet2DConditionModel.from_pretrained(f"{path}/unet", torch_dtype=dtype).to(device).eval()
    x, c, pooled, ids = (v.to(device, dtype) for v in sdxl_unet_inputs(ours.config, 2, size))
    name, t = str(dtype).removeprefix("torch."), torch.tensor(500, device=device)
    neg, pos = ({"encoder_hidden_states": c[i:i + 1], "text_embeds": pooled[i:i + 1], "time_ids": ids[i:i + 1]}
                for i in (0, 1))
    with torch.inference_mode():
        fns = {"ours": lambda: ours(x, 500, c, text_embeds=pooled, time_ids=ids),
               "diffusers": lambda: ref(x, 500, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample}
        unet_rows = {k: (_synchronized(device, f, repeats), _peak_gib(device, f)) for k, f in fns.items()}
        del ref, fns
        plain = pipeline.npo_denoiser(ours, neg, pos, 5.0)
        steps = {"plain CFG": (_synchronized(device, lambda: plain(x[:1], t), repeats),
                               _peak_gib(device, lambda: plain(x[:1], t)))}
        for offset in ("eta", "delta"):
            lora.add_offset(ours, offset, rank=8)
        npo = pipeline.npo_denoiser(ours, neg, pos, 5.0, 1.0, 1.0)
        steps["NPO (η, δ unmerged)"] = (_synchronized(device, lambda: npo(x[:1], t), repeats),
                                        _peak_gib(device, lambda: npo(x[:1], t)))
    return ([(f"SDXL UNet forward, {name}, {k}", tm, m, unet_rows["diffusers"]) for k, (tm, m) in unet_rows.items()]
            + [(f"SDXL guided step, {name}, {k}", tm, m, steps["plain CFG"]) for k, (tm, m) in steps.items()])


def cmd_gpu(args):
    """The GPU table: UNet fp16 / bf16 / compile, NPO against plain CFG, the DPO step against the recipe."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    weights = args.weights or WEIGHTS
    make_weights(weights, tiny=args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (fallback: checks the command runs)"
    lines = [f"{name}; SD1.5-shaped random weights{' (tiny)' if args.tiny else ''}, latent {args.size}x{args.size} "
             f"({8 * args.size} px); median of {args.repeats} after a warm-up", "",
             "| what | s | vs reference | peak GiB above weights |", "|---|---|---|---|"]
    rows = gpu_unet_rows(device, weights, args.size, args.repeats) + gpu_sampling_rows(device, weights, args.size, args.repeats)
    if not args.skip_train:
        rows += gpu_train_rows(device, weights, args.size)
    if args.sdxl != "none":
        lines[0] += f"; SDXL-shaped ({args.sdxl}) at latent {args.sdxl_size}x{args.sdxl_size} ({8 * args.sdxl_size} px)"
        rows += gpu_sdxl_rows(device, weights, args.sdxl, args.sdxl_size, args.repeats)
    for what, seconds, memory, (ref_seconds, _) in rows:
        lines.append(f"| {what} | {seconds:.4f} | {seconds / ref_seconds:.2f}x | {memory:.2f} |")
    print("\n".join(lines), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Scorers: PickScore-shaped CLIP-H/14 (224 px), ours vs transformers' CLIPModel.

CLIP_SHAPES = {  # transformers configs: PickScore's CLIP-H/14, and a small one to check that the command runs
    "clip-h": (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    hidden_act="gelu"),
               dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    patch_size=14, image_size=224, hidden_act="gelu"), 1024),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
             dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=224, hidden_act="gelu"), 32),
}


def make_clip_weights(shape):
    """A transformers CLIPModel folder of the given shape with random weights (made once), with our tokenizer."""
    path = os.path.join(os.path.dirname(WEIGHTS), f"clip-{shape}")
    if not os.path.exists(os.path.join(path, "done")):
        import shutil
        from transformers import CLIPConfig, CLIPModel
        torch.manual_seed(0)
        text, vision, dim = CLIP_SHAPES[shape]
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim)).save_pretrained(path)
        shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "tokenizer"), path,
                        dirs_exist_ok=True)
        open(os.path.join(path, "done"), "w").close()
    return path


def pickscore_fn(impl, path):
    """score(pixels, prompts) = exp(logit_scale) · cos, loaded the way each side loads it."""
    if impl == "ours":
        import scorers
        return scorers.load("pickscore", path).score
    from transformers import CLIPModel, CLIPTokenizer
    model, tokenizer = CLIPModel.from_pretrained(path).eval(), CLIPTokenizer.from_pretrained(path)

    def score(pixels, prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        image, text = (getattr(f, "pooler_output", f) for f in (model.get_image_features(pixel_values=pixels),
                                                              model.get_text_features(input_ids=ids)))
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (image * text).sum(-1)
    return score


def scorer_one(impl, shape, batch, repeats, threads):
    torch.set_num_threads(threads)
    path = make_clip_weights(shape)
    score = pickscore_fn(impl, path)
    load_peak = rss_kib("VmHWM")
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = [f"a photo of a cat number {i}, trending on artstation" for i in range(batch)]
    with torch.inference_mode():
        first = score(pixels, prompts)  # warm-up
        reset_peak_rss()
        base = rss_kib("VmRSS")
        times = [_timed(lambda: score(pixels, prompts)) for _ in range(repeats)]
        peak = rss_kib("VmHWM")
    return dict(seconds=statistics.median(times), load_peak_gib=load_peak / 2**20, peak_gib=peak / 2**20,
                forward_extra_gib=(peak - base) / 2**20, scores=first.tolist())


def cmd_scorers(args):
    make_clip_weights(args.shape)
    print(f"PickScore-shaped CLIP ({args.shape}), 224 px, batch {args.batch}, fp32, {args.threads} threads\n")
    print("| scorer | images/s | time ratio | load peak GiB | forward peak GiB | forward +GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    rows = {impl: run_child("_scorer", impl, args.shape, args.batch, args.repeats, args.threads)
            for impl in ("ref", "ours")}
    ref = rows["ref"]
    for impl, name in (("ref", "transformers CLIPModel"), ("ours", "ours (scorers.PickScore)")):
        r = rows[impl]
        print(f"| {name} | {args.batch / r['seconds']:.2f} | {r['seconds'] / ref['seconds']:.2f}x | {r['load_peak_gib']:.2f} "
              f"| {r['peak_gib']:.2f} | {r['forward_extra_gib']:.2f} | {r['peak_gib'] / ref['peak_gib']:.2f}x |", flush=True)
    gap = max(abs(a - b) for a, b in zip(rows["ours"]["scores"], ref["scores"]))
    print(f"\nlargest score difference, ours vs transformers: {gap:.2e}")


# ----------------------------------------------------------------------------------------------------------
# DDPO: one epoch (sampling + PPO update) against its sampling alone, and peak memory against the sampling steps.

def ddpo_one(sample_steps, size, threads):
    """One DDPO epoch of `npo.py train --method ddpo` in this process (2 sampled batches of 1 prompt, 1 pass: 2
    optimizer steps over every stored step). The epoch's time from its log; the sampling's (DDIM with log-probs,
    decode, reward) by timing `train.ddpo_rollout`; the peak memory of the whole process and of the loop alone
    (VmHWM reset when the loop starts, after the model has loaded)."""
    import tempfile
    torch.set_num_threads(threads)
    import train
    tmp = tempfile.mkdtemp()
    with open(f"{tmp}/prompts.txt", "w") as f:
        f.write("a photo of a cat\n")
    sampling, rollout, loop = [], train.ddpo_rollout, train.train

    def timed_rollout(*args):
        t0 = time.perf_counter()
        result = rollout(*args)
        sampling.append(time.perf_counter() - t0)
        return result

    def loop_with_fresh_peak(*args):
        reset_peak_rss()
        return loop(*args)
    train.ddpo_rollout, train.train = timed_rollout, loop_with_fresh_peak
    start_peak = rss_kib("VmHWM")
    flags = ["--method", "ddpo", "--reward", "rewards:jpeg_compressibility", "--model", WEIGHTS, "--prompts-file",
             f"{tmp}/prompts.txt", "--out", f"{tmp}/run", "--steps", "2", "--resolution", str(8 * size),
             "--sample-steps", str(sample_steps), "--log-every", "1", "--checkpoint-every", "0", "--device", "cpu"]
    train.main(train.parse_args(flags))
    with open(f"{tmp}/run/log.jsonl") as f:
        epoch = sum(1 / line["it_per_s"] for line in map(json.loads, f) if "it_per_s" in line)
    return dict(sample_steps=sample_steps, epoch_seconds=epoch, sampling_seconds=sum(sampling),
                loop_peak_gib=rss_kib("VmHWM") / 2**20, load_peak_gib=start_peak / 2**20)


def cmd_ddpo(args):
    make_weights(WEIGHTS)
    print(f"latent {args.size}x{args.size}, one epoch: 2 batches of 1 prompt (CFG: 2 rows per UNet call), 1 pass, "
          f"every step trained, rank 8, fp32, {args.threads} threads\n")
    print("| sampling steps | s / epoch | s sampling (DDIM + log p, decode, reward) | epoch / sampling | "
          "peak GiB in the loop | peak GiB before it (load) |\n|---|---|---|---|---|---|")
    for steps in args.sample_steps:
        r = run_child("_ddpo", steps, args.size, args.threads)
        print(f"| {steps} | {r['epoch_seconds']:.1f} | {r['sampling_seconds']:.1f} | "
              f"{r['epoch_seconds'] / r['sampling_seconds']:.2f}x | {r['loop_peak_gib']:.2f} | "
              f"{r['load_peak_gib']:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Single-file checkpoints: load time and peak memory against the same model as a folder; extract-lora's time.

def single_file_of(folder, suffix):
    """The model folder written once as an LDM single file (tests/ldm.py's converter, checked against diffusers'
    from_single_file), straight from the folder's tensors: no modules built, nothing copied but the file."""
    path = f"{folder}{suffix}"
    if os.path.exists(path):
        return path
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from types import SimpleNamespace

    import ldm
    from safetensors.torch import load_file, save_file

    def part(name, weights):
        with open(f"{folder}/{name}/config.json") as f:
            config = SimpleNamespace(**json.load(f))
        tensors = load_file(f"{folder}/{name}/{weights}")
        return SimpleNamespace(config=config, state_dict=lambda: tensors)
    pipe = SimpleNamespace(unet=part("unet", "diffusion_pytorch_model.safetensors"),
                           vae=part("vae", "diffusion_pytorch_model.safetensors"),
                           text_encoder=part("text_encoder", "model.safetensors"))
    sd = {k: v.contiguous() for k, v in ldm.to_ldm(pipe, "sd1").items()}
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


def load_one(path, threads):
    """Seconds to load `path` (a folder or a single file) with pipeline.load_pipeline, and the peak resident memory
    (VmHWM above the RSS just before) of the load and a first read of every weight, against the weights' bytes.
    The read counts: a memory-mapped file's pages become resident only when touched, so the load alone shows none."""
    torch.set_num_threads(threads)
    import pipeline
    reset_peak_rss()
    base = rss_kib("VmRSS")
    t0 = time.perf_counter()
    pipe = pipeline.load_pipeline(path)
    seconds = time.perf_counter() - t0
    params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
    with torch.no_grad():
        for p in params:
            p.sum()
    weights = sum(p.numel() * p.element_size() for p in params)
    return dict(seconds=seconds, extra_gib=(rss_kib("VmHWM") - base) / 2**20, weights_gib=weights / 2**30)


def bench_folder(small):
    """SD1.5-shaped random weights, or with --small a tiny SD1 model (to check the command quickly)."""
    if not small:
        make_weights(WEIGHTS)
        return WEIGHTS
    folder = os.path.join(os.path.dirname(WEIGHTS), "small-sd1")
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
        import ldm
        ldm.make_family_dir(folder, "sd1")
    return folder


def cmd_singlefile(args):
    folder = bench_folder(args.small)
    paths = {"folder": folder, **{v: single_file_of(folder, f".{v}") for v in args.variants if v != "folder"}}
    print(f"pipeline.load_pipeline, fp32, {args.threads} threads, median of {args.repeats} fresh processes "
          "(files in the page cache)\n")
    print("| model | load s | vs folder | peak RSS above start (load + first read) GiB | weights GiB | RSS / weights |\n"
          "|---|---|---|---|---|---|")
    rows = {v: [run_child("_load", p, args.threads) for _ in range(args.repeats)] for v, p in paths.items()}
    folder_s = statistics.median(r["seconds"] for r in rows["folder"])
    for variant, runs in rows.items():
        s, extra = statistics.median(r["seconds"] for r in runs), max(r["extra_gib"] for r in runs)
        w = runs[0]["weights_gib"]
        print(f"| {variant} | {s:.2f} | {s / folder_s:.2f}x | {extra:.2f} | {w:.2f} | {extra / w:.2f} |", flush=True)


def cmd_extract(args):
    """lora.extract_offset at SD1.5 shapes: the base UNet against a copy with every weight moved."""
    torch.set_num_threads(args.threads)
    import lora
    import pipeline
    folder = bench_folder(args.small)
    base, tuned = pipeline.load_unet(folder), pipeline.load_unet(folder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    t0 = time.perf_counter()
    stats = lora.extract_offset(base, tuned, "eta", args.rank, args.conv_rank, args.targets)
    seconds = time.perf_counter() - t0
    print(f"| targets | rank | conv rank | layers | s | overall relative error (random ΔW) |\n|---|---|---|---|---|---|")
    print(f"| {args.targets} | {args.rank} | {args.conv_rank or args.rank} | {len(stats)} | {seconds:.1f} "
          f"| {lora.relative_errors(stats)['overall']:.3f} |")


# ----------------------------------------------------------------------------------------------------------
# Data: Pick-a-Pic-shaped parquet shards streamed by data.batches (decode, resize, crop, flip) against the step's
# demand, and the peak memory of one epoch at 1x and 10x the shards.

def write_fake_shards(folder, shards, rows, size, group_rows=8):
    """`shards` parquet files of `rows` pairs of random `size`-px JPEGs each (Pick-a-Pic's columns; ~500 px photos
    as the dataset holds), written once."""
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        jpgs = []
        for _ in range(2 * rows):
            buffer = io.BytesIO()
            noise = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)  # smooth-ish content: JPEG-sized
            Image.fromarray(noise).resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
            jpgs.append(buffer.getvalue())
        table = pa.table({"caption": [f"a photo {s}-{i}" for i in range(rows)], "jpg_0": jpgs[::2], "jpg_1": jpgs[1::2],
                          "label_0": [float(i % 2) for i in range(rows)], "label_1": [float(1 - i % 2) for i in range(rows)]})
        pq.write_table(table, os.path.join(folder, f"train-{s:05d}.parquet"), row_group_size=group_rows)
    open(os.path.join(folder, "done"), "w").close()
    return folder


def data_one(folder, resolution, batches, workers, threads):
    """Pairs per second out of data.batches over `folder` (after one warm-up batch), and the process's peak RSS."""
    torch.set_num_threads(threads)
    import data
    stream = data.batches(data.open_pairs(folder), 8, 0, resolution, random_crop=True, num_workers=workers)
    next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - t0
    stream.close()
    return dict(pairs_per_s=8 * batches / seconds, peak_gib=rss_kib("VmHWM") / 2**20)


def epoch_peak(folder, threads):
    """One whole epoch of rows (no decoding) over `folder`: the peak RSS, whatever the number of shards."""
    torch.set_num_threads(threads)
    import data
    dataset = data.open_pairs(folder)
    for (epoch, _), _ in dataset.rows(0):
        if epoch:
            break
    return dict(peak_gib=rss_kib("VmHWM") / 2**20, rows=len(dataset))


def cmd_data(args):
    base = os.path.join(os.path.dirname(WEIGHTS), "shards")
    one = write_fake_shards(f"{base}-x1", args.shards, 64, args.image_size)
    ten = write_fake_shards(f"{base}-x10", 10 * args.shards, 64, args.image_size)
    print(f"{args.image_size} px JPEG pairs, batches of 8 at --resolution {args.resolution}, random crop and flip, "
          f"{args.threads} threads\n\n| workers | pairs / s | peak GiB |\n|---|---|---|")
    for workers in args.workers:
        r = run_child("_data", one, args.resolution, args.batches, workers, args.threads)
        print(f"| {workers} | {r['pairs_per_s']:.1f} | {r['peak_gib']:.2f} |", flush=True)
    print("\n| shards | rows | one epoch's peak GiB (rows only) |\n|---|---|---|")
    for folder, count in ((one, args.shards), (ten, 10 * args.shards)):
        r = run_child("_epoch", folder, args.threads)
        print(f"| {count} | {r['rows']} | {r['peak_gib']:.3f} |", flush=True)


def add_data_command(sub):
    p = sub.add_parser("data", help="parquet shards: pairs/s decoded and cropped, and peak memory at 1x and 10x shards")
    p.add_argument("--shards", type=int, default=4, help="shards at 1x (default 4; 10x writes ten times as many)")
    p.add_argument("--image-size", type=int, default=512, help="side of the stored JPEGs (default 512)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution (default 512)")
    p.add_argument("--batches", type=int, default=8, help="timed batches of 8 (default 8)")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2],
                   help="comma-separated --num-workers values (default 0,2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_data)


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


# `bench.py _KIND ARGS...`: one measurement in a fresh process (see run_child), printed as JSON.
CHILDREN = {
    "_one": lambda a: measure_one(a[0], a[1], *map(int, a[2:6])),
    "_sampling": lambda a: sampling_one(a[0], *map(int, a[1:4])),
    "_train": lambda a: (train_recipe if a[0].startswith("recipe") else train_ours)(a[0], *map(int, a[1:4])),
    "_reward": lambda a: reward_one(*map(int, a[0:4])),
    "_scorer": lambda a: scorer_one(a[0], a[1], *map(int, a[2:5])),
    "_ddpo": lambda a: ddpo_one(*map(int, a[0:3])),
    "_load": lambda a: load_one(a[0], int(a[1])),
    "_data": lambda a: data_one(a[0], *map(int, a[1:5])),
    "_epoch": lambda a: epoch_peak(a[0], int(a[1])),
    "_sdxl": lambda a: sdxl_one(a[0], a[1], a[2], *map(int, a[3:6])),
}


def add_models_command(sub):
    p = sub.add_parser("models", help="UNet / VAE / text encoder forward: ours vs diffusers / transformers")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[32, 64], help="UNet latent sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_models)


def add_sampling_command(sub):
    p = sub.add_parser("sampling", help="one guided denoising step: plain CFG vs batched NPO vs two merged UNets")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per way (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(SAMPLING_VARIANTS),
                   help=f"comma-separated subset of {','.join(SAMPLING_VARIANTS)}")
    p.set_defaults(func=cmd_sampling)


def add_solvers_command(sub):
    p = sub.add_parser("solvers", help="the sampler update alone per step: DDIM vs DPM-Solver++ (2M)")
    p.add_argument("--size", type=int, default=64, help="latent side (default 64: SD1.5's 512 px)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--repeats", type=int, default=3, help="runs per sampler (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_solvers)


def add_train_command(sub):
    p = sub.add_parser("train", help="one Diffusion-DPO step: ours vs the diffusers recipe, with and without checkpointing")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32: 256 px images)")
    p.add_argument("--steps", type=int, default=6, help="steps per run; the median of steps 2.. (3.. for ours) is reported")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(TRAIN_VARIANTS),
                   help=f"comma-separated subset of {','.join(TRAIN_VARIANTS)}")
    p.set_defaults(func=cmd_train)


def add_gpu_command(sub):
    p = sub.add_parser("gpu", help="on a CUDA machine: UNet fp16/bf16/compile, NPO vs plain CFG, DPO step vs recipe; "
                                   "SDXL's UNet and NPO step")
    p.add_argument("--size", type=int, default=64, help="latent side (default 64: 512 px)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is there (a check that it runs)")
    p.add_argument("--tiny", action="store_true", help="tiny random weights instead of SD1.5-shaped ones (a quick check)")
    p.add_argument("--weights", default=None, help="folder for the random weights (default: NPO_BENCH_DIR)")
    p.add_argument("--skip-train", action="store_true", help="leave out the DPO step rows")
    p.add_argument("--sdxl", choices=["full", "small", "none"], default="full",
                   help="SDXL rows: SDXL base's shapes (full, default), its layout at toy size (small), or none")
    p.add_argument("--sdxl-size", type=int, default=128, help="SDXL latent side (default 128: 1024 px)")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    p.set_defaults(func=cmd_gpu)


def add_reward_command(sub):
    p = sub.add_parser("reward", help="reward training (DRaFT-K): time and peak memory against K and sampling steps")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_reward)


def add_ddpo_command(sub):
    p = sub.add_parser("ddpo", help="DDPO: one epoch (sampling + update) against its sampling; peak memory against steps")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--sample-steps", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50],
                   help="comma-separated sampling step counts, one epoch each (default 10,20,50)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_ddpo)


def add_singlefile_command(sub):
    p = sub.add_parser("singlefile", help="load time and peak memory: a single-file checkpoint against its folder")
    p.add_argument("--variants", type=lambda s: s.split(","), default=["folder", "safetensors"],
                   help="comma-separated subset of folder,safetensors,ckpt")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (median time, largest memory)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--small", action="store_true", help="a tiny SD1 model instead of SD1.5 shapes (a quick check)")
    p.set_defaults(func=cmd_singlefile)


def add_extract_command(sub):
    p = sub.add_parser("extract", help="extract-lora's truncated SVD at SD1.5 shapes")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--conv-rank", type=int, default=None)
    p.add_argument("--targets", default="to_q,to_k,to_v,to_out.0")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--small", action="store_true", help="a tiny SD1 model instead of SD1.5 shapes (a quick check)")
    p.set_defaults(func=cmd_extract)


def add_scorers_command(sub):
    p = sub.add_parser("scorers", help="PickScore scoring throughput and memory: ours vs transformers' CLIPModel")
    p.add_argument("--shape", choices=list(CLIP_SHAPES), default="clip-h", help="clip-h (PickScore's) or tiny (a check)")
    p.add_argument("--batch", type=int, default=4, help="images (and prompts) per scoring call (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_scorers)


def add_sdxl_command(sub):
    p = sub.add_parser("sdxl", help="SDXL: UNet and both text encoders vs diffusers; NPO step vs plain CFG")
    p.add_argument("--preset", choices=sorted(SDXL_PRESETS), default="full",
                   help="full: SDXL base's shapes (about 14 GiB of fp32 weights); small: the layout at toy size")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_sdxl)


def main():
    if len(sys.argv) > 1 and sys.argv[1] in CHILDREN:
        print(json.dumps(CHILDREN[sys.argv[1]](sys.argv[2:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_models_command, add_sampling_command, add_solvers_command, add_train_command, add_gpu_command,
                add_reward_command, add_ddpo_command, add_scorers_command, add_singlefile_command,
                add_extract_command, add_data_command, add_sdxl_command):
        add(sub)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
