"""The few collective operations a run needs, the same code for one process or many.

With one process everything is a no-op; under ``accelerate launch`` or ``torchrun`` they go
through accelerate (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    accelerator: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (picklable Python objects)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def share(self, items: list[Any]) -> list[Any]:
        """This process's share of a list every process holds in the same order."""
        return items[self.rank :: self.world]
