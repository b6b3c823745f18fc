"""Serve a model with N data-parallel replicas of T tensor-parallel ranks until a client STOPs.

    torchrun --nproc-per-node N launch/serve.py [--model DIR] --tensor-parallel-size T \
        [--port 5555] [--deterministic-mode]

Global rank 0 spawns the coordinator on 127.0.0.1:PORT (a random free port if PORT is taken or
not given) and prints its address; clients (megatron_coord.InferenceClient, or Megatron-core's)
connect there. Every rank serves until a client sends STOP (``await client.stop_engines()``),
or until Ctrl-C / SIGTERM; the coordinator process ends with the launch.
"""

from __future__ import annotations

import argparse
import sys

from megatron_coord.launch import Replica, add_replica_arguments, options_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_replica_arguments(parser)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: random)")
    parser.add_argument(
        "--address-file", help="also write the coordinator's address to this file (rank 0)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    replica = Replica(options_from_args(args, port=args.port))
    if replica.is_global_rank0:
        print(f"coordinator listening at {replica.address}", flush=True)
        if args.address_file:
            with open(args.address_file + ".tmp", "w") as f:
                f.write(replica.address)
            import os

            os.replace(args.address_file + ".tmp", args.address_file)
    replica.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
