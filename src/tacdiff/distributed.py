"""One tacdiff command in several processes with ``torch.distributed`` (launched by ``torchrun``).

Work splits by whole batches: the samples of a run at ``batch_size`` form ``ceil(N / batch_size)``
batches, and rank ``r`` of ``W`` takes a contiguous block of them (:func:`shard`). Every network call
therefore sees exactly the inputs it sees in a one-process run at that batch size, so a sample's
images do not depend on the number of processes (for a fixed thread count per process: CPU kernels
are not batch- or thread-invariant). A run with fewer batches than processes is not split: every
rank runs all of it, which gives the same answers.

Statistics that feed back into sampling (TAC's and PTQD's per-step sums) are kept per batch, gathered
from every rank and added in batch order (:meth:`Shard.merge`), so they are bit-identical to a
one-process run; end-of-run metrics are float64 sums all-reduced (:meth:`Shard.sum`), equal to a
one-process run up to float64 rounding; a running sum too large to keep per batch (GPTQ's Gram
matrices) is handed from rank to rank, each adding its own batches in order (:meth:`Shard.relay`).
Rank 0 writes every output (:func:`main_process_writes`) while the others wait at a barrier.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import sys
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

if TYPE_CHECKING:  # torch loads lazily: the command line imports this module (atomic writes) before it needs torch
    from torch import Tensor

T = TypeVar("T")
_writing = [False]


def active() -> bool:
    """Whether this process belongs to an initialised process group of more than one process."""
    dist = sys.modules.get("torch.distributed")  # not imported yet: no group either
    return dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    """How many processes share the work (1 outside a process group)."""
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes outputs and shows progress."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Collectives run on gloo for CPU tensors and NCCL for CUDA ones. Returns whether a group of more
    than one process is active; without ``torchrun`` this does nothing.
    """
    if not active() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        _dist().init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return active()


def shutdown() -> None:
    """Leave the process group (if any)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if device == "cuda" and active():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


@dataclass(frozen=True)
class Shard:
    """The samples this process runs and how its results combine with the other ranks'.

    Attributes:
        samples: the sample indices of this process, whole batches, contiguous.
        batch_size: the batch size the split was made for.
        split: whether the ranks hold different samples; if not, each ran them all and the
            combining methods return their input.
    """

    samples: range
    batch_size: int
    split: bool = False

    def take(self, items: Sequence[T]) -> list[T]:
        """The entries of ``items`` (one per sample, or per batch when sharded with batch size 1) this shard holds."""
        return [items[i] for i in self.samples]

    def gather_rows(self, local: Tensor) -> Tensor:
        """Every rank's ``local`` rows (samples of this shard, in order) concatenated in sample order, on the CPU."""
        import torch

        if not self.split:
            return local
        counts = _all_gather(torch.tensor([local.shape[0]]))
        padded = local.new_zeros(int(counts.max()), *local.shape[1:]).cpu()
        padded[:local.shape[0]] = local.cpu()
        rows = _all_gather(padded)
        return torch.cat([part[:count] for part, count in zip(rows, counts.flatten().tolist())])

    def merge(self, parts: Sequence[T]) -> T:
        """The sum of every rank's per-batch ``parts`` (tensors, or dataclasses of tensors with ``+``),
        added one batch at a time in sample order, as a one-process run over all batches adds them."""
        if not parts:
            raise ValueError("nothing to merge: a shard has at least one batch")
        everything = self._gather_parts(parts) if self.split else list(parts)
        return functools.reduce(operator.add, everything)

    def _gather_parts(self, parts: Sequence[T]) -> list[T]:
        import torch

        leaves = [_leaves(part) for part in parts]
        rows = torch.stack([torch.cat([leaf.detach().double().flatten().cpu() for leaf in row]) for row in leaves])
        template = leaves[0]
        sizes = [leaf.numel() for leaf in template]
        out = []
        for row in self.gather_rows(rows):
            pieces = [piece.view(leaf.shape).to(leaf.dtype) for piece, leaf in zip(row.split(sizes), template)]
            out.append(_rebuild(parts[0], pieces))
        return out

    def relay(self, step: Callable[[Tensor | None], Tensor], like: Tensor) -> Tensor:
        """Run ``step`` in one process after another, in rank order, each on the previous rank's result (None in
        rank 0), and return the last rank's result (shaped and typed as ``like``) in every process, on the CPU.
        This is how a sequential sum runs split and stays bit-identical: each rank adds its own terms, in order,
        to the sum of the ranks before it. Unsplit, it is ``step(None)``."""
        if not self.split:
            return step(None)
        dist, here, last = _dist(), rank(), world_size() - 1
        previous = None
        if here > 0:
            previous = like.new_empty(like.shape, device="cpu")
            dist.recv(previous, src=here - 1)
        out = step(previous).cpu().contiguous()
        if here < last:
            dist.send(out, dst=here + 1)
        dist.broadcast(out, src=last)
        return out

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks, in float64 on the CPU."""
        return self._all_reduce(values.double(), "SUM")

    def maximum(self, values: Tensor) -> Tensor:
        """The element-wise maximum of ``values`` over the ranks (exact in any split), on the CPU."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: Tensor, op: str) -> Tensor:
        total = values.detach().cpu().clone()
        if self.split:
            _dist().all_reduce(total, op=getattr(_dist().ReduceOp, op))
        return total


def shard(num_samples: int, batch_size: int) -> Shard:
    """This rank's share of ``num_samples`` in batches of ``batch_size``: a contiguous block of whole batches
    (earlier ranks take one more when they do not divide evenly); all samples, unsplit, when there are fewer
    batches than processes."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    batches, size = math.ceil(num_samples / batch_size), world_size()
    if size == 1 or batches < size:
        return Shard(range(num_samples), batch_size)
    per, extra = divmod(batches, size)
    first = rank() * per + min(rank(), extra)
    last = first + per + (rank() < extra)
    return Shard(range(first * batch_size, min(last * batch_size, num_samples)), batch_size, split=True)


def main_process_writes(write: Callable[..., Path]) -> Callable[..., Path]:
    """Decorate a writer ``write(path, ...) -> Path``: in a process group only rank 0 writes and every rank
    waits for it at a barrier; the others return ``Path(path)``. Writes nested in a write run directly."""

    @functools.wraps(write)
    def run(path: str | Path, *args: Any, **kwargs: Any) -> Path:
        if not active() or _writing[0]:
            return write(path, *args, **kwargs)
        _writing[0] = True
        try:
            written = write(path, *args, **kwargs) if is_main() else Path(path)
        finally:
            _writing[0] = False
        _dist().barrier()
        return written

    return run


def _all_gather(tensor: Tensor) -> Tensor:
    """``(W, *tensor.shape)``: ``tensor`` of every rank, stacked in rank order."""
    import torch

    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    _dist().all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def _dist() -> Any:
    import torch.distributed

    return torch.distributed


def _leaves(part: Any) -> list[Tensor]:
    import torch

    if isinstance(part, torch.Tensor):
        return [part]
    if is_dataclass(part):
        return [torch.as_tensor(getattr(part, f.name)) for f in fields(part)]
    raise TypeError(f"cannot gather a {type(part).__name__}; pass tensors or dataclasses of tensors")


def _rebuild(template: T, pieces: list[Tensor]) -> T:
    if not is_dataclass(template):
        return pieces[0]
    return replace(template, **{f.name: piece for f, piece in zip(fields(template), pieces)})
