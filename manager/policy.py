"""The scaling policy: one pure function from what is (queues, instances, offers, spend) to what to do.

`decide` reads no clock, does no I/O and is deterministic; `tick`, `run`, `--dry-run` and `simulate` all
call it. Each tick it works through, in order:

1. health: destroy failed instances, instances that never became ready within the ready timeout (and
   avoid their machine from then on), silent instances past the heartbeat timeout (releasing their jobs),
   and draining instances that are done or past the drain timeout;
2. money: while the daily budget could be crossed, or the $/h now billing is above the total cap, shed
   instances (idle and booting ones are destroyed, busy ones drained), the dearest first; a machine whose
   instance is shed before it was ready is avoided for `shed_avoid_s` (it may be stuck, and renting it
   again would pay its boot again);
3. each queue: outside its allowed hours scale to zero (drain what is busy); otherwise work out the
   instances needed, or scale in (idle instances past the idle timeout; busy surplus is drained, never
   destroyed), never below min or above max;
4. rents, shared between the queues that need more: round by round, one rent per queue per round, the
   queue with the fewest instances first, each taking its offer cheapest per job that fits the caps. A
   queue with work and no instance that the caps leave out gets room made: one instance of the queue with
   the most (two or more) is stopped when that lets the first rent fit, so every queue with work makes
   progress; a queue with work that gets nothing more has a `Hold` saying why.

Instances needed, while any job is queued or running, = max(ceil((queued + running) / target jobs per
instance), ceil(recent load / target utilisation)), clamped to [min, max]. The first term reacts to a
backlog; the second keeps capacity at what the measured load needs (as Vast's serverless autoscaler does),
so a fleet under steady load can shrink too: with random claiming, nobody idles long enough for an idle
timeout. Scale-in by load waits until the rest would run below `scale_in_at` (hysteresis), the
last hour's arrivals would not load the rest past `target_utilisation` (a 20-minute mean dips), and no
rented instance is still booting, never takes the last instance (the idle timeout does that), and drains
rather than destroys a busy one.
Offers are ranked by expected $ per job ($/h over measured jobs/h on this queue, or over its arrival rate
when that is lower); untried GPU types get an optimistic guess so they are tried. An offer without a
usable price (not a number, negative) is never rented, and one on a machine that billed more than its
offer said (`price_markups`, from the provider's listings) is priced at what that machine bills.

Money rule: a rent is allowed only if spend today + Σ dph × hours each instance may still bill today
stays within the daily budget. An instance may bill until the end of the budget day, or, for a queue with
allowed hours, until its window closes plus the drain timeout (busy instances are drained at the close,
and a drain that overruns is cut) plus `billing_lag_s` (tick interval and destroy latency). Every live
instance counts with that bound, so rents never plan money past the cap; spend that was not planned
(`Spend.other_dph`, prices that changed) makes step 2 shed.

An instance serving several queues is counted against its first queue only.

Cost levers (issue 12; each off by default): a break-even hold keeps one idle instance past its idle
timeout while the queue's arrivals say its next job comes before idling would cost a reboot (`reboot_s`,
`reboot_usd`); pre-warming rents, `prewarm_s` before a window opens, what the history's forecast for its
first hour needs, and in the window keeps what the next hour's forecast needs (`QueueSnapshot.forecast_*`,
from gpuq.queue_forecast()); the cold pool (`cold_pool_s`; the simulator's only so far) stops idle
instances instead of destroying them and starts them again before renting; packing (`QueuePolicy.packs`;
the simulator's only so far) counts small queues' work on a bigger queue's instances.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from manager.providers.base import Offer, OfferFilter, is_price


class InstanceState(StrEnum):
    REQUESTED = "requested"
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    TERMINATED = "terminated"
    FAILED = "failed"
    LOST = "lost"
    # In the cold pool: stopped with its models on disk, only the disk billing (its view's dph says so).
    # Only the simulator has it so far: the providers cannot stop and start yet.
    STOPPED = "stopped"


# States in which an instance may be billing us. A failed instance bills until it is destroyed;
# terminated and lost ones are gone at the provider.
BILLING_STATES = frozenset(
    {
        InstanceState.REQUESTED,
        InstanceState.BOOTING,
        InstanceState.IDLE,
        InstanceState.BUSY,
        InstanceState.DRAINING,
        InstanceState.FAILED,
        InstanceState.STOPPED,
    }
)
_STARTING = frozenset({InstanceState.REQUESTED, InstanceState.BOOTING})
_READY = frozenset({InstanceState.IDLE, InstanceState.BUSY, InstanceState.DRAINING})


@dataclass(frozen=True)
class InstanceView:
    id: str
    provider: str
    queues: tuple[str, ...]
    state: InstanceState
    dph: float
    gpu_name: str
    machine_id: str | None
    created_at: datetime
    ready_at: datetime | None = None
    last_heartbeat_at: datetime | None = None
    last_job_at: datetime | None = None  # when a job last started or finished on it
    running_jobs: int = 0
    draining_since: datetime | None = None
    stopped_at: datetime | None = None  # when it went into the cold pool

    @property
    def queue(self) -> str:
        return self.queues[0] if self.queues else ""

    @property
    def busy(self) -> bool:
        # From the jobs it holds, not its status: 'busy' is set at a claim and cleared by the next heartbeat
        # (15 s by default), so an instance that has just finished its last job would read busy until then.
        return self.running_jobs > 0


@dataclass(frozen=True)
class QueueSnapshot:
    name: str
    queued: int  # claimable now (backoff passed)
    running: int
    oldest_wait_s: float = 0.0
    recent_load: float | None = None  # mean running jobs over the last ~20 minutes; None: unknown
    arrivals_per_hour: float | None = None  # jobs enqueued per hour over the last hour; None: unknown
    last_rent_at: datetime | None = None  # the queue's latest rent, for the scale-in cooldown
    # Measured from finished jobs of this queue: GPU name -> jobs per busy hour.
    throughput: Mapping[str, float] = field(default_factory=dict)
    paused: bool = False  # an operator paused the queue (gpuq.pause_queue): nothing is claimed or rented
    # From the job history (gpuq.queue_forecast()): jobs expected over the next hour and the GPU-seconds
    # they will keep busy (at the speed of the GPUs that ran them). None: no history.
    forecast_jobs: float | None = None
    forecast_busy_s: float | None = None


@dataclass(frozen=True)
class Spend:
    today: float  # $ billed since the start of the budget day
    other_dph: float = 0.0  # $/h billing outside `instances` (orphans being destroyed, stopped disks)


@dataclass(frozen=True)
class Window:
    """Allowed hours, local wall time. end <= start crosses midnight; start == end is the whole day."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> Window:
        start, end = (time.fromisoformat(part.strip()) for part in text.replace("–", "-").split("-"))
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True)
class QueuePolicy:
    target_jobs_per_instance: float = 2.0  # queued + running per instance before renting more
    target_utilisation: float = 0.85  # rent when recent load / instances goes above this
    # Give an instance back only when the rest would run below this: the band up to target_utilisation
    # keeps a load that wobbles from renting and draining by turns (each cycle pays a boot). None: 0.8, or
    # target_utilisation if lower. 0.8: with the arrivals check in `_scale_in` it is cheaper than 0.65 on
    # all three shipped traces, p95 wait about the same; before that check, 0.72 and above let the steady
    # trace's p95 wait jump.
    scale_in_utilisation: float | None = None
    min_instances: int = 0
    max_instances: int = 4
    idle_timeout_s: float = 600.0
    offer_filter: OfferFilter = field(default_factory=OfferFilter)
    windows: tuple[Window, ...] = ()  # empty: any hour
    tz: str = "UTC"
    # Small queues this queue's instances also serve (packing): their work is counted here, and they rent
    # nothing of their own. Their requirements must be met by this queue's offers.
    packs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive("target_jobs_per_instance", self.target_jobs_per_instance)
        _positive("target_utilisation", self.target_utilisation, most=1.0)
        if self.scale_in_utilisation is not None:
            _positive("scale_in_utilisation", self.scale_in_utilisation, most=self.target_utilisation)
        _not_negative("idle_timeout_s", self.idle_timeout_s)
        if not 0 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 0 <= min_instances <= max_instances, got {self.min_instances} and {self.max_instances}"
            )
        if self.offer_filter.max_dph is not None:
            _positive("offer max_dph", self.offer_filter.max_dph)
        _known_zone("tz", self.tz)  # an unknown time zone fails here, not at the first tick

    @property
    def scale_in_at(self) -> float:
        if self.scale_in_utilisation is not None:
            return self.scale_in_utilisation
        return min(0.8, self.target_utilisation)


