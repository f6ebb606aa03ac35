"""Eviction policies for the tiers, chosen by name.

`POLICIES` is the registry: the configuration's allowed names come from it, and a
new policy is a new file plus one line here.
"""

from .base import EvictionPolicy, urgency_reader
from .lru import LruPolicy
from .scheduler_aware import SchedulerAwarePolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "scheduler-aware": SchedulerAwarePolicy,
    "lru": LruPolicy,
}


def policy_class(name: str) -> type[EvictionPolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None


def make_policy(name: str) -> EvictionPolicy:
    return policy_class(name)()


__all__ = ["EvictionPolicy", "LruPolicy", "SchedulerAwarePolicy", "POLICIES", "make_policy",
           "policy_class"]
