"""A worker's run reports applied as one batch: in order, one commit, and a bad report costs only its answer."""

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from audit.models import AuditEvent, ChainHead
from conftest import requires_postgres
from fetchml import events
from fetchml.compiled import compiled_update_per_shape
from scheduler import counters, dispatch, services
from scheduler.dispatch import dispatch_round
from scheduler.models import NodeAssignment, Worker
from scheduler.services import StatusOutcome, apply_run_reports
from scheduler.tests.factories import assignments_of, queued_task, worker
from tasks import services as task_services
from tasks.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


def _placed(count: int) -> list[dict]:
    """`count` tasks dispatched to one worker; the run reference (task_id, token) of each."""
    box = worker(batch_slots=count)
    tasks = [queued_task() for _ in range(count)]
    assert dispatch_round() == count
    return [
        {"task_id": str(task.id), "token": str(assignments_of(task)[0].token), "worker_id": box.id} for task in tasks
    ]


def _report(run: dict, kind: str, **fields) -> dict:
    message = {"type": kind, "task_id": run["task_id"], "token": run["token"]}
    if kind == "status":
        message |= {"exit_code": None, "failure_reason": "", "error": "", "output": ""} | fields
    if kind == "log":
        message |= {"lines": fields.get("lines", [])}
    return message


def test_a_batch_is_applied_in_arrival_order():
    first, second = _placed(2)
    reports = [
        _report(first, "ack"),
        _report(first, "status", status="running"),
        _report(first, "status", status="completed", exit_code=0),
        _report(second, "ack"),
    ]

    outcomes = apply_run_reports(worker_id=first["worker_id"], reports=reports)

    assert outcomes == [True, StatusOutcome(accepted=True), StatusOutcome(accepted=True), True]
    assert Task.objects.get(id=first["task_id"]).status == "completed"
    assert Task.objects.get(id=second["task_id"]).status == "preparing"


def test_a_batch_publishes_its_changes_once(monkeypatch):
    runs = _placed(3)
    published = []
    monkeypatch.setattr(events, "send_batch_now", published.append)

    apply_run_reports(
        worker_id=runs[0]["worker_id"],
        reports=[_report(run, "status", status="completed", exit_code=0) for run in runs],
    )

    assert len(published) == 1
    assert sum(1 for _, message in published[0] if message.get("event") == "task_complete") == 3


def test_a_failing_report_costs_only_its_own_answer(monkeypatch):
    good, bad = _placed(2)
    real_append = services.append_lines

    def failing_append(**log):
        if str(log["task_id"]) == bad["task_id"]:
            raise RuntimeError("log store unavailable")
        return real_append(**log)

    monkeypatch.setattr(services, "append_lines", failing_append)
    reports = [_report(good, "status", status="completed", exit_code=0), _report(bad, "log", lines=[])]

    outcomes = apply_run_reports(worker_id=good["worker_id"], reports=reports)

    assert outcomes == [StatusOutcome(accepted=True), None]
    assert Task.objects.get(id=good["task_id"]).status == "completed"


@pytest.mark.parametrize(
    ("error", "traced"),
    [(OperationalError("server closed the connection unexpectedly\nmore"), False), (RuntimeError("a bug"), True)],
    ids=["database-out-of-reach", "another-error"],
)
def test_a_report_the_database_could_not_take_is_logged_in_one_line_and_any_other_failure_with_its_traceback(
    monkeypatch, caplog, error, traced
):
    [run] = _placed(1)

    def failing_append(**log):
        raise error

    monkeypatch.setattr(services, "append_lines", failing_append)

    assert apply_run_reports(worker_id=run["worker_id"], reports=[_report(run, "log", lines=[])]) == [None]

    [logged] = [record for record in caplog.records if "report failed" in record.getMessage()]
    assert bool(logged.exc_info) is traced
    if not traced:
        assert logged.getMessage().endswith(
            "a log report failed: OperationalError: server closed the connection unexpectedly"
        )


def test_a_stale_token_in_a_batch_is_answered_stale_and_the_rest_applied():
    run, other = _placed(2)
    stale = {**other, "token": "00000000-0000-0000-0000-000000000000"}

    outcomes = apply_run_reports(
        worker_id=run["worker_id"],
        reports=[_report(stale, "status", status="running"), _report(run, "status", status="running")],
    )

    assert outcomes[0].stale and outcomes[1] == StatusOutcome(accepted=True)
    assert Task.objects.get(id=run["task_id"]).status == "running"


