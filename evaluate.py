"""`npo.py evaluate`: folders of samples scored as the paper scores them (tables 1-3, fig. 7).

    python npo.py evaluate out/sd15 out/sd15-npo --scorer pickscore:PickScore_v1 --scorer hpsv2:HPS_v2.pt --out report

Each folder is written by `npo.py sample` (or A1111): every PNG carries its prompt and seed in its `parameters` text,
and images of different folders are paired by (prompt, seed). Every folder must hold the same pairs. A scorer is
a SPEC for `rewards.load`: `pickscore:PATH`, `hpsv2:PATH`, `aesthetic:CLIP_PATH,MLP_PATH`, `clipscore:PATH`, or any
`module:function` reward; the learned scorers see each image with their authors' preprocessing (`score_pil`),
other rewards see it as a tensor in [0, 1].

Videos (`npo.py sample` on a video model: NNNNN-seedS/ folders of frames 000.png, 001.png, ...) are paired the same
way, by their frames' parameters, and each video's score is the mean of the scorer over its frames (the paper's
table 3: frame-averaged scores); means and win rates are then over videos as over images.

The report, REPORT_DIR/results.json and results.md, holds per scorer the mean score of each folder ± the half-width
of its 95% interval, and for each ordered pair of folders (X, Y) the win rate: the share of (prompt, seed) pairs
where X's image scores higher than Y's, ties counting half, ± its 95% interval. Both intervals are the normal
approximation 1.96 · s / √n (s: the sample standard deviation of the scores, or of the per-pair outcomes 1, ½, 0).
"""
import json
import math
import os
import re
import sys
import time

import torch
from PIL import Image, UnidentifiedImageError

from . import checkpoint
from . import distributed
from . import rewards
from . import scorers
from . import videos
from .checkpoint import UserError

SEED = re.compile(r"(?:^|, )Seed: (-?\d+)(?:,|$)")


# ----------------------------------------------------------------------------------------------------------
# Folders of samples, paired by prompt and seed

def prompt_and_seed(text, path):
    """(prompt, seed) from A1111's `parameters` text: the prompt, an optional "Negative prompt: ..." line, then one
    line of `Key: value` settings that holds `Seed: N`."""
    lines = text.split("\n")
    seed = SEED.search(lines[-1]) if len(lines) > 1 else None
    if seed is None:
        raise UserError(f"{path}: its parameters text has no 'Seed: N' setting; score images written by npo.py sample.")
    negative = [i for i, line in enumerate(lines[:-1]) if line.startswith("Negative prompt: ")]
    return "\n".join(lines[:negative[-1] if negative else -1]), int(seed.group(1))


def index_folder(folder):
    """{(prompt, seed): path} of the PNGs of a folder, and of its videos (`videos.save_video`'s NNNNN-seedS/ folders
    of frames, keyed by their first frame's parameters; the .webp previews are not read); a PNG without its
    settings, or two samples with the same prompt and seed, is an error naming them."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is not a folder; pass folders written by npo.py sample.")
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        video = not name.startswith(".") and videos.is_video_folder(path)  # not a temporary folder being written
        if not (video or name.lower().endswith(".png")):
            continue
        key = prompt_and_seed(read_parameters(videos.frame_paths(path)[0] if video else path), path)
        if key in found:
            raise UserError(f"{found[key]} and {path} have the same prompt and seed, so neither pairs uniquely (two "
                            "sample runs with the same seeds wrote into one folder, or a --compare / --sweep-* grid "
                            "lies among the samples); keep one of them, or sample each run into its own --out.")
        found[key] = path
    if not found:
        raise UserError(f"{folder} holds no PNG images or videos; pass folders written by npo.py sample.")
    return found


def read_parameters(path):
    """The `parameters` text of a PNG; an unreadable PNG, or one without the text, is an error naming it."""
    try:
        text = videos.read_parameters(path)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path} is not a readable PNG ({e}); remove it or sample it again.")
    if text is None:
        raise UserError(f"{path} has no 'parameters' text (prompt and seed); score images written by npo.py sample.")
    return text


def pair(folders):
    """(keys, {folder: [path per key]}): the (prompt, seed) pairs every folder holds, in one order. An image whose
    partner is missing in another folder is an error naming both."""
    if len(folders) < 2 or len(set(folders)) < len(folders):
        raise UserError(f"evaluate compares two or more different folders, got {folders}; pass e.g. out/base out/npo.")
    index = {folder: index_folder(folder) for folder in folders}
    first = folders[0]
    for folder in folders[1:]:
        for a, b in ((first, folder), (folder, first)):
            lonely = sorted(index[a].keys() - index[b].keys())
            if lonely:
                prompt, seed = lonely[0]
                more = f" (nor have {len(lonely) - 1} more of {a})" if len(lonely) > 1 else ""
                raise UserError(f"{index[a][lonely[0]]} (prompt {prompt[:60]!r}, seed {seed}) has no partner in {b}{more}; "
                                "sample the same prompts and seeds into every folder.")
    keys = sorted(index[first])
    for k in keys:  # a video is scored by its frames' mean, and is not comparable with one image
        kinds = {os.path.isdir(index[folder][k]): index[folder][k] for folder in folders}
        if len(kinds) > 1:
            raise UserError(f"{kinds[True]} is a video but {kinds[False]} (the same prompt and seed) is an image; "
                            "compare videos with videos and images with images.")
    return keys, {folder: [index[folder][k] for k in keys] for folder in folders}


def frames_of(paths):
    """(every image to score, in order; how many of them each sample is): a PNG is itself, a video its frames."""
    units = [videos.check_frames(p) if os.path.isdir(p) else [p] for p in paths]
    return [f for unit in units for f in unit], [len(unit) for unit in units]


def repeat(prompts, counts):
    """Each sample's prompt once per image of it (a video's frames are all scored against its prompt)."""
    return [p for p, n in zip(prompts, counts) for _ in range(n)]


def per_sample(scores, counts):
    """Each sample's score from its images' (N,) scores: a video's is the mean over its frames (the paper's table 3
    scores videos frame-averaged), an image's its own."""
    return torch.stack([part.mean() for part in scores.split(counts)])


