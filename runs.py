"""A training run's folder: its output files, atomic checkpoints, and resuming from them.

    OUT/lora.safetensors                      the result (eta.safetensors + delta.safetensors with --joint)
    OUT/settings.json                         the run's settings, so that `--resume OUT` alone continues it
    OUT/log.jsonl                             one line per logged step (OUT/log.png: the same as a plot)
    OUT/checkpoints/step-XXXXXX/              the run's LoRA files + state.pt, written atomically, the last K kept

A checkpoint is complete or absent: it is written under a temporary name, fsynced, then renamed. `state.pt` is a
plain dict of tensors and Python values, readable with torch.load(weights_only=True).
"""
import json
import os
import re
import shutil
import tempfile

import torch

from . import checkpoint
from . import lora
from .checkpoint import UserError

CHECKPOINT_FORMAT = "npo-train-checkpoint-1"
SETTINGS = "settings.json"
# Settings that make a checkpoint a different run: resuming with another value is an error. The others
# (lr, β, batch size, ...) may change on resume, with a warning, since the run no longer replays exactly.
IDENTITY = ("model_fingerprint", "role", "method", "train_branch", "rank", "lora_alpha", "layers")


def file_metadata(settings, step):
    """Metadata strings of the LoRA file, beside lora.save_lora's role, rank, alpha, targets and base model."""
    meta = {"npo_method": settings["method"], "npo_steps": str(step), "npo_lr": f"{settings['lr']:g}",
            "npo_global_batch": str(settings["global_batch"]), "npo_resolution": str(settings["resolution"]),
            "npo_seed": str(settings["seed"])}
    if settings["method"] in ("reward", "ddpo", "spo"):
        uncond = settings["train_branch"] == "uncond"  # δ trained from R itself, on the unconditional branch
        meta.update(npo_reward=settings["reward"], npo_sample_steps=str(settings["sample_steps"]),
                    npo_guidance=f"{settings['guidance']:g}", npo_train_branch=settings["train_branch"],
                    npo_objective="1 - R" if settings["role"] == "delta" and not uncond else "R")
        if uncond:
            meta.update(npo_alpha=f"{settings['alpha']:g}",
                        npo_eta=os.path.basename(settings["lora"]) if settings["lora"] else "none")
        if settings["method"] == "spo":  # NPO swaps SPO's pairs rather than train on 1 − R
            meta.update(npo_objective="R, pairs swapped" if settings["role"] == "delta" and not uncond else "R",
                        **{f"npo_{k}": f"{settings[k]:g}" for k in settings if k.startswith("spo_")})
        elif settings["method"] == "reward":
            meta.update(npo_grad_steps=str(settings["grad_steps"]))
        else:
            meta.update(npo_clip_range=f"{settings['clip_range']:g}", npo_inner_epochs=str(settings["inner_epochs"]),
                        npo_timestep_fraction=f"{settings['timestep_fraction']:g}")
    else:
        meta.update(npo_beta_dpo=f"{settings['beta_dpo']:g}", npo_pairs_swapped=str(settings["role"] == "delta").lower())
        meta.update({f"npo_{k}": str(settings[k]).lower() for k in ("perturb_prompts", "corrupt") if settings.get(k)})
    return meta


def save_results(out, unet, files, settings, step):
    """The run's result files in OUT, one per offset: {role: file name}. Returns their paths."""
    paths = []
    for role, name in files.items():
        paths.append(os.path.join(out, name))
        lora.save_lora(unet, role, paths[-1], role=role, base_model=settings["model"],
                       metadata=file_metadata(settings, step))
    return paths
# ----------------------------------------------------------------------------------------------------------
# The output folder and its checkpoints.

