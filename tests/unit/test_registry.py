import sys
from pathlib import Path

import pytest

from providers.base import Provider
from providers.registry import ProviderRegistry, UnknownPushType

PLUGINS = Path(__file__).resolve().parents[1] / "support" / "plugins"


def test_builtin_process_provider_is_known():
    registry = ProviderRegistry(load_entry_points=False)
    assert "process:push" in registry.known_types()
    assert issubclass(registry.provider_class("process:push"), Provider)


def test_unknown_types_name_the_known_ones():
    with pytest.raises(UnknownPushType) as excinfo:
        ProviderRegistry(load_entry_points=False).provider_class("nope:push")
    assert "process:push" in str(excinfo.value)


def test_cloud_run_alias_is_canonicalised():
    assert ProviderRegistry(load_entry_points=False).canonical("cloud-run:push") == "cloud-run-v2:push"


def test_entry_point_providers_are_loaded(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    registry = ProviderRegistry()
    provider = registry.provider_class("recording:push")
    assert provider.__name__ == "RecordingProvider"
    assert provider.default_base_job_template()["variables"]["properties"]["memory"]["default"] == 512


def test_a_non_provider_entry_is_refused():
    registry = ProviderRegistry({"bad:push": "json:dumps"}, load_entry_points=False)
    with pytest.raises(TypeError):
        registry.provider_class("bad:push")


def test_a_builtin_provider_left_out_of_the_install_is_an_unknown_type_not_a_crash():
    """A Lambda zip with only ecs:push has no providers/process.py; a sweep of
    every push pool must skip a process:push pool, not fail on it."""
    registry = ProviderRegistry({"process:push": "providers.not_in_this_zip:ProcessProvider"}, load_entry_points=False)
    with pytest.raises(UnknownPushType, match="not installed here"):
        registry.create("process:push")
