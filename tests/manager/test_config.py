"""The manager's configuration: money and scaling settings are checked when read, each error named."""

from __future__ import annotations

from typing import Any

import pytest

from manager.config import from_dict

NAN = float("nan")


def test_a_plain_configuration_is_read() -> None:
    ms = from_dict({"daily_budget": 25, "max_total_dph": "5.2", "queues": {"tts": {"max_instances": 3}}})
    assert ms.policy.daily_budget == 25.0 and ms.policy.max_total_dph == 5.2
    assert ms.policy.queues["tts"].max_instances == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # a nan cap passes every "over the cap?" test: it would spend without limit
        ({"daily_budget": NAN}, "daily_budget must be a number >= 0, got nan"),
        ({"max_total_dph": -1}, "max_total_dph must be a number >= 0, got -1.0"),
        ({"daily_budget": "lots"}, "daily_budget must be a number, got 'lots'"),
        ({"budget_tz": "Mars/Base"}, "budget_tz: unknown time zone 'Mars/Base'"),
        ({"q": {"offer": {"max_dph": NAN}}}, "queues.q: offer max_dph must be a number above 0, got nan"),
        ({"q": {"max_instances": -3}}, "queues.q: need 0 <= min_instances <= max_instances, got 0 and -3"),
        ({"q": {"min_instances": 2, "max_instances": 1}}, "need 0 <= min_instances <= max_instances"),
        ({"q": {"target_utilisation": 0}}, "target_utilisation must be a number above 0 and at most 1"),
        (
            {"q": {"scale_in_utilisation": 0.9}},
            "scale_in_utilisation must be a number above 0 and at most 0.85",
        ),
        ({"q": {"idle_timeout_s": -60}}, "idle_timeout_s must be a number >= 0"),
        ({"q": {"tz": "Nowhere"}}, "queues.q: tz: unknown time zone 'Nowhere'"),
    ],
)
def test_bad_settings_stop_the_manager_with_their_name(raw: dict[str, Any], message: str) -> None:
    queue = raw.pop("q", {})
    with pytest.raises(SystemExit) as caught:
        from_dict({**raw, "queues": {"q": queue}})
    assert str(caught.value).startswith("gpuq manager: ")
    assert message in str(caught.value)


def test_the_orphan_timeout_is_off_or_long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    queues = {"queues": {"q": {}}}
    assert from_dict(queues).orphan_timeout_s == 3600
    monkeypatch.setenv("GPUQ_ORPHAN_TIMEOUT_SECONDS", "0")
    assert from_dict(queues).orphan_timeout_s == 0
    # Shorter than a few ticks, and slow ticks would make healthy instances end themselves.
    monkeypatch.setenv("GPUQ_ORPHAN_TIMEOUT_SECONDS", "120")
    with pytest.raises(SystemExit, match=r"GPUQ_ORPHAN_TIMEOUT_SECONDS must be 0 \(off\) or at least 600"):
        from_dict(queues)
    monkeypatch.setenv("GPUQ_ORPHAN_TIMEOUT_SECONDS", "900")
    monkeypatch.setenv("GPUQ_MANAGER_TICK_SECONDS", "300")
    with pytest.raises(SystemExit, match="at least 1500"):
        from_dict(queues)
