"""`npo.py reproduce`: one command per table of the paper (tables 1-2 and fig. 7), from a recipe file.

    python npo.py reproduce recipes/table1-sd15.json --weights ~/npo-weights --out repro/table1

A recipe (JSON) names all that a table takes: the prompts, the seeds and the sampler settings, the scorers, and the
rows, each a model with its preference offset η, its NPO offset δ and eq. 10's α and β. Every path in it is relative
to --weights, the user's folder of public files. The command
1. checks that every file exists, and names every one that does not in one sentence;
2. samples every row into OUT/samples/ROW/PPPPP-seedS.png (P the prompt's index, S its seed), skipping each file
   that is already there, so a run interrupted at any point continues where it stopped (each PNG is written
   atomically; one made with other settings is an error, never silently reused);
3. scores every row with every scorer (`evaluate.evaluate`: images paired by prompt and seed, written to
   OUT/scores/) and writes OUT/table.md (table 1's layout: rows x scorers, mean ± 95% interval), OUT/winrates.md and
   OUT/winrates.png (fig. 7: each row's win rate against its baseline row) and OUT/results.json.

Recipe fields (see recipes/ for the paper's):
    name, note          the title of the report, and free text
    files               {path: where to get it}: the public files the recipe expects, named in the missing-files error
    prompts             a prompts file (Pick-a-Pic's test_unique .parquet: its unique captions) or a list of prompts
    max_prompts         only the first N prompts (optional; --max-prompts overrides it)
    seed                image j of prompt k has seed `seed + k * images_per_prompt + j`, the same in every row
    images_per_prompt   (default 1)
    sampler, steps, guidance, size    the sampler settings (sampler.SAMPLERS names); size in pixels, square
    vae                 a VAE folder replacing the model's (optional; SDXL's fp16-fix VAE)
    scorers             {column name: SPEC}: `evaluate` specs, SCORER:PATH with the PATH relative to --weights, or
                        module:function (e.g. shapes:reward)
    baseline            the row every other row is compared with in fig. 7 (a row may name its own)
    rows                [{name, model, eta | eta_model, delta | delta_model, alpha, beta, baseline,
                          and any of sampler, steps, guidance, vae to differ from the recipe's}]
A model, η or δ "model" is a whole fine-tuned model (a diffusers folder, a unet/ folder or a single file), whose
offset from the row's model is η or δ; `eta` and `delta` are LoRA files. The model "(embedded)" is npo's own
embedded model (weights/).
"""
import json
import os
import re
import sys

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from . import blip
from . import checkpoint
from . import data
from . import evaluate
from . import guided
from . import images
from . import pipeline
from . import sampler
from . import scorers
from .checkpoint import UserError

EMBEDDED = "(embedded)"  # a recipe's name for pipeline.DEFAULT_MODEL, the model in npo's weights/
RECIPE_KEYS = {"name", "note", "files", "prompts", "max_prompts", "seed", "images_per_prompt", "sampler", "steps",
               "guidance", "size", "vae", "scorers", "baseline", "rows"}
REQUIRED = ("name", "prompts", "seed", "sampler", "steps", "guidance", "size", "scorers", "rows")
ROW_KEYS = {"name", "note", "model", "eta", "eta_model", "delta", "delta_model", "alpha", "beta", "baseline",
            "sampler", "steps", "guidance", "vae"}
PER_ROW = ("sampler", "steps", "guidance", "vae")  # recipe settings a row may override
PATHS = ("model", "vae", "eta", "eta_model", "delta", "delta_model")  # a row's files, relative to --weights


# ----------------------------------------------------------------------------------------------------------
# The recipe: read, checked, its paths resolved against --weights

