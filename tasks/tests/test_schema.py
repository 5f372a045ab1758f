"""GET /v1/schema documents the tasks, queue and experiments operations, and the task logs, as the spec names them."""

import pytest

from tasks.logs import MAX_TAIL, append_lines
from tasks.services import task_submit

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(anon_client) -> dict:
    response = anon_client.get("/v1/schema", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def ref_of(response: dict) -> str:
    return response["content"]["application/json"]["schema"].get("$ref", "")


def test_task_operations_use_the_taskid_path_parameter(schema):
    operations = schema["paths"]["/v1/tasks/{taskId}"]
    for method in ("get", "delete"):
        [parameter] = [p for p in operations[method]["parameters"] if p["in"] == "path"]
        assert parameter["name"] == "taskId"
        assert parameter["required"] is True


def test_task_operations_document_bodies_and_errors(schema):
    tasks = schema["paths"]["/v1/tasks"]
    assert ref_of(tasks["get"]["responses"]["200"]).endswith("/TaskList")
    assert tasks["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CreateTaskRequest")
    assert ref_of(tasks["post"]["responses"]["201"]).endswith("/Task")
    assert ref_of(tasks["post"]["responses"]["422"]).endswith("/ErrorResponse")
    detail = schema["paths"]["/v1/tasks/{taskId}"]
    assert {"204", "404", "409"} <= set(detail["delete"]["responses"])


def test_list_tasks_documents_its_query_parameters(schema):
    names = {p["name"] for p in schema["paths"]["/v1/tasks"]["get"]["parameters"]}
    assert {"status", "user_id", "limit", "offset", "experiment_id", "node_count", "reservation_id"} <= names
    [status] = [p for p in schema["paths"]["/v1/tasks"]["get"]["parameters"] if p["name"] == "status"]
    assert {"queued", "running", "completed", "failed", "cancelled"} <= set(status["schema"]["enum"])


def test_submit_documents_the_idempotency_key_header(schema):
    headers = [p["name"] for p in schema["paths"]["/v1/tasks"]["post"]["parameters"] if p["in"] == "header"]
    assert headers == ["Idempotency-Key"]


def test_queue_and_experiments_are_documented(schema):
    assert ref_of(schema["paths"]["/v1/queue"]["get"]["responses"]["200"]).endswith("/QueueStats")
    experiments = schema["paths"]["/v1/experiments"]
    listed = experiments["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["type"] == "array"
    assert listed["items"]["$ref"].endswith("/Experiment")
    assert ref_of(experiments["post"]["responses"]["201"]).endswith("/Experiment")


def test_task_schema_has_every_spec_property(schema):
    properties = set(schema["components"]["schemas"]["Task"]["properties"])
    assert {
        "id", "job_name", "status", "priority", "created_at", "started_at", "ended_at", "worker_id", "error",
        "output", "entrypoint", "snapshot_id", "datasets", "cpu", "memory_gb", "gpu", "user_id", "retry_count",
        "max_retries", "plugin_status", "node_assignments", "priority_aged",
    } <= properties  # fmt: skip


LOGS = "/v1/tasks/{taskId}/logs"


def test_task_logs_document_their_path_and_query_parameters(schema):
    parameters = {(p["in"], p["name"]): p for p in schema["paths"][LOGS]["get"]["parameters"]}
    assert set(parameters) == {
        ("path", "taskId"), ("query", "tail"), ("query", "after_id"), ("query", "follow"), ("header", "Last-Event-ID"),
    }  # fmt: skip
    assert parameters["path", "taskId"]["required"] is True
    assert parameters["query", "tail"]["schema"] == {"type": "integer", "minimum": 1, "maximum": MAX_TAIL}
    assert parameters["query", "follow"]["schema"]["type"] == "boolean"


def test_task_logs_answer_a_log_page_or_an_event_stream(schema):
    content = schema["paths"][LOGS]["get"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"]["$ref"].endswith("/TaskLogPage")
    assert content["text/event-stream"]["schema"] == {"type": "string"}


def test_task_logs_document_the_api_key_and_the_standard_errors(schema):
    operation = schema["paths"][LOGS]["get"]
    assert operation["security"] == [{"ApiKeyAuth": []}]
    for status in ("400", "401", "403", "404", "429"):
        assert ref_of(operation["responses"][status]).endswith("/ErrorResponse"), status
    assert "Retry-After" in operation["responses"]["429"]["headers"]


def test_documented_log_page_has_the_fields_of_a_real_one(schema, user_client, user):
    task = task_submit(owner=user, job_name="train")
    append_lines(task_id=task.id, attempt=1, lines=[{"stream": "stdout", "line": "epoch 1"}])
    body = user_client.get(f"/v1/tasks/{task.id}/logs").json()
    components = schema["components"]["schemas"]
    assert set(components["TaskLogPage"]["properties"]) == set(body)
    assert set(components["TaskLogLine"]["properties"]) == set(body["lines"][0])
    assert body["lines"][0]["stream"] in components["TaskLogLine"]["properties"]["stream"]["enum"]
