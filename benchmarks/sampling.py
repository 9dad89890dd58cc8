"""Models and sampling against diffusers / transformers on identical SD1.5- or SDXL-shaped random weights (not a test).

    python -m benchmarks.sampling models [--sizes 32,64] [--repeats 3] [--threads 2]
    python -m benchmarks.sampling sampling [--size 32] [--repeats 3] [--variants plain,npo,merged,...]
    python -m benchmarks.sampling solvers [--size 64] [--steps 25]
    python -m benchmarks.sampling sdxl [--preset full|small] [--size 32] [--repeats 3]

Builds the random weights once (diffusers / transformers modules saved with save_pretrained, so this needs the test
extra), then times each model in a fresh process so that peak memory is that process's own (harness.py). Prints
Markdown tables for BENCHMARKS.md.
"""
import math
import os
import types

import torch

from benchmarks import harness
from benchmarks.random_weights import SDXL_PRESETS, WEIGHTS, make_sdxl_weights, make_weights

MODULE = "benchmarks.sampling"


# ----------------------------------------------------------------------------------------------------------
# Models (issue 2): one forward of the UNet, VAE decoder and text encoder, ours vs diffusers / transformers.

def load(impl, part):
    if impl == "ours":
        from npo import clip
        from npo import unet
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


def measure_one(impl, part, size, batch, repeats):
    """One forward: the median of `repeats` after a warm-up, the peak RSS during them, and (ours) its FLOPs."""
    model = load(impl, part)
    fn = forward_fn(impl, part, model, size, batch)
    with torch.inference_mode():
        timing = harness.measure(fn, repeats)
        flops = 0
        if impl == "ours":
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                fn()
            flops = counter.get_total_flops()
    return dict(impl=impl, part=part, size=size, batch=batch, seconds=timing.seconds, peak_gib=timing.peak_gib,
                forward_extra_gib=timing.extra_gib, flops=flops)


def matmul_peak_gflops(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = min(harness.once(lambda: a @ b)[1] for _ in range(repeats))
    return 2 * n**3 / t / 1e9


def cmd_models(args):
    make_weights(WEIGHTS)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak:.0f} GFLOP/s\n")
    print("| model | input | ours s | diffusers s | time ratio | ours peak GiB | ref peak GiB | memory ratio | ours forward +GiB | ref forward +GiB | ours GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    jobs = [("unet", s, 2) for s in args.sizes] + [("vae", 32, 1), ("text", 0, 2)]
    for part, size, batch in jobs:
        ours, ref = (harness.run_child(MODULE, "_one", impl, part, size, batch, args.repeats, threads=args.threads)
                     for impl in ("ours", "ref"))
        what = {"unet": f"latent {size}x{size}, batch {batch}", "vae": f"decode latent {size}x{size}",
                "text": f"77 tokens, batch {batch}"}[part]
        gflops = ours["flops"] / ours["seconds"] / 1e9
        print(f"| {part} | {what} | {ours['seconds']:.2f} | {ref['seconds']:.2f} | {ours['seconds'] / ref['seconds']:.2f}x "
              f"| {ours['peak_gib']:.2f} | {ref['peak_gib']:.2f} | {ours['peak_gib'] / ref['peak_gib']:.2f}x "
              f"| {ours['forward_extra_gib']:.2f} | {ref['forward_extra_gib']:.2f} | {gflops:.0f} ({100 * gflops / peak:.0f}%) |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Sampling: one denoising step of CFG / NPO on the SD1.5-shaped UNet.

def random_offsets(model, seed=0):
    """Two rank-8 offsets η and δ on to_q, to_k, to_v, to_out.0 (the authors' targets), small random weights."""
    from npo import lora
    g = torch.Generator().manual_seed(seed)
    for name in ("eta", "delta"):
        lora.add_offset(model, name, rank=8)
        with torch.no_grad():
            for p in lora.parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def sampling_denoiser(variant, model, neg, pos, dtype):
    """The guided denoiser (x_t, t) -> ε of one way of running CFG / NPO (eq. 10: α = β = 1, g = 7.5)."""
    from npo import guided
    from npo import lora
    from npo import pipeline
    from npo import unet
    if variant == "eta-model":  # a dense η: θ_ft as a second UNet, θ + α·η in place of θ, δ a LoRA on it
        tuned = unet.load_unet(f"{WEIGHTS}/unet", dtype=dtype)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 1e-3)
        guided.dense_eta(model, tuned, 1.0)
        lora.remove(model, "eta")
        dense = types.SimpleNamespace(unet=model, eta_unet=tuned, eta_alpha=1.0)
        return guided.dense_eta_denoiser(dense, neg, pos, 7.5, 1.0, 1.0)
    if variant.startswith("merged"):
        return guided.merged_denoiser(*guided.merged_unets(model, 1.0, 1.0), neg, pos, 7.5)
    if "compile" in variant:
        model = torch.compile(model)
    return guided.npo_denoiser(model, neg, pos, 7.5, 1.0, 1.0)  # plain: no offsets, so plain CFG


def sampling_one(variant, size, steps):
    """Seconds per denoising step (median of `steps` after a warm-up, which compiles) and whole-process peak memory
    for one way of running the guided UNet."""
    from npo import unet
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    model = unet.load_unet(f"{WEIGHTS}/unet", dtype=dtype)
    if variant != "plain":
        random_offsets(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size, size, generator=g).to(dtype)
    width = model.config.per_block("cross_attention_dim")[0]
    neg, pos = (torch.randn(1, 77, width, generator=g).to(dtype) for _ in range(2))
    denoise = sampling_denoiser(variant, model, neg, pos, dtype)
    t = torch.tensor(500)
    with torch.inference_mode():
        timing = harness.measure(lambda: denoise(x, t), steps)
    return dict(variant=variant, seconds=timing.seconds, peak_gib=timing.process_peak_gib)


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
    rows = {v: harness.run_child(MODULE, "_sampling", v, args.size, args.repeats, threads=args.threads)
            for v in args.variants}
    base = rows.get("plain")
    print("| way | s / step | x (a) | peak GiB | x (a) |\n|---|---|---|---|---|")
    for variant, r in rows.items():
        ratio_t = f"{r['seconds'] / base['seconds']:.3f}x" if base else "-"
        ratio_m = f"{r['peak_gib'] / base['peak_gib']:.3f}x" if base else "-"
        print(f"| {SAMPLING_VARIANTS[variant]} | {r['seconds']:.2f} | {ratio_t} | {r['peak_gib']:.2f} | {ratio_m} |", flush=True)


def cmd_solvers(args):
    """The samplers' own arithmetic per step (DDIM vs DPM-Solver++ 2M) at SD's latent shape, with a denoiser that
    costs nothing, so what is timed is the update alone; compare it with a UNet step (`sampling` above)."""
    from npo import sampler
    x = torch.randn(2, 4, args.size, args.size, generator=torch.Generator().manual_seed(0))
    out = torch.randn_like(x) * 0.1
    print(f"| sampler | ms / step (latent 2x4x{args.size}x{args.size}, {args.steps} steps, median of {args.repeats}) |")
    print("|---|---|")
    for name in sampler.SAMPLERS:
        timing = harness.measure(lambda: sampler.sample(name, lambda x_t, t: out, x, {}, args.steps), args.repeats,
                                 warmup=0)
        print(f"| {sampler.SAMPLERS[name]} | {1000 * timing.seconds / args.steps:.2f} |", flush=True)


# ----------------------------------------------------------------------------------------------------------
# SDXL (issue 11): the UNet against diffusers, the NPO step against plain CFG, and the two text encoders.

def sdxl_unet_inputs(model_config, batch, size):
    g = torch.Generator().manual_seed(0)
    context = torch.randn(batch, 77, model_config.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, model_config.projection_class_embeddings_input_dim - 6 * 256, generator=g)
    time_ids = torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]] * batch)
    return torch.randn(batch, 4, size, size, generator=g), context, pooled, time_ids


