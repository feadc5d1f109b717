"""The scaling policy: one pure function from what is (queues, instances, offers, spend) to what to do.

`decide` reads no clock, does no I/O and is deterministic; `tick`, `run`, `--dry-run` and `simulate` all
call it. Each tick it works through, in order:

1. health: destroy failed instances, instances that never became ready within the ready timeout (and
   avoid their machine from then on), silent instances past the heartbeat timeout (releasing their jobs),
   and draining instances that are done or past the drain timeout;
2. money: while the daily budget could be crossed, or the $/h now billing is above the total cap, shed
   instances (idle and booting ones are destroyed, busy ones drained), the dearest first;
3. each queue: outside its allowed hours scale to zero (drain what is busy); otherwise work out the
   instances needed and rent the offers cheapest per job, or scale in (idle instances past the idle
   timeout; busy surplus is drained, never destroyed), never below min or above max.

Instances needed, while any job is queued or running, = max(ceil((queued + running) / target jobs per
instance), ceil(recent load / target utilisation)), clamped to [min, max]. The first term reacts to a
backlog; the second keeps capacity at what the measured load needs (as Vast's serverless autoscaler does),
so a fleet under steady load can shrink too: with random claiming, nobody idles long enough for an idle
timeout. Scale-in by load waits until the rest would run below `scale_in_at` (hysteresis), the
last hour's arrivals would not load the rest past `target_utilisation` (a 20-minute mean dips), and no
rented instance is still booting, never takes the last instance (the idle timeout does that), and drains
rather than destroys a busy one.
Offers are ranked by expected $ per job ($/h over measured jobs/h on this queue, or over its arrival rate
when that is lower); untried GPU types get an optimistic guess so they are tried.

Money rule: a rent is allowed only if spend today + Σ dph × hours each instance may still bill today
stays within the daily budget. An instance may bill until the end of the budget day, or, for a queue with
allowed hours, until its window closes plus the drain timeout (busy instances are drained at the close,
and a drain that overruns is cut) plus `billing_lag_s` (tick interval and destroy latency). Every live
instance counts with that bound, so rents never plan money past the cap; spend that was not planned
(`Spend.other_dph`, prices that changed) makes step 2 shed.

An instance serving several queues is counted against its first queue only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo

from manager.providers.base import Offer, OfferFilter


class InstanceState(StrEnum):
    REQUESTED = "requested"
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    TERMINATED = "terminated"
    FAILED = "failed"
    LOST = "lost"


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

    @property
    def queue(self) -> str:
        return self.queues[0] if self.queues else ""

    @property
    def busy(self) -> bool:
        return self.running_jobs > 0 or self.state == InstanceState.BUSY


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
    # An untried GPU type is ranked as if this many times faster than the fastest measured one, so each
    # type that could be cheaper per job gets tried; 1.0 never explores.
    explore_factor: float = 1.5

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


Action = Rent | Drain | Destroy | AvoidMachine


def decide(
    queues: list[QueueSnapshot],
    instances: list[InstanceView],
    offers: list[Offer],
    settings: PolicySettings,
    now: datetime,
    *,
    spend: Spend,
    avoided_machines: frozenset[str] = frozenset(),
) -> list[Action]:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(UTC)
    plan = _Plan(settings, now, spend)
    live = sorted((i for i in instances if i.state in BILLING_STATES), key=lambda i: i.id)
    for inst in live:
        plan.bills(inst.id, inst.dph, plan.billing_end(inst))
    snapshots = {q.name: q for q in queues}

    _check_health(plan, live, avoided_machines)
    _enforce_money_caps(plan, live)
    for name in sorted(set(settings.queues) | {i.queue for i in live}):
        snapshot = snapshots.get(name) or QueueSnapshot(name, 0, 0)
        _scale_queue(plan, snapshot, live, offers, avoided_machines)
    return plan.actions


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

    def stop(self, inst: InstanceView, reason: str) -> None:
        """Scale an instance down the gentle way: destroy it when it has no job, else drain it."""
        if inst.busy:
            self.drain(inst, reason)
        else:
            self.destroy(inst, reason, release_jobs=False)

    def avoid(self, machine_id: str | None, reason: str, already: frozenset[str]) -> None:
        if machine_id and machine_id not in already and machine_id not in self.avoided:
            self.avoided.add(machine_id)
            self.actions.append(AvoidMachine(machine_id, reason))


def _check_health(plan: _Plan, live: list[InstanceView], avoided: frozenset[str]) -> None:
    s, now = plan.settings, plan.now
    for inst in live:
        if inst.state == InstanceState.FAILED:
            plan.destroy(inst, f"destroy {inst.id}: failed to start", release_jobs=True)
            plan.avoid(inst.machine_id, f"machine of {inst.id} failed to start", avoided)
        elif inst.state in _STARTING:
            age = _seconds(inst.created_at, now)
            if age >= s.ready_timeout_s:
                why = f"not ready after {age / 60:.0f} min (ready timeout {s.ready_timeout_s / 60:.0f} min)"
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


def _enforce_money_caps(plan: _Plan, live: list[InstanceView]) -> None:
    s = plan.settings
    # Idle first (nothing lost), then booting (only boot time lost), then busy (drained); dearest first.
    order = {InstanceState.IDLE: 0, InstanceState.REQUESTED: 1, InstanceState.BOOTING: 1}
    candidates = [i for i in live if i.id not in plan.acted and i.state != InstanceState.DRAINING]
    candidates.sort(key=lambda i: (2 if i.busy else order.get(i.state, 2), -i.dph, i.id))
    for inst in candidates:
        projected, dph = plan.projected_spend(), plan.total_dph(stopping=False)
        if projected > s.daily_budget:
            why = f"spend today could reach ${projected:.2f} > ${s.daily_budget:.2f}"
            plan.stop(inst, f"stop {inst.id}: {why}")
        elif dph > s.max_total_dph:
            plan.stop(inst, f"stop {inst.id}: billing ${dph:.2f}/h > cap ${s.max_total_dph:.2f}/h")
        else:
            return


def _scale_queue(
    plan: _Plan,
    snap: QueueSnapshot,
    live: list[InstanceView],
    offers: list[Offer],
    avoided: frozenset[str],
) -> None:
    policy = plan.settings.queues.get(snap.name)
    pool = [i for i in live if i.queue == snap.name and i.id not in plan.acted]
    pool = [i for i in pool if i.state in _STARTING or i.state in (InstanceState.IDLE, InstanceState.BUSY)]
    if policy is None:
        for inst in pool:
            plan.stop(inst, f"stop {inst.id}: queue {snap.name} is not configured")
        return
    if not in_window(policy, plan.now):
        hours = ", ".join(str(w) for w in policy.windows)
        for inst in pool:
            plan.stop(inst, f"stop {inst.id}: queue {snap.name} outside allowed hours {hours} {policy.tz}")
        return

    needed = instances_needed(snap, policy)
    have = len(pool)
    status = f"{snap.queued} queued, {snap.running} running, {have} instance(s), need {needed}"
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
        _rent(plan, snap, policy, live, offers, avoided, needed - have, status, rank)


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
    idle = [i for i in pool if i.state == InstanceState.IDLE and not i.busy]
    idle.sort(key=lambda i: (-rank.cost_per_job(i.gpu_name, i.dph), -_idle_seconds(i, now), i.id))
    for inst in idle:
        if surplus > 0 and _idle_seconds(inst, now) >= policy.idle_timeout_s:
            idle_min = _idle_seconds(inst, now) / 60
            plan.destroy(inst, f"destroy {inst.id}: idle {idle_min:.0f} min, {status}", release_jobs=False)
            surplus -= 1
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


def _rent(
    plan: _Plan,
    snap: QueueSnapshot,
    policy: QueuePolicy,
    live: list[InstanceView],
    offers: list[Offer],
    avoided: frozenset[str],
    count: int,
    status: str,
    rank: _Ranker,
) -> None:
    s, now = plan.settings, plan.now
    closes = window_closes_at(policy, now)
    if closes is not None and _seconds(now, closes) < s.min_window_left_s:
        return
    rented = [a.offer for a in plan.actions if isinstance(a, Rent)]  # by other queues this tick
    in_use = {i.machine_id for i in live if i.machine_id} | plan.avoided | set(avoided)
    in_use |= {o.machine_id for o in rented if o.machine_id}
    taken = {o.offer_id for o in rented}
    until = plan.queue_end(snap.name)
    candidates = [o for o in offers if offer_matches(o, policy.offer_filter)]
    candidates.sort(
        key=lambda o: (rank.cost_per_job(o.gpu_name, o.dph), o.dph, -(o.reliability or 0), o.offer_id)
    )
    for offer in candidates:
        if count == 0:
            return
        if offer.offer_id in taken or (offer.machine_id and offer.machine_id in in_use):
            continue
        if plan.total_dph() + offer.dph > s.max_total_dph:
            continue
        key = f"rent:{offer.offer_id}"
        plan.bills(key, offer.dph, until)
        if plan.projected_spend() > s.daily_budget:
            del plan.billing[key]
            continue
        est = rank.cost_per_job(offer.gpu_name, offer.dph)
        per_job = f"${est:.4f}/job" if rank.known(offer.gpu_name) else "untried GPU"
        reason = (
            f"rent offer {offer.offer_id} ({offer.gpu_name}) at ${offer.dph:.2f}/h for queue {snap.name}: "
            f"{status}; {per_job}"
        )
        plan.actions.append(Rent(snap.name, offer, reason))
        taken.add(offer.offer_id)
        if offer.machine_id:
            in_use.add(offer.machine_id)
        count -= 1


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


def _idle_seconds(inst: InstanceView, now: datetime) -> float:
    since = max(t for t in (inst.last_job_at, inst.ready_at, inst.created_at) if t is not None)
    return _seconds(since, now)


def _seconds(start: datetime, end: datetime) -> float:
    return (end.astimezone(UTC) - start.astimezone(UTC)).total_seconds()


def _hours(start: datetime, end: datetime) -> float:
    return max(0.0, _seconds(start, end) / 3600)


def total_billing_dph(instances: Iterable[InstanceView]) -> float:
    return sum(i.dph for i in instances if i.state in BILLING_STATES)
