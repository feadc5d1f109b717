"""The seam between the manager and a place that rents machines (Vast.ai, AWS EC2 Spot, local processes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol


class ProviderStatus(StrEnum):
    """What the provider says of an instance, normalised across providers."""

    PROVISIONING = "provisioning"  # rented, not yet running (Vast: null/created/loading; EC2: pending)
    RUNNING = "running"
    STOPPED = "stopped"  # not running but may still bill (Vast: stopped/outbid, storage billed)
    DEAD = "dead"  # will never run again (Vast: exited/unknown/offline, OCI errors; EC2: terminated)
    GONE = "gone"  # destroyed / no longer listed


@dataclass(frozen=True)
class Offer:
    provider: str
    offer_id: str
    gpu_name: str
    num_gpus: int
    vram_mb: int  # per GPU
    dph: float  # $/hour total, as it would bill: for interruptible offers the bid plus storage
    interruptible: bool
    min_bid: float | None = None
    bid: float | None = None  # the $/hour bid to place for an interruptible rent (storage bills on top)
    machine_id: str | None = None
    reliability: float | None = None
    verified: bool | None = None
    inet_down_mbps: float | None = None
    disk_gb: float | None = None
    cuda: float | None = None
    location: str | None = None
    # $/hour the disk bills in every state (storage; in dph already): what a stopped or loading instance
    # bills at a provider that charges the rest only while running. None: unknown, or billed as dph.
    storage_dph: float | None = None


@dataclass(frozen=True)
class OfferFilter:
    gpu_names: tuple[str, ...] = ()  # empty: any
    min_vram_mb: int = 0
    max_dph: float | None = None
    min_reliability: float | None = None
    verified_only: bool = True
    min_inet_down_mbps: float | None = None
    min_disk_gb: float = 50
    min_cuda: float | None = None
    locations: tuple[str, ...] = ()  # country codes; empty: any
    interruptible: bool = True
    limit: int = 50
    provider: str | None = None  # the provider the queue rents from; None: any


@dataclass(frozen=True)
class LaunchSpec:
    label: str  # our label, e.g. "gpuq:<deployment>:<queue>"; reconciliation lists by it
    image: str
    disk_gb: int
    onstart: str  # the small bootstrap stub (Vast: <= 4048 characters)
    env: dict[str, str] = field(default_factory=dict)
    bid_price: float | None = None  # interruptible rent when set; on-demand when None


@dataclass(frozen=True)
class ProviderInstance:
    provider: str
    provider_id: str
    label: str
    status: ProviderStatus
    raw_status: str | None
    dph: float | None
    machine_id: str | None = None
    gpu_name: str | None = None
    started_at: datetime | None = None
    status_msg: str | None = None
    storage_dph: float | None = None  # what it bills while not running (see Offer.storage_dph); None: unknown


class ProviderError(Exception):
    """A provider call failed. `retryable` when it may go through later (429, 5xx, offer taken).

    `offer_refused`: a create failed because of the offer itself (taken, gone, a minimum bid it no longer
    honours), so retrying that offer would fail again: the caller should leave its machine alone a while."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        provider_id: str | None = None,
        offer_refused: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.provider_id = provider_id  # set when a failed create still left an instance to destroy
        self.offer_refused = offer_refused


class Provider(Protocol):
    name: str

    def search_offers(self, filters: OfferFilter) -> list[Offer]: ...

    def create(self, offer: Offer, spec: LaunchSpec) -> str:
        """Rent `offer`; return the provider's instance id. On failure raise ProviderError, after destroying
        anything the failed call left billing."""

    def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        """Every instance of ours (label starting with label_prefix), all pages."""

    def destroy(self, provider_id: str) -> None:
        """Ask the provider to destroy; the caller verifies by listing again."""


def to_float(value: Any) -> float | None:
    """A provider's number (a float, a numeric string, None or junk) as a float, or None."""
    try:
        return float(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


# The dearest $/h the books hold (instances.dph is numeric(12, 6)).
PRICE_MAX = 999_999.0


def is_price(value: Any) -> bool:
    """A $/h the caps and the books can use: a finite number, not negative, not above PRICE_MAX. An offer
    priced otherwise must never be rented (the database refuses a negative price after the rent, and a
    NaN passes every cap)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value <= PRICE_MAX
    )


def to_price(value: Any) -> float | None:
    """A provider's $/h as one the books and the caps can use: None when it is no price at all (junk,
    NaN, negative), and an absurdly high one as PRICE_MAX, so that it is recorded and the caps shed it.

    A NaN passes every comparison as false, so one NaN price switched the caps off; a negative or huge one
    was refused by the database and crashed the tick before it destroyed anything."""
    price = to_float(value)
    if price is None or math.isnan(price) or price < 0:
        return None
    return min(price, PRICE_MAX)
