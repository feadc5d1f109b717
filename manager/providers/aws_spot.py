"""AWS EC2 Spot through boto3: one-time spot instances, the bootstrap as user data, our label as a tag.

Offers are (instance type, availability zone) pairs from a configured list of GPU instance types, priced
from describe_spot_price_history; GPU facts come from describe_instance_types (GpuInfo), and from the
small GPU_TABLE below only for a type the API does not describe.
"""

from __future__ import annotations

import logging
import shlex
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from manager.providers.base import (
    LaunchSpec,
    Offer,
    OfferFilter,
    ProviderError,
    ProviderInstance,
    ProviderStatus,
    to_float,
)

log = logging.getLogger(__name__)

LABEL_TAG = "gpuq:label"
DISK_TAG = "gpuq:disk_gb"
HOURS_PER_MONTH = 730  # AWS prices storage by the GB-month and bills it by the second on that basis
DEFAULT_INSTANCE_TYPES = ("g4dn.xlarge", "g5.xlarge", "g6.xlarge")
USER_DATA_MAX = 16 * 1024  # bytes, before base64 (EC2's limit)


@dataclass(frozen=True)
class GpuFacts:
    gpu_name: str
    num_gpus: int
    vram_mb: int  # per GPU, MiB as EC2 reports it


# Only for types describe_instance_types does not answer with GpuInfo (figures from AWS's type pages).
GPU_TABLE: dict[str, GpuFacts] = {
    "g4dn.xlarge": GpuFacts("T4", 1, 16_384),
    "g4dn.2xlarge": GpuFacts("T4", 1, 16_384),
    "g5.xlarge": GpuFacts("A10G", 1, 22_888),
    "g5.2xlarge": GpuFacts("A10G", 1, 22_888),
    "g6.xlarge": GpuFacts("L4", 1, 22_888),
    "g6.2xlarge": GpuFacts("L4", 1, 22_888),
    "g6e.xlarge": GpuFacts("L40S", 1, 45_776),
}

# Region to country code, for OfferFilter.locations; a region not here never matches a location filter.
REGION_COUNTRY = {
    "us-east-1": "US",
    "us-east-2": "US",
    "us-west-1": "US",
    "us-west-2": "US",
    "ca-central-1": "CA",
    "eu-west-1": "IE",
    "eu-west-2": "GB",
    "eu-west-3": "FR",
    "eu-central-1": "DE",
    "eu-south-1": "IT",
    "eu-south-2": "ES",
    "eu-north-1": "SE",
    "ap-northeast-1": "JP",
    "ap-southeast-2": "AU",
}

STATES = {
    "pending": ProviderStatus.PROVISIONING,
    "running": ProviderStatus.RUNNING,
    "stopping": ProviderStatus.STOPPED,
    "stopped": ProviderStatus.STOPPED,
    "shutting-down": ProviderStatus.DEAD,
    # Billing has ended; EC2 still lists it for about an hour. Not GONE, every destroy of ours read as
    # unverified: the row stayed on the books as billing and the destroy failed tick after tick.
    "terminated": ProviderStatus.GONE,
}

# Capacity and price refusals that may clear on another try or in another zone.
RETRYABLE_CODES = {
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "RequestLimitExceeded",
    "Throttling",
    "InternalError",
    "Unavailable",
    "ServiceUnavailable",
}


