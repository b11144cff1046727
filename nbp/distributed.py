"""Device choice and torchrun / DDP / DeepSpeed process-group set-up."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nbp.errors import NbpError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(spec)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend)
        except RuntimeError as e:  # a peer failed (and exited) while the group formed: one line, not a traceback
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise NbpError(f"rank {os.environ.get('RANK', '?')} of {world}: the process group did not form "
                           f"(another rank failed or exited first: {first})") from None
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's node name inside a job step
    print(f"rank {info.rank} of {info.world_size} (local rank {info.local_rank}) on node {node}", flush=True)
    return info


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (for timings); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What a metrics file records as the hardware: the GPU's name, or the CPU's thread count."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------
# sharded work: every rank a contiguous share of the units, results gathered in the original order


CPU = torch.device("cpu")


def share(n: int, info: DistInfo) -> range:
    """This rank's contiguous share of ``n`` work units (batches, or (seed, batch) pairs): disjoint over the ranks,
    covering 0..n-1 in order, sizes differing by at most one (a rank may get none)."""
    return range(n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size)


def _comm_device(device: torch.device) -> torch.device:
    """Where collectives' tensors live: the GPU under nccl, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_rows(rows: np.ndarray, info: DistInfo, device: torch.device = CPU) -> np.ndarray:
    """Every rank's ``rows`` [n_r, ...] concatenated in rank order, on every rank, byte for byte (any plain dtype).

    A rank with no rows may pass ``np.empty(0)``: the row shape and dtype come from the ranks that have rows.
    One process: ``rows`` unchanged.
    """
    if not info.enabled:
        return rows
    rows = np.ascontiguousarray(rows)
    head = torch.zeros(10, dtype=torch.int64)  # [rows, dtype char, ndim - 1, row shape (up to 7 dims)]
    head[0], head[1], head[2] = len(rows), ord(rows.dtype.char), rows.ndim - 1
    head[3:2 + rows.ndim] = torch.tensor(rows.shape[1:], dtype=torch.int64)
    comm = _comm_device(device)
    heads = [torch.zeros_like(head, device=comm) for _ in range(info.world_size)]
    dist.all_gather(heads, head.to(comm))
    heads = [h.cpu() for h in heads]
    sizes = [int(h[0]) for h in heads]
    full = next((h for h in heads if h[0] > 0), head)
    dtype, shape = np.dtype(chr(int(full[1]))), tuple(int(s) for s in full[3:3 + int(full[2])])
    row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mine = torch.zeros(max(sizes), row_bytes, dtype=torch.uint8)  # [max rows, bytes per row]
    if len(rows):
        mine[: len(rows)] = torch.from_numpy(rows.reshape(len(rows), -1).view(np.uint8))
    parts = [torch.zeros_like(mine, device=comm) for _ in range(info.world_size)]
    dist.all_gather(parts, mine.to(comm))
    flat = torch.cat([p[:k].cpu() for p, k in zip(parts, sizes)]).numpy()  # [sum rows, bytes per row]
    return flat.view(dtype).reshape(sum(sizes), *shape)


def sum_over_ranks(values: np.ndarray, info: DistInfo, device: torch.device = CPU) -> np.ndarray:
    """Element-wise sum of ``values`` (int64 or float64) over the ranks; one process: unchanged."""
    if not info.enabled:
        return values
    t = torch.from_numpy(np.ascontiguousarray(values)).to(_comm_device(device))
    dist.all_reduce(t)
    return t.cpu().numpy()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (rank 0 has written the outputs); one process: nothing."""
    if info.enabled:
        dist.barrier()
