"""Data-parallel sharding: which samples this process answers.

Under ``accelerate launch`` (or ``torchrun``) each process gets its rank from
``accelerate.PartialState``; sample ``i`` of the run goes to rank ``i % world``. Processes do not
talk to each other: each appends to its own shard file, and rank 0 waits until every sample of the
run has a record in some file, then merges (no collective call, so no barrier timeout however
unequal the shards are). Plain ``RANK`` / ``WORLD_SIZE`` environment variables work too (any
launcher, or two shells), which is also how the tests run two CPU processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Shard", "shard_info"]


@dataclass(frozen=True)
class Shard:
    """This process's place in the run: ``rank`` of ``world``, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def owns(self, index: int) -> bool:
        """Whether sample ``index`` (position in the run's fixed order) is this process's."""
        return index % self.world == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def shard_info() -> Shard:
    """The current process's shard.

    With ``WORLD_SIZE > 1`` set by a launcher (``MASTER_ADDR`` and ``LOCAL_RANK`` present, as
    ``accelerate launch`` / ``torchrun`` set them), ``accelerate.PartialState`` gives rank, world
    size and local rank (and selects the process's GPU). If it reports a single process while the
    environment says otherwise (e.g. CPU processes, for which accelerate only initialises a process
    group under MPI), the environment's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` are used.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world > 1 and "MASTER_ADDR" in os.environ and "LOCAL_RANK" in os.environ:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes == world:
            return Shard(state.process_index, state.num_processes, state.local_process_index)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Shard(rank, world, local)