def _sql_of_completing(runs: list[dict]) -> list[str]:
    """The statements of one batch of reports completing every run of `runs` (all on one worker)."""
    with CaptureQueriesContext(connection) as queries:
        apply_run_reports(
            worker_id=runs[0]["worker_id"],
            reports=[_report(run, "status", status="completed", exit_code=0) for run in runs],
        )
    return [query["sql"] for query in queries.captured_queries]


def test_a_batch_locks_the_audit_chain_head_once_for_all_its_events():
    runs = _placed(3)

    statements = _sql_of_completing(runs)

    head_locks = [sql for sql in statements if ChainHead._meta.db_table in sql]
    assert len([sql for sql in head_locks if sql.lstrip().startswith("SELECT")]) == 1
    assert AuditEvent.objects.filter(event_type="job_completed").count() == 3


def test_a_batch_names_each_owner_in_its_audit_events_without_reading_the_users():
    runs = _placed(3)

    statements = _sql_of_completing(runs)

    assert not [sql for sql in statements if 'FROM "auth_user"' in sql]
    owners = {str(task.id): task.owner.username for task in Task.objects.select_related("owner")}
    completed = AuditEvent.objects.filter(event_type="job_completed")
    assert {event.resource: event.user_id for event in completed} == {f"task:{t}": name for t, name in owners.items()}


def test_a_completed_report_reads_its_task_once_and_locks_nothing_before_writing():
    [run] = _placed(1)

    with CaptureQueriesContext(connection) as queries:
        [outcome] = apply_run_reports(
            worker_id=run["worker_id"], reports=[_report(run, "status", status="completed", exit_code=0)]
        )

    assert outcome == StatusOutcome(accepted=True)
    selects = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert len([sql for sql in selects if '"tasks_task"' in sql]) == 1  # once for the batch; then in memory
    assert not any("FOR UPDATE" in sql for sql in selects if "audit_chainhead" not in sql)
    task = Task.objects.get(id=run["task_id"])
    assert (task.status, task.exit_code) == ("completed", 0)
    assert task.started_at is not None and task.ended_at is not None


def _ack_and_complete(runs: list[dict]) -> list[dict]:
    return [report for run in runs for report in (_report(run, "ack"), _report(run, "status", status="completed"))]


def _statements_for(count: int) -> int:
    runs = _placed(count)
    with CaptureQueriesContext(connection) as queries:
        outcomes = apply_run_reports(worker_id=runs[0]["worker_id"], reports=_ack_and_complete(runs))
    assert outcomes == [True, StatusOutcome(accepted=True)] * count
    Worker.objects.filter(id=runs[0]["worker_id"]).update(status=Worker.Status.OFFLINE)  # the next round's go elsewhere
    return len(queries.captured_queries)


def test_a_batch_of_completions_costs_the_same_statements_however_many_runs_it_holds():
    assert _statements_for(2) == _statements_for(8)


def test_a_batch_of_completions_gives_the_workers_capacity_back_and_records_both_transitions():
    runs = _placed(3)

    apply_run_reports(worker_id=runs[0]["worker_id"], reports=_ack_and_complete(runs))

    box = Worker.objects.get(id=runs[0]["worker_id"])
    assert (box.used_batch_slots, box.used_cpu, box.used_memory_gb) == (0, 0, 0)
    for run in runs:
        task = Task.objects.get(id=run["task_id"])
        assert (task.status, task.exit_code) == ("completed", 0)
        assert task.started_at is not None and task.ended_at is not None
        [assignment] = assignments_of(task)
        assert (assignment.status, assignment.holds_capacity) == ("finished", False)
        assert assignment.acked_at is not None
    actions = AuditEvent.objects.filter(resource=f"task:{runs[0]['task_id']}").values_list("action", flat=True)
    assert list(actions.order_by("sequence_num")) == ["assign", "running", "completed"]


def test_a_failure_after_an_ack_in_the_same_batch_sees_the_ack():
    [run] = _placed(1)
    reports = [_report(run, "ack"), _report(run, "status", status="failed", exit_code=3, error="boom")]

    outcomes = apply_run_reports(worker_id=run["worker_id"], reports=reports)

    assert outcomes == [True, StatusOutcome(accepted=True)]
    task = Task.objects.get(id=run["task_id"])
    assert (task.status, task.failure_reason, task.exit_code) == ("failed", "exit_code", 3)
    [assignment] = assignments_of(task)
    assert assignment.acked_at is not None and not assignment.holds_capacity
    assert Worker.objects.get(id=run["worker_id"]).used_batch_slots == 0


