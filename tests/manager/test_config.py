"""The manager's configuration: money and scaling settings are checked when read, each error named."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from manager.bootstrap import LaunchRefused, instance_env
from manager.config import SECRET_NAMES, from_dict
from manager.providers import REGISTRY

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


# --- what rented hosts may be given ---------------------------------------------------------------

MANAGER_ENV = {
    "DATABASE_URL": "postgresql://owner:0wner-Passw0rd@db.example:5432/app",
    "VAST_API_KEY": "vast-account-key-0123456789abcdef",
    "AWS_ACCESS_KEY_ID": "AKIAMANAGERKEY000001",
    "AWS_SECRET_ACCESS_KEY": "manager/aws/secret/0123456789abcdefghij",
    "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjEManagerSessionToken0123456789",
    "SUPABASE_SERVICE_ROLE_KEY": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJl",
}
PIN = "gpuq==0.1.0 --hash=sha256:" + "0" * 64
# A rented f5tts queue's model files, each pinned by its sha256.
F5TTS_PINNED = {
    "F5TTS_CKPT_FILE": "s3://models/f5-spanish/model.safetensors",
    "F5TTS_CKPT_SHA256": "a" * 64,
    "F5TTS_VOCAB_FILE": "s3://models/f5-spanish/vocab.txt",
    "F5TTS_VOCAB_SHA256": "b" * 64,
    "F5TTS_VOCODER_DIR": "s3://models/vocos-mel-24khz.tar.gz",
    "F5TTS_VOCODER_SHA256": "c" * 64,
}


def _jwt(claims: str) -> str:
    """A JWT with these claims (unsigned: the deny-list reads the role claim, as anyone can)."""
    parts = ('{"alg":"HS256","typ":"JWT"}', claims)
    encoded = [base64.urlsafe_b64encode(p.encode()).decode().rstrip("=") for p in parts]
    return ".".join([*encoded, "c2lnbmF0dXJl"])


@pytest.fixture
def manager_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in MANAGER_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", "postgresql://looks_worker:w0rker@db.example:5432/app")
    monkeypatch.setenv("GPUQ_INSTALL_SPEC", PIN)
    monkeypatch.delenv("GPUQ_WORKER_ENV", raising=False)


def refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(SystemExit) as caught:
        from_dict(raw)
    message = str(caught.value)
    assert not any(secret in message for secret in MANAGER_ENV.values())  # named, never shown
    assert "0wner-Passw0rd" not in message
    return message


def rented(env: dict[str, str] | None = None) -> dict[str, Any]:
    return {"queues": {"q": {"provider": "vast", **({"env": env} if env else {})}}}


@pytest.mark.usefixtures("manager_env")
def test_rented_hosts_never_get_the_owners_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUQ_WORKER_DATABASE_URL")
    ms = from_dict(rented())
    assert ms.worker_database_url is None  # no fallback to DATABASE_URL
    with pytest.raises(LaunchRefused, match="set GPUQ_WORKER_DATABASE_URL to a login in role gpuq_worker"):
        instance_env(ms, "q", "vast")
    # local workers run here: they keep the manager's database (the local provider gives it to them)
    local = from_dict({"queues": {"q": {"provider": "local"}}})
    assert "DATABASE_URL" not in instance_env(local, "q", "local")
    provider = REGISTRY["local"](local, MANAGER_ENV["DATABASE_URL"], Path("/tmp/gpuq-test-unused"))
    assert provider.env["DATABASE_URL"] == MANAGER_ENV["DATABASE_URL"]  # type: ignore[attr-defined]


@pytest.mark.usefixtures("manager_env")
@pytest.mark.parametrize("name", sorted(SECRET_NAMES))
def test_manager_secrets_named_in_gpuq_worker_env_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("GPUQ_WORKER_ENV", f"SUPABASE_URL,{name}")
    assert f"GPUQ_WORKER_ENV names {name}" in refusal(rented())


@pytest.mark.usefixtures("manager_env")
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"VAST_API_KEY": "another-account-key-000000"}, "queues.q.env sets VAST_API_KEY"),
        ({"DATABASE_URL": "postgresql://x@y/z"}, "queues.q.env sets DATABASE_URL"),
        ({"SUPABASE_SERVICE_KEY": "k"}, "queues.q.env sets SUPABASE_SERVICE_KEY"),
        # by value: the manager's own keys under their own or any other name
        (
            {"AWS_SECRET_ACCESS_KEY": MANAGER_ENV["AWS_SECRET_ACCESS_KEY"]},
            "the manager's AWS_SECRET_ACCESS_KEY",
        ),
        (
            {"MY_KEY_ID": MANAGER_ENV["AWS_ACCESS_KEY_ID"]},
            "MY_KEY_ID: it carries the value of the manager's AWS_ACCESS",
        ),
        ({"AWS_SESSION_TOKEN": MANAGER_ENV["AWS_SESSION_TOKEN"]}, "the manager's AWS_SESSION_TOKEN"),
        ({"HOOK": f"https://x.example/?key={MANAGER_ENV['VAST_API_KEY']}"}, "the manager's VAST_API_KEY"),
        ({"DB": "host=db.example user=other password=0wner-Passw0rd"}, "the manager's database password"),
        # any Supabase service-role key, whatever it is called and whoever's it is
        ({"STORAGE_TOKEN": _jwt('{"role":"service_role","iss":"supabase"}')}, "a Supabase service-role key"),
        ({"STORAGE_TOKEN": "sb_secret_0123456789abcdefghij"}, "a Supabase secret key (sb_secret_…)"),
        ({"SUPABASE_SECRET_KEY": "sb_publishable_looks_harmless"}, "queues.q.env sets SUPABASE_SECRET_KEY"),
    ],
)
def test_queue_env_carrying_manager_secrets_is_refused(env: dict[str, str], needle: str) -> None:
    assert needle in refusal(rented(env))


@pytest.mark.usefixtures("manager_env")
def test_hosts_may_get_keys_of_their_own() -> None:
    own = {
        "AWS_ACCESS_KEY_ID": "AKIAWORKERKEY0000001",
        "AWS_SECRET_ACCESS_KEY": "worker/scoped/secret/0000000000000000000",
        "SUPABASE_ANON_TOKEN": _jwt('{"role":"anon"}'),
    }
    ms = from_dict(rented(own))
    env = instance_env(ms, "q", "vast")
    assert {k: env[k] for k in own} == own
    assert not any(secret in str(env) for secret in MANAGER_ENV.values())
    # a local queue may name anything: its processes run here, with this machine's environment anyway
    from_dict({"queues": {"q": {"provider": "local", "env": {"VAST_API_KEY": "x"}}}})


@pytest.mark.usefixtures("manager_env")
def test_a_secret_reached_through_another_name_is_refused_at_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUQ_WORKER_ENV", "STORAGE_SECRET")
    monkeypatch.setenv("STORAGE_SECRET", MANAGER_ENV["AWS_SECRET_ACCESS_KEY"])
    ms = from_dict(rented())  # the names are fine; the value is the manager's
    with pytest.raises(LaunchRefused) as caught:
        instance_env(ms, "q", "vast")
    assert "STORAGE_SECRET: it carries the value of the manager's AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert MANAGER_ENV["AWS_SECRET_ACCESS_KEY"] not in str(caught.value)


@pytest.mark.usefixtures("manager_env")
@pytest.mark.parametrize(
    "worker_url",
    [
        MANAGER_ENV["DATABASE_URL"],
        "postgresql://owner:other@db.example:5432/app",  # the manager's role, another password
        "host=db.example user=worker password=0wner-Passw0rd",  # the owner's password
    ],
)
def test_a_worker_url_that_is_the_managers_login_is_refused(
    monkeypatch: pytest.MonkeyPatch, worker_url: str
) -> None:
    monkeypatch.setenv("GPUQ_WORKER_DATABASE_URL", worker_url)
    try:
        ms = from_dict(rented())
    except SystemExit as e:
        assert "the manager's own role" in str(e) and "0wner-Passw0rd" not in str(e)
        return
    with pytest.raises(LaunchRefused) as caught:
        instance_env(ms, "q", "vast")
    assert "DATABASE_URL: it carries" in str(caught.value) and "0wner-Passw0rd" not in str(caught.value)


# --- what rented hosts install --------------------------------------------------------------------


@pytest.mark.usefixtures("manager_env")
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"GPUQ_INSTALL_SPEC": "gpuq"}, "GPUQ_INSTALL_SPEC must pin a version and its hash"),
        ({"GPUQ_INSTALL_SPEC": "gpuq==0.1.0"}, "GPUQ_INSTALL_SPEC must pin a version and its hash"),
        ({"GPUQ_INSTALL_SPEC": "gpuq @ https://x.example/gpuq.whl"}, "must pin a version and its hash"),
        ({"GPUQ_INSTALL_SPEC": "gpuq==0.0.9 --hash=sha256:" + "1" * 64}, "pins version 0.0.9; this manager"),
        ({"GPUQ_INSTALL_URL": "https://x.example/gpuq-0.1.0-py3-none-any.whl"}, "needs GPUQ_INSTALL_SHA256"),
        (
            {
                "GPUQ_INSTALL_URL": "https://x.example/gpuq-0.1.0-py3-none-any.whl",
                "GPUQ_INSTALL_SHA256": "ab",
            },
            "needs GPUQ_INSTALL_SHA256",
        ),
        (
            {
                "GPUQ_INSTALL_URL": "https://x.example/gpuq-0.0.9-py3-none-any.whl",
                "GPUQ_INSTALL_SHA256": "a" * 64,
            },
            "gpuq-0.1.0-….whl (the version this manager runs)",
        ),
        (
            {"GPUQ_INSTALL_URL": "https://x.example/gpuq-0.1.0.tar.gz", "GPUQ_INSTALL_SHA256": "a" * 64},
            ".whl",
        ),
    ],
)
def test_install_settings_must_pin_this_version_by_hash(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], needle: str
) -> None:
    monkeypatch.delenv("GPUQ_INSTALL_SPEC")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert needle in refusal(rented())


@pytest.mark.usefixtures("manager_env")
def test_rented_f5tts_queues_run_only_weights_pinned_by_hash() -> None:
    # Left unset, f5-tts downloads its default weights from the model hub, pinned by nothing.
    assert "queues.tts.env: F5TTS_CKPT_FILE is not set" in refusal(
        {"queues": {"tts": {"provider": "vast", "backend": "f5tts"}}}
    )
    unpinned = {**F5TTS_PINNED, "F5TTS_VOCAB_SHA256": ""}
    assert "F5TTS_VOCAB_FILE is remote; set F5TTS_VOCAB_SHA256" in refusal(
        {"queues": {"tts": {"provider": "vast", "backend": "f5tts", "env": unpinned}}}
    )
    ms = from_dict({"queues": {"tts": {"provider": "vast", "backend": "f5tts", "env": F5TTS_PINNED}}})
    assert ms.launch["tts"].env["F5TTS_CKPT_FILE"].startswith("s3://")
    # A local worker uses what this machine has: no pin required.
    assert (
        from_dict({"queues": {"tts": {"provider": "local", "backend": "f5tts"}}}).launch["tts"].backend
        == "f5tts"
    )


def test_rented_queues_name_only_workflows_whose_models_are_pinned() -> None:
    ms = from_dict(
        {"queues": {"q": {"provider": "vast", "workflows": ["looks_tryon", "sdxl_text_to_image"]}}}
    )
    assert ms.launch["q"].workflows == ("looks_tryon", "sdxl_text_to_image")
    assert "queues.q.workflows: unknown workflow 'nope'" in refusal(
        {"queues": {"q": {"provider": "vast", "workflows": ["nope"]}}}
    )