@dataclass(frozen=True)
class PolicySettings:
    queues: Mapping[str, QueuePolicy]
    max_total_dph: float  # $/h of everything billing, rents included
    daily_budget: float  # $ per budget day
    budget_tz: str = "UTC"  # the budget day runs midnight to midnight here
    ready_timeout_s: float = 1200.0
    heartbeat_timeout_s: float = 120.0
    drain_timeout_s: float = 900.0  # a drain that takes longer is cut, its jobs released
    cooldown_s: float = 300.0  # no scale-in this soon after the queue's last rent
    min_window_left_s: float = 900.0  # no rent this close to the window's end: it would boot for nothing
    billing_lag_s: float = 300.0  # how long billing may outlast a decision to stop it
    shed_avoid_s: float = 3600.0  # a machine whose instance the caps shed before it was ready is avoided
    # An untried GPU type is ranked as if this many times faster than the fastest measured one, so each
    # type that could be cheaper per job gets tried; 1.0 never explores.
    explore_factor: float = 1.5
    # What a new instance costs before its first job: seconds from rent to ready (billing) and $ of
    # downloads. With either set, an idle instance past its idle timeout is kept while the queue's arrivals
    # say it will be reused before its idling costs more than booting another (break-even hold).
    reboot_s: float = 0.0
    reboot_usd: float = 0.0
    # Pre-warming: this long before a queue's window opens, rent what the job history forecasts for the
    # first hour, and in the window keep at least the instances the next hour's forecast needs. 0: off.
    prewarm_s: float = 0.0
    # The cold pool: an instance idle `cold_idle_s` is stopped (disk kept, only storage bills) instead of
    # destroyed, and started again before renting; one stopped longer than `cold_pool_s` is destroyed.
    # 0: off (a provider must support stop and start; the simulator does).
    cold_pool_s: float = 0.0
    cold_idle_s: float = 120.0

    def __post_init__(self) -> None:
        # A nan cap would pass every "over the cap?" test: the money settings must be plain numbers.
        for name in (
            "max_total_dph",
            "daily_budget",
            "ready_timeout_s",
            "heartbeat_timeout_s",
            "drain_timeout_s",
            "cooldown_s",
            "min_window_left_s",
            "billing_lag_s",
            "shed_avoid_s",
            "reboot_s",
            "reboot_usd",
            "prewarm_s",
            "cold_pool_s",
            "cold_idle_s",
        ):
            _not_negative(name, getattr(self, name))
        if not self.explore_factor >= 1.0:
            raise ValueError(f"explore_factor must be at least 1, got {self.explore_factor!r}")
        _known_zone("budget_tz", self.budget_tz)


def _known_zone(name: str, tz: str) -> None:
    try:
        _zone(tz)
    except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"{name}: unknown time zone {tz!r}") from None


def _not_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def _positive(name: str, value: float, most: float = math.inf) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= most):
        limit = f" and at most {most:g}" if most < math.inf else ""
        raise ValueError(f"{name} must be a number above 0{limit}, got {value!r}")


