"""`npo.py sample` on the embedded model: 2 torchrun processes × 1 thread against 1 process × 2 threads and 1 process ×
1 thread (not a test).

    python -m benchmarks.multiprocess                       # 24 images (12 prompts × 2), 10 DDIM steps, batches of 4
    python -m benchmarks.multiprocess --n 1 --steps 2       # a check that the command runs

Each way runs the whole command in a fresh process (or torchrun's two), as a user runs it: its wall time includes
starting Python, importing torch and loading the model, so each way is also timed at one image and one step (its
fixed cost), and the difference is the sampling itself. Prints a Markdown table for BENCHMARKS.md, and whether each
way wrote the bytes of 1 process × 1 thread. Imports only the project.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.harness import ROOT
from npo.shapes import COLORS, SHAPES

WAYS = {  # name: (the command's launcher, torch threads per process)
    "1 process × 1 thread": ([sys.executable], 1),
    "1 process × 2 threads": ([sys.executable], 2),
    "2 processes × 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                "--"], 1),
}


def run(way, flags, out):
    """Wall seconds of `npo.py sample FLAGS --out OUT` run the given way."""
    launcher, threads = WAYS[way]
    command = [*launcher, os.path.join(ROOT, "npo.py"), "sample", *flags, "--out", out]
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    seconds = time.perf_counter() - t0
    if result.returncode:
        sys.exit(result.stderr)
    return seconds


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2, help="images per prompt, of the 12 captions (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per UNet forward (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each way; the median is shown (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("".join(f"a {color} {shape}\n" for color in COLORS for shape in SHAPES))
        images = 12 * args.n
        flags = ["--prompts-file", prompts, "--images-per-prompt", str(args.n), "--steps", str(args.steps),
                 "--batch-size", str(args.batch_size)]
        fixed = ["--prompt", "a red circle", "--steps", "1"]
        rows, reference = [], None
        for way in WAYS:
            outs = [os.path.join(tmp, f"{way}-{r}".replace(" ", "_")) for r in range(args.repeats)]
            wall = statistics.median(run(way, flags, out) for out in outs)
            start = statistics.median(run(way, fixed, os.path.join(tmp, "fixed", f"{way}-{r}"))
                                      for r in range(args.repeats))
            written = folder_bytes(outs[0])
            assert len(written) == images, f"{way} wrote {len(written)} images, not {images}"
            reference = reference or written
            rows.append((way, wall, start, wall - start, written == reference))
    base = rows[0][3]
    print(f"{images} images, {args.steps} DDIM steps, batches of {args.batch_size}, embedded model (64 px), "
          f"median of {args.repeats}\n")
    print("| way | wall s | fixed s (1 image, 1 step) | sampling s | images / s (sampling) | speed-up "
          "| same bytes as 1 × 1 |")
    print("|---|---|---|---|---|---|---|")
    for way, wall, start, sampling, same in rows:
        print(f"| {way} | {wall:.1f} | {start:.1f} | {sampling:.1f} | {images / sampling:.2f} "
              f"| {base / sampling:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