def sdxl_unet_fn(impl, path, size):
    """One forward of the CFG batch (2 rows) through our UNet or diffusers'."""
    if impl == "ours":
        from npo import unet
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
        from npo import clip
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
    from npo import guided
    from npo import unet
    model = unet.load_unet(f"{path}/unet")
    if variant != "plain":
        random_offsets(model)
    x, c, pooled, ids = sdxl_unet_inputs(model.config, 2, size)
    neg, pos = ({"encoder_hidden_states": c[i:i + 1], "text_embeds": pooled[i:i + 1], "time_ids": ids[i:i + 1]}
                for i in (0, 1))
    if variant == "merged":
        denoise = guided.merged_denoiser(*guided.merged_unets(model, 1.0, 1.0), neg, pos, 5.0)
    else:
        denoise = guided.npo_denoiser(model, neg, pos, 5.0, 1.0, 1.0)  # plain: no offsets, so plain CFG
    return lambda: denoise(x[:1], torch.tensor(500))


def sdxl_one(what, impl, path, size, repeats):
    with torch.inference_mode():
        fn = {"unet": lambda: sdxl_unet_fn(impl, path, size), "text": lambda: sdxl_text_fn(impl, path),
              "guided": lambda: sdxl_guided_fn(impl, path, size)}[what]()
        timing = harness.measure(fn, repeats)
    return dict(what=what, impl=impl, seconds=timing.seconds, peak_gib=timing.peak_gib,
                forward_extra_gib=timing.extra_gib)


def cmd_sdxl(args):
    path = os.path.join(os.path.dirname(WEIGHTS), f"sdxl-{args.preset}")
    make_sdxl_weights(path, args.preset)

    def run(what, impl):
        return harness.run_child(MODULE, "_sdxl", what, impl, path, args.size, args.repeats, threads=args.threads)
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


def add_commands(sub):
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
    p = sub.add_parser("solvers", help="the sampler update alone per step: DDIM vs DPM-Solver++ (2M)")
    p.add_argument("--size", type=int, default=64, help="latent side (default 64: SD1.5's 512 px)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--repeats", type=int, default=3, help="runs per sampler (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_solvers)
    p = sub.add_parser("sdxl", help="SDXL: UNet and both text encoders vs diffusers; NPO step vs plain CFG")
    p.add_argument("--preset", choices=sorted(SDXL_PRESETS), default="full",
                   help="full: SDXL base's shapes (about 14 GiB of fp32 weights); small: the layout at toy size")
    p.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=cmd_sdxl)


# `python -m benchmarks.sampling KIND ARGS... THREADS`: one measurement in a fresh process (harness.run_child).
CHILDREN = {"_one": measure_one, "_sampling": sampling_one, "_sdxl": sdxl_one}

if __name__ == "__main__":
    harness.main(__doc__, [add_commands], CHILDREN)