@dataclass(frozen=True)
class Rent:
    queue: str
    offer: Offer
    reason: str


@dataclass(frozen=True)
class Drain:
    instance: InstanceView
    reason: str


@dataclass(frozen=True)
class Destroy:
    instance: InstanceView
    reason: str
    release_jobs: bool  # hand its running jobs back to the queue


@dataclass(frozen=True)
class AvoidMachine:
    machine_id: str
    reason: str
    for_s: float | None = None  # how long; None: the default (a week)


@dataclass(frozen=True)
class Hold:
    """A queue with work that gets no instance this tick, and why (nothing to act on: a log line)."""

    queue: str
    reason: str


@dataclass(frozen=True)
class ColdStop:
    """Stop an idle instance into the cold pool: its disk (models downloaded) is kept and billed."""

    instance: InstanceView
    reason: str


@dataclass(frozen=True)
class ColdStart:
    """Start a stopped instance again: seconds, not a fresh pull (refused if its host's GPU was taken)."""

    instance: InstanceView
    reason: str


Action = Rent | Drain | Destroy | AvoidMachine | Hold | ColdStop | ColdStart


def decide(
    queues: list[QueueSnapshot],
    instances: list[InstanceView],
    offers: list[Offer],
    settings: PolicySettings,
    now: datetime,
    *,
    spend: Spend,
    avoided_machines: frozenset[str] = frozenset(),
    price_markups: Mapping[str, float] | None = None,
) -> list[Action]:
    """`price_markups`: machine id -> $/h that machine billed above what its offer said (its listing
    contradicted the price it was rented at); its offers are priced that much higher."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    plan = _Plan(settings, now, spend)
    live = sorted((i for i in instances if i.state in BILLING_STATES), key=lambda i: i.id)
    for inst in live:
        plan.bills(inst.id, inst.dph, plan.billing_end(inst))
    snapshots = _packed({q.name: q for q in queues}, settings)
    offers = [_priced(o, price_markups or {}) for o in offers]

    _check_health(plan, live, avoided_machines)
    _enforce_money_caps(plan, live, avoided_machines)
    wants = []
    packed = {q for p in settings.queues.values() for q in p.packs}
    for name in sorted((set(settings.queues) | {i.queue for i in live}) - packed):
        snapshot = snapshots.get(name) or QueueSnapshot(name, 0, 0)
        want = _scale_queue(plan, snapshot, live)
        if want is not None:
            wants.append(want)
    _rent_fairly(plan, wants, live, offers, avoided_machines)
    return plan.actions


def _packed(snapshots: dict[str, QueueSnapshot], settings: PolicySettings) -> dict[str, QueueSnapshot]:
    """A queue that packs small queues sees their work as its own (its instances serve them too)."""
    merged = dict(snapshots)
    for name, policy in settings.queues.items():
        small = [snapshots[q] for q in policy.packs if q in snapshots]
        if not small:
            continue
        host = snapshots.get(name) or QueueSnapshot(name, 0, 0)
        every = [host, *small]

        def total(attr: str, every: list[QueueSnapshot] = every) -> float | None:
            values = [getattr(q, attr) for q in every]
            return None if all(v is None for v in values) else sum(v or 0.0 for v in values)

        throughput = dict(host.throughput)
        merged[name] = replace(
            host,
            queued=sum(q.queued for q in every),
            running=sum(q.running for q in every),
            oldest_wait_s=max(q.oldest_wait_s for q in every),
            recent_load=total("recent_load"),
            arrivals_per_hour=host.arrivals_per_hour,  # jobs/h measured are the host's kind of job
            throughput=throughput,
            forecast_jobs=total("forecast_jobs"),
            forecast_busy_s=total("forecast_busy_s"),
        )
    return merged


def _priced(offer: Offer, markups: Mapping[str, float]) -> Offer:
    markup = markups.get(offer.machine_id or "", 0.0)
    if not (is_price(markup) and markup > 0) or not is_price(offer.dph):
        return offer
    return replace(offer, dph=round(offer.dph + markup, 6))


class _Plan:
    """The actions of one tick and the billing they leave, so later steps see earlier ones."""

    def __init__(self, settings: PolicySettings, now: datetime, spend: Spend) -> None:
        self.settings = settings
        self.now = now
        self.spend = spend
        self.day_end = _next_midnight(now, settings.budget_tz)
        self.actions: list[Action] = []
        self.acted: set[str] = set()  # instances destroyed or drained this tick: they stop billing soon
        self.avoided: set[str] = set()
        self.billing: dict[str, tuple[float, datetime]] = {}  # id -> (dph, latest it may bill until)

    def bills(self, key: str, dph: float, until: datetime) -> None:
        self.billing[key] = (dph, until)

    def total_dph(self, *, stopping: bool = True) -> float:
        """$/h billing; with stopping=False, what stays once this tick's destroys and drains are done."""
        kept = (dph for key, (dph, _) in self.billing.items() if stopping or key not in self.acted)
        return sum(kept) + self.spend.other_dph

    def projected_spend(self) -> float:
        """The most today's spend can reach if nothing more is rented."""
        total = self.spend.today + self.spend.other_dph * _hours(self.now, self.day_end)
        for dph, until in self.billing.values():
            total += dph * _hours(self.now, min(until, self.day_end))
        return total

    def billing_end(self, inst: InstanceView) -> datetime:
        """The latest an instance may bill, given how the policy will stop it."""
        lag = timedelta(seconds=self.settings.billing_lag_s)
        drain = timedelta(seconds=self.settings.drain_timeout_s)
        if inst.state == InstanceState.DRAINING:
            return (inst.draining_since or self.now) + drain + lag
        if inst.state == InstanceState.FAILED:
            return self.now + lag
        return self.queue_end(inst.queue)

    def queue_end(self, queue: str) -> datetime:
        """The latest an instance of `queue` rented now may bill."""
        lag = timedelta(seconds=self.settings.billing_lag_s)
        drain = timedelta(seconds=self.settings.drain_timeout_s)
        policy = self.settings.queues.get(queue)
        if policy is None:  # unconfigured queues are scaled to zero
            return self.now + drain + lag
        if not policy.windows:
            return self.day_end
        closes = window_closes_at(policy, self.now)
        opens = next_window_opens_at(policy, self.now)
        if closes is None and opens is not None and _seconds(self.now, opens) <= self.settings.prewarm_s:
            closes = window_closes_at(policy, opens)  # pre-warming: it bills through the coming window
        return (closes or self.now) + drain + lag

    def destroy(self, inst: InstanceView, reason: str, *, release_jobs: bool) -> None:
        self.actions.append(Destroy(inst, reason, release_jobs))
        self.acted.add(inst.id)
        self.bills(inst.id, inst.dph, self.now + timedelta(seconds=self.settings.billing_lag_s))

    def drain(self, inst: InstanceView, reason: str) -> None:
        self.actions.append(Drain(inst, reason))
        self.acted.add(inst.id)
        s = self.settings
        self.bills(inst.id, inst.dph, self.now + timedelta(seconds=s.drain_timeout_s + s.billing_lag_s))

    def cold_stop(self, inst: InstanceView, reason: str) -> None:
        """Stop an idle instance into the cold pool: its GPU stops billing now."""
        self.actions.append(ColdStop(inst, reason))
        self.acted.add(inst.id)
        self.bills(inst.id, 0.0, self.now)

    def stop(self, inst: InstanceView, reason: str) -> None:
        """Scale an instance down the gentle way: destroy it when it has no job, else drain it."""
        if inst.busy:
            self.drain(inst, reason)
        else:
            self.destroy(inst, reason, release_jobs=False)

    def avoid(
        self, machine_id: str | None, reason: str, already: frozenset[str], for_s: float | None = None
    ) -> None:
        if machine_id and machine_id not in already and machine_id not in self.avoided:
            self.avoided.add(machine_id)
            self.actions.append(AvoidMachine(machine_id, reason, for_s))

    def fits(self, dph: float, until: datetime) -> str | None:
        """None when a rent billing `dph` until `until` fits the caps; else which cap it crosses."""
        s = self.settings
        billing = self.total_dph()
        if billing + dph > s.max_total_dph:
            return f"total cap: ${billing:.2f}/h billing + ${dph:.2f}/h > ${s.max_total_dph:.2f}/h"
        key = "rent:?"
        self.bills(key, dph, until)
        projected = self.projected_spend()
        del self.billing[key]
        if projected > s.daily_budget:
            return f"daily budget: spend today could reach {_over(projected, s.daily_budget)}"
        return None


