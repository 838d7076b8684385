"""A lock service guarding the parameter server's update: request → grant by policy → use → release.

The protocol follows a centralised lock manager (a client requests, the service grants when its
policy says so, the client uses the resource and releases it). Policies (``LOCK_POLICIES``):

- ``fifo``: a ticket lock — requests are numbered on arrival and granted strictly in ticket order,
  so no worker starves (fairness) and two updates never interleave (no lost updates).
- ``none``: lock-free; every request is granted at once, as in Hogwild! (Recht et al. 2011), and
  no update waits for another. :class:`SharedState` then commits each update with a
  compare-and-swap: an update computed from a snapshot that another one replaced meanwhile is
  recomputed from the newer snapshot (optimistic concurrency control, Kung & Robinson 1981), so
  no update is lost — a conflict costs a recomputation (counted), not an update.

Every wait has a timeout. A request that times out is abandoned: the service skips its ticket, so
one dead or slow client never blocks the queue behind it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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


class Commit(NamedTuple):
    """What :meth:`SharedState.update` did: ``out`` of the update that was committed, the
    snapshot it read and the value it wrote, the wait for the lock grant and the recomputations
    after conflicts."""

    out: Any
    read: Any
    wrote: Any
    wait_s: float
    retries: int


class SharedState:
    """One value that many threads read and update under a :class:`LockService` policy.

    ``read()`` returns the current value (an immutable snapshot) and never blocks.
    ``update(client, fn)`` replaces it by ``fn(value) -> (new value, out)``, a pure function of
    the snapshot it is given:

    - ``fifo``: ``fn`` runs inside the client's ticket grant, so updates apply one at a time in
      ticket order, each to the value the previous one left;
    - ``none``: ``fn`` runs outside any lock, concurrently with other clients'. Its result is
      committed only if the value is still the snapshot ``fn`` read (a compare-and-swap, the
      only step under a mutex: a reference compare and assignment); otherwise ``fn`` runs again
      on the newer value. Every update is applied to the value the previous commit left, as
      under ``fifo``, and none is lost; ``retries`` counts the recomputations.

    The values are JAX arrays, so ``fn`` returns once its computations are dispatched: holding a
    grant costs the dispatch, not the computation, and a reader of a new value waits for it only
    when it uses it.
    """

    def __init__(self, value, lock: LockService):
        self.lock = lock
        self._value = value
        self._swap = threading.Lock()  # guards the compare-and-swap only

    def read(self):
        return self._value

    def update(
        self, client: int, fn: Callable, timeout_s: float | None = None, on_commit=None
    ) -> Commit:
        """Apply ``fn`` as above; ``on_commit(commit)`` runs inside the commit (the grant, or the
        swap), so what it records is in commit order."""
        on_commit = on_commit or (lambda commit: None)
        if self.lock.policy == "fifo":
            with self.lock.hold(client, timeout_s) as wait_s:
                value = self._value
                self._value, out = fn(value)
                commit = Commit(out, value, self._value, wait_s, 0)
                on_commit(commit)
            return commit
        with self.lock.hold(client, timeout_s) as wait_s:  # granted at once: an audit entry
            pass
        timeout_s = self.lock.timeout_s if timeout_s is None else timeout_s
        deadline, retries = time.perf_counter() + timeout_s, 0
        while True:  # every failed swap means another client's update committed: progress
            if time.perf_counter() > deadline:
                raise LockTimeout(
                    f"client {client}: update not committed within {timeout_s:.1f}s "
                    f"({retries} conflicts)"
                )
            value = self._value
            new, out = fn(value)
            with self._swap:
                if self._value is value:
                    self._value = new
                    commit = Commit(out, value, new, wait_s, retries)
                    on_commit(commit)
                    return commit
            retries += 1
