"""Reading model folders: configs, safetensors files, strict state-dict loading; hashing files; writing files
atomically; and the error users see.

Every model in npo (UNet, VAE, CLIP text encoder) is built from its `config.json` and filled by one strict
`load_state_dict`: a missing, unexpected or misshaped key is an error that names the keys.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import secrets

import torch
from safetensors import safe_open
from safetensors.torch import load_file


class UserError(Exception):
    """Bad user input: the message is one sentence saying what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2."""


def finite_float(text):
    """argparse type for float flags: a number that is neither nan nor infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; point --model at a diffusers model folder.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); restore the file from the original model.")


def config_from_dict(cls, d, where, noop=None):
    """Build the dataclass `cls` from a config dict, refusing anything we would otherwise silently ignore.

    `noop` maps each field we do not implement to the values at which it changes nothing; a field there with
    another value, or a field that is neither in `cls` nor in `noop`, is an error naming the field. Keys that
    start with '_' (`_class_name`, `_diffusers_version`, ...) are bookkeeping and skipped."""
    noop = noop or {}
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_"):
            continue
        if key in names:
            kwargs[key] = value
        elif key in noop:
            if value not in noop[key]:
                raise UserError(f"{where}: '{key}' = {value!r} is not supported by npo "
                                f"(supported: {', '.join(repr(v) for v in noop[key])}); use a Stable Diffusion 1.x/2.x/XL model.")
        else:
            raise UserError(f"{where}: unknown config field '{key}'; npo supports Stable Diffusion 1.x/2.x/XL configs only.")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}; fix the config or use a Stable Diffusion 1.x/2.x/XL model.")


def find_weights(folder, stems, variant=None):
    """The safetensors file of a model folder: `<stem>.safetensors` (or `<stem>.<variant>.safetensors`)."""
    names = [f"{s}.{variant}.safetensors" if variant else f"{s}.safetensors" for s in stems]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    bins = [n for n in os.listdir(folder) if n.endswith((".bin", ".ckpt", ".pt"))] if os.path.isdir(folder) else []
    hint = (f" (found {bins[0]}: npo reads safetensors only; convert it with safetensors first)" if bins else "")
    raise UserError(f"{folder} has no {' or '.join(names)}{hint}; point --model at a diffusers folder with safetensors weights.")


def read_safetensors(path, device="cpu"):
    """All tensors of a safetensors file, loaded straight onto `device`; a damaged file is a UserError."""
    try:
        return load_file(path, device=str(device))
    except (torch.OutOfMemoryError, MemoryError):
        raise  # not the file's fault: the loader above says what happened
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, or ValueError on bad headers
        raise UserError(f"{path} is not a readable safetensors file ({e}); download or convert it again.")


def read_weights(path, device="cpu"):
    """The tensors of one weights file: safetensors, or a PyTorch file (.pt / .pth / .bin) read with
    `torch.load(weights_only=True)`, which builds tensors and plain containers only and runs no code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; pass the weights file.")
    if path.lower().endswith(".safetensors"):
        return read_safetensors(path, device)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (torch.OutOfMemoryError, MemoryError):
        raise
    except Exception as e:  # pickle errors, zip errors, and the refusal of anything but tensors and containers
        raise UserError(f"{path} is not a PyTorch weights file that loads with weights_only=True ({e}); "
                        "pass a safetensors file or a plain state dict saved with torch.save.")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict; pass a file of named tensors.")
    return state


def read_safetensors_metadata(path):
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); download or convert it again.")


def sha256_file(path, tensor_data_only=False, chunk=1 << 20):
    """The SHA-256 hex digest of a file, read in 1 MiB chunks. `tensor_data_only`: of a safetensors file's tensor
    data alone, after its header (8 bytes of little-endian length n, then n bytes of JSON), which is kohya's
    "addnet" hash: it does not change when only the metadata does."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if tensor_data_only:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
    except OSError as e:
        raise UserError(f"cannot read {path} to hash it ({e.strerror or e}); check that the file exists and is readable.")
    return digest.hexdigest()


def few(keys, n=5):
    """The first n of `keys`, sorted, and how many more: for error messages that name what is wrong."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(model, state_dict, where, dtype=None,
                hint="check that the weights and config.json come from the same model."):
    """Fill `model` (built on the meta device) from `state_dict`, strictly; a mismatch is a UserError ending in `hint`.

    The tensors of `state_dict` become the parameters (`assign=True`), cast to `dtype` one at a time, so
    loading holds at most the file's tensors plus one converted tensor: never a second copy of the model."""
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({few(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} misshaped keys ({few(misshaped, 3)})")
    if problems:
        raise UserError(f"{where} does not fit its config: {'; '.join(problems)}; {hint}")
    for k in list(state_dict):
        if dtype is not None and state_dict[k].is_floating_point() and state_dict[k].dtype != dtype:
            state_dict[k] = state_dict[k].to(dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def build_on_meta(factory):
    """Construct a module without allocating its weights (they arrive from the checkpoint)."""
    with torch.device("meta"):
        return factory()


def atomic_write(path, write):
    """`write(f)` into a temporary file beside `path` (f: a binary file), fsync it, then rename it to `path`: a
    reader, or a run killed halfway, never sees a half-written file. The temporary file is created with mode 0666,
    which the OS reduces by the process's umask, so the result has a normal file's permissions (mkstemp's 0600
    would need a chmod, and reading the umask means setting it: not thread-safe)."""
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror or e}); check that its folder exists and is writable.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