def test_reports_after_a_failure_applied_at_once_see_its_changes():
    first, second = _placed(2)
    reports = [
        _report(first, "status", status="failed", exit_code=1),
        _report(first, "status", status="completed"),
        _report(second, "status", status="completed"),
    ]

    outcomes = apply_run_reports(worker_id=first["worker_id"], reports=reports)

    assert outcomes[0] == StatusOutcome(accepted=True)
    assert outcomes[1] == StatusOutcome(accepted=True)  # a re-sent final report of an ended run
    assert outcomes[2] == StatusOutcome(accepted=True)
    assert Task.objects.get(id=first["task_id"]).status == "failed"
    assert Task.objects.get(id=second["task_id"]).status == "completed"
    assert Worker.objects.get(id=first["worker_id"]).used_batch_slots == 0


def _applied_with_a_change_before_the_first_write(monkeypatch, run: dict, change) -> tuple[list[bool], list]:
    """`run`'s ack and completion applied as a batch, `change()` run where its first attempt (read
    without locks) starts writing; each attempt's `lock_first`, and the outcomes."""
    modes = []
    real_init = services._ReportBatch.__init__
    real_write = services._Batched.write

    def recording_init(batch, *args, **kwargs):
        real_init(batch, *args, **kwargs)
        modes.append(batch.lock_first)

    def changed_then_written(batch):
        if len(modes) == 1:
            change()
        real_write(batch)

    monkeypatch.setattr(services._ReportBatch, "__init__", recording_init)
    monkeypatch.setattr(services._Batched, "write", changed_then_written)
    outcomes = apply_run_reports(worker_id=run["worker_id"], reports=_ack_and_complete([run]))
    return modes, outcomes


def test_a_batch_whose_runs_changed_before_it_wrote_is_applied_again_holding_its_locks(monkeypatch):
    [run] = _placed(1)

    def changed():
        raise services._RunsChanged("changed meanwhile")

    modes, outcomes = _applied_with_a_change_before_the_first_write(monkeypatch, run, changed)

    assert modes == [False, True]
    assert outcomes == [True, StatusOutcome(accepted=True)]
    assert Task.objects.get(id=run["task_id"]).status == "completed"
    assert AuditEvent.objects.filter(resource=f"task:{run['task_id']}", action="completed").count() == 1


def test_a_batch_whose_run_gave_its_capacity_back_meanwhile_is_applied_again_holding_its_locks(monkeypatch):
    [run] = _placed(1)
    [assignment] = assignments_of(Task.objects.get(id=run["task_id"]))

    def taken_away():
        assert services.end_run(assignment_id=assignment.id, reason="worker_lost", error="lease expired")

    modes, outcomes = _applied_with_a_change_before_the_first_write(monkeypatch, run, taken_away)

    # Giving the slot back a second time would take the counter below zero: the batch (the taking
    # away included, in its transaction here) rolls back and is applied again with its locks.
    assert modes == [False, True]
    assert outcomes == [True, StatusOutcome(accepted=True)]
    assert Task.objects.get(id=run["task_id"]).status == "completed"
    assert Worker.objects.get(id=run["worker_id"]).used_batch_slots == 0


def test_a_batch_that_ends_a_draining_workers_last_run_takes_the_worker_offline():
    runs = _placed(2)
    Worker.objects.filter(id=runs[0]["worker_id"]).update(status=Worker.Status.DRAINING)

    apply_run_reports(worker_id=runs[0]["worker_id"], reports=_ack_and_complete(runs[:1]))
    assert Worker.objects.get(id=runs[0]["worker_id"]).status == Worker.Status.DRAINING  # a run left

    apply_run_reports(worker_id=runs[0]["worker_id"], reports=_ack_and_complete(runs[1:]))
    box = Worker.objects.get(id=runs[0]["worker_id"])
    assert (box.status, box.used_batch_slots) == (Worker.Status.OFFLINE, 0)


