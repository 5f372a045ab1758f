"""GET /v1/: the API's index, public, linking to the docs, the schema, health and the collections."""

import json

import pytest

import fetchml

pytestmark = pytest.mark.django_db


def test_api_index_answers_the_product_and_its_version_without_a_key(anon_client):
    response = anon_client.get("/v1/")

    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["version"]) == ("FetchML", fetchml.__version__)
    assert response.content == json.dumps(body, separators=(",", ":")).encode()


def test_api_index_links_the_docs_the_schema_health_and_the_main_collections(anon_client):
    links = anon_client.get("/v1/").json()["links"]

    assert {
        "docs": "/v1/docs",
        "schema": "/v1/schema",
        "health": "/health",
        "tasks": "/v1/tasks",
        "experiments": "/v1/experiments",
        "workers": "/v1/scheduler/workers",
    }.items() <= links.items()


def test_every_link_of_the_api_index_is_served(anon_client, user_client):
    links = anon_client.get("/v1/").json()["links"]

    statuses = {name: user_client.get(path).status_code for name, path in links.items()}

    # audit_events is for admins; every other link answers a user's key.
    assert statuses == {name: 403 if name == "audit_events" else 200 for name in links}


def test_api_index_without_the_slash_redirects_to_it(anon_client):
    response = anon_client.get("/v1")

    assert (response.status_code, response["Location"]) == (301, "/v1/")


def test_api_index_like_health_is_not_counted_against_a_keys_rate_limit(user_client):
    response = user_client.get("/v1/")

    assert response.status_code == 200
    assert "X-RateLimit-Remaining" not in response


def test_api_index_is_in_the_served_schema_needing_no_key(anon_client):
    schema = anon_client.get("/v1/schema", {"format": "json"}).json()

    operation = schema["paths"]["/v1/"]["get"]
    assert "security" not in operation or operation["security"] == []
    index = schema["components"]["schemas"]["ApiIndex"]
    assert set(index["required"]) == {"name", "version", "links"}
