"""A worker's `used_*` counters: the one way they change (dispatch adds, ended runs give back).

The CHECK constraints on Worker refuse any overcommit; the UPDATE is compiled
once per set of counters (a round and a batch of reports each run it).
"""

from typing import Any

from django.db.models import F

from fetchml.compiled import compiled_update_per_shape
from scheduler.models import Worker


def change_used(worker_id: Any, changes: dict[str, int]) -> None:
    """Add `changes` (counter name -> amount, negative to free) to the worker's counters."""
    _changed(worker_id=worker_id, **changes)


def give_back(worker_id: Any, freed: dict[str, int]) -> None:
    """Subtract what ended runs held (`freed`: counter name -> amount)."""
    change_used(worker_id, {name: -amount for name, amount in freed.items()})


def _update(*, worker_id: Any, **amounts: int) -> tuple:
    return Worker.objects.filter(id=worker_id), {name: F(name) + amount for name, amount in amounts.items()}


_changed = compiled_update_per_shape(_update)
