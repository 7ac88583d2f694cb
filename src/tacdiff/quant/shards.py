"""Activation observation split across processes, merged into exactly what one process observes.

A :class:`~tacdiff.quant.layers.RangeObserver` keeps a random subsample drawn from one random stream per
quantizer, whose draws depend only on the sizes of the calls it has seen (and when its store is halved).
So a process that knows the size of every call of a run can replay the one-process stream: it advances the
stream over the other processes' calls without their values and draws its own calls' values exactly where
one process would. Call sizes depend only on a batch's shape, so they come from one probe pass per distinct
batch size. After the pass every process gathers all calls' stored values, in batch order, and replays the
store (draws and halvings) once more with them: the result is the one-process observer, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from tacdiff.distributed import Shard, rank
from tacdiff.quant.layers import ActQuantizer, RangeObserver

if TYPE_CHECKING:
    from tacdiff.quant.calibrate import Batch


@dataclass(frozen=True)
class Call:
    """One segment of one call of a quantizer: its timestep group, segment, size, and ``owner``: this process's
    rank when it runs the call, -1 when another process does."""

    group: int
    segment: int
    numel: int
    owner: int


class _SizeRecorder:
    """Stands in for an observer during a probe pass: keeps the sizes of each call's segments."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def observe(self, parts: list[torch.Tensor], group: int, name: str) -> None:
        self.calls.append([part.numel() for part in parts])


@dataclass
class ShardObserver:
    """Stands in for a quantizer's observer in one process: replays the one-process random stream over every
    process's :class:`Call` and stores the entries of this process's calls."""

    calls: list[Call]
    replay: RangeObserver
    own: list[torch.Tensor] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # stored values of every call so far

    def observe(self, parts: list[torch.Tensor], group: int, name: str) -> None:
        for seg, x in enumerate(parts):
            self.skip_others()
            expected = self.calls[len(self.sizes)] if len(self.sizes) < len(self.calls) else None
            if expected is None or (expected.group, expected.segment, expected.numel) != (group, seg, x.numel()):
                raise RuntimeError(f"activation quantizer {name!r} saw a call the probe pass did not predict "
                                   f"({x.numel()} values in timestep group {group}): its calls depend on more than "
                                   "the batch shape; quantize in one process")
            entry = RangeObserver.entry(x, self.replay.draw(group, seg, x.numel()), name)
            self._store(expected, entry)
            self.own.append(entry)

    def skip_others(self) -> None:
        """Advance the stream over the calls of other processes up to this process's next call (or the end)."""
        while len(self.sizes) < len(self.calls) and self.calls[len(self.sizes)].owner != rank():
            call = self.calls[len(self.sizes)]
            self._store(call, torch.empty(self.replay.draw(call.group, call.segment, call.numel).numel() + 2))

    def _store(self, call: Call, entry: torch.Tensor) -> None:
        self.replay.add(call.group, call.segment, entry)
        self.sizes.append(entry.numel())


def split_observers(model: nn.Module, quantizers: Sequence[ActQuantizer], batches: Sequence[Batch], mine: Shard,
                    observers: Sequence[RangeObserver]) -> list[ShardObserver]:
    """Stand-ins for the fresh ``observers`` of ``quantizers`` to install while this process runs its share
    ``mine`` of ``batches``; :func:`merge_observers` then makes them the one-process observers."""
    calls = _predicted_calls(model, quantizers, batches, mine)
    return [ShardObserver(quantizer_calls, observer) for quantizer_calls, observer in zip(calls, observers)]


def merge_observers(observers: Sequence[ShardObserver], mine: Shard) -> list[RangeObserver]:
    """In every process, the observers one process gets over all batches: every process's stored values gathered
    in batch order and replayed through a fresh observer of the same seed."""
    merged = []
    for observer in observers:
        observer.skip_others()
        own = torch.cat(observer.own) if observer.own else torch.empty(0)
        entries = mine.gather_rows(own).split(observer.sizes)
        fresh = observer.replay.fresh()
        for call, entry in zip(observer.calls, entries):
            fresh.draw(call.group, call.segment, call.numel)
            fresh.add(call.group, call.segment, entry)
        merged.append(fresh)
    return merged


@torch.no_grad()
def _predicted_calls(model: nn.Module, quantizers: Sequence[ActQuantizer], batches: Sequence[Batch],
                     mine: Shard) -> list[list[Call]]:
    """Every quantizer's calls over all ``batches`` in one-process order, from one probe forward pass per
    distinct batch size (call sizes depend on the batch shape only; a mismatch is caught as it happens)."""
    per_size: dict[int, list[list[list[int]]]] = {}
    owners = {index: rank() for index in mine.samples}
    calls: list[list[Call]] = [[] for _ in quantizers]
    for index, (x, t, cond) in enumerate(batches):
        if x.shape[0] not in per_size:
            recorders = [_SizeRecorder() for _ in quantizers]
            for q, recorder in zip(quantizers, recorders):
                q.observer = recorder
            model(x, timestep=t, **cond)
            per_size[x.shape[0]] = [recorder.calls for recorder in recorders]
        owner = owners.get(index, -1)  # -1: another process's batch
        for q, sizes, out in zip(quantizers, per_size[x.shape[0]], calls):
            group = q.router.group_for(t)
            out.extend(Call(group, seg, numel, owner) for call in sizes for seg, numel in enumerate(call))
    return calls
