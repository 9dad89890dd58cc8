"""Many processes for sampling and scoring: `torchrun --nproc-per-node N -- npo.py sample ...` (and `evaluate`).

torchrun starts N copies of the command with RANK, WORLD_SIZE and LOCAL_RANK in their environment. The work is cut
into the units one process would make anyway (its batches, so that every image and score comes out of the very same
computation, bit for bit), rank r takes units r, r + N, r + 2N, ... (round robin, so that no rank gets all the long
ones), and the ranks exchange only what they must: the first file number, the scores, the written paths. Without
torchrun (no WORLD_SIZE) every function here is the one-process case and starts nothing.

(Training joins its ranks itself, in machinery.py, for DDP.)
"""
import contextlib
import os

import torch
import torch.distributed as dist

from .checkpoint import UserError


def world():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def joined():
    return dist.is_available() and dist.is_initialized()


def rank_and_size():
    """(this process's rank, the number of ranks) of the joined group; (0, 1) in one process."""
    return (dist.get_rank(), dist.get_world_size()) if joined() else (0, 1)


@contextlib.contextmanager
def processes(device):
    """For the block, join the other ranks (NCCL on CUDA, gloo on the CPU); yields (rank, world size, device), the
    device being `device`, or cuda:LOCAL_RANK for a CUDA device under torchrun: one GPU per rank, as in training. A
    group someone else started (a test, a caller's program) is used and left open."""
    rank, size, local = world()
    if size == 1 or joined():
        yield (*rank_and_size(), device)
        return
    cuda = str(device).split(":")[0] == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(f"torchrun started local rank {local}, but this machine has {count} CUDA device"
                            f"{'s' * (count != 1)}, one per rank; pass --nproc-per-node {count} or fewer.")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield rank, size, device
        # every rank past its last collective before any tears the group down: a rank that destroys the group while
        # another is still in a gather can die at exit in gloo's C++ threads (SIGABRT, "terminate called ...")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def share(units, rank, size):
    """The units rank `rank` of `size` takes: every size-th, from its rank on."""
    return list(units)[rank::size]


def broadcast(value):
    """Rank 0's `value`, on every rank (rank 0 computes, say, the first free file number; no other rank has
    written anything yet, since each waits here)."""
    if not joined():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value):
    """[value of rank 0, value of rank 1, ...] on every rank (any picklable value)."""
    if not joined():
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone
