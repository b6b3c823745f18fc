"""Which engine gets the next request: a small policy interface, round robin, least loaded and
prefix aware (least loaded with affinity to the replica caching a prompt's prefix).

* ``base``: the interface (``RoutingPolicy``: what the coordinator asks and tells a policy) and
  ``EngineList``, the routable engines;
* ``round_robin``: ``RoundRobin``, O(1) per request and no accounting;
* ``least_loaded``: ``LeastLoaded`` and its per-request accounting; ``min_tree``: the
  ``MinTree`` that makes its choice O(log n);
* ``prefix_aware``: ``PrefixAware`` (the index it consults is ``coordinator/prefix_index.py``);
* ``options``: its command-line options; here: ``POLICIES`` and ``make_policy``.

Cost per request is independent of the number of engines: round robin is O(1), least loaded
keeps the engines' loads in a min-tree and chooses and updates in O(log n); membership tests on
``engines`` are O(1). Adding or removing an engine may cost O(n): it happens per registration or
health change, never per request. No torch here: the coordinator process must start fast.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .base import EngineList, Identity, RoutingPolicy
from .least_loaded import LeastLoaded
from .options import add_prefix_routing_arguments, prefix_routing_options
from .prefix_aware import DEFAULT_PREFIX_BLOCK_SIZE, DEFAULT_PREFIX_LOAD_FACTOR, PrefixAware
from .round_robin import RoundRobin

__all__ = [
    "DEFAULT_PREFIX_BLOCK_SIZE",
    "DEFAULT_PREFIX_LOAD_FACTOR",
    "POLICIES",
    "EngineList",
    "Identity",
    "LeastLoaded",
    "PrefixAware",
    "RoundRobin",
    "RoutingPolicy",
    "add_prefix_routing_arguments",
    "make_policy",
    "prefix_routing_options",
]


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "prefix_aware": PrefixAware,
}


def make_policy(
    name: str,
    engines: deque[Identity] | Iterable[Identity],
    deterministic: bool = False,
    **prefix_options: Any,
) -> RoutingPolicy:
    """Build the policy registered under ``name`` over ``engines`` (in routing order).

    ``deterministic``: the routing must be a pure function of the request sequence (the
    coordinator's ``deterministic_mode``); round robin always is. ``prefix_options``: the
    keyword options of ``PrefixAware`` (ignored by the other policies)."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(POLICIES)}")
    if factory is PrefixAware:
        return PrefixAware(engines, deterministic=deterministic, **prefix_options)
    if factory is LeastLoaded:
        return LeastLoaded(engines, deterministic=deterministic)
    return factory(engines)