class AwsSpotProvider:
    name = "aws_spot"

    def __init__(
        self,
        *,
        region: str,
        ami_id: str,
        instance_types: Iterable[str] = DEFAULT_INSTANCE_TYPES,
        subnet_id: str | None = None,
        security_group_ids: Iterable[str] = (),
        iam_instance_profile: str | None = None,
        key_name: str | None = None,
        endpoint_url: str | None = None,
        client: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
        search_ttl_s: float = 60.0,
        page_size: int = 500,
        price_margin: float = 0.2,
        ebs_usd_per_gb_month: float = 0.08,
    ) -> None:
        # Spot bills the market price, up to our MaxPrice: bid this much over today's price so a small
        # rise does not interrupt us, and let the money caps see that ceiling, not today's price.
        self._price_margin = price_margin
        # The gp3 root volume bills by the GB-month whatever the instance does (gp3 in us-east-1: $0.08;
        # dearer in some regions): the money caps count it on top of the instance's price.
        self._ebs_usd_per_gb_hour = ebs_usd_per_gb_month / HOURS_PER_MONTH
        # boto3's "standard" retry mode backs off on throttling (RequestLimitExceeded) and 5xx; the
        # ClientToken we send makes a retried RunInstances safe.
        self._ec2 = client or boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(retries={"mode": "standard", "max_attempts": 5}),
        )
        self._region = region
        self._ami_id = ami_id
        self._types = tuple(instance_types)
        self._subnet_id = subnet_id
        self._security_group_ids = list(security_group_ids)
        self._iam_instance_profile = iam_instance_profile
        self._key_name = key_name
        self._clock = clock
        self._search_ttl_s = search_ttl_s
        self._page_size = page_size
        self._facts: dict[str, GpuFacts] | None = None
        self._root_device: str | None = None
        self._subnet_az: str | None = None
        self._prices: tuple[float, dict[tuple[str, str], float]] | None = None

    # ------------------------------------------------------------------ search
    def gpu_facts(self) -> dict[str, GpuFacts]:
        """GPU name, count and memory per configured type; asked once (types do not change)."""
        if self._facts is None:
            facts: dict[str, GpuFacts] = {}
            for itype in self._types:
                found = self._describe_type(itype) or GPU_TABLE.get(itype)
                if found is None:
                    log.warning("aws_spot: no GPU facts for %s; it is not offered", itype)
                else:
                    facts[itype] = found
            self._facts = facts
        return self._facts

    def _describe_type(self, itype: str) -> GpuFacts | None:
        # One type per call: an unknown type fails the whole call (InvalidInstanceType).
        try:
            answer = self._ec2.describe_instance_types(InstanceTypes=[itype])
        except (ClientError, BotoCoreError) as e:
            log.info("aws_spot: describe_instance_types %s: %s", itype, _code(e))
            return None
        for t in answer.get("InstanceTypes", []):
            gpus = (t.get("GpuInfo") or {}).get("Gpus") or []
            if gpus:
                g = gpus[0]
                return GpuFacts(
                    gpu_name=g.get("Name", ""),
                    num_gpus=sum(int(x.get("Count", 1)) for x in gpus),
                    vram_mb=int((g.get("MemoryInfo") or {}).get("SizeInMiB", 0)),
                )
        return None

    def search_offers(self, filters: OfferFilter) -> list[Offer]:
        if not filters.interruptible:
            return []  # this provider rents spot only
        country = REGION_COUNTRY.get(self._region)
        if filters.locations and country not in filters.locations:
            return []
        wanted = {n.upper() for n in filters.gpu_names}
        facts = {
            t: f
            for t, f in self.gpu_facts().items()
            if (not wanted or f.gpu_name.upper() in wanted) and f.vram_mb >= filters.min_vram_mb
        }
        if not facts:
            return []
        subnet_az = self._subnet_zone()
        offers = []
        for (itype, az), price in self._spot_prices().items():
            f = facts.get(itype)
            if f is None or (subnet_az and az != subnet_az):
                continue
            ceiling = price * (1 + self._price_margin)
            # The volume priced at the queue's min_disk_gb, which the manager's config keeps at or above the
            # disk it launches with: never below what will bill (the listing then prices the real volume).
            dph = ceiling + self._storage_dph(filters.min_disk_gb)
            if filters.max_dph is not None and dph > filters.max_dph:
                continue
            offers.append(
                Offer(
                    provider=self.name,
                    offer_id=f"{itype}@{az}",
                    gpu_name=f.gpu_name,
                    num_gpus=f.num_gpus,
                    vram_mb=f.vram_mb,
                    dph=dph,  # the most it can bill: the MaxPrice we bid, plus the root volume
                    interruptible=True,
                    bid=ceiling,
                    verified=True,
                    location=country,
                )
            )
        offers.sort(key=lambda o: o.dph)
        return offers[: filters.limit]

    def _storage_dph(self, disk_gb: float | None) -> float:
        return (disk_gb or 0) * self._ebs_usd_per_gb_hour

    def _spot_prices(self) -> dict[tuple[str, str], float]:
        """The latest spot price per (type, zone), cached for the search TTL."""
        now = self._clock()
        if self._prices is not None and now - self._prices[0] < self._search_ttl_s:
            return self._prices[1]
        latest: dict[tuple[str, str], tuple[datetime, float]] = {}
        try:
            pages = self._ec2.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=list(self._types),
                ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
                StartTime=datetime.now(UTC),  # only the price in effect now, per zone
            )
            for page in pages:
                for row in page.get("SpotPriceHistory", []):
                    key = (row["InstanceType"], row["AvailabilityZone"])
                    stamp = row.get("Timestamp") or datetime.min.replace(tzinfo=UTC)
                    if key not in latest or stamp > latest[key][0]:
                        latest[key] = (stamp, float(row["SpotPrice"]))
        except (ClientError, BotoCoreError) as e:
            raise ProviderError(f"aws_spot spot price history: {_code(e)}", retryable=True) from None
        prices = {k: v[1] for k, v in latest.items()}
        self._prices = (now, prices)
        return prices

    def _subnet_zone(self) -> str | None:
        if self._subnet_id and self._subnet_az is None:
            try:
                (subnet,) = self._ec2.describe_subnets(SubnetIds=[self._subnet_id])["Subnets"]
            except (ClientError, BotoCoreError, ValueError) as e:
                raise ProviderError(
                    f"aws_spot subnet {self._subnet_id}: {_code(e)}", retryable=True
                ) from None
            self._subnet_az = subnet["AvailabilityZone"]
        return self._subnet_az

    # ------------------------------------------------------------------ create
    def create(self, offer: Offer, spec: LaunchSpec) -> str:
        if offer.provider != self.name or "@" not in offer.offer_id:
            raise ProviderError(f"offer {offer.offer_id} is not an aws_spot offer")
        itype, az = offer.offer_id.split("@", 1)
        user_data = build_user_data(spec)
        if len(user_data.encode()) > USER_DATA_MAX:
            raise ProviderError(f"user data is {len(user_data.encode())} bytes; EC2 takes {USER_DATA_MAX}")
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if spec.bid_price is not None:
            spot["MaxPrice"] = f"{spec.bid_price:.6f}"  # else capped at the on-demand price
        tags = [
            {"Key": LABEL_TAG, "Value": spec.label},
            {"Key": "Name", "Value": spec.label},
            {"Key": DISK_TAG, "Value": str(spec.disk_gb)},  # the listing prices the volume from it
        ]
        args: dict[str, Any] = {
            "ImageId": self._ami_id,
            "InstanceType": itype,
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": user_data,
            "ClientToken": uuid.uuid4().hex,
            "InstanceMarketOptions": {"MarketType": "spot", "SpotOptions": spot},
            # A worker that powers off ends the billing instead of leaving a stopped volume.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "BlockDeviceMappings": [
                {
                    "DeviceName": self._root_device_name(),
                    "Ebs": {"VolumeSize": spec.disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ],
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": tags},
                {"ResourceType": "volume", "Tags": tags},
            ],
        }
        if self._subnet_id:
            args["SubnetId"] = self._subnet_id  # fixes the zone
        else:
            args["Placement"] = {"AvailabilityZone": az}
        if self._security_group_ids:
            args["SecurityGroupIds"] = self._security_group_ids
        if self._iam_instance_profile:
            args["IamInstanceProfile"] = {"Name": self._iam_instance_profile}
        if self._key_name:
            args["KeyName"] = self._key_name
        try:
            answer = self._ec2.run_instances(**args)
        except ClientError as e:
            code = _code(e)
            raise ProviderError(
                f"aws_spot run_instances {itype} in {az}: {code}", retryable=code in RETRYABLE_CODES
            ) from None
        except BotoCoreError as e:
            raise ProviderError(f"aws_spot run_instances: {type(e).__name__}", retryable=True) from None
        instances = answer.get("Instances") or []
        if not instances:
            raise ProviderError("aws_spot run_instances answered no instance", retryable=True)
        return instances[0]["InstanceId"]

    def _root_device_name(self) -> str:
        # The root volume is resized only under the AMI's own root device name; another name adds a disk.
        if self._root_device is None:
            try:
                images = self._ec2.describe_images(ImageIds=[self._ami_id])["Images"]
            except (ClientError, BotoCoreError) as e:
                raise ProviderError(f"aws_spot AMI {self._ami_id}: {_code(e)}") from None
            if not images or not images[0].get("RootDeviceName"):
                raise ProviderError(f"aws_spot AMI {self._ami_id} not found")
            self._root_device = images[0]["RootDeviceName"]
        return self._root_device

    # ------------------------------------------------------------------ list / destroy
    def list_instances(self, label_prefix: str) -> list[ProviderInstance]:
        found: list[ProviderInstance] = []
        try:
            # What each instance bills now: the reconciliation records price changes from this listing and
            # counts orphans at it, so it must not depend on a search having run in this process.
            prices = self._spot_prices()
        except ProviderError as e:
            log.warning("aws_spot: listing without fresh prices: %s", e)
            prices = self._prices[1] if self._prices else {}
        facts = self._facts or {}
        try:
            pages = self._ec2.get_paginator("describe_instances").paginate(
                Filters=[{"Name": "tag-key", "Values": [LABEL_TAG]}],
                PaginationConfig={"PageSize": self._page_size},
            )
            for page in pages:
                for reservation in page.get("Reservations", []):
                    for inst in reservation.get("Instances", []):
                        label = _tag(inst, LABEL_TAG) or ""
                        if not label.startswith(label_prefix):
                            continue
                        itype = inst.get("InstanceType", "")
                        az = (inst.get("Placement") or {}).get("AvailabilityZone", "")
                        state = (inst.get("State") or {}).get("Name", "")
                        reason = (inst.get("StateReason") or {}).get("Message")
                        gpu = facts.get(itype) or GPU_TABLE.get(itype)
                        price = prices.get((itype, az))
                        disk = _tag(inst, DISK_TAG)
                        found.append(
                            ProviderInstance(
                                provider=self.name,
                                provider_id=inst["InstanceId"],
                                label=label,
                                status=STATES.get(state, ProviderStatus.PROVISIONING),
                                raw_status=state,
                                dph=None if price is None else price + self._storage_dph(to_float(disk)),
                                machine_id=None,
                                gpu_name=gpu.gpu_name if gpu else None,
                                started_at=inst.get("LaunchTime"),
                                status_msg=reason,
                            )
                        )
        except (ClientError, BotoCoreError) as e:
            raise ProviderError(f"aws_spot describe_instances: {_code(e)}", retryable=True) from None
        return found

    def destroy(self, provider_id: str) -> None:
        try:
            self._ec2.terminate_instances(InstanceIds=[provider_id])
        except ClientError as e:
            if _code(e) == "InvalidInstanceID.NotFound":
                return  # already gone
            raise ProviderError(f"aws_spot terminate {provider_id}: {_code(e)}", retryable=True) from None
        except BotoCoreError as e:
            raise ProviderError(
                f"aws_spot terminate {provider_id}: {type(e).__name__}", retryable=True
            ) from None


def build_user_data(spec: LaunchSpec) -> str:
    """The bootstrap with the launch's env exported ahead of it (EC2 has no container env)."""
    body = spec.onstart
    if body.startswith("#!"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
    env = {"GPUQ_IMAGE": spec.image, "GPUQ_LABEL": spec.label, **spec.env}
    bad = sorted(k for k in env if not k.isidentifier())
    if bad:
        raise ProviderError(f"env names that are not shell names: {', '.join(bad)}")
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return "#!/bin/bash\n" + exports + body


def _tag(inst: dict[str, Any], key: str) -> str | None:
    for t in inst.get("Tags") or []:
        if t.get("Key") == key:
            return t.get("Value")
    return None


def _code(e: Exception) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code") or "ClientError")
    return type(e).__name__
