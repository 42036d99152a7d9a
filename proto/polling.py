"""How gRPC reads and writes its sockets: chosen once per process, before grpc is imported."""

from __future__ import annotations

import os

# grpcio 1.80 moved Python's TCP connections onto gRPC's EventEngine, which does each socket's
# reads and writes on threads of its own and hands every message across to the completion queue
# that Python waits on. With the older endpoints these two experiments name, the thread that
# polls the completion queue reads the socket itself. A hidden state is one small message per
# token per hop, where those hand-offs are much of the hop: a ping-pong of 2.3 KB messages over
# a bidirectional stream between two processes on loopback took 465 us a round trip with the
# default and 270-350 us with these (raw sockets: 30 us), and single-stream decode through 3
# nodes went 6-14% faster (`caravan bench --nodes`, old and new in turn, two runs). grpcio is
# pinned in pyproject.toml; when it is moved, measure again: gRPC plans to retire these switches.
ENDPOINTS_POLLED_IN_PLACE = "-event_engine_client,-event_engine_listener"


def poll_sockets_in_place(environ=os.environ) -> None:
    """Have gRPC read each socket on the thread that polls for it (see above). Must run before
    grpc is imported, as gRPC reads GRPC_EXPERIMENTS when it starts; an operator's own setting
    wins."""
    environ.setdefault("GRPC_EXPERIMENTS", ENDPOINTS_POLLED_IN_PLACE)
