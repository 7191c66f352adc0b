"""One writer per OUT (or per scope of it) on an object store, where there is no flock: a lease.

The lease is the object ``OUT/_vlmbatch/leases/<scope>.json`` (who holds it: run id, pid, host, since,
its time to live). A run takes it with a conditional write that succeeds only if the object does not
exist (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``): of two runs racing, exactly one wins.
The holder rewrites it every ``ttl / 6`` seconds, each time only if it is still the version it last
wrote (``If-Match`` / the generation): so a renewal never overwrites a lease someone else took.

A lease is *expired* when it has not been rewritten for ``ttl`` seconds, judged by the store's own
clock (S3: the object's Last-Modified against the Date of the response that read it; GCS: its update
time against this machine's clock). A run that finds an expired lease takes it over with a write
conditional on the version it read (two runs taking over at once: one wins). So a holder killed with
``kill -9`` loses its lease ``ttl`` seconds after its last renewal (default 30 s,
``VLMBATCH_LEASE_TTL``), and the next run takes over; one that finds a live lease refuses, naming the
holder.

The holder stops writing (``check`` raises ``LeaseLost``, and ``on_lost`` is called once) as soon as its
last successful renewal was sent more than ``ttl / 2`` seconds ago, or another run took the lease: the
other half of the time to live is the margin within which a write already on its way must land.
The rules of local OUT's locks hold (tasks/outputs/lock.py): a writer of the whole of OUT (``out``)
and a slice exclude each other, and slices cut another way (another N) exclude each other; each, once
it holds its own lease, refuses if a live lease that stands in its way exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tasks.errors import UsageError
from tasks.outputs.buckets import Fetched, PreconditionFailed
from tasks.outputs.layout import OUT_SCOPE, STATE_DIR, check_scope
from tasks.outputs.object_path import LeaseLost, ObjectPath
from tasks.slice import scope_of_slice

log = logging.getLogger(__name__)

TTL_ENV = "VLMBATCH_LEASE_TTL"
DEFAULT_TTL = 30.0  # seconds; a killed holder's lease is free this long after its last renewal
LEASES = "leases"


def lease_ttl(environ: Mapping[str, str] | None = None) -> float:
    """The lease's time to live in seconds: ``VLMBATCH_LEASE_TTL`` (2 to 600), else 30."""
    value = (os.environ if environ is None else environ).get(TTL_ENV)
    if not value:
        return DEFAULT_TTL
    try:
        ttl = float(value)
    except ValueError:
        ttl = math.nan
    if not 2 <= ttl <= 600:
        raise UsageError(f"{TTL_ENV}={value!r}: give seconds from 2 to 600")
    return ttl


@dataclass(frozen=True)
class Holder:
    """A lease as found in the store."""

    info: dict[str, object]
    tag: str
    age: float  # seconds since its last renewal, by the store's clock

    @classmethod
    def of(cls, fetched: Fetched) -> Holder:
        try:
            info = json.loads(fetched.data)
            if not isinstance(info, dict):
                info = {}
        except ValueError:
            info = {}
        return cls(info, fetched.tag, (fetched.now - fetched.modified).total_seconds())

    @property
    def ttl(self) -> float:
        value = self.info.get("ttl")
        return float(value) if isinstance(value, int | float) else DEFAULT_TTL

    @property
    def live(self) -> bool:
        return self.age <= self.ttl

    def describe(self) -> str:
        i = self.info
        return (
            f"run {i.get('run_id')} (pid {i.get('pid')} on {i.get('host')}, since {i.get('since')}; "
            f"lease renewed {max(self.age, 0):.0f} s ago, free {self.ttl:.0f} s after its last renewal "
            "if that run is gone)"
        )


def lease_key(out: ObjectPath, scope: str) -> ObjectPath:
    return out / STATE_DIR / LEASES / f"{check_scope(scope)}.json"


