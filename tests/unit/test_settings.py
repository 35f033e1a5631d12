import uuid
from pathlib import Path

import pytest

from dispatcher.settings import Settings, pushpool_home


def test_settings_come_from_the_environment():
    settings = Settings.from_env(
        {
            "PREFECT_API_URL": "http://127.0.0.1:4200/api/",
            "PREFECT_API_AUTH_STRING": "admin:s3cret",
            "PUSHPOOL_POOLS": "a, b,,c",
            "PUSHPOOL_PREFETCH_SECONDS": "45",
            "PUSHPOOL_MAX_CONCURRENCY": "4",
            "PUSHPOOL_WEBHOOK_SECRET": "hook-secret",
            "PREFECT_HOME": "/nonexistent",
        }
    )
    assert settings.api_url == "http://127.0.0.1:4200/api"
    assert settings.pools == ["a", "b", "c"]
    assert settings.prefetch_seconds == 45 and settings.max_concurrency == 4
    assert sorted(settings.secret_values()) == ["admin:s3cret", "hook-secret"]
    assert "s3cret" not in repr(settings)


def test_the_active_prefect_profile_fills_what_the_environment_lacks(tmp_path: Path):
    (tmp_path / "profiles.toml").write_text(
        'active = "remote"\n\n[profiles.remote]\nPREFECT_API_URL = "http://prefect.internal/api"\n'
        'PREFECT_API_KEY = "pnu_key"\n\n[profiles.other]\nPREFECT_API_URL = "http://other/api"\n'
    )
    settings = Settings.from_env({"PREFECT_HOME": str(tmp_path)})
    assert settings.api_url == "http://prefect.internal/api"
    assert settings.api_key.get_secret_value() == "pnu_key"
    # the environment wins over the profile
    assert Settings.from_env({"PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": "http://env/api"}).api_url == "http://env/api"
    assert Settings.from_env({"PREFECT_HOME": str(tmp_path), "PREFECT_PROFILE": "other"}).api_url == "http://other/api"


def test_invalid_numbers_are_refused():
    with pytest.raises(ValueError):
        Settings.from_env({"PUSHPOOL_MAX_CONCURRENCY": "lots", "PREFECT_HOME": "/nonexistent"})


def test_pushpool_home():
    assert pushpool_home({"PUSHPOOL_HOME": "/x/y"}) == Path("/x/y")
    assert pushpool_home({"XDG_DATA_HOME": "/data", "HOME": "/h"}) == Path("/data/pushpool")


def test_without_a_prefetch_setting_each_backend_claims_its_container_start_time_ahead():
    from dispatcher.invocation import Invocation
    from dispatcher.logs import Redactor
    from dispatcher.models import WorkPool
    from providers.registry import ProviderRegistry

    def prefetch(settings: Settings, pool_type: str) -> float:
        invocation = Invocation(
            None, settings, registry=ProviderRegistry(load_entry_points=False), redactor=Redactor(), clock=None
        )
        return invocation.prefetch_seconds(WorkPool(id=uuid.uuid4(), name="p", type=pool_type))

    assert prefetch(Settings(), "ecs:push") == 45
    assert prefetch(Settings(), "process:push") == 10
    assert prefetch(Settings(prefetch_seconds=3), "ecs:push") == 3
