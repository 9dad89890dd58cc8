"""Benchmarks against diffusers / transformers, results in BENCHMARKS.md. Not library code (not in the wheel).

Run from the repository root as modules, e.g. `python -m benchmarks.sampling models --repeats 5`:
    harness.py        the one timing harness: warm-up, repeats, median / mean, peak memory, threads, fresh processes
    sampling.py       models and sampling: UNet / VAE / text forwards, guided steps (CFG, NPO, merged), solvers, SDXL
    training.py       training and data: a DPO step vs diffusers' recipe, reward (DRaFT-K), DDPO, parquet shards
    files.py          the files users hold: single-file checkpoints, extract-lora, PickScore scoring
    gpu.py            the GPU table: ours vs diffusers in one process on a CUDA machine (a CPU fallback checks it)
    random_weights.py SD1.5 / SDXL / CLIP-shaped random weights in diffusers' layout (also tests' `randomize`)
    ldm.py            tiny SD1 / SD2 folders, and a converter of ours from a diffusers folder to an LDM single file
"""
