"""JSON bodies: nesting is bounded before anything recurses, so a deep document is a 400, never a 500."""

import json

import pytest

from fetchml.jsonbody import JSONTooDeep, loads, nesting_depth

pytestmark = pytest.mark.django_db

DEEP = 5000


def deep_object(depth: int) -> str:
    return '{"a":' * depth + "{}" + "}" * depth


def post_json(client, path: str, text: str):
    return client.generic("POST", path, text, content_type="application/json")


def assert_too_deep(response) -> None:
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    assert "nested deeper than 64 levels" in body["error"]
    assert body["trace_id"] == response["X-Request-ID"]


@pytest.mark.urls("fetchml.tests.urls")
def test_a_200000_level_array_body_is_bad_request(user_client):
    assert_too_deep(post_json(user_client, "/v1/test/echo", "[" * 200_000 + "]" * 200_000))


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/v1/tasks", '{"job_name":"m","entrypoint":"true","metadata":' + deep_object(DEEP) + "}"),
        (
            "/v1/tasks",
            '{"job_name":"m","entrypoint":"true","plugin_configs":{"tb":{"settings":' + deep_object(DEEP) + "}}}",
        ),
        ("/v1/experiments", '{"name":"e","description":' + deep_object(DEEP) + "}"),
        ("/v1/jupyter/services", '{"name":"nb","workspace":' + deep_object(DEEP) + "}"),
        ("/v1/scheduler/reservations", '{"gpu_count":' + deep_object(DEEP) + "}"),
    ],
    ids=["task-metadata", "task-plugin-settings", "experiment", "jupyter-service", "reservation"],
)
def test_a_deeply_nested_value_inside_an_api_body_is_bad_request(user_client, path, text):
    assert_too_deep(post_json(user_client, path, text))


@pytest.mark.urls("fetchml.tests.urls")
def test_nesting_up_to_the_setting_is_parsed_and_one_level_more_is_refused(user_client, settings):
    text = json.dumps({"name": "x", "items": [{"size": 1}]})  # three levels
    settings.FETCHML_MAX_JSON_DEPTH = 3
    assert post_json(user_client, "/v1/test/echo", text).status_code == 201
    settings.FETCHML_MAX_JSON_DEPTH = 2
    response = post_json(user_client, "/v1/test/echo", text)
    assert response.status_code == 400
    assert "nested deeper than 2 levels" in response.json()["error"]


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[{{{{", "]]]]"]', 1),
        (r'["\"[[[[", [1]]', 2),
        (r'["\\", [[1]]]', 3),
        (r'["\\\"[[", [1]]', 2),
    ],
)
def test_nesting_depth_counts_brackets_outside_strings_only(text, depth):
    assert nesting_depth(text) == depth


def test_loads_refuses_deep_text_with_a_value_error_before_parsing():
    with pytest.raises(JSONTooDeep) as raised:
        loads(b"[" * 100_000, max_depth=64)
    assert isinstance(raised.value, ValueError)
    assert loads(b'{"a": [1]}', max_depth=2) == {"a": [1]}


@pytest.mark.parametrize(
    ("text", "key"),
    [('{"job_name": "a", "job_name": "b"}', "job_name"), ('{"env": {"A": "1", "A": "2"}, "job_name": "x"}', "A")],
)
def test_a_body_naming_a_key_twice_is_bad_request_naming_it(user_client, text, key):
    response = user_client.generic("POST", "/v1/tasks", text, content_type="application/json")

    assert response.status_code == 400
    assert (
        response.json()["error"]
        == f"Malformed request body: JSON parse error - the object names {key!r} more than once"
    )
