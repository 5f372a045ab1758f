"""Writes of reservations: book, cancel, and the loop's start/expiry tick.

A reservation books `gpu_count` GPUs (of `gpu_type`) on each of `node_count`
workers for a window. It is accepted only if the registered fleet can hold it
together with every other live reservation overlapping that window (the same
greedy binding dispatch uses, `policies.place_reservations`), and only within
the owner's RESERVATIONS_PER_USER live reservations. Bookings are serialised
(an advisory lock on PostgreSQL, the write lock on SQLite) so two concurrent
ones cannot both take the last capacity.

Every refusal is a 422 naming the request field it is about: `starts_at` for a
start in the past (beyond STARTS_AT_SKEW, which counts as now), further ahead
than STARTS_AT_MAX_LEAD, or a window already taken, `expires_minutes` for a
window length out of range, `gpu_count` / `gpu_type` / `node_count` for what
the fleet cannot hold, no field for the per-user limit.

A task naming a reservation runs only on the workers it holds, so it must fit
in what the reservation holds (`task_fit_refusal`, asked at submission).
"""

from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from audit.services import Entry, record, record_many
from fetchml import events
from fetchml.auth import Actor
from fetchml.conf import app_settings
from fetchml.errors import Conflict, Invalid
from scheduler.models import Reservation
from scheduler.policies import (
    FleetNode,
    Shape,
    fleet_lacks,
    largest_gpu_count,
    nodes_that_could_hold,
    overlapping_reservations,
    place_reservations,
    registered_fleet,
    reservation_shape,
)

LIVE_STATES = (Reservation.Status.PENDING, Reservation.Status.ACTIVE)
_BOOKING_LOCK = 0x46524553  # any constant shared by every booking transaction
# A `starts_at` this little in the past is a client clock running behind: taken as now.
STARTS_AT_SKEW = timedelta(seconds=60)
# How far ahead a window may start: a booking is checked against the fleet registered today,
# and a pending reservation counts against its owner's limit until its window ends.
STARTS_AT_MAX_LEAD = timedelta(days=365)


def _serialise_bookings() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_BOOKING_LOCK])


def _refuse(message: str, field: str | None) -> Invalid:
    return Invalid(message, details=[{"field": field, "message": message}])


def _window(*, now: datetime, starts_at: datetime | None, expires_minutes: int) -> tuple[datetime, datetime]:
    """(start, end) of the window asked for, or the refusal naming the field that is wrong."""
    limit = app_settings.RESERVATION_MAX_MINUTES
    if not 1 <= expires_minutes <= limit:
        raise _refuse(f"expires_minutes must be between 1 and {limit}", "expires_minutes")
    if starts_at is not None and starts_at < now - STARTS_AT_SKEW:
        raise _refuse(f"starts_at {starts_at.isoformat()} is in the past; leave it out to start now", "starts_at")
    if starts_at is not None and starts_at > now + STARTS_AT_MAX_LEAD:
        raise _refuse(
            f"starts_at {starts_at.isoformat()} is more than {STARTS_AT_MAX_LEAD.days} days ahead", "starts_at"
        )
    start = starts_at if starts_at is not None and starts_at > now else now
    return start, start + timedelta(minutes=expires_minutes)


def _fleet_cannot_hold(candidate: Reservation, fleet: list[FleetNode]) -> Invalid:
    """Why the registered workers could never hold `candidate`, naming the field to change."""
    gpu_count, gpu_type, node_count = candidate.gpu_count, candidate.gpu_type, candidate.node_count
    what = f"{gpu_count} {gpu_type + ' ' if gpu_type else ''}GPU(s) on each of {node_count} worker(s)"
    refusal = f"the registered workers cannot hold {what}"
    if not fleet:
        return _refuse(f"{refusal}: no worker is registered", None)
    shape = reservation_shape(candidate)
    lacking = fleet_lacks(shape, fleet)
    if "gpu_type" in lacking:
        return _refuse(f"{refusal}: none has GPUs of type {gpu_type}", "gpu_type")
    if "gpu" in lacking:
        return _refuse(f"{refusal}: the largest has {largest_gpu_count(shape, fleet)} GPU(s)", "gpu_count")
    fitting = nodes_that_could_hold(shape, fleet)
    return _refuse(f"{refusal}: only {fitting} could hold {gpu_count} GPU(s)", "node_count")