def read_recipe(path):
    """The recipe at `path` as a dict, every field checked; rows get the recipe's settings where they give none."""
    try:
        with open(path, encoding="utf-8") as f:
            recipe = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the recipe {path} ({e}); pass a recipe file such as recipes/table1-sd15.json.")
    except json.JSONDecodeError as e:
        raise UserError(f"the recipe {path} is not valid JSON ({e.msg} at line {e.lineno}); fix it.")
    if not isinstance(recipe, dict):
        raise UserError(f"the recipe {path} is not a JSON object of fields; see recipes/ for examples.")
    check_keys(recipe, RECIPE_KEYS, f"the recipe {path}")
    missing = [k for k in REQUIRED if k not in recipe]
    if missing:
        raise UserError(f"the recipe {path} lacks the field{'s' * (len(missing) > 1)} {', '.join(missing)}; add "
                        "them (see recipes/table1-sd15.json).")
    recipe = {"images_per_prompt": 1, "max_prompts": None, "vae": None, "files": {}, "note": "", **recipe}
    check_settings(recipe, f"the recipe {path}")
    if not isinstance(recipe["rows"], list) or len(recipe["rows"]) < 2:
        raise UserError(f"the recipe {path} needs a list of at least two rows, to compare them.")
    recipe["rows"] = [read_row(row, recipe, f"row {i + 1} of {path}") for i, row in enumerate(recipe["rows"])]
    check_rows(recipe, path)
    return recipe


def check_keys(d, allowed, where):
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserError(f"{where} has the unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the fields "
                        f"are {', '.join(sorted(allowed))}.")


def check_settings(d, where):
    """The sampler settings of a recipe or a row: a sampler npo has, whole numbers ≥ 1, a guidance scale ≥ 0."""
    if "sampler" in d and d["sampler"] not in sampler.SAMPLERS:
        raise UserError(f"{where}: sampler {d['sampler']!r} is not one of {', '.join(sampler.SAMPLERS)}.")
    for key in ("steps", "size", "images_per_prompt", "seed", "max_prompts"):
        value = d.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (key != "seed")):
            raise UserError(f"{where}: {key} must be a whole number{'' if key == 'seed' else ' of at least 1'}, "
                            f"not {value!r}.")
    if d.get("size") is not None and d["size"] % 8:
        raise UserError(f"{where}: size {d['size']} is not a multiple of 8; use e.g. 512 or 1024.")
    for key in ("guidance", "alpha", "beta"):
        value = d.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise UserError(f"{where}: {key} must be a number of at least 0, not {value!r}.")


def read_row(row, recipe, where):
    if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"].strip():
        raise UserError(f"{where} is not an object with a \"name\"; give each row a name and a model.")
    where = f"row {row['name']!r}"
    check_keys(row, ROW_KEYS, where)
    if not isinstance(row.get("model"), str) or not row["model"]:
        raise UserError(f"{where} names no model; add \"model\": a path under --weights (or \"{EMBEDDED}\").")
    for a, b, greek in (("eta", "eta_model", "η"), ("delta", "delta_model", "δ")):
        if row.get(a) and row.get(b):
            raise UserError(f"{where} gives both {a} and {b}; a row has one {greek} (a LoRA with {a}, a whole model "
                            f"with {b}), so keep one.")
    for key in PATHS:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UserError(f"{where}: {key} must be a path (text), not {row[key]!r}.")
    check_settings(row, where)
    return {"eta": None, "eta_model": None, "delta": None, "delta_model": None, "alpha": 1.0, "beta": 1.0,
            "baseline": recipe.get("baseline"), "note": "", **{k: recipe[k] for k in PER_ROW}, **row}


def check_rows(recipe, path):
    """Unique names and folder names; every baseline a row of the recipe; the scorers a {name: spec} object."""
    names = [row["name"] for row in recipe["rows"]]
    slugs = [slug(n) for n in names]
    for values, what in ((names, "name"), (slugs, "folder name")):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise UserError(f"the recipe {path} has two rows of the {what} {twice[0]!r}; give each row its own name.")
    for row in recipe["rows"]:
        if row["baseline"] is not None and row["baseline"] not in names:
            raise UserError(f"row {row['name']!r} of {path} is compared with the baseline {row['baseline']!r}, which "
                            f"is not a row; name one of {', '.join(names)}.")
    specs = recipe["scorers"]
    if not isinstance(specs, dict) or not specs or not all(isinstance(s, str) for s in specs.values()):
        raise UserError(f"the recipe {path}: scorers must be an object of column name: SPEC, e.g. "
                        "{\"PickScore\": \"pickscore:PickScore_v1\"}.")


