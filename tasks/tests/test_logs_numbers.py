"""The numbers GET /v1/tasks/{taskId}/logs reads (tail, after_id, Last-Event-ID): ASCII digits in
range, or a 400 in the standard format naming the one that is not."""

import pytest

from tasks.logs import append_lines
from tasks.services import task_submit

MAX_LINE_ID = 2**63 - 1  # log line ids are 64-bit keys


@pytest.fixture
def task(user):
    task = task_submit(owner=user, job_name="train")
    append_lines(task_id=task.id, attempt=1, lines=[{"stream": "stdout", "line": f"line {n}"} for n in range(3)])
    return task


def _url(task) -> str:
    return f"/v1/tasks/{task.id}/logs"


def _assert_bad(response, field: str) -> None:
    assert response.status_code == 400, response.content[:300]
    body = response.json()
    assert body["code"] == "BAD_REQUEST"
    assert body["trace_id"]
    assert [detail["field"] for detail in body["details"]] == [field]


@pytest.mark.parametrize(
    "value",
    [
        "\u00b2",  # a superscript 2: str.isdigit() says yes, int() says no
        "\u0663",  # an Arabic-Indic 3, which int() reads as 3
        "1_0",  # int() reads it as 10
        "+1",
        "-1",
        str(MAX_LINE_ID + 1),  # past every line id
        pytest.param("9" * 5000, id="5000-digits"),
    ],
)
def test_last_event_id_other_than_a_line_id_in_ascii_digits_is_a_400_naming_the_header(user_client, task, value):
    response = user_client.get(_url(task), {"follow": "true"}, headers={"Last-Event-ID": value})

    _assert_bad(response, "Last-Event-ID")
    assert response.json()["error"] == "Invalid header: Last-Event-ID"


@pytest.mark.parametrize("param", ["tail", "after_id"])
# "\uff12" is a fullwidth 2, "\u0663" an Arabic-Indic 3, "\u00b2" a superscript 2.
@pytest.mark.parametrize("value", ["1_0", "+2", " 2", "2 ", "\uff12", "\u0663", "\u00b2", "2.0", "0x2"])
def test_a_number_not_written_in_ascii_digits_is_a_400_naming_the_parameter(user_client, task, param, value):
    _assert_bad(user_client.get(_url(task), {param: value}), param)


@pytest.mark.parametrize("value", [str(MAX_LINE_ID + 1), pytest.param("9" * 5000, id="5000-digits")])
def test_after_id_past_every_line_id_is_a_400(user_client, task, value):
    _assert_bad(user_client.get(_url(task), {"after_id": value}), "after_id")


def test_tail_thousands_of_digits_long_is_a_400(user_client, task):
    _assert_bad(user_client.get(_url(task), {"tail": "1" * 5000}), "tail")


def test_after_id_of_the_largest_line_id_answers_no_lines(user_client, task):
    response = user_client.get(_url(task), {"after_id": str(MAX_LINE_ID)})

    assert response.status_code == 200
    assert response.json()["lines"] == []


def test_leading_zeros_are_still_the_number(user_client, task):
    body = user_client.get(_url(task), {"tail": "002"}).json()

    assert [line["line"] for line in body["lines"]] == ["line 1", "line 2"]
