"""Conversions between the wire messages and the domain objects. gRPC types stop here."""

from __future__ import annotations

from adapters.model import Entity, Graph, ObservationAddition, ObservationDeletion, Relation
from memshift.v1 import memory_pb2 as pb


def entity_in(msg: pb.Entity) -> Entity:
    return Entity(msg.name, msg.entity_type, tuple(msg.observations), dict(msg.metadata))


def entity_out(ent: Entity) -> pb.Entity:
    return pb.Entity(name=ent.name, entity_type=ent.entity_type, observations=ent.observations,
                     metadata=dict(ent.metadata))


def relation_in(msg: pb.Relation) -> Relation:
    # `from` is a Python keyword, so the generated field is reached through getattr.
    return Relation(getattr(msg, "from"), msg.to, msg.relation_type, dict(msg.metadata))


def relation_out(rel: Relation) -> pb.Relation:
    return pb.Relation(**{"from": rel.source}, to=rel.target, relation_type=rel.relation_type,
                       metadata=dict(rel.metadata))


def addition_in(msg: pb.ObservationAddition) -> ObservationAddition:
    return ObservationAddition(msg.entity_name, tuple(msg.contents))


def deletion_in(msg: pb.ObservationDeletion) -> ObservationDeletion:
    return ObservationDeletion(msg.entity_name, tuple(msg.observations))


def graph_out(graph: Graph) -> pb.Graph:
    return pb.Graph(entities=[entity_out(e) for e in graph.entities],
                    relations=[relation_out(r) for r in graph.relations])