def slug(name):
    """A row's folder name: its name with every run of characters other than letters, digits, '.', '-' as '_'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") or "row"


def resolve(weights, path):
    """A recipe path as a file path: under --weights (an absolute path stays), or the embedded model."""
    return pipeline.DEFAULT_MODEL if path == EMBEDDED else os.path.join(weights, path)


def resolve_spec(weights, spec):
    """A scorer SPEC with its weight paths under --weights; a module:function reward stays as it is."""
    name, _, argument = spec.partition(":")
    if name not in scorers.SCORERS:
        return spec
    return f"{name}:" + ",".join(resolve(weights, p) for p in scorers.weight_paths(name, argument))


def expected_files(recipe):
    """Every file the recipe reads, relative to --weights, in the order it names them (no duplicates)."""
    paths = [recipe["prompts"]] if isinstance(recipe["prompts"], str) else []
    for row in recipe["rows"]:
        paths += [row[k] for k in PATHS if row.get(k) and row[k] != EMBEDDED]
    for spec in recipe["scorers"].values():
        name, _, argument = spec.partition(":")
        if name == "imagereward":  # a folder: the files in it, so that none is found missing only after sampling
            paths += [os.path.join(argument, f) for f in blip.FILES]
        elif name in scorers.SCORERS:
            paths += scorers.weight_paths(name, argument)
    return list(dict.fromkeys(paths))


def source(recipe, path):
    """Where the recipe says `path` comes from: its own entry in `files`, or its folder's; None if it says nothing."""
    folders = [k for k in recipe["files"] if path == k or path.startswith(k.rstrip("/") + "/")]
    return recipe["files"][max(folders, key=len)] if folders else None


def check_files(recipe, weights):
    """One sentence that names every file still missing under --weights, with where each comes from."""
    if not os.path.isdir(weights):
        raise UserError(f"--weights {weights} is not a folder; pass the folder that holds the files the recipe "
                        f"names ({', '.join(expected_files(recipe)[:3])}, ...).")
    missing = [p for p in expected_files(recipe) if not os.path.exists(resolve(weights, p))]
    if missing:
        named = [f"{p} ({source(recipe, p)})" if source(recipe, p) else p for p in missing]
        raise UserError(f"{len(missing)} of the files the recipe {recipe['name']!r} expects "
                        f"{'is' if len(missing) == 1 else 'are'} missing under {weights}: {'; '.join(named)}; put "
                        "them there (or fix --weights).")


def read_prompts(recipe, weights, max_prompts=None):
    """The recipe's prompts: its list, or its prompts file's (a Pick-a-Pic parquet gives its unique captions)."""
    source = recipe["prompts"]
    if isinstance(source, str):
        prompts = data.read_prompts(resolve(weights, source))
    elif isinstance(source, list) and source and all(isinstance(p, str) and p.strip() for p in source):
        prompts = list(source)
    else:
        raise UserError("the recipe's prompts must be a prompts file under --weights or a list of prompts (text).")
    limit = max_prompts or recipe["max_prompts"]
    return prompts[:limit] if limit else prompts


# ----------------------------------------------------------------------------------------------------------
# Sampling: every row the same (prompt, seed) jobs, one file each, skipped when it is there

def plan(recipe, prompts):
    """The images of every row, [(prompt index, prompt, seed)]: the same in every row, so that rows pair."""
    n = recipe["images_per_prompt"]
    return [(k, p, recipe["seed"] + k * n + j) for k, p in enumerate(prompts) for j in range(n)]


def image_path(out, row, k, seed):
    return os.path.join(out, "samples", slug(row["name"]), f"{k:05d}-seed{seed}.png")


