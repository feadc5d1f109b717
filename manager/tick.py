"""One manager tick: reconcile -> snapshot -> decide -> act -> record.

A dry run lists and searches at the providers (reads only) and reads the database, then prints what it
would do; it creates, destroys and writes nothing. Two ticks never act at once: an advisory lock in
Postgres, held by an open transaction on a connection of its own (so it holds through a transaction
pooler too), serialises them (a cron tick that finds `run` mid-tick skips).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from gpuq.client import Client, new_secret, secret_hash
from gpuq.db import Connection, connect, deadline_of
from manager.bootstrap import launch_spec
from manager.config import ManagerSettings
from manager.credentials import StorageCredentials
from manager.metrics import Metrics
from manager.policy import (
    Action,
    AvoidMachine,
    ColdStart,
    ColdStop,
    Destroy,
    Drain,
    Hold,
    InstanceState,
    QueueSnapshot,
    Rent,
    decide,
    instances_wanted,
)
from manager.providers.base import Offer, Provider, ProviderError
from manager.reconcile import ReconcileReport, destroy_verified, reconcile
from manager.state import (
    DbInstance,
    Snapshot,
    forecast_lines,
    managed_instances,
    read_snapshot,
    record_idle,
)

log = logging.getLogger("gpuq.manager")

TICK_LOCK = 0x67707572  # one manager tick at a time, per database ("gpur")
REFUSED_OFFER_AVOID = "1 hour"  # a machine whose offer a create refused (gone, stale minimum bid)
_POOL = (InstanceState.REQUESTED, InstanceState.BOOTING, InstanceState.IDLE, InstanceState.BUSY)


@dataclass
class TickResult:
    skipped: bool = False  # another tick held the lock
    reconcile: ReconcileReport = field(default_factory=ReconcileReport)
    actions: list[Action] = field(default_factory=list)
    rented: list[str] = field(default_factory=list)  # "provider:id"
    destroyed: list[int] = field(default_factory=list)
    drained: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class Manager:
    client: Client
    settings: ManagerSettings
    providers: Mapping[str, Provider]
    metrics: Metrics = field(default_factory=Metrics)
    echo: Callable[[str], None] = print  # where a dry run's plan goes
    credentials: StorageCredentials | None = None  # None: from the settings and environment

    def __post_init__(self) -> None:
        if self.credentials is None:  # checked here, at start: a bad setting stops the manager
            self.credentials = StorageCredentials.from_settings(self.settings)


def tick(m: Manager, *, dry_run: bool = False, now: datetime | None = None) -> TickResult:
    result = TickResult()
    lock = None if dry_run else _tick_lock(m.client)
    if lock is False:
        log.info("another manager tick is running; skipping this one")
        result.skipped = True
        return result
    started = time.monotonic()
    try:
        _tick(m, result, dry_run, now)
        if not dry_run and not result.reconcile.errors:
            # every provider listed and repaired: rented workers may count on being looked after
            m.client.record_tick()
    finally:
        if lock is not None:
            lock.close()  # ends its transaction, and the lock with it
    m.metrics.ticks.inc()
    m.metrics.tick_duration.set(time.monotonic() - started)
    m.metrics.last_tick.set(time.time())
    if m.settings.metrics_file is not None and not dry_run:
        m.metrics.write(m.settings.metrics_file)
    return result


def _tick_lock(client: Client) -> Connection | Literal[False]:
    """The tick lock, held by a transaction open on a connection of its own until that is closed; False
    when another tick holds it. A session lock on the client's connection would not do through a
    transaction pooler: each call may run on another server session, so the lock was taken on one and
    another manager's tick, handed that same session, took it again."""
    conn = connect(client.url, client.settings, autocommit=False, timeout_s=deadline_of(client.conn))
    try:
        # The transaction sits idle for the whole tick: a server-wide idle timeout must not end it.
        conn.execute("set local idle_in_transaction_session_timeout = 0")
        got = conn.execute("select pg_try_advisory_xact_lock(%s) as got", (TICK_LOCK,)).fetchone()
    except BaseException:
        conn.close()
        raise
    if got is None or not got["got"]:
        conn.close()
        return False
    return conn


