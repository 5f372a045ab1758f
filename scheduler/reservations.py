"""Writes of reservations: book, cancel, and the loop's start/expiry tick.

A reservation books `gpu_count` GPUs (of `gpu_type`) on each of `node_count`
workers for a window. It is accepted only if the registered fleet can hold it
together with every other live reservation overlapping that window (the same
greedy binding dispatch uses, `policies.place_reservations`), and only within
the owner's RESERVATIONS_PER_USER live reservations. Bookings are serialised
(an advisory lock on PostgreSQL, the write lock on SQLite) so two concurrent
ones cannot both take the last capacity.
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
from scheduler.policies import overlapping_reservations, place_reservations, registered_fleet

LIVE_STATES = (Reservation.Status.PENDING, Reservation.Status.ACTIVE)
_BOOKING_LOCK = 0x46524553  # any constant shared by every booking transaction


def _serialise_bookings() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_BOOKING_LOCK])


def _refuse(message: str, field: str = "gpu_count") -> Invalid:
    return Invalid(message, details=[{"field": field, "message": message}])


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
    start = starts_at if starts_at is not None and starts_at > now else now
    expires_at = start + timedelta(minutes=expires_minutes)
    with transaction.atomic():
        _serialise_bookings()
        live = Reservation.objects.filter(owner=owner, status__in=LIVE_STATES, expires_at__gt=now).count()
        limit = app_settings.RESERVATIONS_PER_USER
        if live >= limit:
            raise _refuse(f"you already have {live} live reservation(s); the limit is {limit}", "expires_minutes")
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
            what = f"{gpu_count} {gpu_type + ' ' if gpu_type else ''}GPU(s) on each of {node_count} worker(s)"
            raise _refuse(f"the registered workers cannot hold {what}")
        others = overlapping_reservations(starts_at=start, expires_at=expires_at)
        _, refused = place_reservations([*others, candidate], fleet)
        if refused:
            raise _refuse("that capacity is already reserved by other reservations in this window")
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