# ----------------------------------------------------------------------------------------------------------
# Scores, and what they say

class Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line every tenth of the way in a log."""

    def __init__(self, total, show=True):
        self.total, self.done, self.start, self.tty, self.show = total, 0, time.time(), sys.stderr.isatty(), show

    def update(self, what, k):
        before, self.done = self.done, self.done + k
        if not self.show:  # a torchrun rank other than 0
            return
        if not self.tty and self.done * 10 // self.total == before * 10 // self.total and self.done < self.total:
            return
        elapsed = time.time() - self.start
        eta = elapsed * (self.total - self.done) / self.done
        bar = "#" * (30 * self.done // self.total)
        print(f"scoring [{bar:<30}] {self.done}/{self.total} images ({what}), {elapsed:.0f}s, ETA {eta:.0f}s",
              end="\r" if self.tty else "\n", file=sys.stderr, flush=True)


def read_rgb(path):
    with Image.open(path) as image:
        return image.convert("RGB")


def score_images(reward, paths, prompts, batch_size, device, progress, what, rank=0, ranks=1):
    """{b: the rewards (n,) of batch b}, for the batches paths[b·batch_size:(b + 1)·batch_size] this rank scores (b
    = rank, rank + ranks, ...; all of them in one process); PIL images for a learned scorer, else tensors in [0, 1].
    A score's last bits may depend on the batch it is computed in, so the batches are always cut from the start, as
    one process cuts them."""
    scores = {}
    for start in distributed.share(range(0, len(paths), batch_size), rank, ranks):
        batch = [read_rgb(p) for p in paths[start:start + batch_size]]
        texts = prompts[start:start + batch_size]
        with torch.no_grad():
            if hasattr(reward, "score_pil"):
                s = reward.score_pil(batch, texts)
            elif len({im.size for im in batch}) == 1:
                s = reward(torch.stack([scorers.unit_pixels(im) for im in batch]).to(device), texts)
            else:  # images of different sizes: one at a time
                s = torch.cat([reward(scorers.unit_pixels(im)[None].to(device), texts[i:i + 1])
                               for i, im in enumerate(batch)])
        rewards.check_scores(s, len(batch), what)
        scores[start // batch_size] = s.detach().double().cpu()
        progress.update(what, len(batch))
    return scores


def gather_scores(mine):
    """{folder: scores (N,)} in the one-process order, from every rank's {folder: {b: scores of batch b}}."""
    everyone = distributed.gather(mine)
    return {f: torch.cat([s for _, s in sorted((b, s) for part in everyone for b, s in part[f].items())])
            for f in mine}


def interval(x):
    """(mean, half-width of its 95% interval 1.96 · s / √n), s the sample standard deviation; None for n < 2."""
    x = x.double()
    return x.mean().item(), (1.96 * x.std().item() / math.sqrt(len(x)) if len(x) > 1 else None)


def win_rate(a, b):
    """(how often a scores above b at the same prompt and seed, ties counting half; its 95% interval)."""
    return interval((a > b).double() + 0.5 * (a == b).double())


