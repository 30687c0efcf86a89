"""Conversions between the wire messages and the domain objects. gRPC types stop here."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from adapters.model import Entity, Graph, ObservationAddition, ObservationDeletion, Relation
from memshift.v1 import memory_pb2 as pb
from proxy.routing import validation as check
from proxy.runtime.config import Limits

# Repeated fields of the Memory requests -> the limit on their length. Nested lists are counted only inside a list
# already counted, so the whole check costs at most a few thousand `len` calls whatever the request holds.
_TOP = ("entities", "relations", "observations", "deletions", "entity_names", "names", "entity_types")
_NESTED = ("observations", "contents")


def check_counts(request: Message, limits: Limits) -> None:
    """Refuse an over-count request (RESOURCE_EXHAUSTED naming the field) on the wire message, before any of it is
    converted: a 1.4 MB request can hold 700,000 empty entities."""
    for name in _TOP:
        if name not in request.DESCRIPTOR.fields_by_name:
            continue
        items = getattr(request, name)
        check.count(name, items, limits.max_items_per_call)
        if not items or not isinstance(items[0], Message):
            continue
        for i, item in enumerate(items):
            for nested in _NESTED:
                if nested in item.DESCRIPTOR.fields_by_name:
                    check.count(f"{name}[{i}].{nested}", getattr(item, nested), limits.max_observations_per_entity)
            if "metadata" in item.DESCRIPTOR.fields_by_name:
                check.metadata_entries(f"{name}[{i}].metadata", item.metadata, limits)


def _metadata(entries: Mapping[str, str]) -> dict[str, str]:
    # `dict()` of an empty protobuf map still walks its keys view in Python: a third of converting a page.
    return dict(entries) if entries else {}


def entity_in(msg: pb.Entity) -> Entity:
    return Entity(msg.name, msg.entity_type, tuple(msg.observations), _metadata(msg.metadata))


def entity_out(ent: Entity) -> pb.Entity:
    return pb.Entity(name=ent.name, entity_type=ent.entity_type, observations=ent.observations,
                     metadata=dict(ent.metadata))


def relation_in(msg: pb.Relation) -> Relation:
    # `from` is a Python keyword, so the generated field is reached through getattr.
    return Relation(getattr(msg, "from"), msg.to, msg.relation_type, _metadata(msg.metadata))


def relation_out(rel: Relation) -> pb.Relation:
    return pb.Relation(**{"from": rel.source}, to=rel.target, relation_type=rel.relation_type,
                       metadata=dict(rel.metadata))


def addition_in(msg: pb.ObservationAddition) -> ObservationAddition:
    return ObservationAddition(msg.entity_name, tuple(msg.contents))


def deletion_in(msg: pb.ObservationDeletion) -> ObservationDeletion:
    return ObservationDeletion(msg.entity_name, tuple(msg.observations))


def graph_out(graph: Graph) -> pb.Graph:
    return pb.Graph(entities=[entity_out(e) for e in graph.entities],
                    relations=[relation_out(r) for r in graph.relations], truncated=graph.truncated)


def graph_in(msg: pb.Graph) -> Graph:
    return Graph(tuple(entity_in(e) for e in msg.entities), tuple(relation_in(r) for r in msg.relations),
                 msg.truncated)