def _check_health(plan: _Plan, live: list[InstanceView], avoided: frozenset[str]) -> None:
    s, now = plan.settings, plan.now
    for inst in live:
        if inst.state == InstanceState.FAILED:
            plan.destroy(inst, f"destroy {inst.id}: failed to start", release_jobs=True)
            plan.avoid(inst.machine_id, f"machine of {inst.id} failed to start", avoided)
        elif inst.state in _STARTING:
            age = _seconds(inst.created_at, now)
            if age >= s.ready_timeout_s:
                why = f"not ready after {_duration(age)} (ready timeout {_duration(s.ready_timeout_s)})"
                plan.destroy(inst, f"destroy {inst.id}: {why}", release_jobs=True)
                plan.avoid(inst.machine_id, f"{inst.id} on it was {why}", avoided)
        elif inst.state in _READY:
            heard = max(t for t in (inst.last_heartbeat_at, inst.ready_at, inst.created_at) if t is not None)
            silent = _seconds(heard, now)
            if silent >= s.heartbeat_timeout_s:
                why = f"no heartbeat for {silent:.0f} s, releasing its {inst.running_jobs} job(s)"
                plan.destroy(inst, f"destroy {inst.id}: {why}", release_jobs=True)
            elif inst.state == InstanceState.DRAINING and not inst.busy:
                plan.destroy(inst, f"destroy {inst.id}: drained", release_jobs=False)
            elif inst.state == InstanceState.DRAINING:
                draining = _seconds(inst.draining_since or now, now)
                if draining >= s.drain_timeout_s:
                    why = f"still draining after {draining / 60:.0f} min, releasing its jobs"
                    plan.destroy(inst, f"destroy {inst.id}: {why}", release_jobs=True)


def _enforce_money_caps(plan: _Plan, live: list[InstanceView], avoided: frozenset[str]) -> None:
    s = plan.settings
    # Idle first (nothing lost), then booting (only boot time lost), then busy (drained); dearest first.
    order = {
        InstanceState.STOPPED: -1,
        InstanceState.IDLE: 0,
        InstanceState.REQUESTED: 1,
        InstanceState.BOOTING: 1,
    }
    candidates = [i for i in live if i.id not in plan.acted and i.state != InstanceState.DRAINING]
    candidates.sort(key=lambda i: (2 if i.busy else order.get(i.state, 2), -i.dph, i.id))
    for inst in candidates:
        projected, dph = plan.projected_spend(), plan.total_dph(stopping=False)
        if projected > s.daily_budget:
            why = f"spend today could reach {_over(projected, s.daily_budget)}"
        elif dph > s.max_total_dph:
            why = f"billing ${dph:.2f}/h > cap ${s.max_total_dph:.2f}/h"
        else:
            return
        plan.stop(inst, f"stop {inst.id}: {why}")
        if inst.state in _STARTING and s.shed_avoid_s > 0:
            # Shed before it was ready: renting its machine again at once would pay the boot again (and
            # a machine stuck loading would be rented and shed over and over, never reaching its timeout).
            age = _duration(_seconds(inst.created_at, plan.now))
            reason = f"{inst.id} on it shed after {age} booting ({why})"
            plan.avoid(inst.machine_id, reason, avoided, s.shed_avoid_s)


