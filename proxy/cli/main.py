"""`memshift`: run the proxy, or look at (and poke) a running one.

    memshift serve [--config FILE] [--listen HOST:PORT] [--store SPEC]
    memshift graph                      the whole graph of a scope
    memshift search TEXT                semantic search
    memshift find TEXT                  case-insensitive substring search
    memshift open NAME...               named entities and their relations
    memshift remember NAME TYPE [OBSERVATION...]
    memshift relate FROM RELATION TO
    memshift forget NAME...
    memshift health                     exit 0 if the proxy reports SERVING over gRPC health (container checks)
    memshift admin ...                  drive a migration (see `memshift admin --help`)

Client commands take --target (default $MEMSHIFT_TARGET or 127.0.0.1:50051) and --scope (default $MEMSHIFT_SCOPE
or "default").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from adapters.errors import JsonlError
from adapters.specs import scrub
from memshift.v1 import memory_pb2 as pb
from memshift.v1 import memory_pb2_grpc as pb_grpc
from proxy.cli import admin as admin_cli
from proxy.cli import transfer as transfer_cli


def _print_graph(entities: Iterable[pb.Entity], relations: Iterable[pb.Relation],
                 scores: dict[str, float] | None = None) -> None:
    rels = list(relations)
    for ent in entities:
        score = f"  [{scores[ent.name]:.3f}]" if scores and ent.name in scores else ""
        print(f"{ent.name} ({ent.entity_type}){score}")
        for obs in ent.observations:
            print(f"  - {obs}")
        for rel in rels:
            if getattr(rel, "from") == ent.name:
                print(f"  -> {rel.relation_type} {rel.to}")
            elif rel.to == ent.name:
                print(f"  <- {rel.relation_type} {getattr(rel, 'from')}")


def _client_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                   help_: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    p.add_argument("--target", default=os.environ.get("MEMSHIFT_TARGET", "127.0.0.1:50051"))
    p.add_argument("--scope", default=os.environ.get("MEMSHIFT_SCOPE", "default"))
    p.add_argument("--token", default=os.environ.get("MEMSHIFT_TOKEN"),
                   help="bearer token, when the proxy has a memory_tokens_file ($MEMSHIFT_TOKEN)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memshift", description="Hot-migrating gRPC proxy for AI-agent memory.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default $MEMSHIFT_CONFIG)")
    serve.add_argument("--listen", help="address to serve on, e.g. 127.0.0.1:50051")
    serve.add_argument("--store", help="store spec, e.g. sqlite:///./data/memory.db")
    _client_parser(sub, "graph", "print the whole graph of a scope")
    p = _client_parser(sub, "search", "semantic search")
    p.add_argument("text")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--min-score", type=float)
    p.add_argument("--type", action="append", default=[], dest="types", help="only this entity type (repeatable)")
    p = _client_parser(sub, "find", "case-insensitive substring search")
    p.add_argument("text")
    p = _client_parser(sub, "open", "show named entities")
    p.add_argument("names", nargs="+")
    p = _client_parser(sub, "remember", "create an entity, or add observations to an existing one")
    p.add_argument("name")
    p.add_argument("entity_type")
    p.add_argument("observations", nargs="*")
    p = _client_parser(sub, "relate", "create a relation")
    p.add_argument("source")
    p.add_argument("relation_type")
    p.add_argument("target_entity")
    p = _client_parser(sub, "forget", "delete entities")
    p.add_argument("names", nargs="+")
    _client_parser(sub, "mcp", "serve the MCP memory tools on stdio, as a bridge to a running proxy "
                               "(for clients that launch a command)")
    p = _client_parser(sub, "health", "check the proxy's gRPC health (exit 0 when SERVING)")
    p.add_argument("--timeout", type=float, default=3.0)
    transfer_cli.add_parsers(sub, _client_parser)
    admin_cli.add_parser(sub)
    return parser


async def _health(target: str, deadline_s: float) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


class _Bearer(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call of the channel."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = tuple(details.metadata or ()) + self._metadata
        return await continuation(details._replace(metadata=metadata), request)


async def _client(args: argparse.Namespace) -> None:
    if args.command in ("import", "export") and await transfer_cli.run_backup(args):
        return
    interceptors = [_Bearer(args.token)] if args.token else None
    async with grpc.aio.insecure_channel(args.target, interceptors=interceptors) as channel:
        stub = pb_grpc.MemoryStub(channel)
        scope = args.scope
        if args.command == "import":
            await transfer_cli.import_file(stub, args.file, scope, args.dry_run)
            return
        if args.command == "export":
            if args.output is None:
                await transfer_cli.export_file(stub, scope, sys.stdout)
            else:
                with args.output.open("w", encoding="utf-8") as sink:
                    await transfer_cli.export_file(stub, scope, sink)
            return
        if args.command == "graph":
            token = ""
            while True:
                page = await stub.ReadGraph(pb.ReadGraphRequest(scope=scope, page_token=token))
                _print_graph(page.entities, page.relations)
                if not page.entities and not page.relations and not token:
                    print(f"(scope {scope!r} is empty)")
                token = page.next_page_token
                if not token:
                    break
        elif args.command == "search":
            req = pb.SemanticSearchRequest(scope=scope, query=args.text, limit=args.limit, entity_types=args.types)
            if args.min_score is not None:
                req.min_score = args.min_score
            res = await stub.SemanticSearch(req)
            _print_graph([r.entity for r in res.results], res.relations,
                         {r.entity.name: r.score for r in res.results})
        elif args.command == "find":
            g = await stub.SearchNodes(pb.SearchNodesRequest(scope=scope, query=args.text))
            _print_graph(g.entities, g.relations)
        elif args.command == "open":
            g = await stub.OpenNodes(pb.OpenNodesRequest(scope=scope, names=args.names))
            _print_graph(g.entities, g.relations)
        elif args.command == "remember":
            created = await stub.CreateEntities(pb.CreateEntitiesRequest(scope=scope, entities=[
                pb.Entity(name=args.name, entity_type=args.entity_type, observations=args.observations)]))
            if created.created:
                print(f"created {args.name}")
            elif args.observations:
                res = await stub.AddObservations(pb.AddObservationsRequest(scope=scope, observations=[
                    pb.ObservationAddition(entity_name=args.name, contents=args.observations)]))
                print(f"{args.name} exists; added {len(res.results[0].added_observations)} observation(s)")
            else:
                print(f"{args.name} exists; nothing to add")
        elif args.command == "relate":
            res = await stub.CreateRelations(pb.CreateRelationsRequest(scope=scope, relations=[pb.Relation(
                **{"from": args.source}, to=args.target_entity, relation_type=args.relation_type)]))
            print("created" if res.created else "exists")
        elif args.command == "forget":
            await stub.DeleteEntities(pb.DeleteEntitiesRequest(scope=scope, entity_names=args.names))
            print(f"deleted {len(args.names)} name(s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        try:
            return admin_cli.run(args)
        except grpc.RpcError as exc:
            print(f"memshift: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.command == "serve":
        from adapters.errors import ConfigError
        from proxy.runtime import logs
        from proxy.runtime.config import load_config
        from proxy.transports.server import serve

        env = dict(os.environ)
        if args.listen:
            env["MEMSHIFT_LISTEN"] = args.listen
        if args.store:
            env["MEMSHIFT_STORE"] = args.store
        try:
            config = load_config(args.config, env)
        except ConfigError as exc:
            print(f"memshift: {exc}", file=sys.stderr)
            return 2
        logs.setup(config.log_level, config.log_format)
        try:
            asyncio.run(serve(config))
        except Exception as exc:  # start-up failures: say what and exit non-zero, no traceback wall
            print(f"memshift: cannot serve: {scrub(str(exc))}", file=sys.stderr)
            return 1
        return 0
    if args.command == "mcp":
        from proxy.runtime import logs
        from proxy.transports.mcp_bridge import run_stdio

        logs.setup("WARNING", "json")  # stderr only: stdout carries the protocol
        asyncio.run(run_stdio(args.target, args.scope, args.token))
        return 0
    try:
        if args.command == "health":
            return asyncio.run(_health(args.target, args.timeout))
        asyncio.run(_client(args))
    except grpc.aio.AioRpcError as exc:
        print(f"memshift: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (JsonlError, OSError) as exc:  # a bad line or file: said once, nothing was written
        print(f"memshift: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
