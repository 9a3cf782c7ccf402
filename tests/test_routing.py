"""Routing by user across orchestrator replicas: the client and the trainer's RefreshUser hash the
user over the addresses a target resolves to (gRPC ring_hash on rpc/wire.py's header), so each
user's adapter is hot on one replica. The replicas are stand-ins that record who reached them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from easyphoto.cli.client import GeneratorClient
from easyphoto.trainer.app import refresh_notifier
from easyphoto.v1 import generator_pb2, generator_pb2_grpc

USERS = [f"user{index}" for index in range(12)]


class _Replica(generator_pb2_grpc.GeneratorServicer, generator_pb2_grpc.ServingServicer):
    """An orchestrator that answers at once and records the users of each call it got."""

    def __init__(self, name: str, seen: dict[str, set[str]]) -> None:
        self.name = name
        self.seen = seen
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        generator_pb2_grpc.add_GeneratorServicer_to_server(self, self.server)
        generator_pb2_grpc.add_ServingServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _record(self, users: list[str]) -> None:
        self.seen[",".join(users)].add(self.name)

    def Generate(
        self, request: generator_pb2.GenerateRequest, context: object
    ) -> generator_pb2.GenerateResponse:
        self._record(list(request.user_ids))
        return generator_pb2.GenerateResponse(model_family=self.name)

    def GenerateStream(
        self, request: generator_pb2.GenerateRequest, context: object
    ) -> Iterator[generator_pb2.GenerateEvent]:
        self._record(list(request.user_ids))
        yield generator_pb2.GenerateEvent(result=generator_pb2.GenerateResponse(model_family=self.name))

    def RefreshUser(
        self, request: generator_pb2.RefreshUserRequest, context: object
    ) -> generator_pb2.RefreshUserResponse:
        self._record([f"refresh:{request.user_id}"])
        return generator_pb2.RefreshUserResponse(seconds=0.0)


@pytest.fixture
def replicas() -> Iterator[tuple[list[_Replica], dict[str, set[str]]]]:
    seen: dict[str, set[str]] = defaultdict(set)
    started = [_Replica(f"replica{index}", seen) for index in range(3)]
    yield started, seen
    for replica in started:
        replica.server.stop(None)


def _target(replicas: list[_Replica]) -> str:
    """Several addresses behind one target, as a headless Service's DNS name resolves."""
    return "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)


def _generate_all(client: GeneratorClient, rounds: int = 3) -> None:
    for _ in range(rounds):
        for user in USERS:
            client.generate([b"template"], [user])
            list(client.generate_stream([b"template"], [user]))


def test_each_users_requests_reach_one_replica_and_users_spread(
    replicas: tuple[list[_Replica], dict[str, set[str]]],
) -> None:
    started, seen = replicas
    with GeneratorClient(_target(started), timeout=10, route_by_user=True) as client:
        _generate_all(client)
        client.generate([b"group"], ["", "user3", "user5"])  # where its first user's requests go
    assert all(len(seen[user]) == 1 for user in USERS), dict(seen)
    assert len(set().union(*(seen[user] for user in USERS))) >= 2  # not every user on one replica
    assert seen[",user3,user5"] == seen["user3"]


def test_without_routing_the_same_target_ignores_the_user(
    replicas: tuple[list[_Replica], dict[str, set[str]]],
) -> None:
    """The control: gRPC's default policy sends every call to the first replica it reached."""
    started, seen = replicas
    with GeneratorClient(_target(started), timeout=10) as client:
        _generate_all(client, rounds=1)
    assert len(set().union(*(seen[user] for user in USERS))) == 1


def test_refresh_warms_the_replica_the_users_requests_reach(
    replicas: tuple[list[_Replica], dict[str, set[str]]],
) -> None:
    started, seen = replicas
    notify = refresh_notifier(_target(started), route_by_user=True)
    for user in USERS:
        notify(f"acme+{user}", 1)  # the trainer names users by stored id; acme's clients say user
    with GeneratorClient(_target(started), timeout=10, route_by_user=True) as client:
        _generate_all(client, rounds=1)
    assert all(seen[f"refresh:acme+{user}"] == seen[user] for user in USERS), dict(seen)


def test_a_replica_gone_moves_only_its_users(
    replicas: tuple[list[_Replica], dict[str, set[str]]],
) -> None:
    started, seen = replicas
    with GeneratorClient(_target(started), timeout=10, route_by_user=True) as client:
        _generate_all(client, rounds=1)
        before = {user: next(iter(seen[user])) for user in USERS}
        gone = before["user0"]
        next(replica for replica in started if replica.name == gone).server.stop(None).wait()
        seen.clear()
        _generate_all(client, rounds=2)
    after = {user: seen[user] for user in USERS}
    assert all(len(names) == 1 and gone not in names for names in after.values()), after
    assert all(after[user] == {before[user]} for user in USERS if before[user] != gone)