@dataclass
class _Want:
    """A queue that needs more instances this tick: how many, and what it got."""

    snap: QueueSnapshot
    policy: QueuePolicy
    have: int
    count: int
    status: str
    rank: _Ranker
    got: int = 0
    blocked: str | None = None  # why its last try found nothing
    by_money: bool = False  # it was the caps (total $/h or the daily budget), not the offers


def _scale_queue(plan: _Plan, snap: QueueSnapshot, live: list[InstanceView]) -> _Want | None:
    """Scale in (or stop, outside the queue's hours); answers what the queue needs rented, if anything."""
    policy = plan.settings.queues.get(snap.name)
    mine = [i for i in live if i.queue == snap.name and i.id not in plan.acted]
    pool = [i for i in mine if i.state in _STARTING or i.state in (InstanceState.IDLE, InstanceState.BUSY)]
    cold = [i for i in mine if i.state == InstanceState.STOPPED]
    if policy is None:
        for inst in pool + cold:
            plan.stop(inst, f"stop {inst.id}: queue {snap.name} is not configured")
        return None
    prewarm = _prewarm(plan.settings, plan.now, snap, policy)
    if not in_window(policy, plan.now) and prewarm is None:
        hours = ", ".join(str(w) for w in policy.windows)
        for inst in pool + cold:
            plan.stop(inst, f"stop {inst.id}: queue {snap.name} outside allowed hours {hours} {policy.tz}")
        return None
    for inst in cold:
        cold_s = _seconds(inst.stopped_at or inst.created_at, plan.now)
        if cold_s >= plan.settings.cold_pool_s:
            plan.destroy(inst, f"destroy {inst.id}: cold for {_duration(cold_s)}", release_jobs=False)
    cold = [i for i in cold if i.id not in plan.acted]

    needed = instances_needed(snap, policy)
    why_more = ""
    if prewarm is not None:
        count, why_more = prewarm
        if in_window(policy, plan.now) and plan.settings.cold_pool_s > 0:
            # In the window a stopped instance is seconds away: the forecast's spares may wait cold, so
            # the floor counts them, and running ones beyond the demand may go cold.
            if len(pool) + len(cold) >= count:
                count = 0
            else:
                count -= len(cold)
            why_more += f" ({len(cold)} of them cold)" if cold else ""
        needed = max(needed, count)
    have = len(pool)
    status = f"{snap.queued} queued, {snap.running} running, {have} instance(s), need {needed}{why_more}"
    rank = _Ranker(snap, plan.settings.explore_factor)
    if have > policy.max_instances:
        # Over max (it was lowered): shed what costs least to lose, whatever the cooldown.
        pool.sort(key=lambda i: (i.busy, i.state in _STARTING, -rank.cost_per_job(i.gpu_name, i.dph), i.id))
        for inst in pool[: have - policy.max_instances]:
            plan.stop(inst, f"stop {inst.id}: queue {snap.name} above max {policy.max_instances}: {status}")
        pool, have = pool[have - policy.max_instances :], policy.max_instances
    if have > needed:
        _scale_in(plan, snap, policy, pool, needed, status, rank)
    elif needed > have:
        # The cold pool first: a start takes seconds and downloads nothing.
        cold.sort(key=lambda i: (rank.cost_per_job(i.gpu_name, i.dph), i.id))
        for inst in cold[: needed - have]:
            plan.actions.append(ColdStart(inst, f"start {_name(inst)} from the cold pool: {status}"))
            plan.acted.add(inst.id)
            have += 1
        if needed > have:
            return _Want(snap, policy, have, needed - have, status, rank)
    return None


def instances_wanted(
    settings: PolicySettings, snap: QueueSnapshot, policy: QueuePolicy, now: datetime
) -> int:
    """How many instances the queue may want rented now: the demand's within its hours, or the forecast's
    when pre-warming applies (before the window opens too). The tick searches offers only below this."""
    prewarm = _prewarm(settings, now, snap, policy)
    needed = instances_needed(snap, policy) if in_window(policy, now) else 0
    return max(needed, prewarm[0] if prewarm is not None else 0)


def _prewarm(
    s: PolicySettings, now: datetime, snap: QueueSnapshot, policy: QueuePolicy
) -> tuple[int, str] | None:
    """Instances the next hour's forecast needs ready (and why), when pre-warming applies: within the
    window, or `prewarm_s` before it opens. None: no forecast, pre-warming off, or too early."""
    if s.prewarm_s <= 0 or snap.paused or not snap.forecast_jobs or not snap.forecast_busy_s:
        return None
    opens = next_window_opens_at(policy, now)
    if opens is not None and opens > now:
        if _seconds(now, opens) > s.prewarm_s:
            return None
        when = f"window opens in {_duration(_seconds(now, opens))}"
    else:
        closes = window_closes_at(policy, now)
        if closes is not None and _seconds(now, closes) < s.min_window_left_s:
            return None
        when = "next hour"
    load = snap.forecast_busy_s / 3600
    count = min(policy.max_instances, max(1, math.ceil(load / policy.target_utilisation)))
    return count, (
        f"; forecast {snap.forecast_jobs:.0f} jobs, {load:.2f} GPUs busy ({when}): keep {count} ready"
    )


def _name(inst: InstanceView) -> str:
    return f"instance {inst.id}"