def a1111_value(value):
    """A setting's value as A1111 writes it: JSON-quoted when it holds ',', ':' or a newline."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters(recipe, row, prompt, seed):
    """The PNG's A1111 `parameters` text: the prompt, no negative prompt, the settings and the row's files."""
    settings = {"Steps": row["steps"], "Sampler": sampler.SAMPLERS[row["sampler"]], "CFG scale": row["guidance"],
                "Seed": seed, "Size": f"{recipe['size']}x{recipe['size']}", "Model": row["model"]}
    names = {"vae": "VAE", "eta": "NPO eta", "eta_model": "NPO eta model", "delta": "NPO",
             "delta_model": "NPO delta model"}
    settings.update({label: row[key] for key, label in names.items() if row[key]})
    if row["eta"] or row["eta_model"] or row["delta"] or row["delta_model"]:
        settings.update({"NPO alpha": float(row["alpha"]), "NPO beta": float(row["beta"])})
    settings.update({"Recipe": recipe["name"], "Recipe row": row["name"]})
    return f"{prompt}\nNegative prompt: \n" + ", ".join(f"{k}: {a1111_value(v)}" for k, v in settings.items())


def png_parameters(path):
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get("parameters")
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path} is not a readable PNG ({e}); remove it and run again to sample it anew.")


def missing_jobs(recipe, row, jobs, out):
    """The jobs of `row` whose image is not there yet. An image that is there must carry this recipe's settings for
    it: one made by another recipe or other settings would pair with the wrong images."""
    todo = []
    for k, prompt, seed in jobs:
        path = image_path(out, row, k, seed)
        if not os.path.exists(path):
            todo.append((k, prompt, seed))
        elif png_parameters(path) != parameters(recipe, row, prompt, seed):
            raise UserError(f"{path} was made with other settings than the recipe gives row {row['name']!r} now; "
                            "remove that row's folder to sample it again, or use another --out.")
    return todo


def load_row(row, weights, dtype, device):
    """The row's pipeline: its model (and VAE), η and δ attached as LoRAs or as whole models."""
    vae = resolve(weights, row["vae"]) if row["vae"] else None
    pipe = pipeline.load_pipeline(resolve(weights, row["model"]), dtype, device, vae=vae)
    for key, name in (("eta", "eta"), ("delta", "delta")):
        if row[key]:
            guided.load_offset(pipe, [(resolve(weights, row[key]), 1.0)], name)
    eta_model = resolve(weights, row["eta_model"]) if row["eta_model"] else None
    if row["delta_model"]:  # δ = θ_δ − θ needs θ, so it comes first, with a whole-model η
        guided.attach_npo_model(pipe, resolve(weights, row["delta_model"]), row["beta"], eta_model, row["alpha"])
    elif eta_model:
        guided.attach_eta_model(pipe, eta_model, row["alpha"])
    sampler.check_steps(row["sampler"], pipe.scheduler_config, row["steps"], not pipe.is_sdxl)
    return pipe


def sample_row(recipe, row, jobs, out, weights, options):
    """Sample the images of `row` that are not there yet; returns how many were made. The model loads only when
    one is missing."""
    todo = missing_jobs(recipe, row, jobs, out)
    print(f"{row['name']}: {len(jobs) - len(todo)} of {len(jobs)} images there, sampling {len(todo)}", file=sys.stderr)
    if not todo:
        return 0
    pipe = load_row(row, weights, options["dtype"], options["device"])
    os.makedirs(os.path.dirname(image_path(out, row, 0, 0)), exist_ok=True)
    size = recipe["size"]
    for start in range(0, len(todo), options["batch_size"]):
        batch = todo[start:start + options["batch_size"]]
        x = guided.generate(pipe, [p for _, p, _ in batch], [s for _, _, s in batch], None, row["steps"],
                              row["guidance"], 0.0, row["alpha"], row["beta"], size, size, sampler=row["sampler"])
        for (k, prompt, seed), picture in zip(batch, images.to_pil(x)):
            images.save_png(picture, image_path(out, row, k, seed), parameters(recipe, row, prompt, seed))
        done = start + len(batch)
        if done * 10 // len(todo) != start * 10 // len(todo):  # a line every tenth of the row
            print(f"{row['name']}: {done}/{len(todo)} sampled", file=sys.stderr, flush=True)
    del pipe
    return len(todo)


# ----------------------------------------------------------------------------------------------------------
# Scores: table 1's layout and fig. 7's win rates

