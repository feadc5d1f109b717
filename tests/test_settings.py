"""The setting parsers every process shares: what they accept, and the message for what they don't."""

from __future__ import annotations

import pytest

from gpuq.settings import SettingError, env_float, parse_bool, parse_float, parse_int
from manager.providers import REGISTRY


def test_parsers_read_any_mapping_and_default_when_unset_or_blank() -> None:
    env = {"N": " 12 ", "X": "0.25", "B": " Yes ", "BLANK": "  "}
    assert parse_int(env, "N", 1) == 12
    assert parse_float(env, "X", 1.0) == 0.25
    assert parse_bool(env, "B", False) is True
    assert parse_int(env, "BLANK", 7) == 7 and parse_bool(env, "MISSING", True) is True


@pytest.mark.parametrize(
    ("parse", "raw", "message"),
    [
        (parse_int, "1.5", "N must be a whole number, got '1.5'"),
        (parse_float, "ten", "N must be a number, got 'ten'"),
        (parse_float, "nan", "N must be a finite number, got 'nan'"),
        (parse_float, "-inf", "N must be a finite number, got '-inf'"),
        (parse_bool, "maybe", "N must be true or false, got 'maybe'"),
    ],
)
def test_malformed_values_name_the_setting(parse: object, raw: str, message: str) -> None:
    with pytest.raises(SettingError) as caught:
        parse({"N": raw}, "N", 0)  # type: ignore[operator]
    assert str(caught.value) == message


def test_commands_exit_with_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUQ_POLL_SECONDS", "nan")
    with pytest.raises(SystemExit, match="gpuq: GPUQ_POLL_SECONDS must be a finite number"):
        env_float("GPUQ_POLL_SECONDS", 5.0)


def test_a_negative_ebs_price_stops_the_aws_provider(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("GPUQ_AWS_REGION", "eu-central-1")
    monkeypatch.setenv("GPUQ_AWS_AMI", "ami-12345678")
    monkeypatch.setenv("GPUQ_AWS_EBS_USD_PER_GB_MONTH", "-0.08")
    with pytest.raises(SystemExit, match="GPUQ_AWS_EBS_USD_PER_GB_MONTH must not be negative"):
        REGISTRY["aws_spot"](None, "postgresql://unused", tmp_path)  # type: ignore[arg-type]
