"""A lock service guarding the parameter server's update: request → grant by policy → use → release.

The protocol follows a centralised lock manager (a client requests, the service grants when its
policy says so, the client uses the resource and releases it). Policies (``LOCK_POLICIES``):

- ``fifo``: a ticket lock — requests are numbered on arrival and granted strictly in ticket order,
  so no worker starves (fairness) and two updates never interleave (no lost updates).
- ``none``: lock-free; every request is granted at once, as in Hogwild! (Recht et al. 2011). Two
  updates may then read the same parameter version and one overwrite the other: the server
  counts such lost updates instead of preventing them.

Every wait has a timeout. A request that times out is abandoned: the service skips its ticket, so
one dead or slow client never blocks the queue behind it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import NamedTuple

from jaxsync import ConfigError

LOCK_POLICIES = ("fifo", "none")


class LockTimeout(TimeoutError):
    """A grant did not come within the timeout."""


class Ticket(NamedTuple):
    number: int
    client: int
    requested_at: float


class LockService:
    """Grants one holder at a time (``fifo``) or everyone at once (``none``).

    Attributes:
      grants: ``(ticket number, client)`` in the order grants were made (for audits and tests).
    """

    def __init__(self, policy: str = "fifo", timeout_s: float = 10.0):
        if policy not in LOCK_POLICIES:
            raise ConfigError(f"unknown lock policy {policy!r}; choose from {list(LOCK_POLICIES)}")
        self.policy = policy
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0  # the ticket that may hold the lock next
        self._abandoned: set[int] = set()
        self._holder: int | None = None
        self.grants: list[tuple[int, int]] = []

    def request(self, client: int) -> Ticket:
        """Take a ticket; the request is queued in arrival order."""
        with self._cond:
            ticket = Ticket(self._next_ticket, client, time.perf_counter())
            self._next_ticket += 1
            return ticket

    def wait_grant(self, ticket: Ticket, timeout_s: float | None = None) -> float:
        """Block until the policy grants ``ticket``; returns the wait in seconds.

        Raises:
          LockTimeout: after ``timeout_s`` (default: the service's); the ticket is abandoned.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        with self._cond:
            if self.policy == "fifo":
                ok = self._cond.wait_for(
                    lambda: self._serving == ticket.number and self._holder is None, timeout_s
                )
                if not ok:
                    self._abandon(ticket.number)
                    raise LockTimeout(
                        f"ticket {ticket.number} (client {ticket.client}) not granted within "
                        f"{timeout_s:.1f}s; lock held by ticket {self._holder}"
                    )
                self._holder = ticket.number
            self.grants.append((ticket.number, ticket.client))
        return time.perf_counter() - ticket.requested_at

    def release(self, ticket: Ticket) -> None:
        """Give the lock back and wake the next ticket."""
        if self.policy != "fifo":
            return
        with self._cond:
            if self._holder != ticket.number:
                raise RuntimeError(f"ticket {ticket.number} released a lock it does not hold")
            self._holder = None
            self._advance(ticket.number + 1)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, client: int, timeout_s: float | None = None):
        """``with lock.hold(worker) as wait_s:`` — request, wait for the grant, use, release."""
        ticket = self.request(client)
        wait_s = self.wait_grant(ticket, timeout_s)
        try:
            yield wait_s
        finally:
            self.release(ticket)

    def _abandon(self, number: int) -> None:
        # Called with the condition held. If the dead ticket is next in line, skip past it now;
        # otherwise remember it so _advance skips it when its turn comes.
        if self._serving == number and self._holder is None:
            self._advance(number + 1)
            self._cond.notify_all()
        else:
            self._abandoned.add(number)

    def _advance(self, number: int) -> None:
        while number in self._abandoned:
            self._abandoned.discard(number)
            number += 1
        self._serving = number