def summarize(recipe, results, folders):
    """{"recipe", "pairs", "scorers", "rows": [{name, baseline, mean, ci95, win_rate, win_rate_ci95}]} from
    evaluate's results, by the recipe's row and scorer names. A row's win rate is against its baseline (none for
    the baseline itself)."""
    rows = []
    for row in recipe["rows"]:
        entry = {"name": row["name"], "baseline": row["baseline"] if row["baseline"] != row["name"] else None,
                 "mean": {}, "ci95": {}, "win_rate": {}, "win_rate_ci95": {}}
        for column, spec in recipe["scorers"].items():
            r = results["scorers"][spec]
            entry["mean"][column], entry["ci95"][column] = r["mean"][folders[row["name"]]], r["ci95"][folders[row["name"]]]
            if entry["baseline"]:
                x, y = folders[row["name"]], folders[entry["baseline"]]
                entry["win_rate"][column], entry["win_rate_ci95"][column] = r["win_rate"][x][y], r["win_rate_ci95"][x][y]
        rows.append(entry)
    return {"recipe": recipe["name"], "pairs": results["pairs"], "scorers": recipe["scorers"], "rows": rows}


def table_markdown(summary):
    columns = list(summary["scorers"])
    lines = [f"# {summary['recipe']}", "", f"Mean score ± the half-width of its 95% interval, {summary['pairs']} "
             "prompt-seed pairs per row (the paper's table 1 gives the means).", "",
             "| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in summary["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(evaluate.plus_minus(row["mean"][c], row["ci95"][c])
                                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def winrates_markdown(summary):
    columns = list(summary["scorers"])
    lines = [f"# {summary['recipe']}: win rates", "",
             "Percent of prompt-seed pairs where the row's image scores higher than its baseline's (ties count "
             "half), ± 95% interval: the paper's fig. 7.", "",
             "| row | against | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in summary["rows"]:
        if row["baseline"]:
            cells = [evaluate.plus_minus(row["win_rate"][c], row["win_rate_ci95"][c], 100, ".1f") for c in columns]
            lines.append(f"| {row['name']} | {row['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
CHART = dict(plot_height=300, bar=28, gap=36, left=56, top=70, right=16)  # pixels


def bar_chart(groups, series, values, title):
    """Fig. 7 as a grouped bar chart: for each group (a row against its baseline) one bar per series (a scorer) of
    height values[g][s] in [0, 1] on a 0-100% axis, with a dashed line at 50% (a tie) and the percent above each bar.
    Bar (g, s) spans x0 = left + gap/2 + g·(n·bar + gap) + s·bar, and reaches plot_height·(1 − value) below `top`."""
    c, font, small = CHART, images.label_font(14), images.label_font(11)
    group_width = len(series) * c["bar"] + c["gap"]
    title = images.readable(font, title)
    legend = sum(16 + int(images.text_width(small, name)) + 14 for name in series)
    # as wide as the bars need, or the title, or the legend: no text is cut
    width = max(c["left"] + len(groups) * group_width + c["right"], int(images.text_width(font, title)) + 16,
                legend + 8)
    labels = [images.wrap(small, images.readable(small, g), group_width - 6) for g in groups]
    line = sum(small.getmetrics()) + 2
    height = c["top"] + c["plot_height"] + 8 + line * max(map(len, labels), default=1) + 8
    chart = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((8, 6), title, fill="black", font=font)
    legend_x = 8
    for s, name in enumerate(series):  # the legend: a swatch and the scorer's name
        draw.rectangle([legend_x, 32, legend_x + 12, 44], fill=COLORS[s % len(COLORS)])
        draw.text((legend_x + 16, 30), name, fill="black", font=small)
        legend_x += 16 + int(images.text_width(small, name)) + 14
    bottom = c["top"] + c["plot_height"]
    for tick in (0, 25, 50, 75, 100):
        y = bottom - c["plot_height"] * tick // 100
        draw.line([c["left"] - 4, y, width - c["right"], y], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{tick}%", fill="black", font=small)
    for g, group in enumerate(values):
        x0 = c["left"] + c["gap"] // 2 + g * group_width
        for s, value in enumerate(group):
            top = bottom - round(c["plot_height"] * min(max(value, 0.0), 1.0))
            x = x0 + s * c["bar"]
            if top < bottom:  # a win rate of 0 draws no bar
                draw.rectangle([x + 1, top, x + c["bar"] - 2, bottom - 1], fill=COLORS[s % len(COLORS)])
            draw.text((x + 1, top - 13), f"{100 * value:.0f}", fill="black", font=small)
        for k, text in enumerate(labels[g]):
            draw.text((x0 - c["gap"] // 2 + 3, bottom + 6 + k * line), text, fill="black", font=small)
    y50 = bottom - c["plot_height"] // 2
    for x in range(c["left"], width - c["right"], 8):  # the 50% line, dashed, over the bars
        draw.line([x, y50, x + 4, y50], fill="black", width=1)
    draw.line([c["left"], c["top"], c["left"], bottom], fill="black")
    return chart


def write_reports(summary, out):
    """OUT/results.json, table.md, winrates.md and winrates.png, each written atomically."""
    def text_file(name, text):
        checkpoint.atomic_write(os.path.join(out, name), lambda f: f.write(text.encode("utf-8")))
    text_file("results.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    text_file("table.md", table_markdown(summary))
    text_file("winrates.md", winrates_markdown(summary))
    compared = [row for row in summary["rows"] if row["baseline"]]
    chart = bar_chart([f"{row['name']} vs {row['baseline']}" for row in compared], list(summary["scorers"]),
                      [[row["win_rate"][c] for c in summary["scorers"]] for row in compared],
                      f"{summary['recipe']}: win rate against the baseline")
    images.save_png(chart, os.path.join(out, "winrates.png"))


# ----------------------------------------------------------------------------------------------------------
# The command

def add_arguments(p):
    p.add_argument("recipe", help="a recipe file (JSON): recipes/table1-sd15.json, recipes/table2-sdxl.json, "
                                  "recipes/tiny-shapes.json, or your own")
    p.add_argument("--weights", required=True, help="the folder of public files the recipe names (its paths are "
                                                    "relative to it)")
    p.add_argument("--out", required=True, help="the report folder: samples/ROW/, scores/, table.md, winrates.md, "
                                                "winrates.png, results.json. Run again to continue an interrupted run")
    p.add_argument("--max-prompts", type=int, help="only the first N prompts (a quick look; a later run with more "
                                                   "samples only the rest)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per sampling forward (default 1); continue a run at the batch size it began with: "
                        "another may round a pixel differently")
    p.add_argument("--score-batch-size", type=int, default=8, help="images per scorer forward (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and activations of the models that sample (float16 on CUDA only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--sample-only", action="store_true", help="sample the rows, score nothing")


def check_arguments(args):
    for flag in ("max_prompts", "batch_size", "score_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {value}).")
    if args.dtype == "float16" and args.device == "cpu":
        raise UserError("--dtype float16 is not supported on CPU; use bfloat16 or float32.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; pass a folder for the report.")


def main(args):
    """Check everything, sample every row (continuing where an earlier run stopped), score, report. Returns the
    summary (None with --sample-only)."""
    check_arguments(args)
    recipe = read_recipe(args.recipe)
    check_files(recipe, args.weights)
    prompts = read_prompts(recipe, args.weights, args.max_prompts)
    jobs = plan(recipe, prompts)
    specs = {column: resolve_spec(args.weights, spec) for column, spec in recipe["scorers"].items()}
    if not args.sample_only:  # a scorer that refuses these prompts says so before hours of sampling
        for spec in specs.values():
            evaluate.check_spec(spec, prompts)
    options = {"dtype": {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype],
               "device": args.device, "batch_size": args.batch_size}
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {args.out} ({e.strerror}); pick a writable --out.")
    made = sum(sample_row(recipe, row, jobs, args.out, args.weights, options) for row in recipe["rows"])
    print(f"sampled {made} images into {os.path.join(args.out, 'samples')}", file=sys.stderr)
    if args.sample_only:
        return None
    folders = {row["name"]: os.path.dirname(image_path(args.out, row, 0, 0)) for row in recipe["rows"]}
    results = evaluate.evaluate(list(folders.values()), list(specs.values()), os.path.join(args.out, "scores"),
                                args.score_batch_size, args.device)
    summary = summarize({**recipe, "scorers": specs}, results, folders)
    summary["scorers"] = recipe["scorers"]  # the recipe's specs, relative to --weights, in the report
    write_reports(summary, args.out)
    print(f"wrote {os.path.join(args.out, 'table.md')}, winrates.md, winrates.png and results.json", file=sys.stderr)
    return summary
