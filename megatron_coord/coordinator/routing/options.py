"""The command-line options of ``prefix_aware`` and the coordinator options they become."""

from __future__ import annotations

from typing import Any

from ..prefix_index import DEFAULT_INDEX_BLOCKS
from .prefix_aware import DEFAULT_PREFIX_BLOCK_SIZE, DEFAULT_PREFIX_LOAD_FACTOR


def add_prefix_routing_arguments(parser: Any) -> None:
    """The command-line options of ``prefix_aware`` (launch/arguments.py, standalone.py)."""
    parser.add_argument(
        "--prefix-load-factor",
        type=float,
        default=DEFAULT_PREFIX_LOAD_FACTOR,
        help="prefix_aware: the replica caching a prompt's prefix gets it unless its load "
        "exceeds this many times the least-loaded replica's, the request counted on both "
        f"(default {DEFAULT_PREFIX_LOAD_FACTOR:g}; >= 1)",
    )
    parser.add_argument(
        "--prefix-index-blocks",
        type=int,
        default=DEFAULT_INDEX_BLOCKS,
        help="prefix_aware: KV block names the coordinator remembers across all replicas "
        f"(~75 bytes each; default {DEFAULT_INDEX_BLOCKS:,})",
    )
    parser.add_argument(
        "--prefix-block-size",
        type=int,
        default=DEFAULT_PREFIX_BLOCK_SIZE,
        help="prefix_aware: tokens per block for replicas that do not report their KV block "
        f"size (Megatron-core's; default {DEFAULT_PREFIX_BLOCK_SIZE})",
    )


def prefix_routing_options(args: Any) -> dict[str, Any]:
    """Coordinator options from ``add_prefix_routing_arguments``'s parsed values."""
    return {
        "prefix_load_factor": args.prefix_load_factor,
        "prefix_index_blocks": args.prefix_index_blocks,
        "prefix_block_size": args.prefix_block_size,
    }
