"""GET /v1/schema and /v1/docs: public, valid OpenAPI 3, documenting X-API-Key and the error body;
/v1/docs works offline (Swagger UI from this server's static files)."""

import re

import pytest
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

from fetchml.schema import ERROR_CODES

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# Load balancers probe /health without a key; /v1/ is where a newcomer starts.
PUBLIC_OPERATIONS = {("/health", "get"), ("/v1/", "get")}


@pytest.fixture
def schema(anon_client, db) -> dict:
    response = anon_client.get("/v1/schema", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def error_schema_of(operation: dict, status: str) -> dict:
    return operation["responses"][status]["content"]["application/json"]["schema"]


def test_schema_is_openapi_3_and_needs_no_key(schema):
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "FetchML API"


def test_schema_documents_the_api_key_scheme(schema):
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] | {"description": ""} == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "",
    }


def test_every_api_operation_requires_the_api_key_in_the_schema(schema):
    without_key = [
        (path, method)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if {"ApiKeyAuth": []} not in operation.get("security", [])
    ]
    assert set(without_key) == PUBLIC_OPERATIONS


def test_the_api_key_or_an_admin_session_are_the_only_schemes_an_operation_accepts(schema):
    accepted = {
        scheme
        for operations in schema["paths"].values()
        for operation in operations.values()
        for requirement in operation.get("security", [])
        for scheme in requirement
    }
    assert accepted == {"ApiKeyAuth", "cookieAuth"}
    assert schema["components"]["securitySchemes"]["cookieAuth"]["in"] == "cookie"


def test_health_is_documented_as_needing_no_key(schema):
    assert schema["paths"]["/health"]["get"]["security"] == []


def test_schema_documents_the_error_body(schema):
    error = schema["components"]["schemas"]["ErrorResponse"]
    assert set(error["required"]) == {"error", "code", "trace_id"}
    assert set(error["properties"]) == {"error", "code", "trace_id", "details"}


def test_error_codes_documented_are_the_specs():
    assert ERROR_CODES == [
        "BAD_REQUEST",
        "UNAUTHORIZED",
        "FORBIDDEN",
        "NOT_FOUND",
        "CONFLICT",
        "RATE_LIMITED",
        "INTERNAL_ERROR",
        "SERVICE_UNAVAILABLE",
        "VALIDATION_ERROR",
    ]


@pytest.mark.urls("fetchml.tests.urls")
def test_every_operation_documents_its_error_responses(schema):
    post = schema["paths"]["/v1/test/echo"]["post"]
    for status in ("400", "401", "403", "413", "422", "429"):
        assert error_schema_of(post, status) == ERROR_REF, status
    assert "Retry-After" in post["responses"]["429"]["headers"]
    assert post["security"] == [{"ApiKeyAuth": []}, {"cookieAuth": []}]
    get = schema["paths"]["/v1/test/echo"]["get"]
    assert {"401", "403", "429"} <= get["responses"].keys()
    assert "422" not in get["responses"]


def test_public_schema_views_are_not_in_the_schema(schema):
    assert "/v1/schema" not in schema["paths"]


def test_swagger_ui_is_served_without_a_key(anon_client, db):
    response = anon_client.get("/v1/docs")
    assert response.status_code == 200
    assert b"swagger-ui" in response.content


def docs_assets(html: str) -> list[str]:
    """The URLs of the scripts, styles and icon a /v1/docs page loads."""
    return re.findall(r'<script[^>]* src="([^"]+)"', html) + re.findall(r'<link[^>]* href="([^"]+)"', html)


def test_docs_page_loads_nothing_from_another_host(anon_client, db):
    html = anon_client.get("/v1/docs").content.decode()
    assets = docs_assets(html)
    assert len(assets) == 4, assets  # the Swagger UI bundle, its preset, its stylesheet, the icon
    assert [url for url in assets if re.match(r"(https?:)?//", url)] == []
    assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io


def test_docs_page_assets_are_served_by_fetchml(anon_client, db):
    for url in docs_assets(anon_client.get("/v1/docs").content.decode()):
        response = anon_client.get(url)
        assert response.status_code == 200, url
        assert b"".join(response.streaming_content), url
        response.close()


def test_generated_schema_is_valid_openapi_without_errors_or_warnings():
    GENERATOR_STATS.reset()
    schema = SchemaGenerator().get_schema(request=None, public=True)
    errors, warnings = dict(GENERATOR_STATS._error_cache), dict(GENERATOR_STATS._warn_cache)
    validate_schema(schema)
    assert not errors, errors
    assert not warnings, warnings


def test_a_task_details_queue_position_is_documented_as_null_unless_queued(schema):
    # A running task's detail answers null: a client validating against the schema must accept it.
    assert schema["components"]["schemas"]["TaskDetail"]["properties"]["queue_position"]["nullable"] is True


@pytest.mark.parametrize(
    ("path", "method"),
    [("/v1/datasets/{name}", "get"), ("/v1/datasets/{name}", "delete"), ("/v1/datasets/{name}/content", "get")],
)
def test_a_dataset_reads_bad_query_parameters_are_documented_as_422(schema, path, method):
    assert error_schema_of(schema["paths"][path][method], "422") == ERROR_REF