class Lease:
    """The lease on OUT (or on ``scope`` of it) for one run."""

    def __init__(
        self,
        out: ObjectPath,
        run_id: str,
        scope: str = OUT_SCOPE,
        ttl: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.out = out
        self.scope = scope
        self.path = lease_key(out, scope)
        self.run_id = run_id
        self.ttl = lease_ttl() if ttl is None else ttl
        self.on_lost = on_lost
        self._token = secrets.token_hex(8)
        self._since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._renewals = 0
        self._tag: str | None = None
        self._valid_until = 0.0  # time.monotonic() until which this run may write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def _body(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": self._since,
                "ttl": self.ttl,
                "scope": self.scope,
                "token": self._token,
                "renewals": self._renewals,
            }
        ).encode()

    @property
    def held(self) -> bool:
        return self._tag is not None

    def acquire(self) -> None:
        """Take the lease or raise UsageError naming its live holder; then keep it renewed."""
        for _ in range(5):
            sent, body = time.monotonic(), self._body()
            try:
                tag = self.path.bucket.put(self.path.key, body, create=True)
                break
            except PreconditionFailed:
                pass
            found = self.path.get()
            if found is None:
                continue  # released in between: try to create it again
            if found.data == body:  # our own write, answered 412 on a retry after a lost response
                tag = found.tag
                break
            holder = Holder.of(found)
            if holder.live:
                raise self._refusal(holder)
            try:  # expired: take it over, only if it is still the version we judged expired
                tag = self.path.bucket.put(self.path.key, body, match=holder.tag)
                log.warning("took over OUT's lease from %s, which had expired", holder.describe())
                break
            except PreconditionFailed:
                continue  # another run took it over first (or its holder came back): look again
        else:
            raise UsageError(f"--out {self.out}: could not take the writer's lease {self.path} (contended)")
        self._tag, self._valid_until = tag, sent + self.ttl / 2
        try:
            self._check_other_scopes()
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._keep, name="vlmbatch-lease", daemon=True)
        self._thread.start()

    def _refusal(self, holder: Holder, scope: str | None = None) -> UsageError:
        scope = self.scope if scope is None else scope
        what = "" if scope == OUT_SCOPE else f" (slice {scope})"
        if scope != self.scope and OUT_SCOPE not in (scope, self.scope):
            why = (
                f"; slices cut another way than {self.scope} would overlap it: every slice writing one "
                "OUT at a time takes the same N"
            )
        else:
            why = "; wait for it to finish or choose another --out"
        return UsageError(f"--out {self.out} is being written by {holder.describe()}{what}{why}")

    def _check_other_scopes(self) -> None:
        """A whole-OUT writer and a slice, or two slices of another N, must not run at once: refuse if
        one holds a live lease (checked after taking ours, so two starting at once cannot both miss
        each other)."""
        for other in (self.out / STATE_DIR / LEASES).listing()[0]:
            scope = other.name.removesuffix(".json")
            if scope == self.scope or not excludes(self.scope, scope):
                continue
            found = other.get()
            if found is not None and (holder := Holder.of(found)).live:
                raise self._refusal(holder, scope)

    def check(self) -> None:
        """Raise LeaseLost unless this run may still write (called before every write to OUT)."""
        if self._lost is None and time.monotonic() > self._valid_until:
            self._lose(f"the lease on {self.out} was not renewed for {self.ttl / 2:g} s")
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def _lose(self, reason: str) -> None:
        with self._guard:
            if self._lost is not None:
                return
            self._lost = reason
        log.error("stopped writing to %s: %s", self.out, reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def _keep(self) -> None:
        interval = max(self.ttl / 6, 0.2)
        while not self._stop.wait(interval):
            self._renewals += 1
            sent, body = time.monotonic(), self._body()
            try:
                self._tag = self.path.bucket.put(self.path.key, body, match=self._tag)
                self._valid_until = sent + self.ttl / 2
                continue
            except PreconditionFailed:
                found = self.path.get()
                if found is not None and found.data == body:  # ours, on a retry after a lost response
                    self._tag, self._valid_until = found.tag, sent + self.ttl / 2
                    continue
                who = Holder.of(found).describe() if found is not None else "no one (it was deleted)"
                self._lose(f"the lease on {self.out} was taken over by {who}")
                return
            except Exception as exc:  # the store unreachable for a moment: try again until it lapses
                log.warning("renewing the lease on %s failed: %s", self.out, exc)
                if time.monotonic() > self._valid_until:
                    self._lose(f"the lease on {self.out} could not be renewed: {exc}")
                    return

    def release(self) -> None:
        """Stop renewing and delete the lease (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._tag is not None and self._lost is None:
            try:
                self.path.bucket.delete(self.path.key, match=self._tag)
            except PreconditionFailed:
                pass
            except Exception as exc:  # it expires by itself
                log.warning("could not delete the lease on %s (it expires by itself): %s", self.out, exc)
        self._tag = None


def excludes(scope: str, other: str) -> bool:
    """Whether writers of these two scopes may not write one OUT at once."""
    if OUT_SCOPE in (scope, other):
        return True
    mine, theirs = scope_of_slice(scope), scope_of_slice(other)
    return mine is None or theirs is None or mine[1] != theirs[1]


def lease_holder(out: ObjectPath, scope: str) -> str | None:
    """Who holds the live lease on ``scope`` of OUT, or None (one request)."""
    return _live_holder(lease_key(out, scope))


def _live_holder(lease: ObjectPath) -> str | None:
    fetched = lease.get()
    if fetched is not None and (holder := Holder.of(fetched)).live:
        return holder.describe()
    return None


def live_leases(out: ObjectPath) -> dict[str, str]:
    """The live leases on OUT: scope → who holds it (for inspect, export, report, the slices' parent)."""
    found: dict[str, str] = {}
    for lease in (out / STATE_DIR / LEASES).listing()[0]:
        if (who := _live_holder(lease)) is not None:
            found[lease.name.removesuffix(".json")] = who
    return dict(sorted(found.items()))
