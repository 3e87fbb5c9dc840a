"""The sender's policy: what a peer's answer means (delivered, retry, dead) and when to try again.

Pure functions, no network and no database: :func:`classify_status` reads a C-STORE status,
:func:`classify_rejection` an A-ASSOCIATE-RJ, :func:`classify_http` and
:func:`classify_failure_reason` a STOW-RS answer, :func:`backoff_seconds` spaces the retries and
:func:`decide` turns one attempt's :class:`Outcome` into what the outbox row becomes (its
:class:`Decision`), including giving up after ``give_up_after_hours``. The outbox is handed that
decision; it never imports this policy.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicomnode.config import DeliveryConfig
from dicomnode.status import (
    CANNOT_UNDERSTAND_RANGE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE,
    WARNING_RANGE,
    Status,
)

# Failures that no amount of retrying changes: fail fast instead of looping.
PERMANENT_STATUSES = frozenset(
    {
        Status.NO_SUCH_ATTRIBUTE,
        Status.INVALID_ATTRIBUTE_VALUE,
        Status.NO_SUCH_SOP_INSTANCE,
        Status.NO_SUCH_ARGUMENT,
        Status.INVALID_ARGUMENT_VALUE,
        Status.INVALID_OBJECT_INSTANCE,
        Status.NO_SUCH_SOP_CLASS,
        Status.CLASS_INSTANCE_CONFLICT,
        Status.MISSING_ATTRIBUTE,
        Status.MISSING_ATTRIBUTE_VALUE,
        Status.SOP_CLASS_NOT_SUPPORTED,
        Status.NOT_AUTHORIZED,
        Status.DUPLICATE_INVOCATION,
        Status.UNRECOGNIZED_OPERATION,
        Status.MISTYPED_ARGUMENT,
    }
)


class RejectResult(enum.IntEnum):
    """A-ASSOCIATE-RJ Result field (PS3.8 9.3.4)."""

    REJECTED_PERMANENT = 0x01
    REJECTED_TRANSIENT = 0x02


class Verdict(enum.StrEnum):
    """What happens to an outbox row after one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt: a verdict, the DIMSE status if one came back, and why."""

    verdict: Verdict
    reason: str
    status: int | None = None
    detail: str | None = None  # the peer's Error Comment: stored, never logged


@dataclass(frozen=True)
class Decision:
    """What one attempt makes of its row: the final verdict, the reason, the next attempt time.

    ``next_attempt_at`` is the retry time for :attr:`Verdict.RETRY` and the attempt's own time for
    the two final verdicts (the claim lease is over).
    """

    verdict: Verdict
    reason: str
    next_attempt_at: datetime


def status_name(status: int) -> str:
    """``0xA700 (Refused: Out of Resources)`` style text for a DIMSE status."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status)
    if status == Status.WARNING_OPTIONAL_ATTRIBUTES:
        entry = ("Warning", "Requested optional attributes are not supported")
    return f"0x{status:04X} ({entry[1] or entry[0]})" if entry else f"0x{status:04X}"


def classify_status(status: int) -> Outcome:
    """Classify a C-STORE response status: delivered, retry later, or dead (permanent)."""
    name = status_name(status)
    if status == Status.SUCCESS:
        return Outcome(Verdict.DELIVERED, "success", status)
    if status in WARNING_RANGE or status in (
        Status.WARNING_OPTIONAL_ATTRIBUTES,
        Status.WARNING_ATTRIBUTE_LIST,
        Status.WARNING_VALUE_OUT_OF_RANGE,
    ):
        return Outcome(Verdict.DELIVERED, f"stored with warning {name}", status)
    if status == Status.DUPLICATE_SOP_INSTANCE:
        return Outcome(Verdict.DELIVERED, f"peer already holds the instance {name}", status)
    if (
        status in DATASET_DOES_NOT_MATCH_SOP_CLASS_RANGE
        or status in CANNOT_UNDERSTAND_RANGE
        or status in PERMANENT_STATUSES
    ):
        return Outcome(Verdict.DEAD, f"peer rejected the object permanently: {name}", status)
    # Out of resources, processing failure, resource limitation, cancel and unknown codes: try again
    # later; give_up_after_hours bounds it.
    return Outcome(Verdict.RETRY, f"peer failed the store: {name}", status)


