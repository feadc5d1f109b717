"""AwsSpotProvider with real boto3 against moto's EC2 server on 127.0.0.1."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import boto3
import pytest
import requests

from manager.providers import aws_spot
from manager.providers.aws_spot import DISK_TAG, LABEL_TAG, AwsSpotProvider, GpuFacts, build_user_data
from manager.providers.base import LaunchSpec, OfferFilter, ProviderError, ProviderStatus

REGION = "eu-central-1"
LABEL = "gpuq:test:tts"
TYPES = ("g4dn.xlarge", "g5.xlarge", "g6.xlarge")


@pytest.fixture
def ec2(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    requests.post(f"{moto_url}/moto-api/reset", timeout=10)
    yield boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


@pytest.fixture(scope="module")
def ami(moto_url: str) -> str:
    # One of moto's built-in AMIs; they come back with the same ids after each reset.
    client = boto3.client(
        "ec2", region_name=REGION, endpoint_url=moto_url, aws_access_key_id="t", aws_secret_access_key="t"
    )
    images = [i for i in client.describe_images(Owners=["amazon"])["Images"] if i.get("RootDeviceName")]
    return images[0]["ImageId"]


@pytest.fixture
def aws(moto_url: str, ec2: object, ami: str) -> AwsSpotProvider:
    return AwsSpotProvider(region=REGION, ami_id=ami, instance_types=TYPES, endpoint_url=moto_url)


def spec(**kw: object) -> LaunchSpec:
    args: dict = {
        "label": LABEL,
        "image": "ghcr.io/acme/gpuq-f5tts:1",
        "disk_gb": 80,
        "onstart": "#!/bin/bash\nset -e\necho 'boot'\n",
        "env": {"GPUQ_QUEUE": "tts", "GPUQ_NOTE": "it's quoted"},
        "bid_price": 0.5,
    }
    args.update(kw)
    return LaunchSpec(**args)


def describe(ec2: object, instance_id: str) -> dict:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def test_gpu_facts_come_from_describe_instance_types(aws: AwsSpotProvider) -> None:
    assert aws.gpu_facts() == {
        "g4dn.xlarge": GpuFacts("T4", 1, 16_384),
        "g5.xlarge": GpuFacts("A10G", 1, 22_888),
        "g6.xlarge": GpuFacts("L4", 1, 22_888),
    }


def test_gpu_facts_fall_back_to_the_table_for_types_the_api_does_not_know(
    moto_url: str, ec2: object, ami: str
) -> None:
    aws = AwsSpotProvider(
        region=REGION, ami_id=ami, instance_types=("x9.unknown", "g5.xlarge"), endpoint_url=moto_url
    )
    assert list(aws.gpu_facts()) == ["g5.xlarge"]  # unknown to both: not offered


def test_gpu_facts_use_the_table_when_the_api_has_none(
    moto_url: str, ec2: object, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(aws_spot.GPU_TABLE, "x9.unknown", GpuFacts("Z100", 2, 1_000))
    aws = AwsSpotProvider(region=REGION, ami_id=ami, instance_types=("x9.unknown",), endpoint_url=moto_url)
    assert aws.gpu_facts() == {"x9.unknown": GpuFacts("Z100", 2, 1_000)}


def test_offers_per_type_and_zone_priced_from_spot_history(aws: AwsSpotProvider, ec2: object) -> None:
    offers = aws.search_offers(OfferFilter())
    zones = {z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]}
    assert {o.offer_id for o in offers} == {f"{t}@{z}" for t in TYPES for z in zones}
    assert [o.dph for o in offers] == sorted(o.dph for o in offers)
    history = ec2.describe_spot_price_history(InstanceTypes=["g5.xlarge"])["SpotPriceHistory"]
    g5 = next(o for o in offers if o.offer_id.startswith("g5.xlarge@"))
    # the bid (MaxPrice) is 20 % over today's price; the money caps see that ceiling plus the root
    # volume the queue launches with (50 GB by default, gp3 at $0.08 per GB-month)
    assert g5.bid == pytest.approx(float(history[0]["SpotPrice"]) * 1.2, rel=1e-9)
    assert g5.dph == pytest.approx(g5.bid + 50 * 0.08 / 730, rel=1e-9)
    big = next(o for o in aws.search_offers(OfferFilter(min_disk_gb=500)) if o.offer_id == g5.offer_id)
    assert big.dph - big.bid == pytest.approx(500 * 0.08 / 730, rel=1e-9)
    assert (g5.gpu_name, g5.vram_mb, g5.num_gpus, g5.interruptible, g5.location) == (
        "A10G",
        22_888,
        1,
        True,
        "DE",
    )


def test_offer_filters(aws: AwsSpotProvider) -> None:
    assert {o.gpu_name for o in aws.search_offers(OfferFilter(gpu_names=("a10g",)))} == {"A10G"}
    assert {o.gpu_name for o in aws.search_offers(OfferFilter(min_vram_mb=20_000))} == {"A10G", "L4"}
    assert aws.search_offers(OfferFilter(max_dph=0.000001)) == []
    assert aws.search_offers(OfferFilter(locations=("ES",))) == []
    assert aws.search_offers(OfferFilter(locations=("ES", "DE")))
    assert len(aws.search_offers(OfferFilter(limit=2))) == 2
    assert aws.search_offers(OfferFilter(interruptible=False)) == []  # spot only


def test_spot_prices_are_cached_for_the_ttl(moto_url: str, ec2: object, ami: str) -> None:
    now = [1000.0]
    aws = AwsSpotProvider(
        region=REGION, ami_id=ami, instance_types=TYPES, endpoint_url=moto_url, clock=lambda: now[0]
    )
    calls: list[str] = []
    aws._ec2.meta.events.register("before-call.ec2.DescribeSpotPriceHistory", lambda **_: calls.append("x"))
    aws.search_offers(OfferFilter())
    aws.search_offers(OfferFilter(gpu_names=("T4",)))
    assert len(calls) == 1
    now[0] += 61
    aws.search_offers(OfferFilter())
    assert len(calls) == 2


def test_create_rents_spot_with_user_data_tags_and_disk(aws: AwsSpotProvider, ec2: object) -> None:
    offer = next(o for o in aws.search_offers(OfferFilter(gpu_names=("A10G",))) if o.offer_id.endswith("b"))
    iid = aws.create(offer, spec())

    inst = describe(ec2, iid)
    assert inst["InstanceLifecycle"] == "spot"
    assert inst["InstanceType"] == "g5.xlarge"
    assert inst["Placement"]["AvailabilityZone"] == offer.offer_id.split("@")[1]
    assert {t["Key"]: t["Value"] for t in inst["Tags"]} == {LABEL_TAG: LABEL, "Name": LABEL, DISK_TAG: "80"}
    assert inst["MetadataOptions"]["HttpTokens"] == "required"
    raw = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"]
    user_data = base64.b64decode(raw).decode()
    assert user_data == build_user_data(spec())
    assert user_data.startswith("#!/bin/bash\n") and user_data.count("#!") == 1
    assert "export GPUQ_NOTE='it'\"'\"'s quoted'\n" in user_data
    assert "export GPUQ_IMAGE=ghcr.io/acme/gpuq-f5tts:1\n" in user_data
    assert user_data.endswith("set -e\necho 'boot'\n")
    volume_ids = [m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]]
    sizes = [v["Size"] for v in ec2.describe_volumes(VolumeIds=volume_ids)["Volumes"]]
    assert sizes == [80]  # the root volume resized, not a second disk
    # An orphaned worker ends the machine with `shutdown` (onstart): that must terminate, not stop it.
    behaviour = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"


def test_list_by_label_prefix_across_pages_and_states(moto_url: str, ec2: object, ami: str) -> None:
    aws = AwsSpotProvider(region=REGION, ami_id=ami, instance_types=TYPES, endpoint_url=moto_url, page_size=5)
    offer = aws.search_offers(OfferFilter(gpu_names=("T4",)))[0]
    mine = {aws.create(offer, spec()) for _ in range(7)}
    aws.create(offer, spec(label="gpuq:other:tts"))
    ec2.run_instances(ImageId=ami, InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1)  # not ours, no tag

    listed = aws.list_instances("gpuq:test:")
    assert {i.provider_id for i in listed} == mine
    assert all(i.status == ProviderStatus.RUNNING and i.label == LABEL for i in listed)
    assert all(i.gpu_name == "T4" and i.started_at is not None for i in listed)
    # a listing says what it bills now: the market price (the offer showed the ceiling we bid, 20 % over)
    # plus the 80 GB volume it was launched with
    assert all(i.dph == pytest.approx(offer.bid / 1.2 + 80 * 0.08 / 730, rel=1e-9) for i in listed)
    # a fresh process (a cron tick reconciles before it searches) prices its listing too
    fresh = AwsSpotProvider(region=REGION, ami_id=ami, instance_types=TYPES, endpoint_url=moto_url)
    assert [i.dph for i in fresh.list_instances("gpuq:test:")] == pytest.approx([i.dph for i in listed])
    assert len(aws.list_instances("gpuq:")) == 8


def test_stopped_and_terminated_states(aws: AwsSpotProvider, ec2: object) -> None:
    offer = aws.search_offers(OfferFilter())[0]
    a, b = aws.create(offer, spec()), aws.create(offer, spec())
    ec2.stop_instances(InstanceIds=[a])
    aws.destroy(b)
    by_id = {i.provider_id: i for i in aws.list_instances("gpuq:")}
    assert by_id[a].status == ProviderStatus.STOPPED and by_id[a].raw_status == "stopped"
    assert by_id[b].status == ProviderStatus.GONE and by_id[b].raw_status == "terminated"
    assert by_id[b].status_msg  # the StateReason, e.g. a spot interruption or our terminate
    aws.destroy(b)  # terminating again is harmless
    aws.destroy("i-0123456789abcdef0")  # so is an id that never existed
    aws.destroy(a)
    billing = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
    )
    assert billing["Reservations"] == []  # nothing left running or holding a volume


def test_bad_launches_fail_before_renting(aws: AwsSpotProvider, ec2: object) -> None:
    offer = aws.search_offers(OfferFilter())[0]
    with pytest.raises(ProviderError):
        aws.create(offer, spec(onstart="#!/bin/bash\n" + "x" * 17_000))
    with pytest.raises(ProviderError):
        aws.create(offer, spec(env={"NOT-A-NAME": "1"}))
    with pytest.raises(ProviderError):
        aws.create(offer.__class__(**{**offer.__dict__, "offer_id": "g5.xlarge"}), spec())
    assert ec2.describe_instances()["Reservations"] == []


def test_unknown_ami_is_a_clear_error(moto_url: str, ec2: object) -> None:
    aws = AwsSpotProvider(
        region=REGION, ami_id="ami-00000000000000000", instance_types=TYPES, endpoint_url=moto_url
    )
    offer = aws.search_offers(OfferFilter())[0]
    with pytest.raises(ProviderError) as ei:
        aws.create(offer, spec())
    assert not ei.value.retryable
    assert ec2.describe_instances()["Reservations"] == []
