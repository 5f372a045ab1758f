"""GET /v1/snapshots: the caller's code snapshots, newest first, paged."""

import pytest

from artifacts.tests.factories import tar_gz
from conftest import KeyClient

pytestmark = pytest.mark.django_db


def upload(client: KeyClient, name: str) -> str:
    response = client.post("/v1/snapshots", data=tar_gz({name: b"x"}), content_type="application/octet-stream")
    return response.json()["id"]


def test_the_list_holds_the_callers_snapshots_newest_first(user_client, other_client):
    first, second = upload(user_client, "a.py"), upload(user_client, "b.py")
    upload(other_client, "c.py")

    response = user_client.get("/v1/snapshots")

    assert response.status_code == 200
    assert [s["id"] for s in response.json()] == [second, first]
    assert response["X-Total-Count"] == "2"


def test_bytes_another_user_uploaded_first_are_listed_for_the_caller_too(user_client, other_client):
    shared = upload(other_client, "same.py")
    assert upload(user_client, "same.py") == shared

    assert [s["id"] for s in user_client.get("/v1/snapshots").json()] == [shared]


def test_an_admin_lists_every_snapshot(user_client, other_client, admin_client_key):
    upload(user_client, "a.py")
    upload(other_client, "b.py")

    assert admin_client_key.get("/v1/snapshots")["X-Total-Count"] == "2"


def test_the_list_pages_with_limit_and_offset(user_client):
    ids = [upload(user_client, f"{index}.py") for index in range(3)]

    response = user_client.get("/v1/snapshots", {"limit": 1, "offset": 1})

    assert [s["id"] for s in response.json()] == [ids[1]]
    assert response["X-Total-Count"] == "3"


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"offset": -1}])
def test_a_bad_page_is_400_naming_the_parameter_as_on_the_other_lists(user_client, query):
    snapshots = user_client.get("/v1/snapshots", query)
    tasks = user_client.get("/v1/tasks", query)

    assert (snapshots.status_code, snapshots.json()["code"]) == (400, "BAD_REQUEST")
    assert [detail["field"] for detail in snapshots.json()["details"]] == list(query)
    assert snapshots.json()["details"] == tasks.json()["details"]
