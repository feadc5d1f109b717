"""A local HTTP stand-in of the Vast.ai API, as the `vastai` 1.9.1 SDK calls it.

Endpoints and shapes follow the SDK source (vastai/api/offers.py, instances.py, client.py) and
/work/shared/reference/vast-api.md. Time is simulated: pass a `SimClock` shared with the code under
test, so instances boot, rate limits refill and charges accrue without waiting.

Fault switches (all off by default) are plain attributes and methods; `rentals` records each rent
(bid or on-demand, price) and `requests` each HTTP request, so tests can assert money and rate facts.

Billing follows Vast's published rules: storage ($/GB-month x the disk asked for, a 30-day month) bills
every second an instance exists, whatever its state; the rest (the bid, or the on-demand GPU price) only
while it runs (actual_status "running"): not while it loads, once it is stopped (outbid) or exited, nor for
an instance that never starts. `committed_rate()` is what the live instances would bill running (storage
alone for stopped ones), the figure a $/h cap is about; `peak_committed` is its highest value so far.

The market can be made hostile: bid searches that answer `dph_total` at the minimum bid
(`bid_dph_total`), machines that bill more than their offer says (`machine_surcharge`), exit after
running a while (`exit_after`), never finish loading (`stuck_machines`) or are outbid after a while
(`outbid_after`), offers the index keeps listing that are gone (`phantom_offers`) or whose real minimum
bid is above the one searched (`stale_min_bid`: the create answers an error carrying `new_contract`),
every Nth request failing (`periodic_failures`), and a hook inside each create (`on_create`), where a test
can kill the caller mid-call. Time is a `SimClock`, or `RealClock` for a manager running in its own process.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

OCI_MSG = (
    "Error response from daemon: failed to create task for container: failed to create shim task: "
    "OCI runtime create failed: runc create failed: unable to start container process"
)

# Per-endpoint limits of the real API (reference: search 10/min, create ≥ 4.5 s, list 1 s, show 2 s,
# destroy 3 s), as (calls, seconds).
RATE_LIMITS: dict[str, tuple[int, float]] = {
    "search": (10, 60.0),
    "create": (1, 4.5),
    "list": (1, 1.0),
    "show": (1, 2.0),
    "destroy": (1, 3.0),
}

# Simulated boot: actual_status null, then created, then loading, then running (seconds after create).
CREATED_AT_S = 5.0
LOADING_AT_S = 10.0
RUNNING_AT_S = 60.0

SEARCH_META_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}


class RealClock:
    """Wall time, for a stand-in serving a manager in another process."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class SimClock:
    """Simulated epoch seconds, shared by the stand-in and the code under test."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self._t = start
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> float:
        with self._lock:
            return self._t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += seconds


@dataclass
class RequestRecord:
    t: float
    method: str
    path: str
    kind: str  # search | create | list | show | destroy | other
    status: int
    query: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass
class Rental:
    id: int
    offer_id: int
    machine_id: int
    label: str | None
    image: str | None
    env: dict[str, str]
    onstart: str | None
    disk: float
    rent_type: str  # "bid" or "on-demand"
    price: float | None  # the bid sent; None for on-demand
    dph_total: float  # what it bills while running, and what its listing shows
    storage_dph: float  # what it bills in every state
    gpu_name: str
    num_gpus: int
    created_at: float
    destroyed_at: float | None = None
    # When it starts running (actual_status "running"); None: never (stuck, OCI error, a leftover).
    running_from: float | None = None
    # When it stopped running for good (outbid, exited); the GPU part bills no more from then.
    halted_at: float | None = None
    # Set by faults; wins over the simulated boot sequence.
    override: dict[str, Any] | None = None
    # A fault due later: (time, the listing state from then on).
    scheduled: tuple[float, dict[str, Any]] | None = None

    def end(self, now: float) -> float:
        return self.destroyed_at if self.destroyed_at is not None else now

    def running_seconds(self, now: float) -> float:
        if self.running_from is None:
            return 0.0
        stop = min(t for t in (self.halted_at, self.end(now)) if t is not None)
        return max(0.0, stop - self.running_from)

    def cost(self, now: float) -> float:
        """$ billed up to now: storage for its whole life, the rest while it ran."""
        life = max(0.0, self.end(now) - self.created_at)
        gpu = self.dph_total - self.storage_dph
        return (self.storage_dph * life + gpu * self.running_seconds(now)) / 3600.0

    def running_at(self, t: float) -> bool:
        return (
            self.running_from is not None
            and self.running_from <= t
            and (self.halted_at is None or t < self.halted_at)
            and (self.destroyed_at is None or t < self.destroyed_at)
        )

    def rate_now(self, now: float) -> float:
        if self.destroyed_at is not None:
            return 0.0
        return self.dph_total if self.running_at(now) else self.storage_dph

    def committed(self) -> float:
        """What it would bill running: a stopped or exited one bills storage alone until destroyed."""
        if self.destroyed_at is not None:
            return 0.0
        return self.storage_dph if self.halted_at is not None or self.stopped_leftover else self.dph_total

    @property
    def stopped_leftover(self) -> bool:
        return self.running_from is None and (self.override or {}).get("cur_state") == "stopped"


class VastStandin:
    def __init__(self, api_key: str, clock: SimClock, *, enforce_rate_limits: bool = True) -> None:
        self.api_key = api_key
        self.clock = clock
        self.enforce_rate_limits = enforce_rate_limits
        self._lock = threading.RLock()
        self.offers: dict[int, dict[str, Any]] = {}
        self.rentals: dict[int, Rental] = {}
        self.requests: list[RequestRecord] = []
        self._next_instance_id = 20_000_000
        self._next_offer_id = 9_000_000
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Simulated boot: actual_status null, then created, then loading, then running (s after create).
        self.created_at_s = CREATED_AT_S
        self.loading_at_s = LOADING_AT_S
        self.running_at_s = RUNNING_AT_S
        self.peak_committed = 0.0  # the highest committed_rate() so far
        self.served = 0  # requests answered, for periodic_failures
        # --- fault switches ---
        self._fail_queue: list[tuple[int, dict[str, Any], str | None]] = []  # (status, body, kind or None)
        self.search_quota_exceeded = False
        self.vanish_after_search = False  # every offer a search returns is taken by someone else
        self.stuck_loading = False  # instances created from now on never leave "loading"
        self.ghost_destroys = 0  # the next N destroys answer success and change nothing
        self.create_error_with_contract = 0  # the next N creates leave a stopped instance and answer an error
        self.ignore_bid = False  # rents on-demand even when a bid price is sent (what must be caught)
        self.oci_on_create = False  # instances created from now on fail with an OCI error
        self.row_overrides: dict[int, dict[str, Any]] = {}  # instance id -> fields its listing row shows
        self.broken_lists = 0  # the next N listings break off mid-answer (a dropped connection)
        self.hold_lists: threading.Event | None = None  # when set: listings wait for this event first
        # --- a hostile market (see the module's notes) ---
        # What a bid search answers as dph_total: "on-demand" (dph_base + storage, as on-demand searches),
        # "min_bid" (the minimum bid alone) or "min_bid+storage".
        self.bid_dph_total = "on-demand"
        self.search_breakdown = True  # offers carry `search`: {gpuCostPerHour, diskHour, totalHour}
        self.machine_surcharge: dict[int, float] = {}  # machine -> $/h billed above what its offer says
        self.exit_after: dict[int, float] = {}  # machine -> its instances exit this long after running
        self.outbid_after: dict[int, float] = {}  # machine -> its instances are outbid this long after create
        self.stuck_machines: set[int] = set()  # machines whose instances never leave "loading"
        self.phantom_offers: set[int] = set()  # listed by searches, gone when rented (no_such_ask)
        self.stale_min_bid: dict[int, float] = {}  # offer -> its real minimum bid (searches show the old)
        self.periodic_failures: list[tuple[int, int]] = []  # (n, status): every nth request answers status
        self.on_create: Callable[[Rental], None] | None = None  # called inside each create, before answering
        self.list_storage_fields = False  # listing rows carry storage_cost (unknown whether Vast's do)
        self.search_overrides: dict[int, dict[str, Any]] = {}  # offer id -> fields its search row shows

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                standin._handle(self, "GET")

            def do_POST(self) -> None:
                standin._handle(self, "POST")

            def do_PUT(self) -> None:
                standin._handle(self, "PUT")

            def do_DELETE(self) -> None:
                standin._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ setup and faults
    def add_offer(
        self,
        *,
        gpu_name: str = "RTX 4090",
        num_gpus: int = 1,
        gpu_ram: int = 24_564,
        dph_base: float = 0.40,
        min_bid: float = 0.20,
        storage_cost: float = 0.15,  # $/GB/month
        reliability: float = 0.99,
        verified: bool = True,
        inet_down: float = 800.0,
        disk_space: float = 200.0,
        cuda_max_good: float = 12.4,
        geolocation: str = "Spain, ES",
        machine_id: int | None = None,
    ) -> int:
        with self._lock:
            self._next_offer_id += 1
            oid = self._next_offer_id
            self.offers[oid] = {
                "id": oid,
                "ask_contract_id": oid,
                "machine_id": machine_id if machine_id is not None else oid % 100_000,
                "host_id": 4242,
                "num_gpus": num_gpus,
                "gpu_name": gpu_name,
                "gpu_ram": gpu_ram,
                "gpu_total_ram": gpu_ram * num_gpus,
                "cpu_ram": 64_000,
                "cpu_cores": 16,
                "cuda_max_good": cuda_max_good,
                "disk_space": disk_space,
                "inet_up": inet_down / 2,
                "inet_down": inet_down,
                "dph_base": dph_base,
                "min_bid": min_bid,
                "storage_cost": storage_cost,
                "reliability": reliability,
                "verified": verified,
                "verification": "verified" if verified else "unverified",
                "rentable": True,
                "rented": False,
                "external": False,
                "hosting_type": 0,
                "geolocation": geolocation,
                "start_date": self.clock.now() - 86_400,
                "end_date": self.clock.now() + 30 * 86_400,
                "duration": 30 * 86_400.0,
            }
            return oid

    def fail_next(self, n: int, status: int = 429, kind: str | None = None, body: dict | None = None) -> None:
        """The next n requests (of `kind`, or any) answer `status` before doing anything."""
        body = body or {"success": False, "error": "rate_limited" if status == 429 else "server_error"}
        with self._lock:
            self._fail_queue.extend([(status, body, kind)] * n)

    def clear_faults(self) -> None:
        """Forget the failures fail_next queued that have not happened yet."""
        with self._lock:
            self._fail_queue.clear()

    def take_offer(self, offer_id: int) -> None:
        """Another renter was faster."""
        with self._lock:
            self.offers[offer_id]["rented"] = True

    def set_status(self, instance_id: int, actual_status: str | None, status_msg: str | None = None) -> None:
        """Force an instance into exited / unknown / offline / ... from now on."""
        with self._lock:
            self._halt(self.rentals[instance_id], self.clock.now(), _exited(actual_status, status_msg))

    def outbid(self, instance_id: int) -> None:
        """A higher bid took the machine: stopped, storage still billed."""
        with self._lock:
            r = self.rentals[instance_id]
            self._halt(r, self.clock.now(), _stopped(self._computed(r)["actual_status"]))

    def _halt(self, r: Rental, at: float, state: dict[str, Any]) -> None:
        r.override = state
        r.scheduled = None
        if state["actual_status"] != "running" and (r.halted_at is None or at < r.halted_at):
            r.halted_at = at

    def _settle(self) -> None:
        """Apply the faults that fell due (lazily: time is whatever the clock says)."""
        now = self.clock.now()
        for r in self.rentals.values():
            if r.scheduled is not None and r.destroyed_at is None and now >= r.scheduled[0]:
                at, state = r.scheduled
                if state.get("cur_state") == "stopped":  # an outbid: stopped whatever it was doing
                    state = _stopped("running" if r.running_at(at) else "loading")
                self._halt(r, at, state)

    # ------------------------------------------------------------------ money facts
    def live(self) -> dict[int, Rental]:
        """Instances not destroyed: each still bills."""
        with self._lock:
            self._settle()
            return {i: r for i, r in self.rentals.items() if r.destroyed_at is None}

    def billing_rate(self) -> float:
        """$/h billing this moment (storage alone for what is not running)."""
        with self._lock:
            self._settle()
            now = self.clock.now()
            return sum(r.rate_now(now) for r in self.rentals.values())

    def committed_rate(self) -> float:
        """$/h the live instances would bill running: what a total $/h cap is about."""
        with self._lock:
            self._settle()
            return sum(r.committed() for r in self.rentals.values())

    def total_cost(self) -> float:
        with self._lock:
            self._settle()
            now = self.clock.now()
            return sum(r.cost(now) for r in self.rentals.values())

    def cost_of(self, instance_id: int) -> float:
        with self._lock:
            self._settle()
            return self.rentals[instance_id].cost(self.clock.now())

    def is_running(self, instance_id: int) -> bool:
        """Whether the instance runs now (what a worker on it needs)."""
        with self._lock:
            self._settle()
            r = self.rentals[instance_id]
            return r.running_at(self.clock.now()) and self._computed(r)["actual_status"] == "running"

    def request_times(self, kind: str) -> list[float]:
        with self._lock:
            return [r.t for r in self.requests if r.kind == kind]

    def of_kind(self, kind: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if r.kind == kind]

    # ------------------------------------------------------------------ HTTP
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path = parts.path
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        kind = _kind(method, path)
        with self._lock:
            status, answer = self._dispatch(h, method, path, query, body, kind)
            self.requests.append(RequestRecord(self.clock.now(), method, path, kind, status, query, body))
        data = json.dumps(answer).encode()
        hold = self.hold_lists if kind == "list" else None
        if hold is not None:
            hold.wait(30)
        with self._lock:
            broken = kind == "list" and self.broken_lists > 0
            self.broken_lists -= broken
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if broken:  # half the answer, then the connection drops
            h.wfile.write(data[: len(data) // 2])
            h.close_connection = True
            return
        h.wfile.write(data)

    def _dispatch(
        self, h: BaseHTTPRequestHandler, method: str, path: str, query: dict, body: Any, kind: str
    ) -> tuple[int, Any]:
        if h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}
        self._settle()
        self.served += 1
        for every, status in self.periodic_failures:
            if self.served % every == 0:
                error = "rate_limited" if status == 429 else "server_error"
                return status, {"success": False, "error": error, "msg": f"every {every}th request fails"}
        for i, (status, fail_body, fail_kind) in enumerate(self._fail_queue):
            if fail_kind is None or fail_kind == kind:
                del self._fail_queue[i]
                return status, fail_body
        if self.enforce_rate_limits and kind in RATE_LIMITS and self._over_limit(kind):
            # The real API sends no Retry-After.
            return 429, {"success": False, "error": "rate_limited", "msg": "API requests too frequent"}

        routes: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
            ("POST", r"^/api/v0/bundles/?$", lambda m: self._search(body)),
            ("PUT", r"^/api/v0/search/asks/?$", lambda m: self._search(body.get("q") or {})),
            ("PUT", r"^/api/v0/asks/(\d+)/?$", lambda m: self._create(int(m[1]), body)),
            ("GET", r"^/api/v1/instances/?$", lambda m: self._list(query)),
            ("GET", r"^/api/v0/instances/?$", lambda m: (410, {"error": "deprecated_endpoint"})),
            ("GET", r"^/api/v0/instances/(\d+)/?$", lambda m: self._show(int(m[1]))),
            ("DELETE", r"^/api/v0/instances/(\d+)/?$", lambda m: self._destroy(int(m[1]))),
        ]
        for route_method, pattern, fn in routes:
            m = re.match(pattern, path)
            if m and route_method == method:
                return fn(m)
        return 404, {"success": False, "error": "not_found", "msg": f"no route {method} {path}"}

    def _over_limit(self, kind: str) -> bool:
        calls, per_s = RATE_LIMITS[kind]
        now = self.clock.now()
        # Only requests that were served count against the bucket, as a token bucket would.
        recent = [r for r in self.requests if r.kind == kind and r.status != 429 and now - r.t < per_s]
        return len(recent) >= calls

    # ------------------------------------------------------------------ endpoints
    def _search(self, q: dict) -> tuple[int, Any]:
        if self.search_quota_exceeded:
            return 429, {"success": False, "error": "search_quota_exceeded", "msg": "Daily search quota"}
        offer_type = q.get("type", "on-demand")
        storage = float(q.get("allocated_storage") or 5.0)
        rows = []
        for offer in self.offers.values():
            row = dict(offer)
            disk_hour = offer["storage_cost"] * storage / 720.0
            gpu = offer["dph_base"]
            if offer_type == "bid" and self.bid_dph_total != "on-demand":
                gpu = offer["min_bid"]
                total = gpu + (disk_hour if self.bid_dph_total == "min_bid+storage" else 0.0)
            else:
                total = gpu + disk_hour
            row["dph_total"] = round(total, 6)
            row["storage_total_cost"] = round(disk_hour, 6)
            if self.search_breakdown:
                row["search"] = {
                    "gpuCostPerHour": round(gpu, 6),
                    "diskHour": round(disk_hour, 6),
                    "totalHour": round(gpu + disk_hour, 6),
                }
            row["is_bid"] = offer_type == "bid"
            row.update(self.search_overrides.get(offer["id"], {}))
            if all(_matches(row, key, cond) for key, cond in q.items() if key not in SEARCH_META_KEYS):
                rows.append(row)
        for col, direction in reversed(q.get("order") or []):
            rows.sort(key=lambda r, c=col: (r.get(c) is None, r.get(c)), reverse=direction == "desc")
        if q.get("limit"):
            rows = rows[: int(q["limit"])]
        if self.vanish_after_search:
            for row in rows:
                self.offers[row["id"]]["rented"] = True
        return 200, {"offers": rows}

    def _create(self, offer_id: int, body: dict) -> tuple[int, Any]:
        offer = self.offers.get(offer_id)
        if offer is None or offer["rented"] or not offer["rentable"] or offer_id in self.phantom_offers:
            return 404, {
                "success": False,
                "error": "no_such_ask",
                "msg": f"Instance type by id {offer_id} is not available.",
            }
        onstart = body.get("onstart") or ""
        label = body.get("label") or ""
        env = body.get("env") or {}
        if len(onstart) > 4048:
            return 400, {"success": False, "error": "invalid_args", "msg": "onstart longer than 4048"}
        if len(label) > 256 or any(len(str(v)) > 256 for v in env.values()):
            return 400, {"success": False, "error": "invalid_args", "msg": "label or env value too long"}

        price = body.get("price")
        disk = float(body.get("disk") or 10)
        storage_dph = offer["storage_cost"] * disk / 720.0
        surcharge = self.machine_surcharge.get(offer["machine_id"], 0.0)
        if price is None or self.ignore_bid:
            rent_type, dph = "on-demand", offer["dph_base"] + storage_dph + surcharge
        else:
            rent_type, dph = "bid", float(price) + storage_dph + surcharge

        real_min = self.stale_min_bid.get(offer_id, offer["min_bid"])
        below_min = rent_type == "bid" and float(price) < real_min
        stale = offer_id in self.stale_min_bid and below_min  # the search said it was enough
        forced_error = self.create_error_with_contract > 0
        if below_min and body.get("cancel_unavail") and not stale:
            return 400, {"success": False, "error": "invalid_price", "msg": "bid below the minimum"}

        rental = self._rent(offer, body, rent_type, price, dph, storage_dph)
        if below_min or forced_error:
            # The money trap: an error answer, yet a stopped instance stays behind billing storage.
            self.create_error_with_contract = max(0, self.create_error_with_contract - 1)
            if stale:
                offer["rented"] = False  # the index goes on listing it, stale minimum and all
            rental.override = {
                "actual_status": None,
                "cur_state": "stopped",
                "next_state": "stopped",
                "intended_status": "stopped",
                "status_msg": None,
            }
            rental.running_from = None
            rental.scheduled = None
            self.peak_committed = max(self.peak_committed, sum(r.committed() for r in self.rentals.values()))
            return 400, {
                "success": False,
                "error": "invalid_price",
                "msg": "Your bid is below the minimum; the instance could not be scheduled.",
                "new_contract": rental.id,
            }
        self.peak_committed = max(self.peak_committed, sum(r.committed() for r in self.rentals.values()))
        if self.on_create is not None:
            self.on_create(rental)
        return 200, {"success": True, "new_contract": rental.id}

    def _rent(
        self, offer: dict, body: dict, rent_type: str, price: float | None, dph: float, storage_dph: float
    ) -> Rental:
        self._next_instance_id += 1
        offer["rented"] = True
        now = self.clock.now()
        rental = Rental(
            id=self._next_instance_id,
            offer_id=offer["id"],
            machine_id=offer["machine_id"],
            label=body.get("label"),
            image=body.get("image"),
            env=dict(body.get("env") or {}),
            onstart=body.get("onstart"),
            disk=float(body.get("disk") or 10),
            rent_type=rent_type,
            price=float(price) if price is not None and rent_type == "bid" else None,
            dph_total=round(dph, 6),
            storage_dph=storage_dph,
            gpu_name=offer["gpu_name"],
            num_gpus=offer["num_gpus"],
            created_at=now,
        )
        machine = offer["machine_id"]
        if not (self.stuck_loading or machine in self.stuck_machines or self.oci_on_create):
            rental.running_from = now + self.running_at_s
        if self.oci_on_create:
            rental.override = {
                "actual_status": "created",
                "cur_state": "running",
                "next_state": "running",
                "intended_status": "running",
                "status_msg": OCI_MSG,
            }
        if machine in self.exit_after and rental.running_from is not None:
            rental.scheduled = (rental.running_from + self.exit_after[machine], _exited("exited", None))
        if machine in self.outbid_after:
            rental.scheduled = (now + self.outbid_after[machine], _stopped(None))
        self.rentals[rental.id] = rental
        return rental

    def _computed(self, r: Rental) -> dict[str, Any]:
        if r.override is not None:
            return dict(r.override)
        now = self.clock.now()
        age = now - r.created_at
        if age < self.created_at_s:
            actual = None
        elif age < self.loading_at_s:
            actual = "created"
        elif not r.running_at(now):
            actual = "loading"
        else:
            actual = "running"
        return {
            "actual_status": actual,
            "cur_state": "running",
            "next_state": "running",
            "intended_status": "running",
            "status_msg": "success, running" if actual == "running" else None,
        }

    def _row(self, r: Rental) -> dict[str, Any]:
        states = self._computed(r)
        return (
            {
                "id": r.id,
                "machine_id": r.machine_id,
                "host_id": 4242,
                **states,
                "label": r.label,
                "image_uuid": r.image,
                "image_runtype": "ssh_direc ssh_proxy",
                "onstart": r.onstart,
                "extra_env": [[k, v] for k, v in r.env.items()],
                "num_gpus": r.num_gpus,
                "gpu_name": r.gpu_name,
                "gpu_util": 0.0 if states["actual_status"] == "running" else None,
                "disk_space": r.disk,
                "dph_total": r.dph_total,
                "start_date": r.created_at,
                "end_date": r.created_at + 30 * 86_400,
                "public_ipaddr": "203.0.113.7",
                "ports": {},
                "ssh_host": "ssh4.vast.ai",
                "ssh_port": 30_000 + r.id % 1000,
            }
            | self._storage_fields(r)
            | self.row_overrides.get(r.id, {})
        )

    def _storage_fields(self, r: Rental) -> dict[str, Any]:
        if not self.list_storage_fields:
            return {}
        return {"storage_cost": round(r.storage_dph * 720.0 / r.disk, 6) if r.disk else 0.0}

    def _list(self, query: dict) -> tuple[int, Any]:
        filters = json.loads(query.get("select_filters") or "{}")
        order = json.loads(query.get("order_by") or '[{"col": "id", "dir": "asc"}]')
        limit = max(1, min(int(query.get("limit") or 25), 25))
        after = query.get("after_token")
        rows = [self._row(r) for r in self.rentals.values() if r.destroyed_at is None]
        rows = [row for row in rows if all(_matches(row, k, c) for k, c in filters.items())]
        for o in reversed(order):
            rows.sort(key=lambda r, c=o["col"]: (r.get(c) is None, r.get(c)), reverse=o.get("dir") == "desc")
        total = len(rows)
        start = 0
        if after:
            last_id = json.loads(base64.urlsafe_b64decode(after))["values"]["id"]
            start = next((i + 1 for i, row in enumerate(rows) if row["id"] == last_id), len(rows))
        page = rows[start : start + limit]
        next_token = None
        if start + limit < len(rows):
            token = json.dumps({"values": {"id": page[-1]["id"]}}).encode()
            next_token = base64.urlsafe_b64encode(token).decode()
        label_counts: dict[str, int] = {}
        for row in rows:
            label_counts[row["label"] or ""] = label_counts.get(row["label"] or "", 0) + 1
        return 200, {
            "instances": page,
            "next_token": next_token,
            "total_instances": total,
            "label_counts": label_counts,
        }

    def _show(self, instance_id: int) -> tuple[int, Any]:
        r = self.rentals.get(instance_id)
        if r is None or r.destroyed_at is not None:
            return 200, {"instances": None}
        return 200, {"instances": self._row(r)}

    def _destroy(self, instance_id: int) -> tuple[int, Any]:
        r = self.rentals.get(instance_id)
        if r is None or r.destroyed_at is not None:
            return 404, {"success": False, "error": "no_such_instance", "msg": "Instance not found"}
        if self.ghost_destroys > 0:
            # Answers success, keeps running and billing.
            self.ghost_destroys -= 1
            return 200, {"success": True}
        r.destroyed_at = self.clock.now()
        if r.offer_id in self.offers:
            self.offers[r.offer_id]["rented"] = False  # the machine is free again: its offer is back
        return 200, {"success": True}


def _exited(actual_status: str | None, status_msg: str | None) -> dict[str, Any]:
    return {
        "actual_status": actual_status,
        "cur_state": "running",
        "next_state": "running",
        "intended_status": "running",
        "status_msg": status_msg,
    }


def _stopped(actual_status: str | None) -> dict[str, Any]:
    """Outbid: stopped, whether it was running or still loading."""
    return {
        "actual_status": "stopped" if actual_status in ("running", "loading") else actual_status,
        "cur_state": "stopped",
        "next_state": "stopped",
        "intended_status": "stopped",
        "status_msg": None,
    }


def _kind(method: str, path: str) -> str:
    if path.rstrip("/") in ("/api/v0/bundles", "/api/v0/search/asks"):
        return "search"
    if method == "PUT" and path.startswith("/api/v0/asks/"):
        return "create"
    if method == "GET" and path.rstrip("/") == "/api/v1/instances":
        return "list"
    if method == "GET" and re.match(r"^/api/v0/instances/\d+/?$", path):
        return "show"
    if method == "DELETE" and path.startswith("/api/v0/instances/"):
        return "destroy"
    return "other"


def _matches(row: dict[str, Any], key: str, cond: Any) -> bool:
    """One search or select filter, {op: value} with ops eq neq gt gte lt lte in notin."""
    if not isinstance(cond, dict):
        cond = {"eq": cond}
    value = row.get(key)
    for op, want in cond.items():
        if key == "geolocation" and isinstance(value, str) and op in ("eq", "in", "neq", "notin"):
            value = value[-2:]  # matched by country code, as "Spain, ES"
        if op == "eq" and value != want:
            return False
        if op == "neq" and value == want:
            return False
        if op == "in" and value not in want:
            return False
        if op == "notin" and value in want:
            return False
        if op in ("gt", "gte", "lt", "lte"):
            if value is None:
                return False
            if op == "gt" and not value > want:
                return False
            if op == "gte" and not value >= want:
                return False
            if op == "lt" and not value < want:
                return False
            if op == "lte" and not value <= want:
                return False
    return True