def _worth_holding(plan: _Plan, snap: QueueSnapshot, inst: InstanceView, rank: int) -> bool:
    """Break-even hold: keep one idle instance past its idle timeout while the wait for the job that
    would reuse it costs less than booting another (the wait: the queue's mean gap between arrivals)."""
    s = plan.settings
    if snap.paused:  # its arrivals cannot be claimed: holding for them only bills
        return False
    if (s.reboot_s <= 0 and s.reboot_usd <= 0) or not snap.arrivals_per_hour:
        return False
    if rank > 1:
        # One spare is what a trickle needs; more is what a fading burst leaves behind (held, the second
        # and later ones cost bursty_launch more than they saved in boots).
        return False
    reboot = s.reboot_s * inst.dph / 3600 + s.reboot_usd
    wait_s = rank * 3600 / snap.arrivals_per_hour
    return wait_s * inst.dph / 3600 < reboot


def instances_needed(snap: QueueSnapshot, policy: QueuePolicy) -> int:
    if snap.paused:  # rent nothing for it; what it has idles out (the idle timeout), busy ones finish
        return 0
    by_backlog = math.ceil((snap.queued + snap.running) / policy.target_jobs_per_instance)
    # With nothing queued or running the idle timeout alone decides how long to stay warm.
    busy_now = snap.queued + snap.running > 0
    by_load = math.ceil(snap.recent_load / policy.target_utilisation) if snap.recent_load and busy_now else 0
    return max(policy.min_instances, min(policy.max_instances, max(by_backlog, by_load)))


def _scale_in(
    plan: _Plan,
    snap: QueueSnapshot,
    policy: QueuePolicy,
    pool: list[InstanceView],
    needed: int,
    status: str,
    rank: _Ranker,
) -> None:
    now = plan.now
    if snap.last_rent_at is not None and _seconds(snap.last_rent_at, now) < plan.settings.cooldown_s:
        return  # demand rose a moment ago: hold capacity rather than flap
    surplus = len(pool) - needed
    idle = [i for i in pool if i.state in (InstanceState.IDLE, InstanceState.BUSY) and not i.busy]
    idle.sort(key=lambda i: (-rank.cost_per_job(i.gpu_name, i.dph), -_idle_seconds(i, now), i.id))
    s = plan.settings
    closes = window_closes_at(policy, now)
    cold_ok = s.cold_pool_s > 0 and (closes is None or _seconds(now, closes) >= s.min_window_left_s)
    held = 0
    for inst in reversed(idle):  # the cheapest per job is the one to hold
        if surplus <= 0:
            break
        idle_s = _idle_seconds(inst, now)
        # The queue's last running instance is not stopped at cold_idle_s: a restart refused (its host
        # taken) falls back to a full boot, which a trickle queue's next job would wait for.
        last = sum(1 for i in pool if i.id not in plan.acted) <= 1
        to_cold = f"stop {_name(inst)} into the cold pool: idle {_duration(idle_s)}, {status}"
        if cold_ok and not last and idle_s >= min(s.cold_idle_s, policy.idle_timeout_s):
            plan.cold_stop(inst, to_cold)
            surplus -= 1
        elif idle_s >= policy.idle_timeout_s:
            if _worth_holding(plan, snap, inst, held + 1):
                held += 1
                continue
            if cold_ok:
                plan.cold_stop(inst, to_cold)
            else:
                plan.destroy(
                    inst, f"destroy {inst.id}: idle {_duration(idle_s)}, {status}", release_jobs=False
                )
            surplus -= 1
    if held:
        return  # a spare held on purpose is not for the load rule below to take
    # Under steady load nobody idles for the idle timeout, yet the measured load may need fewer
    # instances: then give back one per tick, the dearest per job, an idle one if any, else drain a busy
    # one (a drain only lets its running job finish). Only with a measured load and an empty queue.
    if surplus <= 0 or snap.recent_load is None or snap.queued > 0:
        return
    if any(i.state in _STARTING for i in pool):
        return  # capacity asked for has not arrived yet
    # Going to zero is the idle timeout's call alone: a quiet queue keeps one warm that long.
    if len(pool) < 2 or snap.recent_load > (len(pool) - 1) * policy.scale_in_at:
        return
    rest = [i for i in pool if i.id not in plan.acted]
    if not rest:
        return
    worst = max(rest, key=lambda i: (not i.busy, rank.cost_per_job(i.gpu_name, i.dph), i.id))
    # The load is a 20-minute mean and dips by chance; the hour's arrivals against what the rest can do
    # (measured jobs/h) say whether the dip is real. Without this a fleet at 1 job/min, one A40's
    # capacity, went from two to one on a dip and queued for a new boot minutes later.
    keep = rank.capacity_per_hour(i.gpu_name for i in pool if i is not worst)
    arrivals = snap.arrivals_per_hour
    if arrivals and keep is not None and arrivals > policy.target_utilisation * keep:
        return
    why = f"recent load {snap.recent_load:.2f} needs fewer: {status}"
    if worst.busy:
        plan.drain(worst, f"drain {worst.id}: {why}")
    else:
        plan.destroy(worst, f"destroy {worst.id}: {why}", release_jobs=False)