def prepare_output(out):
    """Create OUT/checkpoints and prove OUT writable; returns whether OUT was created here."""
    created = not os.path.exists(out)
    try:
        os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {out} ({e.strerror or e}); "
                        "pass --out a folder you can write to.")
    for name in os.listdir(os.path.join(out, "checkpoints")):
        if name.startswith(".step-"):  # a checkpoint that a killed run left half-written
            shutil.rmtree(os.path.join(out, "checkpoints", name), ignore_errors=True)
    return created


def record(out):
    """What OUT holds before a run starts writing: its entries, its checkpoints and the size of its log, so that a
    run that fails before its first checkpoint can be undone (`roll_back`)."""
    log = os.path.join(out, "log.jsonl")
    return {"entries": set(os.listdir(out)) if os.path.isdir(out) else set(), "checkpoints": list_checkpoints(os.path.join(out, "checkpoints")),
            "log": os.path.getsize(log) if os.path.isfile(log) else None}


def roll_back(out, created, before):
    """Undo a failed run that wrote no checkpoint: remove OUT if the run created it; else remove what the run added
    (its log, validation images, an empty checkpoints/ folder) and cut a resumed run's log back to its old end. A
    run that wrote a checkpoint is kept: it can be resumed."""
    if set(list_checkpoints(os.path.join(out, "checkpoints"))) - set(before["checkpoints"]):
        return
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in set(os.listdir(out)) - before["entries"]:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    if before["log"] is not None:
        os.truncate(os.path.join(out, "log.jsonl"), before["log"])


def checkpoint_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step-{step:06d}")


def list_checkpoints(ckpt_dir):
    """The complete checkpoint folders, oldest first (temporary ones start with '.' and are not listed)."""
    if not os.path.isdir(ckpt_dir):
        return []
    steps = sorted(int(m[1]) for name in os.listdir(ckpt_dir) if (m := re.fullmatch(r"step-(\d+)", name)))
    return [checkpoint_path(ckpt_dir, s) for s in steps]


def last_saved_path(ckpt_dir):
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir, step, unet, files, optimizer, settings, keep, streams=None, scaler=None,
                    method_state=None):
    """Write checkpoints/step-XXXXXX/ with the run's LoRA files (`files`: {role: name}, usable as they are) and
    `state.pt` (a plain dict of tensors and Python values, readable with torch.load(weights_only=True)), then keep
    the last `keep`. `streams`: each rank's (epoch, position) in a streamed dataset (parquet shards), whose place,
    unlike an in-memory dataset's, does not follow from the step. `scaler`: fp16's loss-scale state.
    `method_state`: what the method carries between steps (DDPO's epoch policy and tracker).

    The folder appears only complete: it is written under a temporary name, fsynced, then renamed."""
    final = checkpoint_path(ckpt_dir, step)
    tmp = tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=ckpt_dir)
    try:
        save_results(tmp, unet, files, settings, step)
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": step,  # optimizer steps done; the data stream continues at micro-step step × grad_accum
            "optimizer": optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "data": {"examples_seen": step * settings["global_batch"], "seed": settings["seed"], "streams": streams},
            "settings": settings,
            "scaler": scaler,
            "files": dict(files),
            "method_state": method_state,
        }
        torch.save(state, os.path.join(tmp, "state.pt"))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if os.path.exists(final):  # the same step written again (a resumed run): swap the old one out first
            old = tempfile.mkdtemp(prefix=f".step-{step:06d}-old-", dir=ckpt_dir)
            os.replace(final, os.path.join(old, "x"))
            shutil.rmtree(old)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    if keep:
        for folder in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(folder)
    return final


def find_resume(resume, ckpt_dir):
    """The checkpoint folder that --resume names: 'latest' or the run folder itself (its newest checkpoint; None
    when there is none yet), or a checkpoint folder."""
    if resume is None:
        return None
    folder = os.path.abspath(resume)
    if resume == "latest" or folder == os.path.dirname(os.path.abspath(ckpt_dir)):
        return last_saved_path(ckpt_dir)
    if not os.path.isfile(os.path.join(folder, "state.pt")):
        raise UserError(f"--resume {resume} is not a checkpoint folder (it has no state.pt); pass an "
                        "OUT/checkpoints/step-XXXXXX folder or 'latest'.")
    return folder


