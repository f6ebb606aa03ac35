"""Eviction policies for the tiers, chosen by name."""

from .base import EvictionPolicy
from .lru import LruPolicy
from .scheduler_aware import SchedulerAwarePolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "scheduler-aware": SchedulerAwarePolicy,
    "lru": LruPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None


__all__ = ["EvictionPolicy", "LruPolicy", "SchedulerAwarePolicy", "POLICIES", "make_policy"]