def task_fit_refusal(*, reservation: Reservation, shape: Shape) -> Invalid | None:
    """Why a task of `shape` could never run on `reservation`, naming the task's field; None if it fits.

    Such a task runs only on the `node_count` workers the reservation holds, one node on each, and
    the reservation holds `gpu_count` GPUs (of `gpu_type`) on each of them: a wider task, or one
    asking for more GPUs per node or GPUs of another type, would wait out the whole window and
    then run as an ordinary task. CPU cores and memory are not held: the task takes them from
    what its workers have free, as any task does.
    """
    held = (
        f"the reservation holds {reservation.gpu_count} {reservation.gpu_type + ' ' if reservation.gpu_type else ''}"
        f"GPU(s) on each of {reservation.node_count} worker(s)"
    )
    if shape.node_count > reservation.node_count:
        reason, field = f"the task asks for {shape.node_count} nodes; {held}", "node_count"
    elif shape.gpu > reservation.gpu_count:
        reason, field = f"the task asks for {shape.gpu} GPU(s) per node; {held}", "gpu"
    elif shape.gpu and shape.gpu_type and reservation.gpu_type and shape.gpu_type != reservation.gpu_type:
        reason, field = f"the task asks for GPUs of type {shape.gpu_type}; {held}", "gpu_type"
    else:
        return None
    return Invalid(
        f"the task cannot run on its reservation: {reason}",
        details=[{"field": field, "message": f"Does not fit reservation {reservation.id}: {reason}."}],
    )


def reservation_create(
    *,
    owner: AbstractBaseUser,
    actor: Actor,
    gpu_count: int,
    gpu_type: str = "",
    node_count: int = 1,
    expires_minutes: int = 30,
    starts_at: datetime | None = None,
) -> Reservation:
    """Book capacity now (active) or for a future window (pending); 422 with the reason if it cannot be held."""
    now = timezone.now()
    start, expires_at = _window(now=now, starts_at=starts_at, expires_minutes=expires_minutes)
    with transaction.atomic():
        _serialise_bookings()
        live = Reservation.objects.filter(owner=owner, status__in=LIVE_STATES, expires_at__gt=now).count()
        limit = app_settings.RESERVATIONS_PER_USER
        if live >= limit:
            raise _refuse(f"you already have {live} live reservation(s); the limit is {limit}", None)
        candidate = Reservation(
            owner=owner,
            gpu_count=gpu_count,
            gpu_type=gpu_type,
            node_count=node_count,
            starts_at=start,
            expires_at=expires_at,
            status=Reservation.Status.PENDING if start > now else Reservation.Status.ACTIVE,
            created_at=now,
        )
        fleet = registered_fleet()
        _, alone = place_reservations([candidate], fleet)
        if alone:
            raise _fleet_cannot_hold(candidate, fleet)
        others = overlapping_reservations(starts_at=start, expires_at=expires_at)
        _, refused = place_reservations([*others, candidate], fleet)
        if refused:
            raise _refuse(
                "that capacity is already reserved by other reservations in this window; choose another starts_at",
                "starts_at",
            )
        candidate.save()
        record(
            event_type="reservation_changed",
            user=owner,
            resource=f"reservation:{candidate.id}",
            action="create",
            ip_address=actor.ip_address,
            metadata={
                "gpu_count": gpu_count,
                "gpu_type": gpu_type,
                "node_count": node_count,
                "starts_at": start.isoformat(),
                "expires_at": expires_at.isoformat(),
                "status": candidate.status,
            },
        )
        events.status_changed("reservation_created", {"reservation_id": str(candidate.id)})
        events.wake_scheduler("reservation_created")
    return candidate


def reservation_cancel(*, reservation: Reservation, actor: Actor) -> Reservation:
    """Release a pending or active reservation at once; its tasks become ordinary tasks."""
    with transaction.atomic():
        won = Reservation.objects.filter(id=reservation.id, status__in=LIVE_STATES).update(
            status=Reservation.Status.CANCELLED
        )
        reservation.refresh_from_db()
        if not won:
            raise Conflict(f"reservation is already {reservation.status}")
        record(
            event_type="reservation_changed",
            user=actor.user,
            resource=f"reservation:{reservation.id}",
            action="cancel",
            ip_address=actor.ip_address,
        )
        events.status_changed("reservation_cancelled", {"reservation_id": str(reservation.id)})
        events.wake_scheduler("reservation_cancelled")
    return reservation


def reservations_tick(*, now: datetime | None = None) -> int:
    """Start due pending reservations and expire ended ones (each pass of the scheduler loop); returns changes."""
    now = now or timezone.now()
    with transaction.atomic():
        ending = Reservation.objects.filter(
            status__in=(*LIVE_STATES, Reservation.Status.CLAIMED), expires_at__lte=now
        ).values_list("id", "owner__username")
        expired = list(ending)
        Reservation.objects.filter(id__in=[rid for rid, _ in expired]).update(status=Reservation.Status.EXPIRED)
        starting = list(
            Reservation.objects.filter(
                status=Reservation.Status.PENDING, starts_at__lte=now, expires_at__gt=now
            ).values_list("id", "owner__username")
        )
        Reservation.objects.filter(id__in=[rid for rid, _ in starting], status=Reservation.Status.PENDING).update(
            status=Reservation.Status.ACTIVE
        )
        changes = [(rid, who, "expire") for rid, who in expired] + [(rid, who, "start") for rid, who in starting]
        if not changes:
            return 0
        record_many(
            [
                Entry(event_type="reservation_changed", user=who, resource=f"reservation:{rid}", action=action)
                for rid, who, action in changes
            ]
        )
        events.status_changed("reservations_changed", {"count": len(changes)})
        events.wake_scheduler("reservations_changed")
    return len(changes)
