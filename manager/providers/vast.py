"""Vast.ai through the `vastai` SDK: interruptible (explicit bid) and on-demand rents.

Facts this relies on, read from the vastai 1.9.1 source:
- search_offers -> POST /api/v0/bundles/ with the query dict, `type`, `order`, `limit`, `allocated_storage`.
- create_instance -> PUT /api/v0/asks/{offer}/ ; `price` null rents on-demand, a number rents a bid.
- show_instances_v1 -> GET /api/v1/instances/?select_filters=&order_by=&limit=&after_token= (paged).
- show_instance -> GET /api/v0/instances/{id}/?owner=me ; destroy_instance -> DELETE /api/v0/instances/{id}/.
- Every call ends in `raise_for_status()`, so 4xx/5xx surface as requests.HTTPError with the response.
- The client retries 429/502/503/504 itself with 0.15 s, 0.225 s ... sleeps. We build it with retry=1
  (one attempt per call) and retry here instead, so every attempt passes our per-endpoint pacing.

Prices. What each price field of a search answer means cannot be checked from here, and one reading of
them booked bids far below their bill: storage was taken as `dph_total - dph_base`, and a bid search that
answered `dph_total` at the minimum bid while `dph_base` kept the on-demand GPU price made it negative. So
no price rests on one field:
- storage ($/h, billed in every state) is `storage_cost` ($/GB per 30-day month, as the SDK's own
  conversions count a month) x the disk searched for (at least the disk the launch asks for), checked
  against the offer's own breakdown where there is one (`search.diskHour`, and for an on-demand search
  `dph_total - dph_base`); a reading that is negative, not a number, or dearer than
  STORAGE_MAX_USD_PER_GB_MONTH is ignored, and of the readings left the dearest is taken;
- a bid rent is priced at the bid we send plus that storage; the bid is the minimum bid plus a margin,
  never above the on-demand GPU price (`dph_base`), and an offer whose minimum bid is above it is skipped;
- an on-demand rent is priced at the dearest of `dph_total`, `dph_base` + storage and `search.totalHour`.
An offer that cannot be priced this way is skipped, never rented at a guess.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import requests
from vastai import VastAI

from manager.providers.base import (
    PRICE_MAX,
    LaunchSpec,
    Offer,
    OfferFilter,
    ProviderError,
    ProviderInstance,
    ProviderStatus,
    is_price,
    to_float,
    to_price,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Vast's per-IP limits (calls, seconds). Creates closer than ~4.5 s apart are refused.
DEFAULT_LIMITS: dict[str, tuple[int, float]] = {
    "search": (10, 60.0),
    "create": (1, 4.5),
    "list": (1, 1.0),
    "show": (1, 2.0),
    "destroy": (1, 3.0),
}

ONSTART_MAX = 4048
LABEL_MAX = 256
ENV_VALUE_MAX = 256
DEAD_ACTUAL = {"exited", "unknown", "offline"}
OFFER_GONE_ERRORS = {"no_such_ask"}
# A create refused for the price asked: the offer's minimum bid is not what the search said.
BID_REFUSED_ERRORS = {"invalid_price", "bid_too_low", "price_too_low"}

HOURS_PER_MONTH = 720.0  # storage_cost is $ per GB per 30-day month
STORAGE_MAX_USD_PER_GB_MONTH = 5.0  # dearer storage is a misread field, not a price (hosts ask ~$0.05-0.50)
REFUSED_OFFER_S = 1800.0  # an offer whose create was refused is not offered again for this long


class RateLimiter:
    """At most `calls` per `seconds` for each endpoint, waiting with the injected sleep."""

    def __init__(
        self,
        limits: dict[str, tuple[int, float]],
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._sleep = sleep
        self._sent: dict[str, deque[float]] = {k: deque() for k in limits}

    def wait(self, endpoint: str) -> None:
        calls, per_s = self._limits[endpoint]
        sent = self._sent[endpoint]
        while True:
            now = self._clock()
            while sent and now - sent[0] >= per_s:
                sent.popleft()
            if len(sent) < calls:
                sent.append(now)
                return
            self._sleep(sent[0] + per_s - now)


class VastProvider:
    name = "vast"

    def __init__(
        self,
        api_key: str,
        *,
        server_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        search_ttl_s: float = 60.0,
        bid_margin: float = 0.10,
        max_attempts: int = 5,
        backoff_s: float = 2.0,
        backoff_max_s: float = 60.0,
        limits: dict[str, tuple[int, float]] | None = None,
        runtype: str = "ssh_direc ssh_proxy",
        http_timeout_s: float = 60.0,
    ) -> None:
        if not api_key:
            raise ValueError("a Vast API key is required")
        self._sdk = VastAI(api_key=api_key, server_url=server_url, retry=1)
        self._sdk.client.timeout = http_timeout_s
        self._secret = api_key
        self._clock = clock
        self._sleep = sleep
        self._limiter = RateLimiter(limits or DEFAULT_LIMITS, clock, sleep)
        self._search_ttl_s = search_ttl_s
        self._bid_margin = bid_margin
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._runtype = runtype
        self._cache: dict[OfferFilter, tuple[float, list[Offer]]] = {}
        self._refused: dict[str, float] = {}  # offer id -> until (clock): its create was refused
        self._storage: dict[str, float] = {}  # instance id -> storage $/h, for those rented here
        self._warned: set[str] = set()  # offer ids whose odd prices were logged already

    def __repr__(self) -> str:  # never the key
        return f"VastProvider(server_url={self._sdk.client.server_url!r})"

    # ------------------------------------------------------------------ search
    def search_offers(self, filters: OfferFilter) -> list[Offer]:
        cached = self._cache.get(filters)
        if cached is not None and self._clock() - cached[0] < self._search_ttl_s:
            return [o for o in cached[1] if not self._is_refused(o.offer_id)]
        query = self._query(filters)
        rows = self._call(
            "search",
            lambda: self._sdk.search_offers(
                query=query,
                type="bid" if filters.interruptible else "on-demand",
                order="dph_total",
                limit=filters.limit,
                storage=filters.min_disk_gb,
                no_default=True,  # our query carries every filter, defaults included
            ),
        )
        offers = []
        for row in rows or []:
            offer = self._offer(row, filters.interruptible, filters.min_disk_gb)
            if offer is not None and self._keep(offer, filters):
                offers.append(offer)
        offers.sort(key=lambda o: o.dph)
        self._cache[filters] = (self._clock(), offers)
        # A refused offer stays out across search refreshes: the index may list it again, and Vast would
        # refuse it again (taken, or a minimum bid the search no longer tells).
        return [o for o in offers if not self._is_refused(o.offer_id)]

    def _is_refused(self, offer_id: str) -> bool:
        until = self._refused.get(offer_id)
        if until is None:
            return False
        if self._clock() >= until:
            del self._refused[offer_id]
            return False
        return True

    def _refuse(self, offer_id: str) -> None:
        self._refused[offer_id] = self._clock() + REFUSED_OFFER_S
        self._forget_offer(offer_id)

    def _query(self, f: OfferFilter) -> dict[str, Any]:
        q: dict[str, Any] = {
            "external": {"eq": False},
            "rentable": {"eq": True},
            "rented": {"eq": False},
            "disk_space": {"gte": f.min_disk_gb},
        }
        if f.verified_only:
            q["verified"] = {"eq": True}
        if f.gpu_names:
            # The API spells names with spaces ("RTX 4090"); the CLI's underscores are a CLI-only form.
            q["gpu_name"] = {"in": [n.replace("_", " ") for n in f.gpu_names]}
        if f.min_vram_mb:
            q["gpu_ram"] = {"gte": f.min_vram_mb}  # MB per GPU
        if f.max_dph is not None and not f.interruptible:
            q["dph_total"] = {"lte": f.max_dph}
        if f.min_reliability is not None:
            q["reliability"] = {"gte": f.min_reliability}
        if f.min_inet_down_mbps is not None:
            q["inet_down"] = {"gte": f.min_inet_down_mbps}
        if f.min_cuda is not None:
            q["cuda_max_good"] = {"gte": f.min_cuda}
        if f.locations:
            q["geolocation"] = {"in": list(f.locations)}
        return q

    def _offer(self, row: dict[str, Any], interruptible: bool, disk_gb: float) -> Offer | None:
        """One search row as an Offer priced as it would bill (see the module's notes), or None."""
        try:
            offer_id = str(row["id"])
            storage = self._storage_dph(row, disk_gb, interruptible)
            if interruptible:
                priced = self._bid_price(row, storage)
                if priced is None:
                    return None
                bid, dph = priced
                min_bid = to_float(row.get("min_bid"))
            else:
                bid, min_bid = None, None
                dph = self._on_demand_price(row, storage)
                if dph is None:
                    return None
            verification = row.get("verification")
            return Offer(
                provider=self.name,
                offer_id=offer_id,
                gpu_name=str(row.get("gpu_name") or ""),
                num_gpus=int(row.get("num_gpus") or 1),
                vram_mb=int(row.get("gpu_ram") or 0),
                dph=dph,
                interruptible=interruptible,
                min_bid=min_bid,
                bid=bid,
                machine_id=str(row["machine_id"]) if row.get("machine_id") is not None else None,
                reliability=to_float(row.get("reliability")),
                verified=(verification == "verified") if verification is not None else row.get("verified"),
                inet_down_mbps=to_float(row.get("inet_down")),
                disk_gb=to_float(row.get("disk_space")),
                cuda=to_float(row.get("cuda_max_good")),
                location=_country(row.get("geolocation")),
                storage_dph=storage,
            )
        except (KeyError, TypeError, ValueError):
            log.warning("vast: skipping an offer with an unexpected shape (id %s)", row.get("id"))
            return None

    def _storage_dph(self, row: dict[str, Any], disk_gb: float, interruptible: bool) -> float | None:
        """What the disk bills per hour, from every reading the row offers (see the module's notes);
        None when no reading is believable."""
        readings: dict[str, float | None] = {}
        cost = to_float(row.get("storage_cost"))
        readings["storage_cost"] = None if cost is None else cost * disk_gb / HOURS_PER_MONTH
        breakdown = row.get("search")
        if isinstance(breakdown, dict):
            readings["search.diskHour"] = to_float(breakdown.get("diskHour"))
        if not interruptible and row.get("dph_base") is not None:
            total, base = to_float(row.get("dph_total")), to_float(row.get("dph_base"))
            readings["dph_total - dph_base"] = None if total is None or base is None else total - base
        most = STORAGE_MAX_USD_PER_GB_MONTH * max(disk_gb, 1.0) / HOURS_PER_MONTH
        believed = [v for v in readings.values() if v is not None and math.isfinite(v) and 0 <= v <= most]
        present = [v for v in readings.values() if v is not None]
        if len(believed) < len(present) or (believed and max(believed) - min(believed) > 0.002):
            self._warn_once(row, f"storage readings disagree or are not believable: {_readings(readings)}")
        if not believed:
            return None
        return _round_up(max(believed))

    def _bid_price(self, row: dict[str, Any], storage: float | None) -> tuple[float, float] | None:
        """(the bid to send, the $/h it bills: bid + storage), or None when the offer cannot be bid on."""
        min_bid = to_float(row.get("min_bid"))
        if min_bid is None or not math.isfinite(min_bid) or min_bid <= 0 or storage is None:
            self._warn_once(row, f"no usable minimum bid or storage (min_bid {row.get('min_bid')!r})")
            return None
        # Bid a little over the minimum so the first higher bid does not stop us at once, and never more
        # than the GPU costs on-demand.
        bid = min_bid * (1 + self._bid_margin)
        gpu_on_demand = to_float(row.get("dph_base"))
        if gpu_on_demand is not None and math.isfinite(gpu_on_demand) and gpu_on_demand > 0:
            bid = min(bid, gpu_on_demand)
        bid = _round_up(bid, 4)
        if bid < min_bid:  # the minimum bid is above the on-demand price: no sense bidding
            return None
        dph = _round_up(bid + storage)
        return (bid, dph) if is_price(dph) else None

    def _on_demand_price(self, row: dict[str, Any], storage: float | None) -> float | None:
        readings = [to_float(row.get("dph_total"))]
        base = to_float(row.get("dph_base"))
        if base is not None and storage is not None:
            readings.append(base + storage)
        breakdown = row.get("search")
        if isinstance(breakdown, dict):
            readings.append(to_float(breakdown.get("totalHour")))
        prices = [p for p in readings if p is not None and math.isfinite(p) and 0 <= p <= PRICE_MAX]
        if not prices:
            self._warn_once(row, f"no usable on-demand price (dph_total {row.get('dph_total')!r})")
            return None
        return _round_up(max(prices))

    def _warn_once(self, row: dict[str, Any], what: str) -> None:
        key = str(row.get("id"))
        if len(self._warned) > 10_000:  # a manager that runs for months sees many offers
            self._warned.clear()
        if key not in self._warned:
            self._warned.add(key)
            log.warning("vast: offer %s: %s", key, what)

    @staticmethod
    def _keep(o: Offer, f: OfferFilter) -> bool:
        """The server filtered already; this re-checks what the server cannot (the bid we would place)."""
        if f.max_dph is not None and o.dph > f.max_dph:
            return False
        if f.locations and o.location not in f.locations:
            return False
        return o.vram_mb >= f.min_vram_mb

    def _forget_offer(self, offer_id: str) -> None:
        for key, (t, offers) in list(self._cache.items()):
            self._cache[key] = (t, [o for o in offers if o.offer_id != offer_id])

    # ------------------------------------------------------------------ create
    def create(self, offer: Offer, spec: LaunchSpec) -> str:
        self._check_spec(offer, spec)
        price = spec.bid_price if offer.interruptible else None
        try:
            answer = self._call(
                "create",
                lambda: self._sdk.create_instance(
                    id=int(offer.offer_id),
                    image=spec.image,
                    disk=spec.disk_gb,
                    env=dict(spec.env),
                    price=price,  # explicit: a bid stays a bid, never a silent on-demand rent
                    label=spec.label,
                    onstart_cmd=spec.onstart,
                    runtype=self._runtype,
                    # Refuse rather than leave a stopped instance when it cannot be scheduled.
                    cancel_unavail=True,
                ),
                retry_5xx=False,  # a 5xx may still have rented; reconciliation finds it by label
            )
        except _HTTPFailure as e:
            self._forget_offer(offer.offer_id)
            leftover = _contract(e.body)
            if leftover is not None:
                self._destroy_leftover(leftover, e.message)
            gone = e.status in (404, 410) or _error_code(e.body) in OFFER_GONE_ERRORS
            # The offer itself is the trouble (taken, or a minimum bid the search did not tell): trying it
            # again after the next search would fail the same way.
            refused = gone or leftover is not None or _error_code(e.body) in BID_REFUSED_ERRORS
            if refused:
                self._refuse(offer.offer_id)
            raise ProviderError(
                f"{e.message} (offer {offer.offer_id})",
                retryable=gone or e.retryable,
                provider_id=leftover,
                offer_refused=refused,
            ) from None

        self._forget_offer(offer.offer_id)
        contract = _contract(answer)
        if not isinstance(answer, dict) or answer.get("success") is False or contract is None:
            if contract is not None:
                self._destroy_leftover(contract, "create answered without success")
            self._refuse(offer.offer_id)
            raise ProviderError(
                f"vast create on offer {offer.offer_id} failed: {_describe(answer)}",
                retryable=False,
                provider_id=contract,
                offer_refused=True,
            )
        if offer.storage_dph is not None:
            self._storage[contract] = offer.storage_dph
        if price is not None:
            self._verify_bid(contract, offer, price)
        return contract

    def _check_spec(self, offer: Offer, spec: LaunchSpec) -> None:
        if offer.provider != self.name:
            raise ProviderError(f"offer {offer.offer_id} is from {offer.provider}, not vast")
        # Checked before renting: a price the books refuse would fail the record after the rent, leaving
        # an instance to destroy on every tick.
        if not is_price(offer.dph):
            raise ProviderError(f"offer {offer.offer_id} has no usable price ({offer.dph!r}/h); not renting")
        if spec.bid_price is not None and not (is_price(spec.bid_price) and spec.bid_price > 0):
            raise ProviderError(f"bid {spec.bid_price!r} on offer {offer.offer_id} is not a usable price")
        if offer.interruptible and spec.bid_price is None:
            # Without a price Vast rents on-demand at full price, silently.
            raise ProviderError(f"offer {offer.offer_id} is interruptible but the launch has no bid_price")
        if not offer.interruptible and spec.bid_price is not None:
            raise ProviderError(f"offer {offer.offer_id} is on-demand but the launch carries a bid_price")
        if spec.bid_price is not None and offer.min_bid is not None and spec.bid_price < offer.min_bid:
            raise ProviderError(
                f"bid {spec.bid_price} is below the offer's minimum {offer.min_bid}", retryable=True
            )
        if len(spec.onstart) > ONSTART_MAX:
            raise ProviderError(f"onstart is {len(spec.onstart)} characters; Vast takes {ONSTART_MAX}")
        if len(spec.label) > LABEL_MAX:
            raise ProviderError(f"label is longer than {LABEL_MAX} characters")
        long_env = sorted(k for k, v in spec.env.items() if len(v) > ENV_VALUE_MAX)
        if long_env:
            raise ProviderError(f"env values longer than {ENV_VALUE_MAX} characters: {', '.join(long_env)}")

    def _verify_bid(self, contract: str, offer: Offer, bid: float) -> None:
        """Check from the provider's own record that we got a bid rent, not an on-demand one."""
        try:
            row = self._call("show", lambda: self._sdk.show_instance(id=int(contract)))
        except (_HTTPFailure, ProviderError) as e:
            # Rented as asked, per the answer; the listing on the next tick is the backstop.
            log.warning("vast: could not re-read instance %s after create: %s", contract, e)
            return
        if not row:
            log.warning("vast: instance %s not shown right after create", contract)
            return
        dph = to_price(row.get("dph_total"))
        # dph_total of a bid rent is the bid plus storage; on-demand bills the full ask. The slack
        # covers a storage reading off by a little without letting an on-demand price through.
        is_bid = row.get("is_bid")
        expected = bid + (offer.storage_dph or 0.0)
        if is_bid is False or (dph is not None and dph > expected + max(0.05, 0.15 * bid)):
            self._destroy_leftover(contract, f"billed {dph}/h, not the bid {bid}/h")
            self._refuse(offer.offer_id)
            raise ProviderError(
                f"vast instance {contract} billed {dph}/h on a bid of {bid}/h (on-demand?); destroyed",
                provider_id=contract,
                offer_refused=True,
            )

    def _destroy_leftover(self, contract: str, why: str) -> None:
        log.warning("vast: destroying instance %s left by a failed create (%s)", contract, why)
        try:
            self.destroy(contract)
        except ProviderError as e:
            log.error("vast: could not destroy leftover instance %s: %s", contract, e)

    # ------------------------------------------------------------------ list / destroy
    def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        # The v1 list filters labels by equality only, so page through all and match the prefix here.
        params: dict[str, Any] = {
            "select_filters": {},
            "order_by": [{"col": "id", "dir": "asc"}],
            "limit": 25,
        }
        found: list[ProviderInstance] = []
        seen_tokens: set[str] = set()
        while True:
            page = self._call("list", lambda: self._sdk.show_instances_v1(dict(params)))
            if not isinstance(page, dict):
                raise ProviderError(f"vast list answered {_describe(page)}", retryable=True)
            for row in page.get("instances") or []:
                label = row.get("label")
                if isinstance(label, str) and label.startswith(label_prefix):
                    found.append(self._instance(row))
            token = page.get("next_token")
            if not token or token in seen_tokens:
                return found
            seen_tokens.add(token)
            params["after_token"] = token

    def _instance(self, row: dict[str, Any]) -> ProviderInstance:
        """One listing row; a field with an odd value is read as unknown, so that one row cannot stop the
        reconciliation of all the others (only a row without an id raises: it cannot be acted on)."""
        if row.get("id") is None:
            raise ProviderError("vast list answered an instance without an id", retryable=True)
        return ProviderInstance(
            provider=self.name,
            provider_id=str(row["id"]),
            label=row["label"],
            status=map_status(row),
            raw_status=_raw_status(row),
            dph=to_price(row.get("dph_total")),
            machine_id=str(row["machine_id"]) if row.get("machine_id") is not None else None,
            gpu_name=_text(row.get("gpu_name")),
            started_at=_timestamp(row.get("start_date")),
            status_msg=_text(row.get("status_msg")),
            storage_dph=self._instance_storage(row),
        )

    def _instance_storage(self, row: dict[str, Any]) -> float | None:
        """What an instance bills while not running: as priced when rented here, else from the row's own
        storage_cost and disk when it has them (None: unknown, the books then charge the full price)."""
        known = self._storage.get(str(row["id"]))
        if known is not None:
            return known
        cost, disk = to_float(row.get("storage_cost")), to_float(row.get("disk_space"))
        if cost is None or disk is None or not (0 <= cost <= STORAGE_MAX_USD_PER_GB_MONTH and disk >= 0):
            return None
        return _round_up(cost * disk / HOURS_PER_MONTH) if math.isfinite(cost * disk) else None

    def destroy(self, provider_id: str) -> None:
        self._storage.pop(provider_id, None)
        try:
            answer = self._call("destroy", lambda: self._sdk.destroy_instance(id=int(provider_id)))
        except _HTTPFailure as e:
            if e.status == 404 or _error_code(e.body) == "no_such_instance":
                return  # already gone
            raise ProviderError(f"{e.message} (instance {provider_id})", retryable=e.retryable) from None
        if isinstance(answer, dict) and answer.get("success") is False:
            if _error_code(answer) == "no_such_instance":
                return
            raise ProviderError(f"vast destroy {provider_id} failed: {_describe(answer)}", retryable=True)

    # ------------------------------------------------------------------ transport
    def _call(self, endpoint: str, fn: Callable[[], T], *, retry_5xx: bool = True) -> T:
        """One SDK call, paced per endpoint, retried with backoff on 429, 5xx and connection errors."""
        for attempt in range(self._max_attempts):
            self._limiter.wait(endpoint)
            last = attempt == self._max_attempts - 1
            try:
                return fn()
            except requests.HTTPError as e:
                failure = _HTTPFailure.of(endpoint, e, self._secret)
                quota = failure.status == 429 and _error_code(failure.body) == "search_quota_exceeded"
                transient = failure.status == 429 or (failure.status >= 500 and retry_5xx)
                if quota or not transient or last:
                    raise failure from None
                log.info("vast %s: HTTP %s, retrying", endpoint, failure.status)
            except requests.RequestException as e:  # a dropped connection, a timeout, an answer cut off
                if last or not retry_5xx:
                    raise ProviderError(
                        f"vast {endpoint}: {type(e).__name__} talking to the API", retryable=True
                    ) from None
                log.info("vast %s: %s, retrying", endpoint, type(e).__name__)
            except (KeyError, TypeError, ValueError) as e:
                # The SDK post-processes answers (start_date arithmetic, extra_env); a shape it
                # does not expect lands here.
                raise ProviderError(f"vast {endpoint}: unexpected answer ({type(e).__name__})") from None
            self._sleep(min(self._backoff_max_s, self._backoff_s * 2**attempt))
        raise AssertionError("unreachable")


class _HTTPFailure(ProviderError):
    """An HTTP error answer, with its status and JSON body (internal; callers see ProviderError)."""

    def __init__(self, message: str, status: int, body: Any) -> None:
        super().__init__(message, retryable=status == 429 or status >= 500)
        self.message = message
        self.status = status
        self.body = body

    @classmethod
    def of(cls, endpoint: str, e: requests.HTTPError, secret: str) -> _HTTPFailure:
        resp = e.response
        status = resp.status_code if resp is not None else 0
        try:
            body = resp.json() if resp is not None else None
        except ValueError:
            body = None
        message = f"vast {endpoint}: HTTP {status} {_describe(body)}".replace(secret, "***")
        return cls(message, status, body)


def map_status(row: dict[str, Any]) -> ProviderStatus:
    actual = row.get("actual_status")
    cur, nxt, intended = row.get("cur_state"), row.get("next_state"), row.get("intended_status")
    msg = (_text(row.get("status_msg")) or "").lower()
    if "oci runtime create failed" in msg or actual in DEAD_ACTUAL:
        return ProviderStatus.DEAD
    if actual in ("stopped", "frozen"):
        return ProviderStatus.STOPPED
    if cur == nxt == intended == "stopped":
        return ProviderStatus.STOPPED  # outbid (or stopped) before it ever ran
    if actual == "running":
        return ProviderStatus.STOPPED if cur == "stopped" else ProviderStatus.RUNNING
    # null, created, loading, rebooting, or a state we do not know yet: the ready timeout decides.
    return ProviderStatus.PROVISIONING


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _timestamp(value: Any) -> datetime | None:
    seconds = to_float(value)
    try:
        return datetime.fromtimestamp(seconds, UTC) if seconds else None
    except (OverflowError, OSError, ValueError):
        return None


def _round_up(value: float, places: int = 6) -> float:
    """Rounded up, never down: a price booked a hair under the bill lets the caps be crossed by it."""
    scale = 10**places
    return math.ceil(value * scale - 1e-9) / scale


def _readings(readings: dict[str, float | None]) -> str:
    return ", ".join(f"{k}={'?' if v is None else f'{v:.6f}'}" for k, v in readings.items())


def _raw_status(row: dict[str, Any]) -> str:
    return (
        f"{row.get('actual_status') or 'null'} (cur={row.get('cur_state')}, next={row.get('next_state')}, "
        f"intended={row.get('intended_status')})"
    )


def _contract(answer: Any) -> str | None:
    if isinstance(answer, dict) and answer.get("new_contract") not in (None, "", 0):
        return str(answer["new_contract"])
    return None


def _error_code(body: Any) -> str | None:
    return body.get("error") if isinstance(body, dict) else None


def _describe(body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "msg", "message", "detail") if body.get(k)]
        if parts:
            return ": ".join(parts)[:300]
    return "(no error detail)" if body is None else str(body)[:300]


def _country(geo: Any) -> str | None:
    # Vast writes "Spain, ES": the country code is the last two letters, as the SDK's georegion code reads it.
    if isinstance(geo, str) and len(geo.strip()) >= 2:
        return geo.strip()[-2:]
    return None
