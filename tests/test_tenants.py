"""Tenants on live servers: API keys name tenants, each tenant sees and uses only its own users and
jobs (another tenant's is NOT_FOUND, never USER_NOT_READY), limits answer RESOURCE_EXHAUSTED, and
TLS serves gRPC while the HTTP probes stay plaintext."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import running_orchestrator, running_trainer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import encode_png
from easyphoto.rpc.server import GrpcApp, Security
from easyphoto.rpc.tenants import TenantDirectory, key_digest
from easyphoto.rpc.wire import ClientSecurity, error_details
from easyphoto.server.app import ServerConfig
from easyphoto.trainer.app import TrainerApp, TrainerConfig
from easyphoto.users.store import UserStore
from easyphoto.v1 import (
    generator_pb2,
    generator_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    users_pb2,
    users_pb2_grpc,
)

KEYS = {"acme": "acme-key", "globex": "globex-key", "initech": "initech-key", "slow": "slow-key"}
SERVICE_KEY = "service-key"


def _tenants_file(folder: Path) -> Path:
    tenants: dict[str, Any] = {name: {"keys": [key_digest(key)]} for name, key in KEYS.items()}
    tenants["slow"].update(max_concurrent=1, requests_per_second=0.01, burst=3)
    path = folder / "tenants.json"
    path.write_text(json.dumps({"tenants": tenants, "service_keys": [key_digest(SERVICE_KEY)]}))
    return path


@pytest.fixture(scope="module")
def tenant_data(alice_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """acme's alice (v1) and globex's alice (v2) from the suite's alice; globex's bob is training."""
    data = tmp_path_factory.mktemp("tenants")
    users = data / "users"
    shutil.copytree(alice_data / "users" / "alice", users / "acme+alice")
    shutil.copytree(alice_data / "users" / "alice" / "v1", users / "globex+alice" / "v2")
    (users / "globex+alice" / "CURRENT").write_text("2")
    UserStore(data).mark_training("globex+bob", "job-of-bob")
    return data


@pytest.fixture(scope="module")
def orchestrator(tenant_data: Path) -> Iterator[str]:
    security = Security(tenants=_tenants_file(tenant_data))
    with running_orchestrator(
        ServerConfig(port=0, models="tiny", data=tenant_data, security=security)
    ) as address:
        yield address


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerApp]:
    data = tmp_path_factory.mktemp("tenant-trainer")
    config = TrainerConfig(port=0, data=data, device="cpu", security=Security(tenants=_tenants_file(data)))
    with running_trainer(config) as app:
        yield app


def _channel(address: str, tenant: str | None, **security: Any) -> grpc.Channel:
    key = KEYS[tenant] if tenant else security.pop("api_key", "")
    return ClientSecurity(api_key=key, **security).channel(address)


def _generator(address: str, tenant: str | None, **security: Any) -> generator_pb2_grpc.GeneratorStub:
    return generator_pb2_grpc.GeneratorStub(_channel(address, tenant, **security))


def _failure(call: Any, request: Any) -> dict[str, Any]:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=60)
    return error_details(caught.value)


def _generate(user: str) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        templates=[encode_png(sample_photo("astronaut"))], user_ids=[user]
    )
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps = 6
    return request


def test_calls_without_a_known_key_are_unauthenticated_but_health_is_open(orchestrator: str) -> None:
    for key in ("", "not-a-key"):
        failure = _failure(_generator(orchestrator, None, api_key=key).Generate, _generate("alice"))
        assert failure["code"] == "UNAUTHENTICATED", failure
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(orchestrator))
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )


def test_each_tenant_paints_its_own_alice(orchestrator: str) -> None:
    versions = {}
    for tenant in ("acme", "globex"):
        response = _generator(orchestrator, tenant).Generate(_generate("alice"), timeout=120)
        (face,) = response.images[0].faces
        assert face.user_id == "alice"  # as the tenant names it
        versions[tenant] = face.user_version
    assert versions == {"acme": 1, "globex": 2}


def test_another_tenants_user_is_not_found_never_not_ready(orchestrator: str) -> None:
    acme = _generator(orchestrator, "acme")
    failure = _failure(acme.Generate, _generate("bob"))  # globex's bob is training
    assert (failure["code"], failure["reason"]) == ("NOT_FOUND", "UNKNOWN_USER"), failure
    assert "globex" not in failure["message"] and "acme+" not in failure["message"], failure
    failure = _failure(acme.Generate, _generate("globex+alice"))  # no way to name another namespace
    assert failure["code"] == "INVALID_ARGUMENT" and "user_ids[0]" in failure["fields"], failure
    serving = generator_pb2_grpc.ServingStub(_channel(orchestrator, "acme"))
    assert serving.RefreshUser(generator_pb2.RefreshUserRequest(user_id="alice", version=1), timeout=60)
    failure = _failure(serving.RefreshUser, generator_pb2.RefreshUserRequest(user_id="bob"))
    assert failure["code"] == "NOT_FOUND", failure
    # The trainer's service key names stored ids: any tenant's user.
    service = generator_pb2_grpc.ServingStub(ClientSecurity(api_key=SERVICE_KEY).channel(orchestrator))
    refreshed = service.RefreshUser(
        generator_pb2.RefreshUserRequest(user_id="globex+alice", version=2), timeout=60
    )
    assert refreshed.seconds >= 0


def test_jobs_and_users_stay_in_their_tenant(trainer: TrainerApp) -> None:
    address = f"127.0.0.1:{trainer.app.port}"
    acme, globex = (trainer_pb2_grpc.TrainerStub(_channel(address, t)) for t in ("acme", "globex"))
    photo = encode_png(sample_photo("coffee"))
    request = trainer_pb2.CreateTrainingJobRequest(user_id="alice", photos=[photo], request_id="same-key")
    mine = acme.CreateTrainingJob(request, timeout=60)
    theirs = globex.CreateTrainingJob(request, timeout=60)  # the same idempotency key: its own job
    assert mine.job_id != theirs.job_id and mine.user_id == theirs.user_id == "alice"
    assert acme.CreateTrainingJob(request, timeout=60).job_id == mine.job_id  # idempotent within acme
    for call, message in (
        (globex.GetJob, trainer_pb2.GetJobRequest(job_id=mine.job_id)),
        (globex.CancelJob, trainer_pb2.CancelJobRequest(job_id=mine.job_id)),
        (
            lambda r, timeout: list(globex.WatchJob(r, timeout=timeout)),
            trainer_pb2.WatchJobRequest(job_id=mine.job_id),
        ),
    ):
        failure = _failure(call, message)
        assert failure["code"] == "NOT_FOUND" and "acme" not in failure["message"], failure
    listed = {
        tenant: stub.ListJobs(trainer_pb2.ListJobsRequest(), timeout=60).jobs
        for tenant, stub in (("acme", acme), ("globex", globex))
    }
    assert [j.job_id for j in listed["acme"]] == [mine.job_id] and [j.user_id for j in listed["acme"]] == [
        "alice"
    ]
    assert [j.job_id for j in listed["globex"]] == [theirs.job_id]
    users = users_pb2_grpc.UsersStub(_channel(address, "globex"))
    assert [u.user_id for u in users.ListUsers(users_pb2.ListUsersRequest(), timeout=60).users] == ["alice"]
    nobody = users_pb2_grpc.UsersStub(_channel(address, "initech"))
    assert not nobody.ListUsers(users_pb2.ListUsersRequest(), timeout=60).users
    failure = _failure(nobody.GetUser, users_pb2.GetUserRequest(user_id="alice"))
    assert failure["code"] == "NOT_FOUND", failure
    failure = _failure(nobody.DeleteUser, users_pb2.DeleteUserRequest(user_id="alice"))
    assert failure["code"] == "NOT_FOUND", failure
    service = trainer_pb2_grpc.TrainerStub(ClientSecurity(api_key=SERVICE_KEY).channel(address))
    assert {j.user_id for j in service.ListJobs(trainer_pb2.ListJobsRequest(), timeout=60).jobs} == {
        "acme+alice",
        "globex+alice",
    }


def test_a_tenant_past_its_rate_is_resource_exhausted(trainer: TrainerApp) -> None:
    """``slow`` may make 3 calls (its burst, refilled at 0.01 a second); others are unaffected."""
    address = f"127.0.0.1:{trainer.app.port}"
    slow = trainer_pb2_grpc.TrainerStub(_channel(address, "slow"))
    for _ in range(3):
        slow.ListJobs(trainer_pb2.ListJobsRequest(), timeout=60)
    failure = _failure(slow.ListJobs, trainer_pb2.ListJobsRequest())
    assert (failure["code"], failure["reason"]) == ("RESOURCE_EXHAUSTED", "TENANT_LIMIT"), failure
    assert "calls a second" in failure["message"]
    acme = trainer_pb2_grpc.TrainerStub(_channel(address, "acme"))
    assert acme.ListJobs(trainer_pb2.ListJobsRequest(), timeout=60) is not None


def test_calls_in_flight_are_limited_until_they_end() -> None:
    from easyphoto.rpc.errors import TenantLimited
    from easyphoto.rpc.tenants import Limits, Tenant

    directory = TenantDirectory({})
    tenant = Tenant("acme", Limits(max_concurrent=2, requests_per_second=1000, burst=1000))
    directory.admit(tenant)
    directory.admit(tenant)
    with pytest.raises(TenantLimited, match="2 calls in flight; at most 2 at once"):
        directory.admit(tenant)
    directory.release(tenant)
    directory.admit(tenant)  # one ended: room for one more
    directory.admit(Tenant("open"))  # no limits


def test_a_bad_tenants_file_is_refused_naming_the_problem(tmp_path: Path) -> None:
    from easyphoto.rpc.errors import InvalidArgument

    for data, words in (
        ({"tenants": {"Bad Name": {"keys": []}}}, "tenant name"),
        ({"tenants": {"acme": {"keys": ["plain-text-key"]}}}, "sha256:"),
        ([], "expected"),
    ):
        with pytest.raises(InvalidArgument, match=words):
            TenantDirectory.parse(data)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_serves_grpc_and_leaves_the_probes_plaintext(tmp_path: Path) -> None:
    from easyphoto.rpc.metrics import Metrics

    cert, key = _self_signed(tmp_path)
    security = Security(tenants=_tenants_file(tmp_path), tls_cert=cert, tls_key=key)
    app = GrpcApp([], host="127.0.0.1", port=0, metrics=Metrics(port=0), security=security)
    app.start()
    app.set_serving(True)
    try:
        address = f"127.0.0.1:{app.port}"
        secured = health_pb2_grpc.HealthStub(ClientSecurity(tls_ca=cert).channel(address))
        assert (
            secured.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        plaintext = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        with pytest.raises(grpc.RpcError) as caught:
            plaintext.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert app.http is not None
        for path in ("/readyz", "/healthz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}{path}", timeout=10) as reply:
                assert reply.status == 200
    finally:
        app.stop(0)


def test_a_yaml_tenants_file_names_tenants_by_key(tmp_path: Path) -> None:
    from easyphoto.rpc.errors import Unauthenticated

    path = tmp_path / "tenants.yaml"
    lines = ["tenants:", "  acme:", f"    keys: ['{key_digest('k1')}']", "    burst: 2"]
    path.write_text("\n".join([*lines, f"service_keys: ['{key_digest('s1')}']", ""]))
    directory = TenantDirectory.read(path)
    acme = directory.identify({"authorization": "Bearer k1"})
    assert (acme.name, acme.limits.burst if acme.limits else None) == ("acme", 2)
    assert directory.identify({"x-api-key": "s1"}).service
    assert directory.identify({"x-api-key": "s1", "x-easyphoto-tenant": "acme"}) == acme  # acting for acme
    with pytest.raises(Unauthenticated):
        directory.identify({"authorization": "Basic k1"})
