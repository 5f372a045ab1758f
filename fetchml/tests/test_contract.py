"""The API contract: shared/spec/fetchml-openapi.yaml against what FetchML really serves.

`COVERED` lists, per issue, the spec operations FetchML implements so far; a
later issue adds its group, until every operation of the spec is covered. Every
operation of the spec must be in the served OpenAPI schema; the ones served
outside DRF (/health, the SSE streams, /ws) must also agree with the spec there,
and are checked to exist by their own means. `RESPONSE_PRODUCERS`
maps spec schema names to a callable producing a real response body; every
property of that spec schema must be present in it.
"""

import re
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from drf_spectacular.generators import SchemaGenerator

from conftest import KeyClient

Operation = tuple[str, str]  # (HTTP method, spec path)

COVERED: dict[str, list[Operation]] = {
    "issue 2: health": [
        ("GET", "/health"),
    ],
    "issue 4: live updates": [
        ("GET", "/ws"),
    ],
    "issue 2: tasks, queue and experiments": [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/{taskId}"),
        ("DELETE", "/v1/tasks/{taskId}"),
        ("GET", "/v1/queue"),
        ("GET", "/v1/experiments"),
        ("POST", "/v1/experiments"),
    ],
    "issue 2: audit": [
        ("GET", "/v1/audit/events"),
        ("POST", "/v1/audit/verify"),
        ("GET", "/v1/audit/chain-root"),
    ],
    "issue 5: scheduler": [
        ("GET", "/v1/scheduler/status"),
        ("GET", "/v1/scheduler/status/stream"),
        ("GET", "/v1/scheduler/workers"),
        ("GET", "/v1/scheduler/workers/{workerId}"),
        ("DELETE", "/v1/scheduler/workers/{workerId}"),
        ("GET", "/v1/scheduler/reservations"),
        ("POST", "/v1/scheduler/reservations"),
        ("PATCH", "/v1/scheduler/jobs/{jobId}/priority"),
        ("GET", "/v1/scheduler/jobs/{jobId}/stream"),
    ],
    "issue 7: plugins": [
        ("GET", "/v1/plugins"),
        ("GET", "/v1/plugins/{pluginName}"),
        ("GET", "/v1/plugins/{pluginName}/config"),
        ("PUT", "/v1/plugins/{pluginName}/config"),
        ("DELETE", "/v1/plugins/{pluginName}/config"),
        ("GET", "/v1/plugins/{pluginName}/health"),
    ],
    "issue 7: jupyter": [
        ("GET", "/v1/jupyter/services"),
        ("POST", "/v1/jupyter/services"),
        ("DELETE", "/v1/jupyter/services/{serviceId}"),
    ],
}

# The agreed contract lives beside the repository (shared/spec/); spec/ holds a
# copy of it so a checkout on its own is tested against the same contract.
SHARED_SPEC_PATH = Path(settings.BASE_DIR).parent / "shared" / "spec" / "fetchml-openapi.yaml"
REPO_SPEC_PATH = Path(settings.BASE_DIR) / "spec" / "fetchml-openapi.yaml"
SPEC_PATH = SHARED_SPEC_PATH if SHARED_SPEC_PATH.is_file() else REPO_SPEC_PATH
# SSE streams are plain async views: checked by URL resolution.
SSE_STREAMS = {("GET", "/v1/scheduler/status/stream"), ("GET", "/v1/scheduler/jobs/{jobId}/stream")}
# Served outside DRF: fetchml.schema adds them to the generated schema, as the spec describes them.
NOT_DRF = {("GET", "/health"), ("GET", "/ws")} | SSE_STREAMS
_PARAMETER = re.compile(r"\{[^}/]+\}")


def covered_operations() -> list[Operation]:
    return [operation for operations in COVERED.values() for operation in operations]


@cache
def spec() -> dict[str, Any]:
    if not SPEC_PATH.is_file():
        pytest.fail(f"The API contract is missing: expected it at {SPEC_PATH}")
    return yaml.safe_load(SPEC_PATH.read_text())


