"""Where instances are rented. One file per provider, each a `Provider`; `REGISTRY` names them."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

from gpuq.settings import env_float, env_int

if TYPE_CHECKING:
    from manager.config import ManagerSettings
    from manager.providers.base import Provider


class Factory(Protocol):
    """name -> factory(manager settings, database URL, data dir; embedded: the database is the embedded
    Postgres under the data dir). Imports are inside the factories so a deployment that uses one
    provider needs none of the others' packages."""

    def __call__(
        self, ms: ManagerSettings, db_url: str, data_dir: os.PathLike[str], *, embedded: bool = False
    ) -> Provider: ...


def _vast(
    ms: ManagerSettings, db_url: str, data_dir: os.PathLike[str], *, embedded: bool = False
) -> Provider:
    from manager.providers.vast import VastProvider

    key = os.environ.get("VAST_API_KEY")
    if not key:
        raise SystemExit("gpuq manager: the vast provider needs VAST_API_KEY")
    return VastProvider(key, server_url=os.environ.get("GPUQ_VAST_URL") or None)


def _aws_spot(
    ms: ManagerSettings, db_url: str, data_dir: os.PathLike[str], *, embedded: bool = False
) -> Provider:
    from manager.providers.aws_spot import DEFAULT_INSTANCE_TYPES, AwsSpotProvider

    region, ami = os.environ.get("GPUQ_AWS_REGION"), os.environ.get("GPUQ_AWS_AMI")
    if not region or not ami:
        raise SystemExit("gpuq manager: the aws_spot provider needs GPUQ_AWS_REGION and GPUQ_AWS_AMI")
    ebs = env_float("GPUQ_AWS_EBS_USD_PER_GB_MONTH", 0.08)
    if ebs < 0:
        raise SystemExit(f"gpuq manager: GPUQ_AWS_EBS_USD_PER_GB_MONTH must not be negative, got {ebs:g}")
    types = os.environ.get("GPUQ_AWS_INSTANCE_TYPES")
    groups = os.environ.get("GPUQ_AWS_SECURITY_GROUPS", "")
    return AwsSpotProvider(
        region=region,
        ami_id=ami,
        instance_types=tuple(t.strip() for t in types.split(",")) if types else DEFAULT_INSTANCE_TYPES,
        subnet_id=os.environ.get("GPUQ_AWS_SUBNET") or None,
        security_group_ids=[g.strip() for g in groups.split(",") if g.strip()],
        iam_instance_profile=os.environ.get("GPUQ_AWS_INSTANCE_PROFILE") or None,
        endpoint_url=os.environ.get("GPUQ_AWS_ENDPOINT_URL") or None,
        ebs_usd_per_gb_month=ebs,
    )


def _local(
    ms: ManagerSettings, db_url: str, data_dir: os.PathLike[str], *, embedded: bool = False
) -> Provider:
    from pathlib import Path

    from manager.providers.local import LocalProvider

    # The manager's own database and data dir: the processes run here. On the embedded default they
    # join its server (LocalProvider), and do not get DATABASE_URL.
    env = {"DATABASE_URL": db_url, "GPUQ_DATA_DIR": str(data_dir)}
    if ms.storage_url:
        env["GPUQ_STORAGE_URL"] = ms.storage_url
    return LocalProvider(
        Path(data_dir) / "local",
        env=env,
        slots=env_int("GPUQ_LOCAL_SLOTS", 2),
        grace_s=env_float("GPUQ_LOCAL_GRACE_SECONDS", 20.0),
        embedded_data_dir=Path(data_dir) if embedded else None,
    )


REGISTRY: dict[str, Factory] = {"vast": _vast, "aws_spot": _aws_spot, "local": _local}
