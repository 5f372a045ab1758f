"""/v1/schema documents every Plugins operation with the pluginName path parameter."""

import pytest
import yaml
from drf_spectacular.generators import SchemaGenerator

pytestmark = pytest.mark.django_db

OPERATIONS = [
    ("/v1/plugins", "get"),
    ("/v1/plugins/{pluginName}", "get"),
    ("/v1/plugins/{pluginName}", "delete"),
    ("/v1/plugins/{pluginName}/config", "get"),
    ("/v1/plugins/{pluginName}/config", "put"),
    ("/v1/plugins/{pluginName}/config", "delete"),
    ("/v1/plugins/{pluginName}/health", "get"),
]


@pytest.fixture(scope="module")
def schema() -> dict:
    # The same generator /v1/schema serves, built once for the module.
    return SchemaGenerator().get_schema(request=None, public=True)


def test_schema_endpoint_serves_the_plugin_paths(client):
    response = client.get("/v1/schema")
    assert response.status_code == 200
    assert "/v1/plugins/{pluginName}/health" in yaml.safe_load(response.content)["paths"]


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_operation_is_documented_under_the_plugins_tag(schema, path, method):
    operation = schema["paths"][path][method]
    assert operation["tags"] == ["Plugins"]
    if "{pluginName}" in path:
        [parameter] = [p for p in operation["parameters"] if p["in"] == "path"]
        assert (parameter["name"], parameter["required"]) == ("pluginName", True)
        assert "404" in operation["responses"]


def test_put_documents_the_422_and_the_plugin_body(schema):
    put = schema["paths"]["/v1/plugins/{pluginName}/config"]["put"]
    assert "422" in put["responses"]
    assert put["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PluginUpdate")


def test_health_response_is_documented(schema):
    properties = schema["components"]["schemas"]["HealthResponse"]["properties"]
    assert {"status", "version", "timestamp", "details"} <= set(properties)
