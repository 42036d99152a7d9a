"""Ask a node whether it is up, as `grpc_health_probe` would: exit 0 when it answers SERVING.

    python -m caravan.node.health HOST:PORT [--ready] [--timeout S]

--ready asks about the Stage service (SERVING only once layers are loaded and compiled)
instead of the server as a whole. Health checks need no cluster token. For systemd, Ansible
and monitoring.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .server import SERVICE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caravan.node.health", description=__doc__.split("\n\n")[0])
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--ready", action="store_true", help="ask whether layers are loaded, not just whether it runs")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S")
    args = p.parse_args(argv)
    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE if args.ready else ""), timeout=args.timeout,
                wait_for_ready=True)
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name.lower()}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
