"""The README's "Using δ in other tools" diffusers recipe, run as written (only its settings at the top replaced), on a
tiny random SD model and random η and δ: its pixels are `npo.py sample`'s."""
import json
import os
import re
import shutil

import numpy as np
import torch
from PIL import Image

from npo import guided
from npo import lora
import npo
from npo import pipeline
from conftest import ROOT

ATOL = 1e-4  # images in [0, 1], as in test_sample.py's NPO-vs-diffusers tests


def readme_recipe():
    """The first python block of the README's "Using δ in other tools" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Using δ in other tools"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def with_settings(code, **values):
    """`code` with its top-level settings (lines `NAME, NAME = ...` of upper-case names) set to `values`; every value
    must name a setting the code has."""
    lines, seen = [], set()
    for line in code.splitlines():
        m = re.fullmatch(r"([A-Z_]+(?:, [A-Z_]+)*) = (.*)", line)
        if m:
            names = m[1].split(", ")
            current = {}
            exec(line, {"torch": torch}, current)
            new = [values.get(n, current[n]) for n in names]
            line = f"{m[1]} = {tuple(new) if len(new) > 1 else new[0]!r}"
            seen |= set(names)
        lines.append(line)
    assert set(values) <= seen, set(values) - seen
    return "\n".join(lines)


def diffusers_folder(tiny_model, folder):
    """The tiny model as a full diffusers pipeline folder (from_pretrained needs model_index.json)."""
    shutil.copytree(tiny_model, folder)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


def test_readme_diffusers_recipe_gives_npo_samples_pixels(tiny_model, offsets, tmp_path):
    model = diffusers_folder(tiny_model[0], tmp_path / "model")
    settings = dict(BASE=model, ETA=offsets["eta"], DELTA=offsets["delta"], OUT=str(tmp_path / "recipe.png"),
                    ALPHA=0.3, BETA=0.7, GUIDANCE=6.0, STEPS=6, SEED=5, HEIGHT=32, WIDTH=32, PROMPT="a red circle",
                    NEGATIVE="ugly", DEVICE="cpu")
    code = with_settings(readme_recipe(), **settings)
    namespace = {}
    exec(code, namespace)
    recipe = (namespace["image"] / 2 + 0.5).clamp(0, 1)

    # what `npo.py sample` runs, as floats, and the PNG it writes
    pipe = pipeline.load_pipeline(model)
    lora.load_lora(pipe.unet, offsets["eta"], "eta")
    lora.load_lora(pipe.unet, offsets["delta"], "delta")
    ours = guided.generate(pipe, ["a red circle"], [5], "ugly", steps=6, guidance=6.0, alpha=0.3, beta=0.7,
                             height=32, width=32)
    assert (recipe - (ours / 2 + 0.5).clamp(0, 1)).abs().max() <= ATOL
    assert npo.main(["sample", "--model", model, "--prompt", "a red circle", "--negative-prompt", "ugly", "--lora",
                     offsets["eta"], "--npo", offsets["delta"], "--alpha", "0.3", "--beta", "0.7", "--guidance", "6",
                     "--steps", "6", "--seed", "5", "--height", "32", "--width", "32", "--out",
                     str(tmp_path / "npo")]) == 0
    written = [np.asarray(Image.open(p).convert("RGB"), dtype=int)
               for p in (tmp_path / "npo" / "00000-seed5.png", tmp_path / "recipe.png")]
    assert np.abs(written[0] - written[1]).max() <= 1  # 8-bit rounding of values 1e-6 apart may differ by one level

    # δ loaded as a plain LoRA, on both branches (what A1111's <lora:…> or load_lora_weights do), is another image
    both = code.replace("pos = branch({ETA: 1.0})", "pos = branch({ETA: 1.0, DELTA: BETA})")
    assert both != code
    namespace = {}
    exec(both.replace(settings["OUT"], str(tmp_path / "both.png")), namespace)
    assert ((namespace["image"] / 2 + 0.5).clamp(0, 1) - recipe).abs().max() > 10 / 255