def save_settings(out, settings):
    """OUT/settings.json, written atomically: the settings a run was given (trainconfig.settings_to_save)."""
    text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    checkpoint.atomic_write(os.path.join(out, SETTINGS), lambda f: f.write(text.encode()))


def saved_settings(resume, out):
    """(the settings the run that --resume names saved, its folder): the run folder OUT itself, the run of a
    checkpoint folder OUT/checkpoints/step-XXXXXX, or --out for 'latest'. ({}, out) when the run saved none."""
    if resume == "latest" and not out:
        raise UserError("--resume latest continues the run in --out; pass --out, or pass --resume the run folder.")
    folder = out if resume == "latest" else os.path.abspath(resume)
    if os.path.isfile(os.path.join(folder, "state.pt")):  # a checkpoint folder: its run is two folders up
        folder = os.path.dirname(os.path.dirname(folder))
    path = os.path.join(folder, SETTINGS)
    if not os.path.isfile(path):
        return {}, out
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); pass the run's flags again with --resume.")
    return settings, out or folder


def read_checkpoint(folder):
    path = os.path.join(folder, "state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors for damaged or foreign files
        raise UserError(f"{path} is not a readable training checkpoint ({e}); resume from another checkpoint.")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not an npo training checkpoint; resume from an OUT/checkpoints/step-XXXXXX folder.")
    for name in state.get("files", {}).values():
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{folder} has no {name}; resume from another checkpoint.")
    return state


def check_resume(saved, now, folder, say):
    """A checkpoint continues only the same run (model, role, method, LoRA shape); other changes are allowed
    with a warning, since they change the training from there on."""
    if saved["model_fingerprint"] != now["model_fingerprint"]:
        raise UserError(f"{folder} was trained on the model {saved['model']}, and {now['model']} has other "
                        f"weights; resume with --model {saved['model']} or start a new run in another --out.")
    if _method_flags(saved) != _method_flags(now):
        raise UserError(f"{folder} was trained with {_method_flags(saved)}, not {_method_flags(now)}; "
                        "resume with the original flags or start a new run in another --out.")
    if any(saved[k] != now[k] for k in ("rank", "lora_alpha", "layers")):
        shape = lambda s: f"rank {s['rank']}, alpha {s['lora_alpha']:g} on {len(s['layers'])} layers"
        raise UserError(f"{folder} holds a LoRA of {shape(saved)}, but this run asks for {shape(now)}; "
                        "resume with the original --rank, --lora-alpha and --targets.")
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k not in IDENTITY and k != "model" and saved.get(k) != now[k]]
    if changed:
        say(f"warning: resuming with changed settings ({'; '.join(changed)}): the run will not replay an "
            "uninterrupted one exactly")


def _method_flags(settings):
    """What a run trains, as the flags that chose it: the method, and --npo, --joint or --train-branch uncond."""
    if settings.get("train_branch", "both") == "uncond":  # (checkpoints older than the flag trained both branches)
        return f"--method {settings['method']} --train-branch uncond"
    return f"--method {settings['method']}" + {"delta": " --npo", "eta+delta": " --joint"}.get(settings["role"], "")


def restore_lora(unet, role, path):
    """Copy the checkpoint's LoRA tensors into the offset, bit for bit, refusing any other set of keys or shapes."""
    saved = checkpoint.read_safetensors(path)
    own = lora.offset_state_dict(unet, role)  # views of the parameters: copying into them sets the LoRA
    if saved.keys() != own.keys() or any(saved[k].shape != v.shape for k, v in own.items()):
        raise UserError(f"{path} does not fit the LoRA of this run (other layers or rank); "
                        "resume with the original --rank, --lora-alpha and --targets.")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])
