"""Which part of the work this process does, when ``accelerate launch`` starts several.

After rank 0 has prepared the folder (dataset.json, clean-up, index repair) every rank lists the
missing images, in plan order (prompt-file order x sample); a barrier later, rank ``r`` of ``world``
renders ``missing[r::world]``. No rank writes between the two barriers, so all ranks see the same
list and the slices are disjoint and balanced whatever is missing (a resumed tail, or a new sample
of every prompt). Rank 0 alone writes ``dataset.json`` and ``metadata.jsonl``; the other ranks only
commit images, whose rows rank 0 reads back from the PNGs after the final barrier (see :mod:`.dataset`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import SelmaError

T = TypeVar("T")


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, missing: list[T]) -> list[T]:
        """This rank's slice of the work every rank listed identically."""
        return missing[self.rank::self.world]


def shard_from_environment(device: str = "auto") -> Shard:
    """One process: ``Shard()``. Under ``accelerate launch``/``torchrun`` (WORLD_SIZE > 1): this rank.

    Uses accelerate's ``PartialState``, which sets up torch.distributed: NCCL on GPUs, gloo on CPU
    (``device == "cpu"``, no CUDA, or ``accelerate launch --cpu``). Two CPU processes on one machine:
    ``accelerate launch --multi_gpu --num_processes 2`` without GPUs (``--cpu`` alone starts one
    process unless MPI is set up), or ``torchrun --nproc_per_node 2``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    cpu = (device == "cpu" or not torch.cuda.is_available()
           or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        raise SelmaError(f"WORLD_SIZE is {world} but torch.distributed was set up for {state.num_processes} "
                         "process(es); every process would render everything. Launch with `accelerate launch "
                         "--num_processes N` (or torchrun) and --device cpu/cuda matching the machine")
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone)