def classify_rejection(where: str, result: int, source: str, reason: str) -> Outcome:
    """Classify an A-ASSOCIATE-RJ: "rejected-permanent" is dead at once, anything else is retried.

    A permanent rejection (an unknown calling or called AE title, an unsupported protocol version,
    a peer refusing all associations) answers the same until someone changes the peer's
    configuration, so the row waits for ``dicomnode retry`` instead of 72 h of attempts. A transient
    one (the peer is busy, out of associations) is worth trying again.
    """
    try:
        name = RejectResult(result).name.lower().replace("_", "-")
    except ValueError:
        name = f"result 0x{result:02X}"
    text = f"association rejected by {where} ({name}, source {source}, reason {reason})"
    if result == RejectResult.REJECTED_PERMANENT:
        return Outcome(Verdict.DEAD, text)
    return Outcome(Verdict.RETRY, text)


def classify_http(code: int, phrase: str, credentials: str) -> Outcome:
    """Classify a STOW-RS answer that says nothing about single objects, by its HTTP status.

    401/403 are dead with a message naming ``credentials`` (the destination key to check); 408,
    429 and 5xx are retried; any other 4xx (a wrong ``url``, a request the peer will never accept,
    400/409 without a Failed SOP Sequence) is dead; 2xx is delivered.
    """
    text = f"HTTP {code} {phrase}".rstrip()
    if 200 <= code < 300:
        return Outcome(Verdict.DELIVERED, f"stored ({text})")
    if code in (401, 403):
        return Outcome(Verdict.DEAD, f"peer refused our credentials ({text}): check {credentials}")
    if code in (408, 429) or code >= 500:
        return Outcome(Verdict.RETRY, f"peer failed the request ({text})")
    if code in (404, 405) or 300 <= code < 400:
        return Outcome(Verdict.DEAD, f"no STOW-RS service at the destination url ({text}): check its url")
    return Outcome(Verdict.DEAD, f"peer rejected the request permanently ({text})")


def classify_failure_reason(reason: int) -> Outcome:
    """Classify one object's Failure Reason (0008,1197) in a STOW-RS Failed SOP Sequence.

    The reasons are C-STORE statuses (PS3.18 Table 10.5.3-1), so the DIMSE policy applies:
    0xA7xx (out of resources) and 0x0110 (processing failure) are retried, 0xA9xx, 0xCxxx, 0x0122,
    0x0124 are dead with the reason.
    """
    outcome = classify_status(reason)
    if outcome.verdict is Verdict.DELIVERED:  # a success code as a failure reason: not stored
        return Outcome(Verdict.RETRY, f"peer listed the object as failed: {status_name(reason)}", reason)
    return outcome


def backoff_seconds(attempts: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(maximum, initial * 2**(attempts-1))]."""
    ceiling = min(maximum, initial * 2.0 ** max(0, min(attempts - 1, 60)))
    return rng.uniform(0.0, ceiling)


def decide(
    outcome: Outcome,
    *,
    attempts: int,
    created_at: datetime,
    now: datetime,
    policy: DeliveryConfig,
    rng: random.Random,
) -> Decision:
    """Turn attempt number ``attempts`` of a row created at ``created_at`` into its decision.

    A retry at or after the give-up deadline (``created_at + give_up_after_hours``) is dead, naming
    the last error; an earlier one is due after the jittered backoff, never later than the deadline.
    """
    if outcome.verdict is not Verdict.RETRY:
        return Decision(outcome.verdict, outcome.reason, now)
    deadline = created_at + timedelta(hours=policy.give_up_after_hours)
    if now >= deadline:
        return Decision(
            Verdict.DEAD,
            (
                f"gave up after {attempts} attempts over {policy.give_up_after_hours:g} h; "
                f"last error: {outcome.reason}"
            ),
            now,
        )
    delay = backoff_seconds(attempts, policy.retry_initial_seconds, policy.retry_max_seconds, rng)
    return Decision(Verdict.RETRY, outcome.reason, min(now + timedelta(seconds=delay), deadline))
