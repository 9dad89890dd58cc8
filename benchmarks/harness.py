"""One timing harness for every benchmark: warm-up calls, timed repeats (median and mean), the peak memory of the
timed calls (resident memory on the CPU, torch.cuda.max_memory_allocated on a GPU), the thread count, and fresh
processes so that a measurement's peak memory is its own."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_gib(field="VmRSS"):
    """Linux /proc/self/status: VmRSS (resident now) or VmHWM (the peak resident set since the last reset), GiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Timing:
    seconds: float           # median of the timed calls
    mean: float
    peak_gib: float          # peak during the timed calls: whole-process RSS (CPU), or allocated CUDA memory (GPU)
    extra_gib: float         # that peak above what was resident / allocated when the timed calls began
    process_peak_gib: float  # the largest of the process's life so far (the model load included)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device):
    """Start a fresh peak; return (the peak so far, what is in use now), in GiB."""
    if device.type == "cuda":
        before = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return before, torch.cuda.memory_allocated(device) / 2**30
    before = rss_gib("VmHWM")
    reset_peak_rss()
    return before, rss_gib("VmRSS")


def measure(fn, repeats=3, warmup=1, device="cpu"):
    """Time `fn()`: `warmup` untimed calls (allocator, caches, torch.compile), then `repeats` timed ones, each waiting
    for the device to finish; return a Timing."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    before, base = _reset_peak(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else rss_gib("VmHWM")
    return Timing(statistics.median(times), statistics.mean(times), peak, peak - base, max(before, peak))


def once(fn):
    """(fn()'s result, its seconds) of one call, for what runs once (a load, an SVD, a training run)."""
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_child(module, kind, *args, threads=2):
    """`python -m MODULE KIND ARGS... THREADS` in a fresh process (so that its peak memory is its own): the module's
    child function KIND on ARGS with THREADS torch threads; return its JSON result. The child inherits this process's
    working folder, so it imports what this one imports."""
    out = subprocess.run([sys.executable, "-m", module, kind, *map(str, args), str(threads)], capture_output=True,
                         text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(doc, commands, children):
    """A benchmark module's entry point: `KIND ARGS... THREADS` runs children[KIND] and prints its JSON (see
    run_child); anything else is the module's argparse subcommands, each added by one of `commands`."""
    if len(sys.argv) > 1 and sys.argv[1] in children:
        *args, threads = map(_value, sys.argv[2:])
        torch.set_num_threads(threads)
        print(json.dumps(children[sys.argv[1]](*args)))
        return
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in commands:
        add(sub)
    args = parser.parse_args()
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    args.func(args)