def _rent_fairly(
    plan: _Plan, wants: list[_Want], live: list[InstanceView], offers: list[Offer], avoided: frozenset[str]
) -> None:
    """Rent for every queue that needs more, sharing the caps: one rent per queue per round, the queue
    with the fewest instances first (then the longest wait), until no queue can rent more. Then a queue
    with work still left with nothing gets room made, or a Hold saying why."""
    s, now = plan.settings, plan.now
    in_use = {i.machine_id for i in live if i.machine_id} | plan.avoided | set(avoided)
    taken: set[str] = set()
    active = []
    for w in wants:
        closes = window_closes_at(w.policy, now)
        if closes is not None and _seconds(now, closes) < s.min_window_left_s:
            w.blocked = f"its allowed hours close in {_duration(_seconds(now, closes))}"
        else:
            active.append(w)
    while active:
        active.sort(key=lambda w: (w.have + w.got, -w.snap.oldest_wait_s, w.snap.name))
        for w in list(active):
            offer = _pick(plan, w, offers, in_use, taken)
            if offer is None:
                active.remove(w)
                continue
            est = w.rank.cost_per_job(offer.gpu_name, offer.dph)
            per_job = f"${est:.4f}/job" if w.rank.known(offer.gpu_name) else "untried GPU"
            reason = (
                f"rent offer {offer.offer_id} ({offer.gpu_name}) at ${offer.dph:.2f}/h for queue "
                f"{w.snap.name}: {w.status}; {per_job}"
            )
            plan.actions.append(Rent(w.snap.name, offer, reason))
            plan.bills(f"rent:{offer.offer_id}", offer.dph, plan.queue_end(w.snap.name))
            taken.add(offer.offer_id)
            if offer.machine_id:
                in_use.add(offer.machine_id)
            w.got += 1
            if w.got >= w.count:
                active.remove(w)
    # A queue with work that got nothing says why (a log that said "nothing to do" while a queue waited
    # was no help); one with no instance at all first gets room made when the caps are what stops it.
    waiting = [w for w in wants if w.got == 0 and w.snap.queued > 0]
    waiting.sort(key=lambda w: (w.have > 0, -w.snap.oldest_wait_s, w.snap.name))
    for w in waiting:
        why = w.blocked or "no offer"
        if w.have == 0 and w.by_money:
            room = _make_room(plan, w, live, offers, in_use, taken)
            if room is not None:
                why = f"{why}; making room: {room}"
        gets = "no instance" if w.have == 0 else "no more instances"
        plan.actions.append(Hold(w.snap.name, f"queue {w.snap.name} gets {gets}: {w.status}; {why}"))


def _usable(w: _Want, offers: list[Offer], in_use: set[str], taken: set[str]) -> list[Offer]:
    """The queue's offers it may rent now, cheapest per job first."""
    found = [
        o
        for o in offers
        if offer_matches(o, w.policy.offer_filter)
        and o.offer_id not in taken
        and not (o.machine_id and o.machine_id in in_use)
    ]
    found.sort(
        key=lambda o: (w.rank.cost_per_job(o.gpu_name, o.dph), o.dph, -(o.reliability or 0), o.offer_id)
    )
    return found


def _pick(plan: _Plan, w: _Want, offers: list[Offer], in_use: set[str], taken: set[str]) -> Offer | None:
    """The queue's best offer that fits the caps; None (and w.blocked says why) when there is none."""
    usable = _usable(w, offers, in_use, taken)
    if not usable:
        matching = any(offer_matches(o, w.policy.offer_filter) for o in offers)
        w.blocked = (
            "every matching offer is taken, or on a machine in use or avoided"
            if matching
            else "no offer matches its filter"
        )
        return None
    until = plan.queue_end(w.snap.name)
    for offer in usable:
        if plan.fits(offer.dph, until) is None:
            return offer
    cheapest = min(usable, key=lambda o: o.dph)
    refusal = plan.fits(cheapest.dph, until)
    w.blocked = f"its cheapest offer, {cheapest.offer_id} at ${cheapest.dph:.2f}/h, is over the {refusal}"
    w.by_money = True
    return None


def _make_room(
    plan: _Plan,
    w: _Want,
    live: list[InstanceView],
    offers: list[Offer],
    in_use: set[str],
    taken: set[str],
) -> str | None:
    """Stop instances of the queues that have the most (each keeps one) when that lets this queue's
    cheapest offer fit the caps: one by one from the biggest queue, idle ones first, then booting, then
    busy (drained). Stops nothing unless the rent then fits. Answers what was stopped, or None."""
    usable = _usable(w, offers, in_use, taken)
    if not usable:
        return None
    offer = min(usable, key=lambda o: o.dph)
    s = plan.settings
    pools: dict[str, list[InstanceView]] = {}
    for inst in live:
        if inst.id in plan.acted or inst.queue == w.snap.name:
            continue
        if inst.state in _STARTING or inst.state in (InstanceState.IDLE, InstanceState.BUSY):
            pools.setdefault(inst.queue, []).append(inst)
    order = {InstanceState.IDLE: 0, InstanceState.REQUESTED: 1, InstanceState.BOOTING: 1}
    for pool in pools.values():
        pool.sort(key=lambda i: (2 if i.busy else order.get(i.state, 2), -i.dph, i.id), reverse=True)
    chosen: list[InstanceView] = []
    saved = dict(plan.billing)
    dph = plan.total_dph(stopping=False)
    until = plan.queue_end(w.snap.name)
    fits = False
    while True:
        donors = [q for q in pools if len(pools[q]) >= 2]
        if not donors:
            break
        donor = max(donors, key=lambda q: (len(pools[q]), q))
        inst = pools[donor].pop()  # the cheapest to lose: sorted last
        chosen.append(inst)
        dph -= inst.dph
        # it bills until destroyed, or drained
        stops = plan.now + timedelta(seconds=s.billing_lag_s + (s.drain_timeout_s if inst.busy else 0.0))
        plan.bills(inst.id, inst.dph, min(stops, plan.billing[inst.id][1]))
        plan.bills("rent:?", offer.dph, until)
        fits = dph + offer.dph <= s.max_total_dph and plan.projected_spend() <= s.daily_budget
        del plan.billing["rent:?"]
        if fits:
            break
    plan.billing = saved
    if not fits:
        return None
    for inst in chosen:
        plan.stop(
            inst,
            f"stop {inst.id} of queue {inst.queue} to share the caps with queue {w.snap.name} ({w.status})",
        )
    return "stopping " + ", ".join(f"{i.id} of queue {i.queue}" for i in chosen)