def _tick(m: Manager, result: TickResult, dry_run: bool, now: datetime | None) -> None:
    s = m.settings
    prefix = "[dry-run] " if dry_run else ""
    # Reconcile first: the jobs of an instance that died are released (no attempt used up) before their
    # leases can expire; then expired leases go back in the queue, so depth is right.
    rec = reconcile(m.client, m.providers, s.label_prefix, dry_run=dry_run)
    result.reconcile = rec
    if not dry_run:
        m.client.reap_expired()
    for err in rec.errors:
        m.metrics.provider_errors.labels(err.split(":", 1)[0]).inc()
    if dry_run:
        for line in rec.lines:
            _say(m, result, prefix + line, echo=True)

    if now is None:
        now = m.client.call("select now() as t")[0]["t"]
    snap = read_snapshot(
        m.client, s.policy.budget_tz, s.label_prefix, other_dph=rec.other_dph, policy=s.policy, now=now
    )
    if dry_run:
        for line in forecast_lines(snap.queues, s.policy, now):
            _say(m, result, prefix + line, echo=True)
    offers = _offers(m, snap, now, result)
    actions = decide(
        snap.queues,
        snap.views,
        offers,
        s.policy,
        now,
        spend=snap.spend,
        avoided_machines=snap.avoided,
        price_markups=_markups(m.client),
    )
    result.actions = actions
    by_id = {str(i.id): i for i in snap.instances}
    for action in actions:
        kind = type(action).__name__.lower()
        m.metrics.actions.labels(kind).inc()
        if dry_run:
            _say(m, result, prefix + _reason(action), echo=True)
            continue
        rented = len(result.rented)
        try:
            _act(m, action, by_id, result)
        except ProviderError as e:
            provider = action.offer.provider if isinstance(action, Rent) else "?"
            m.metrics.provider_errors.labels(provider).inc()
            result.errors.append(f"{_reason(action)}: {e}")
            log.warning("%s failed: %s", _reason(action), e)
            if isinstance(action, Rent) and e.offer_refused:
                _avoid_refused(m, action, e, result)
        else:
            if isinstance(action, Rent) and len(result.rented) > rented:
                _record_storage(m, action.offer, result.rented[-1])
    if not dry_run:
        _renew_credentials(m, result)
        record_idle(m.client, s.policy, s.tick_seconds)
    if not actions:
        queues = (
            ", ".join(f"{q.name}: {q.queued} queued, {q.running} running" for q in snap.queues) or "no jobs"
        )
        _say(m, result, f"{prefix}nothing to do ({queues}; {len(snap.instances)} instance(s))", echo=dry_run)
    _record_metrics(m, snap, rec)


def _offers(m: Manager, snap: Snapshot, now: datetime, result: TickResult) -> list[Offer]:
    """Search only for queues the policy may rent for: Vast allows 10 searches a minute and a daily quota."""
    by_name = {q.name: q for q in snap.queues}
    offers: list[Offer] = []
    for name, policy in m.settings.policy.queues.items():
        snapshot = by_name.get(name) or QueueSnapshot(name, 0, 0)
        have = sum(1 for i in snap.instances if i.view.queue == name and i.status in _POOL)
        if instances_wanted(m.settings.policy, snapshot, policy, now) <= have:
            continue
        provider_name = m.settings.launch[name].provider
        try:
            found = m.providers[provider_name].search_offers(policy.offer_filter)
        except ProviderError as e:
            m.metrics.provider_errors.labels(provider_name).inc()
            result.errors.append(f"search for {name}: {e}")
            log.warning("%s: offer search for queue %s failed: %s", provider_name, name, e)
            continue
        offers += [o for o in found if o not in offers]
    return offers


def _markups(client: Client) -> dict[str, float]:
    """Machine -> $/h it bills above its offers (gpuq.machine_markups(), from listings that contradicted
    a rent's price); the dearest where two providers share a machine id."""
    markups: dict[str, float] = {}
    for r in client.call("select machine_id, markup_dph from gpuq.machine_markups()"):
        markups[r["machine_id"]] = max(markups.get(r["machine_id"], 0.0), float(r["markup_dph"]))
    return markups


