"""Reconciliation: the provider's listing is the truth about what bills, the database about jobs.

Each tick, before deciding, for each provider: list every instance carrying our label and compare:
- listed, unknown to the database or ended there (terminated, lost): an orphan. It is recorded
  (adopt_orphan, so its cost is on the books) and destroyed;
- listed as stopped (an outbid interruptible instance: storage still bills, its processes are dead) or
  dead (exited, OCI error): marked failed (its jobs go back to the queue) and destroyed, and its machine
  avoided (a dead one for a week, an outbid one for OUTBID_AVOID: renting it again at the minimum bid
  would be outbid again);
- listed while the row is still `requested`: booting; a $/h different from ours: a price change, and when
  it bills more than it was rented at, the machine is marked up by the difference (its offers are priced
  at what it bills from then on, so the caps do not shed it and the next tick rent it again);
- every live row listed: its billing state (loading, running, stopped) for the books (see 0007);
- a live row the listing lacks: lost, its jobs released.
A failed listing changes nothing: an API outage must not mark the fleet lost.

Every destroy is verified by listing again and retried while the provider still shows the instance
(Vast has answered success and kept billing). One still listed after the retries stays on the books as
billing: a live row stays `failed` (the policy destroys it again next tick); an ended row's $/h is
reported in `other_dph` so the policy's caps count it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpuq.client import Client
from manager.policy import InstanceState
from manager.providers.base import Provider, ProviderError, ProviderInstance, ProviderStatus
from manager.state import DbInstance, managed_instances

log = logging.getLogger("gpuq.manager")

# A rent is recorded right after the provider answers; a listing may lag behind that a little.
NEW_ROW_GRACE_S = 60.0
DESTROY_ATTEMPTS = 3
OUTBID_AVOID = "1 hour"  # an outbid instance's machine is avoided this long (a dead one's for a week)
MARKUP_MIN_DPH = 0.001  # a listing above the booked price by less is rounding, not a markup
BILLING_STATE = {
    ProviderStatus.PROVISIONING: "loading",
    ProviderStatus.RUNNING: "active",
    ProviderStatus.STOPPED: "stopped",
    ProviderStatus.DEAD: "stopped",
}


@dataclass
class ReconcileReport:
    orphans_destroyed: list[str] = field(default_factory=list)  # "provider:id"
    lost: list[int] = field(default_factory=list)  # instance ids
    failed: list[int] = field(default_factory=list)  # stopped (outbid) or dead at the provider
    booting: list[int] = field(default_factory=list)
    price_changes: list[int] = field(default_factory=list)
    avoided: list[str] = field(default_factory=list)  # machines of dead or outbid instances
    markups: dict[str, float] = field(default_factory=dict)  # machine -> $/h it bills above its offers
    unverified: list[str] = field(default_factory=list)  # destroys the provider still lists
    errors: list[str] = field(default_factory=list)
    other_dph: float = 0.0  # billing outside the live rows (orphans we could not destroy)
    lines: list[str] = field(default_factory=list)  # what was done (or would be, in a dry run), and why

    def say(self, line: str) -> None:
        self.lines.append(line)
        log.info("%s", line)


def destroy_verified(
    provider: Provider, provider_ids: Iterable[str], label_prefix: str, attempts: int = DESTROY_ATTEMPTS
) -> tuple[set[str], set[str]]:
    """Destroy, then list to check; retry those still listed. Answers (gone, still listed)."""
    asked = set(provider_ids)
    pending = set(asked)
    for _ in range(attempts):
        if not pending:
            break
        for pid in sorted(pending):
            try:
                provider.destroy(pid)
            except ProviderError as e:
                log.warning("%s: destroy %s failed: %s", provider.name, pid, e)
        try:
            listed = {
                p.provider_id
                for p in provider.list_instances(label_prefix)
                if p.status != ProviderStatus.GONE
            }
        except ProviderError as e:
            log.warning("%s: cannot list to verify destroys: %s", provider.name, e)
            return set(), pending  # unverified: treated as still billing
        pending &= listed
    return asked - pending, pending


def _mark_up(
    client: Client,
    provider: str,
    machine: str,
    row: DbInstance,
    listed: float,
    markups: dict[str, float],
    report: ReconcileReport,
    dry_run: bool,
) -> None:
    """The machine bills more than its offer said: price its offers that much higher from now on.

    Measured against the price it was rented at (its offer's, plus the machine's markup then, most likely
    the one in force now), not the row's price, which follows the listings: a listing that dipped (a state
    Vast prices differently) and came back must not read as a markup."""
    rented = client.call("select gpuq.rented_dph(%s) as dph", (row.id,))[0]["dph"]
    rented = row.dph if rented is None else float(rented)
    if listed - rented <= MARKUP_MIN_DPH:
        return
    markup = round(listed - rented + markups.get(machine, 0.0), 6)
    verb = "would " if dry_run else ""
    report.say(
        f"{verb}price machine {machine}'s offers ${markup:.4f}/h higher: instance {row.id} on it bills "
        f"${listed:.4f}/h, rented at ${rented:.4f}/h"
    )
    report.markups[machine] = markup
    if not dry_run:
        client.call(
            "select gpuq.record_machine_markup(%s, %s, %s::numeric, %s)",
            (
                provider,
                machine,
                markup,
                f"instance {row.id} bills ${listed:.4f}/h, rented at ${rented:.4f}/h",
            ),
        )


def reconcile(
    client: Client,
    providers: Mapping[str, Provider],
    label_prefix: str,
    *,
    dry_run: bool = False,
) -> ReconcileReport:
    report = ReconcileReport()
    rows = managed_instances(client, label_prefix)
    age = {
        r["id"]: float(r["age"])
        for r in client.call(
            "select id, extract(epoch from now() - created_at) as age from gpuq.manager_instances()"
        )
    }
    for name, provider in providers.items():
        try:
            listed = provider.list_instances(label_prefix)
        except Exception as e:  # whatever one provider does wrong, the others are reconciled
            report.errors.append(f"{name}: {e}")
            log.warning("%s: cannot list instances, reconciling nothing there this tick: %s", name, e)
            continue
        live = {r.provider_instance_id: r for r in rows if r.provider == name and r.provider_instance_id}
        _reconcile_provider(client, provider, listed, live, age, label_prefix, report, dry_run)
    return report


def _reconcile_provider(
    client: Client,
    provider: Provider,
    listed: list[ProviderInstance],
    live: dict[str | None, DbInstance],
    age: dict[int, float],
    label_prefix: str,
    report: ReconcileReport,
    dry_run: bool,
) -> None:
    name = provider.name
    verb = "would " if dry_run else ""
    known = {
        r["provider_instance_id"]: r for r in client.call("select * from gpuq.manager_known(%s)", (name,))
    }
    markups = {
        r["machine_id"]: float(r["markup_dph"])
        for r in client.call("select * from gpuq.machine_markups() where provider = %s", (name,))
    }
    # provider id -> (instance row id or None, reason, $/h, is a live row)
    doomed: dict[str, tuple[int | None, str, float, bool]] = {}
    shown = {p.provider_id for p in listed if p.status != ProviderStatus.GONE}

    for p in listed:
        if p.status == ProviderStatus.GONE:
            continue
        row = live.get(p.provider_id)
        if row is None:
            k = known.get(p.provider_id)
            why = "unknown to the database" if k is None else f"{k['status']} in the database"
            reason = f"orphan: {name} instance {p.provider_id} ({p.label}) is {why}"
            report.say(f"{verb}destroy {reason}, billing ${p.dph or 0:.3f}/h")
            doomed[p.provider_id] = (k["id"] if k else None, reason, p.dph or 0.0, False)
            if not dry_run and k is None:
                adopted = client.call(
                    "select gpuq.adopt_orphan(%s, %s, %s, %s::numeric, %s, %s, %s) as id",
                    (name, p.provider_id, p.label, p.dph or 0, p.machine_id, p.gpu_name, p.started_at),
                )[0]["id"]
                doomed[p.provider_id] = (int(adopted), reason, p.dph or 0.0, True)
            continue
        if not dry_run:
            client.call(
                "select gpuq.record_billing_state(%s, %s, %s::numeric, %s)",
                (row.id, BILLING_STATE[p.status], p.storage_dph, f"{name}: {p.raw_status}"),
            )
        if p.status in (ProviderStatus.STOPPED, ProviderStatus.DEAD):
            if p.status == ProviderStatus.STOPPED:
                reason = f"stopped at {name} ({p.raw_status}): outbid or stopped; storage still bills"
            else:
                reason = f"dead at {name} ({p.raw_status}{': ' + p.status_msg if p.status_msg else ''})"
            report.say(
                f"{verb}destroy instance {row.id} ({name} {p.provider_id}): {reason}; releasing its jobs"
            )
            report.failed.append(row.id)
            machine = p.machine_id or row.view.machine_id
            if not dry_run:
                client.call("select gpuq.mark_failed(%s, %s)", (row.id, reason))
                if machine:
                    # Its next instance would end the same way: an exited machine was rented 10 times.
                    avoid_for = OUTBID_AVOID if p.status == ProviderStatus.STOPPED else "7 days"
                    client.call(
                        "select gpuq.avoid_machine(%s, %s, %s, %s::interval)",
                        (name, machine, f"instance {row.id} on it: {reason}", avoid_for),
                    )
            if machine:
                report.avoided.append(machine)
            doomed[p.provider_id] = (row.id, reason, row.dph, True)
            continue
        if row.status == InstanceState.REQUESTED:
            report.booting.append(row.id)
            if not dry_run:
                client.call("select gpuq.mark_booting(%s, %s)", (row.id, f"{name}: {p.raw_status}"))
        if p.dph is not None and abs(p.dph - row.dph) > 1e-6:
            report.say(
                f"{verb}record instance {row.id}'s price: ${row.dph:.4f}/h -> ${p.dph:.4f}/h "
                f"(as {name} bills)"
            )
            report.price_changes.append(row.id)
            if not dry_run:
                client.call(
                    "select gpuq.record_price_change(%s, %s::numeric, %s)", (row.id, p.dph, f"{name} listing")
                )
            machine = p.machine_id or row.view.machine_id
            if machine and p.dph - row.dph > MARKUP_MIN_DPH:
                _mark_up(client, name, machine, row, p.dph, markups, report, dry_run)

    for pid, row in live.items():
        if pid in shown:
            continue
        if row.status == InstanceState.REQUESTED and age.get(row.id, 0.0) < NEW_ROW_GRACE_S:
            continue  # just rented: the listing may not show it yet
        report.say(
            f"{verb}mark instance {row.id} ({name} {pid}) lost: {name} no longer shows it; releasing its jobs"
        )
        report.lost.append(row.id)
        if not dry_run:
            client.call("select gpuq.mark_lost(%s, %s)", (row.id, f"{name} no longer shows it"))

    if dry_run or not doomed:
        return
    gone, still = destroy_verified(provider, doomed, label_prefix)
    for pid in sorted(gone):
        db_id, reason, _, _ = doomed[pid]
        if db_id is not None:
            client.call("select gpuq.record_destroy(%s, %s, true)", (db_id, reason))
        if reason.startswith("orphan"):
            report.orphans_destroyed.append(f"{name}:{pid}")
    for pid in sorted(still):
        db_id, reason, dph, is_live = doomed[pid]
        report.unverified.append(f"{name}:{pid}")
        log.error(
            "%s: instance %s is still listed after %d destroys (%s); retrying next tick",
            name,
            pid,
            DESTROY_ATTEMPTS,
            reason,
        )
        if not is_live:
            report.other_dph += dph  # not among the live rows: the caps must count it here