def summarize(scores):
    """{"mean", "ci95", "win_rate", "win_rate_ci95"} of one scorer's {folder: scores (N,)}."""
    out = {"mean": {}, "ci95": {}, "win_rate": {}, "win_rate_ci95": {}}
    for x, sx in scores.items():
        out["mean"][x], out["ci95"][x] = interval(sx)
        wins = {y: win_rate(sx, sy) for y, sy in scores.items() if y != x}
        out["win_rate"][x] = {y: w for y, (w, _) in wins.items()}
        out["win_rate_ci95"][x] = {y: h for y, (_, h) in wins.items()}
    return out


# ----------------------------------------------------------------------------------------------------------
# The report

def plus_minus(value, half, scale=1.0, form=".4g"):
    return f"{value * scale:{form}}" + ("" if half is None else f" ± {half * scale:{form}}")


def markdown(results, folders):
    """The paper's table 1 (folders × scorers, mean ± 95%) and a fig. 7 win-rate table per scorer."""
    specs = list(results["scorers"])
    lines = [f"# Evaluation of {len(folders)} folders on {results['pairs']} prompt-seed pairs", "",
             "Mean score ± the half-width of its 95% interval.", "",
             "| folder | " + " | ".join(f"`{s}`" for s in specs) + " |", "|---" * (len(specs) + 1) + "|"]
    for folder in folders:
        cells = [plus_minus(results["scorers"][s]["mean"][folder], results["scorers"][s]["ci95"][folder]) for s in specs]
        lines.append(f"| `{folder}` | " + " | ".join(cells) + " |")
    for s in specs:
        r = results["scorers"][s]
        lines += ["", f"## Win rates, `{s}`", "",
                  "Percent of prompt-seed pairs where the row's image scores higher than the column's (ties count "
                  "half), ± 95% interval.", "",
                  "| row beats column | " + " | ".join(f"`{f}`" for f in folders) + " |", "|---" * (len(folders) + 1) + "|"]
        for x in folders:
            cells = ["—" if x == y else plus_minus(r["win_rate"][x][y], r["win_rate_ci95"][x][y], 100, ".1f") for y in folders]
            lines.append(f"| `{x}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_spec(spec, prompts):
    """Fail before anything is scored: a learned scorer's files must exist (it loads when its turn comes), any other
    reward loads now (a module import) and may refuse the prompts."""
    name, _, argument = spec.partition(":")
    if name in scorers.SCORERS:
        for path in scorers.weight_paths(name, argument):
            if not os.path.exists(path):
                raise UserError(f"--scorer {spec}: {path or '(no path)'} does not exist; pass {name}:PATH to the weights.")
    else:
        rewards.check_prompts(rewards.load(spec, "--scorer"), set(prompts))


def evaluate(folders, specs, out, batch_size=8, device="cpu"):
    """Score every paired image of `folders` with every scorer SPEC; write out/results.json and out/results.md.
    Returns the results dict. Under torchrun each rank scores its share and every rank returns the whole dict."""
    if not specs:
        raise UserError("evaluate needs at least one --scorer SPEC, e.g. --scorer pickscore:PATH.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {batch_size}).")
    keys, samples = pair(list(folders))
    prompts = [prompt for prompt, _ in keys]
    frames = {f: frames_of(samples[f]) for f in folders}  # f: (image paths, images per sample)
    for spec in specs:
        check_spec(spec, prompts)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {out} ({e.strerror}); pick a writable --out.")
    # under torchrun (`distributed`), rank r scores batches r, r + N, ... of each folder and rank 0 writes the report
    rank, ranks = distributed.rank_and_size()
    mine = sum(1 for f in folders for i in range(len(frames[f][0])) if i // batch_size % ranks == rank)
    progress = Progress(mine * len(specs), show=rank == 0)  # rank 0's share stands for the whole
    results = {"scorers": {}, "pairs": len(keys)}
    for spec in specs:  # one scorer in memory at a time: each CLIP-H is 4 GB
        reward = rewards.load(spec)
        if isinstance(reward, torch.nn.Module):
            reward.to(device)
        scores = gather_scores({f: score_images(reward, frames[f][0], repeat(prompts, frames[f][1]), batch_size,
                                                device, progress, spec, rank, ranks) for f in folders})
        results["scorers"][spec] = summarize({f: per_sample(scores[f], frames[f][1]) for f in folders})
        del reward
    if progress.tty and progress.show:
        print(file=sys.stderr)
    if rank > 0:
        return results
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    checkpoint.atomic_write(os.path.join(out, "results.json"), lambda f: f.write(text.encode("utf-8")))
    report = markdown(results, folders)
    checkpoint.atomic_write(os.path.join(out, "results.md"), lambda f: f.write(report.encode("utf-8")))
    return results