def _avoid_refused(m: Manager, action: Rent, e: ProviderError, result: TickResult) -> None:
    """An offer the provider refused (gone, a minimum bid the search did not tell) would be offered and
    refused again after every search refresh: leave its machine alone a while."""
    machine = action.offer.machine_id
    if not machine:
        return
    reason = f"offer {action.offer.offer_id} refused: {e}"
    m.client.call(
        "select gpuq.avoid_machine(%s, %s, %s, %s::interval)",
        (action.offer.provider, machine, reason, REFUSED_OFFER_AVOID),
    )
    _say(m, result, f"avoid machine {machine} for {REFUSED_OFFER_AVOID}: {reason}")


def _record_storage(m: Manager, offer: Offer, rented: str) -> None:
    """What the new instance bills while not running (loading, stopped), for the books (0007)."""
    if offer.storage_dph is None:
        return
    provider, provider_id = rented.split(":", 1)
    m.client.call(
        "select gpuq.record_storage_dph(%s, %s, %s::numeric)", (provider, provider_id, offer.storage_dph)
    )


def _act(m: Manager, action: Action, by_id: dict[str, DbInstance], result: TickResult) -> None:
    s, client = m.settings, m.client
    if isinstance(action, Rent):
        launch = s.launch[action.queue]
        offer = action.offer
        if offer.provider != launch.provider:
            # Offers of every provider go to the policy in one list; a queue rents from its own only.
            log.info("skip %s: queue %s rents from %s", _reason(action), action.queue, launch.provider)
            return
        provider = m.providers[offer.provider]
        # The instance's own secret: its worker acts as this instance and nothing else, and only until
        # the instance ends. The database keeps its hash; the worker replaces it when it registers.
        secret = new_secret()
        spec = launch_spec(s, action.queue, offer)
        spec = replace(spec, env={**spec.env, "GPUQ_INSTANCE_SECRET": secret})
        provider_id = provider.create(offer, spec)
        # A crash between create and this record leaves an orphan: the next tick destroys it by label
        # (its secret was never recorded, so its worker cannot touch a job meanwhile).
        try:
            row_id = _record_rent(m, action, provider_id, secret)
        except Exception as exc:
            # Not on the books (the database refused or did not answer): it must not bill unseen until a
            # later tick finds it. Destroy it now; if that is unconfirmed, the next tick destroys it by label.
            _, still = destroy_verified(provider, [provider_id], s.label_prefix)
            outcome = (
                "destroy not confirmed: the next tick destroys it as an orphan" if still else "destroyed it"
            )
            log.error(
                "rented %s %s but could not record it (%s); %s", offer.provider, provider_id, exc, outcome
            )
            raise ProviderError(
                f"rented {offer.provider} {provider_id} but could not record it ({exc}); {outcome}"
            ) from exc
        result.rented.append(f"{offer.provider}:{provider_id}")
        _say(m, result, f"{action.reason} -> {instance_name(row_id, offer.provider, provider_id)}")
    elif isinstance(action, Drain):
        client.drain_instance(int(action.instance.id), action.reason)
        result.drained.append(int(action.instance.id))
        _say(m, result, _named(action.reason, by_id.get(action.instance.id)))
    elif isinstance(action, Destroy):
        inst = by_id.get(action.instance.id)
        if inst is None:
            return
        if action.release_jobs:
            client.release_instance_jobs(inst.id)  # back in the queue now, not when the destroy is confirmed
        provider = m.providers.get(inst.provider)
        if inst.provider_instance_id and provider is not None:
            _, still = destroy_verified(provider, [inst.provider_instance_id], s.label_prefix)
            if still:
                # Still billing: keep it on the books as failed, so the caps count it and the next
                # tick destroys it again.
                client.call(
                    "select gpuq.mark_failed(%s, %s)", (inst.id, f"destroy not confirmed: {action.reason}")
                )
                result.reconcile.unverified.append(f"{inst.provider}:{inst.provider_instance_id}")
                raise ProviderError(f"{inst.provider} still lists {inst.provider_instance_id} after destroy")
        elif provider is None:
            raise ProviderError(f"instance {inst.id}: provider {inst.provider} is not enabled")
        client.call("select gpuq.record_destroy(%s, %s, %s)", (inst.id, action.reason, action.release_jobs))
        result.destroyed.append(inst.id)
        _say(m, result, _named(action.reason, inst))
    elif isinstance(action, AvoidMachine):
        provider = next((i.provider for i in by_id.values() if i.view.machine_id == action.machine_id), "any")
        if action.for_s is None:
            client.call("select gpuq.avoid_machine(%s, %s, %s)", (provider, action.machine_id, action.reason))
        else:
            client.call(
                "select gpuq.avoid_machine(%s, %s, %s, make_interval(secs => %s))",
                (provider, action.machine_id, action.reason, action.for_s),
            )
        _say(m, result, f"avoid machine {action.machine_id}: {action.reason}")
    elif isinstance(action, Hold):
        _say(m, result, action.reason)
    elif isinstance(action, ColdStop | ColdStart):
        # Only the simulator stops and starts instances so far; the providers cannot (cold_pool_s is 0
        # unless a configuration sets it, and config refuses it).
        raise ProviderError(f"{_reason(action)}: the cold pool needs a provider that can stop and start")


