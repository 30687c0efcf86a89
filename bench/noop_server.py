"""The transport floor: a grpc.aio Memory server that answers OpenNodes with a fixed 1-entity graph, doing no
work. Run as `python -m bench.noop_server PORT`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc

GRAPH = pb.Graph(entities=[pb.Entity(name="e00001", entity_type="thing", observations=["fact about e00001"])])


class Noop(pb_grpc.MemoryServicer):
    async def OpenNodes(self, request: pb.OpenNodesRequest, context: Any) -> pb.Graph:
        return GRAPH


async def main(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_MemoryServicer_to_server(Noop(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