class _Ranker:
    """Expected $ per job of a GPU at a price: $/h over the jobs/h measured for that GPU on this queue
    (or over the queue's arrival rate when that is lower).

    While nothing is measured the ranking is plain $/h. An untried GPU is assumed `explore` times as fast
    as the fastest measured one, so it is tried when it could plausibly be cheaper per job.
    """

    def __init__(self, snap: QueueSnapshot, explore: float) -> None:
        self.measured = {gpu: rate for gpu, rate in snap.throughput.items() if rate > 0}
        self.untried_rate = max(self.measured.values(), default=1.0) * (explore if self.measured else 1.0)
        self.demand = snap.arrivals_per_hour if self.measured and snap.arrivals_per_hour else math.inf

    def known(self, gpu: str) -> bool:
        return gpu in self.measured

    def capacity_per_hour(self, gpus: Iterable[str]) -> float | None:
        """Jobs/h these GPUs can do together (untried ones at the guess); None while nothing is measured."""
        if not self.measured:
            return None
        return sum(self.measured.get(gpu, self.untried_rate) for gpu in gpus)

    def cost_per_job(self, gpu: str, dph: float) -> float:
        # A GPU faster than the queue's arrivals waits for jobs, billing by the hour: it cannot do more
        # jobs than arrive, so on a quiet queue the cheapest per hour is the cheapest per job.
        rate = min(self.measured.get(gpu, self.untried_rate), max(self.demand, 1e-9))
        return dph / rate


def offer_matches(offer: Offer, f: OfferFilter) -> bool:
    """The filter, checked again here: an unknown value fails any requirement on it."""
    if f.provider is not None and offer.provider != f.provider:
        return False  # offers from every provider arrive in one list
    if not is_price(offer.dph):
        return False  # no price the caps can compare: never rented (NaN passes every cap)
    if f.gpu_names and _gpu_key(offer.gpu_name) not in {_gpu_key(g) for g in f.gpu_names}:
        return False
    if offer.vram_mb < f.min_vram_mb or offer.interruptible != f.interruptible:
        return False
    if f.max_dph is not None and offer.dph > f.max_dph:
        return False
    checks: list[tuple[float | None, float | None]] = [
        (offer.reliability, f.min_reliability),
        (offer.inet_down_mbps, f.min_inet_down_mbps),
        (offer.disk_gb, f.min_disk_gb),
        (offer.cuda, f.min_cuda),
    ]
    for value, minimum in checks:
        if minimum is not None and (value is None or value < minimum):
            return False
    if f.verified_only and offer.verified is not True:
        return False
    return not f.locations or _country(offer.location) in {c.upper() for c in f.locations}


def _gpu_key(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def _country(location: str | None) -> str:
    # Vast writes "Spain, ES"; take the trailing country code.
    return (location or "").rsplit(",", 1)[-1].strip().upper()


def in_window(policy: QueuePolicy, now: datetime) -> bool:
    return not policy.windows or window_closes_at(policy, now) is not None


def window_closes_at(policy: QueuePolicy, now: datetime) -> datetime | None:
    """When the allowed hours around `now` end (UTC); None when now is outside them or they never end."""
    if not policy.windows:
        return None
    tz = _zone(policy.tz)
    today = now.astimezone(tz).date()
    closes: datetime | None = None
    for w in policy.windows:
        if w.start == w.end:
            return None
        for day in (today - timedelta(days=1), today):
            start = datetime.combine(day, w.start, tzinfo=tz).astimezone(UTC)
            end_day = day + timedelta(days=1) if w.end <= w.start else day
            end = datetime.combine(end_day, w.end, tzinfo=tz).astimezone(UTC)
            if start <= now < end and (closes is None or end > closes):
                closes = end
    return closes


def next_window_opens_at(policy: QueuePolicy, now: datetime) -> datetime | None:
    """When the allowed hours next begin (UTC), now if open; None when there are no windows."""
    if not policy.windows:
        return None
    if in_window(policy, now):
        return now
    tz = _zone(policy.tz)
    today = now.astimezone(tz).date()
    starts = [
        datetime.combine(today + timedelta(days=d), w.start, tzinfo=tz).astimezone(UTC)
        for w in policy.windows
        for d in (0, 1)
    ]
    return min(s for s in starts if s > now)


def _next_midnight(now: datetime, tz_name: str) -> datetime:
    tz = _zone(tz_name)
    tomorrow = now.astimezone(tz).date() + timedelta(days=1)
    return datetime.combine(tomorrow, time(0), tzinfo=tz).astimezone(UTC)


def budget_day_start(now: datetime, tz_name: str) -> datetime:
    tz = _zone(tz_name)
    return datetime.combine(now.astimezone(tz).date(), time(0), tzinfo=tz).astimezone(UTC)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _over(amount: float, budget: float) -> str:
    """ "$0.1234 > $0.1200": cents alone would print a small budget's overrun as "$0.12 > $0.12"."""
    places = 2 if budget >= 10 else 4
    return f"${amount:.{places}f} > ${budget:.{places}f}"


def _duration(seconds: float) -> str:
    """Seconds as a log reads them: "90 s", "20 min", "2.5 min"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    whole = abs(minutes - round(minutes)) < 0.05 or minutes >= 20
    return f"{minutes:.0f} min" if whole else f"{minutes:.1f} min"


def _idle_seconds(inst: InstanceView, now: datetime) -> float:
    since = max(t for t in (inst.last_job_at, inst.ready_at, inst.created_at) if t is not None)
    return _seconds(since, now)


def _seconds(start: datetime, end: datetime) -> float:
    return (end.astimezone(UTC) - start.astimezone(UTC)).total_seconds()


def _hours(start: datetime, end: datetime) -> float:
    return max(0.0, _seconds(start, end) / 3600)


def total_billing_dph(instances: Iterable[InstanceView]) -> float:
    return sum(i.dph for i in instances if i.state in BILLING_STATES)