def spec_operations() -> set[Operation]:
    return {
        (method.upper(), path)
        for path, item in spec()["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }


@cache
def generated_schema() -> dict[str, Any]:
    return SchemaGenerator().get_schema(request=None, public=True)


def generated_operations() -> frozenset[Operation]:
    schema = generated_schema()
    return frozenset((method.upper(), path) for path, item in schema["paths"].items() for method in item)


def test_the_repository_copy_of_the_contract_is_current():
    if not SHARED_SPEC_PATH.is_file():
        pytest.skip("shared/spec/ is not beside this checkout; the repository copy is the contract")
    assert REPO_SPEC_PATH.read_bytes() == SHARED_SPEC_PATH.read_bytes(), "copy shared/spec/ into spec/ again"


def test_covered_operations_are_listed_once():
    operations = covered_operations()
    assert len(operations) == len(set(operations))


def test_every_spec_operation_is_covered():
    missing = spec_operations() - set(covered_operations())
    assert not missing, f"spec operations FetchML does not serve: {sorted(missing)}"


@pytest.mark.parametrize("operation", covered_operations(), ids=lambda op: f"{op[0]} {op[1]}")
def test_covered_operation_is_in_the_spec(operation):
    assert operation in spec_operations(), f"{operation} is not an operation of {SPEC_PATH.name}"


@pytest.mark.parametrize("operation", sorted(spec_operations()), ids=lambda op: f"{op[0]} {op[1]}")
def test_spec_operation_is_in_the_served_schema(operation):
    """By the same path template: a client generated from either calls its parameters by one name."""
    method, path = operation
    served = generated_operations()
    assert (method, path) in served, (
        f"{method} {path} of the spec is missing from the served schema; served: {sorted(served)}"
    )


def resolve_in(document: dict, node: dict) -> dict:
    """`node`, or what its local $ref (#/components/...) names in `document`."""
    while "$ref" in node:
        target = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def agreement_problems(spec_node: dict, served_node: dict, where: str) -> list[str]:
    """How a served schema object contradicts the spec's: a missing property, another type, an unknown enum value."""
    spec_node, served_node = resolve_in(spec(), spec_node), resolve_in(generated_schema(), served_node)
    problems = []
    if spec_node.get("type") != served_node.get("type"):
        problems.append(f"{where}: type {served_node.get('type')!r}, the spec says {spec_node.get('type')!r}")
    if "enum" in spec_node and not set(served_node.get("enum", ())) <= set(spec_node["enum"]):
        problems.append(f"{where}: enum {served_node.get('enum')}, the spec allows {spec_node['enum']}")
    for name, child in spec_node.get("properties", {}).items():
        if name not in served_node.get("properties", {}):
            problems.append(f"{where}.{name}: missing")
        else:
            problems += agreement_problems(child, served_node["properties"][name], f"{where}.{name}")
    return problems


@pytest.mark.parametrize("operation", sorted(NOT_DRF), ids=lambda op: f"{op[0]} {op[1]}")
def test_operation_served_outside_drf_agrees_with_the_spec(operation):
    method, path = operation
    expected = spec()["paths"][path][method.lower()]
    served = generated_schema()["paths"][path][method.lower()]
    assert served.get("security") == expected.get("security", spec()["security"])
    parameters = {(p["in"], p["name"]): p for p in served.get("parameters", [])}
    for parameter in expected.get("parameters", []):
        key = (parameter["in"], parameter["name"])
        assert key in parameters, f"parameter {key} missing"
        assert parameters[key].get("required", False) == parameter.get("required", False), key
        assert not agreement_problems(parameter["schema"], parameters[key]["schema"], str(key))
    for status, response in expected["responses"].items():
        assert status in served["responses"], f"response {status} missing"
        response = resolve_in(spec(), response)
        content = served["responses"][status].get("content", {})
        assert set(content) == set(response.get("content", {})), f"media types of {status}"
        for media_type, body in response.get("content", {}).items():
            where = f"{status} {media_type}"
            assert not agreement_problems(body["schema"], content[media_type]["schema"], where)


@pytest.mark.django_db
def test_health_operation_is_served(anon_client):
    if ("GET", "/health") not in covered_operations():
        pytest.skip("GET /health is not listed as covered")
    response = anon_client.get("/health")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("operation", sorted(SSE_STREAMS), ids=lambda op: f"{op[0]} {op[1]}")
def test_sse_operation_is_served(operation):
    from django.urls import resolve

    if operation not in covered_operations():
        pytest.skip(f"{operation} is not listed as covered")
    path = _PARAMETER.sub(str(uuid.uuid4()), operation[1])
    assert resolve(path).func is not None


def test_ws_operation_is_served():
    from fetchml.routing import websocket_urlpatterns

    assert any(pattern.pattern.match("ws") for pattern in websocket_urlpatterns), "no route serves /ws"


# --- response bodies against the spec's schemas ----------------------------


class Api:
    """Real requests against the running app, for the response producers."""

    def __init__(self, client: KeyClient, anon: KeyClient, admin: KeyClient):
        self.client = client
        self.anon = anon
        self.admin = admin

    def ok(self, response, status: int = 200) -> Any:
        assert response.status_code == status, (response.status_code, response.content[:500])
        return response.json()

    def create_task(self) -> dict:
        body = {"job_name": "contract-check", "entrypoint": "train.py", "args": "--epochs 1", "priority": 7}
        return self.ok(self.client.post("/v1/tasks", body, format="json"), 201)

    def task(self) -> dict:
        return self.ok(self.client.get(f"/v1/tasks/{self.create_task()['id']}"))

    def task_list(self) -> dict:
        self.create_task()
        return self.ok(self.client.get("/v1/tasks"))

    def queue(self) -> dict:
        self.create_task()
        return self.ok(self.client.get("/v1/queue"))

    def experiment(self) -> dict:
        created = self.ok(
            self.client.post("/v1/experiments", {"name": "contract", "description": "x"}, format="json"), 201
        )
        listed = self.ok(self.client.get("/v1/experiments"))
        items = listed if isinstance(listed, list) else listed.get("experiments", [])
        [same] = [item for item in items if item["id"] == created["id"]]
        assert same.keys() == created.keys()
        return created

    def error(self) -> dict:
        return self.ok_error(self.client.get(f"/v1/tasks/{uuid.uuid4()}"), 404)

    def ok_error(self, response, status: int) -> dict:
        assert response.status_code == status, response.content[:500]
        return response.json()

    def health(self) -> dict:
        return self.ok(self.anon.get("/health"))

    def audit_events(self) -> dict:
        self.create_task()  # creating keys and tasks leaves events in the chain
        body = self.ok(self.admin.get("/v1/audit/events"))
        assert body["events"], "the chain must hold events, or their properties go unchecked"
        return body

    def scheduler_status(self) -> dict:
        return self.ok(self.client.get("/v1/scheduler/status"))

    def worker(self) -> dict:
        from scheduler.models import Worker

        Worker.objects.create(name="contract-worker", status="active", gpu_count=2, gpu_type="A100", batch_slots=2)
        [body] = self.ok(self.client.get("/v1/scheduler/workers"))
        return self.ok(self.client.get(f"/v1/scheduler/workers/{body['id']}"))

    def reservation(self) -> dict:
        from scheduler.models import Worker

        Worker.objects.create(name="contract-gpu", status="active", gpu_count=4, batch_slots=2)
        return self.ok(self.client.post("/v1/scheduler/reservations", {"gpu_count": 2}, format="json"), 201)

    def audit_verification(self) -> dict:
        self.create_task()
        return self.ok(self.admin.post("/v1/audit/verify"))

    def plugin(self) -> dict:
        return self.ok(self.client.get("/v1/plugins/mlflow"))

    def jupyter_service(self) -> dict:
        from jupyter.models import JupyterService
        from jupyter.services import jupyter_ready

        created = self.ok(self.client.post("/v1/jupyter/services", {"name": "contract"}, format="json"), 201)
        task_id = JupyterService.objects.get(id=created["id"]).task_id
        # Running, so that url and token are filled in (the owner sees the token).
        jupyter_ready(task_id=task_id, url="http://10.0.0.7:8888/", service_token="contract-token")
        [listed] = self.ok(self.client.get("/v1/jupyter/services"))
        return listed


RESPONSE_PRODUCERS: dict[str, Callable[[Api], Any]] = {
    "HealthResponse": Api.health,
    "Task": Api.task,
    "TaskList": Api.task_list,
    "QueueStats": Api.queue,
    "Experiment": Api.experiment,
    "ErrorResponse": Api.error,
    "AuditEventList": Api.audit_events,
    "VerificationResult": Api.audit_verification,
    "SchedulerStatus": Api.scheduler_status,
    "Worker": Api.worker,
    "Reservation": Api.reservation,
    "Plugin": Api.plugin,
    "JupyterService": Api.jupyter_service,
}


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec()["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def missing_properties(schema: dict, value: Any, where: str) -> list[str]:
    """Spec properties absent from `value`, following $refs into nested objects and arrays."""
    schema = resolve(schema)
    missing: list[str] = []
    if schema.get("type") == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            missing += missing_properties(schema.get("items", {}), item, f"{where}[{index}]")
    elif "properties" in schema and isinstance(value, dict):
        for name, child in schema["properties"].items():
            if name not in value:
                missing.append(f"{where}.{name}")
            elif value[name] is not None:
                missing += missing_properties(child, value[name], f"{where}.{name}")
    return missing


def test_every_spec_schema_with_a_producer_exists():
    assert set(RESPONSE_PRODUCERS) <= set(spec()["components"]["schemas"])


@pytest.mark.django_db
@pytest.mark.parametrize("schema_name", list(RESPONSE_PRODUCERS))
def test_real_response_has_every_property_of_the_spec_schema(schema_name, user_client, anon_client, admin_client_key):
    body = RESPONSE_PRODUCERS[schema_name](Api(user_client, anon_client, admin_client_key))
    assert body, f"{schema_name}: empty response"
    missing = missing_properties(spec()["components"]["schemas"][schema_name], body, schema_name)
    assert not missing, f"properties of the spec missing from the real response: {missing}"


@pytest.mark.django_db
def test_task_list_check_really_looks_inside_the_tasks(user_client, anon_client, admin_client_key):
    body = Api(user_client, anon_client, admin_client_key).task_list()
    assert body["tasks"], "the list must hold a task, or its items go unchecked"
    del body["tasks"][0]["priority_aged"]
    assert missing_properties({"$ref": "#/components/schemas/TaskList"}, body, "TaskList") == [
        "TaskList.tasks[0].priority_aged"
    ]