def instance_name(row_id: int | str, provider: str, provider_instance_id: str | None) -> str:
    """How log lines name an instance: the database id and the provider's, so rent and destroy lines
    about one machine say the same thing ("instance 3 (local:local-642e…)")."""
    return f"instance {row_id} ({provider}:{provider_instance_id or '?'})"


def _named(reason: str, inst: DbInstance | None) -> str:
    if inst is None:
        return reason
    return f"{reason} -> {instance_name(inst.id, inst.provider, inst.provider_instance_id)}"


def _renew_credentials(m: Manager, result: TickResult) -> None:
    """Each live instance's own storage credentials, issued or renewed before they expire; those rented
    this tick included, those destroyed excluded (manager/credentials.py)."""
    assert m.credentials is not None
    _, errors = m.credentials.renew(m.client)
    result.errors += errors


def _record_rent(m: Manager, action: Rent, provider_id: str, secret: str) -> int:
    """The rent on the books: its price, what it serves, how many jobs at once, its secret's hash.
    Answers the new row's id."""
    s, offer = m.settings, action.offer
    launch = s.launch[action.queue]
    rows = m.client.call(
        "select gpuq.record_rent(%s, %s, %s, %s, %s, %s, %s::int, %s::int, %s::numeric, %s, "
        "%s::text[], %s, %s::int, %s)",
        (
            offer.provider,
            provider_id,
            offer.offer_id,
            offer.machine_id,
            s.label(action.queue),
            offer.gpu_name,
            offer.num_gpus,
            offer.vram_mb,
            offer.dph,
            offer.interruptible,
            [action.queue],
            action.reason,
            launch.concurrency,
            secret_hash(secret),
        ),
    )
    return int(next(iter(rows[0].values())))


def _reason(action: Action) -> str:
    return action.reason


def _say(m: Manager, result: TickResult, line: str, *, echo: bool = False) -> None:
    result.lines.append(line)
    if echo:
        m.echo(line)
    else:
        log.info("%s", line)


def _record_metrics(m: Manager, snap: Snapshot, rec: ReconcileReport) -> None:
    mt = m.metrics
    instances: Counter[tuple[str, str]] = Counter()
    dph = dict.fromkeys(m.providers, 0.0)  # an enabled provider with nothing billing reads 0, not absent
    # the fleet after this tick's actions, not the snapshot it decided on
    for inst in managed_instances(m.client, m.settings.label_prefix):
        instances[(inst.provider, inst.status.value)] += 1
        dph[inst.provider] = dph.get(inst.provider, 0.0) + inst.dph
    # These describe now: a status, provider or queue seen last tick and gone since must not keep its
    # old value. Counted above first, so a scrape between clear and set finds them empty only briefly.
    for gauge in (mt.instances, mt.dph, mt.queue_queued, mt.queue_running, mt.queue_oldest_wait):
        gauge.clear()
    for (provider, status), n in instances.items():
        mt.instances.labels(provider, status).set(n)
    for provider, total in dph.items():
        mt.dph.labels(provider).set(total)
    for q in snap.queues:
        mt.queue_queued.labels(q.name).set(q.queued)
        mt.queue_running.labels(q.name).set(q.running)
        mt.queue_oldest_wait.labels(q.name).set(q.oldest_wait_s)
    mt.spend_today.set(snap.spend.today)
    mt.daily_budget.set(m.settings.policy.daily_budget)
    mt.max_total_dph.set(m.settings.policy.max_total_dph)
    mt.orphans_destroyed.inc(len(rec.orphans_destroyed))
    mt.lost.inc(len(rec.lost))
    mt.unverified_destroys.set(len(rec.unverified))