@requires_postgres
def test_on_postgresql_rounds_and_report_batches_write_with_updates_compiled_once_per_shape(monkeypatch):
    builds: dict[str, int] = {}

    def counted(name, build):
        def counting(**values):
            builds[name] = builds.get(name, 0) + 1
            return build(**values)

        return compiled_update_per_shape(counting)

    monkeypatch.setattr(dispatch, "_preparing", counted("preparing", dispatch._preparing_update))
    monkeypatch.setattr(counters, "_changed", counted("counters", counters._update))
    monkeypatch.setattr(services, "_runs_changed", counted("runs", services._runs_update))
    monkeypatch.setattr(task_services, "_transitions_written", counted("tasks", task_services._transitions_update))
    box = worker(batch_slots=1)
    for _ in range(2):
        task = queued_task()
        assert dispatch_round() == 1
        run = {"task_id": str(task.id), "token": str(assignments_of(task)[0].token)}
        reports = [_report(run, "ack"), _report(run, "status", status="running")]
        apply_run_reports(worker_id=box.id, reports=[*reports, _report(run, "status", status="completed")])
        assert Task.objects.get(id=task.id).status == "completed"

    # The second task's round and batch ran the SQL the first one's compiled (counters: taken; the
    # batch gives them back with the statement that locks the worker, `give_back_reading_status`).
    assert builds == {"preparing": 1, "counters": 1, "runs": 1, "tasks": 1}


def _gang_and_single() -> tuple[list[dict], dict]:
    """A 2-node task on workers node-0 and node-1 and a single-node task beside it on node-0; the run
    references (with worker_id) of the gang's nodes, by rank, and of the single-node run."""
    first, second = worker(name="node-0", batch_slots=2), worker(name="node-1", batch_slots=1)
    gang, single = queued_task(node_count=2), queued_task()
    assert dispatch_round() == 2
    nodes = [
        {"task_id": str(gang.id), "token": str(run.token), "worker_id": run.worker_id} for run in assignments_of(gang)
    ]
    assert [node["worker_id"] for node in nodes] == [first.id, second.id]
    [run] = assignments_of(single)
    return nodes, {"task_id": str(single.id), "token": str(run.token), "worker_id": first.id}


def _progress_and_completion(run: dict) -> list[dict]:
    return [
        _report(run, "ack"),
        _report(run, "status", status="running"),
        _report(run, "status", status="completed", exit_code=0),
    ]


def test_a_multi_node_task_reported_in_batches_completes_with_its_last_node():
    (rank0, rank1), single = _gang_and_single()

    first = apply_run_reports(
        worker_id=rank0["worker_id"], reports=_progress_and_completion(rank0) + _progress_and_completion(single)
    )
    assert Task.objects.get(id=rank0["task_id"]).status == "running"
    second = apply_run_reports(worker_id=rank1["worker_id"], reports=_progress_and_completion(rank1))

    accepted = StatusOutcome(accepted=True)
    assert first == [True, accepted, accepted] * 2
    assert second == [True, accepted, accepted]
    assert {task.status for task in Task.objects.all()} == {"completed"}
    assert not Worker.objects.filter(used_batch_slots__gt=0).exists()
    events_of_gang = AuditEvent.objects.filter(resource=f"task:{rank0['task_id']}").order_by("sequence_num")
    assert [(event.event_type, event.action) for event in events_of_gang] == [
        ("job_started", "assign"),
        ("job_started", "running"),
        ("job_completed", "completed"),
    ]


def test_a_multi_node_runs_completion_in_a_batch_uses_the_rows_the_batch_read():
    (rank0, _), single = _gang_and_single()
    reports = [_report(rank0, "ack"), _report(rank0, "status", status="completed", exit_code=0)]

    with CaptureQueriesContext(connection) as queries:
        outcomes = apply_run_reports(worker_id=rank0["worker_id"], reports=reports + _progress_and_completion(single))

    assert outcomes == [
        True,
        StatusOutcome(accepted=True),
        True,
        StatusOutcome(accepted=True),
        StatusOutcome(accepted=True),
    ]
    whole_rows = [q["sql"] for q in queries.captured_queries if '"tasks_task"."entrypoint"' in q["sql"]]
    assert whole_rows == []  # the batch's own read of its tasks serves the report applied at once


def test_a_repeated_completion_of_a_multi_node_run_in_one_batch_is_acknowledged_again():
    (rank0, _), _ = _gang_and_single()
    completed = _report(rank0, "status", status="completed", exit_code=0)

    outcomes = apply_run_reports(worker_id=rank0["worker_id"], reports=[completed, completed])

    assert outcomes == [StatusOutcome(accepted=True), StatusOutcome(accepted=True)]
    assert NodeAssignment.objects.get(token=rank0["token"]).holds_capacity is False
    assert Task.objects.get(id=rank0["task_id"]).status == "preparing"  # until its other node reports
