"""Settings, read from the environment (and, like the `prefect` CLI, from the
active Prefect profile when a Prefect setting is not in the environment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field, SecretStr, field_validator

PREFECT_SETTING_NAMES = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")


class Settings(BaseModel):
    api_url: Optional[str] = Field(None, description="PREFECT_API_URL")
    api_key: Optional[SecretStr] = Field(None, description="PREFECT_API_KEY")
    api_auth_string: Optional[SecretStr] = Field(None, description="PREFECT_API_AUTH_STRING")
    pools: list[str] = Field(
        default_factory=list, description="PUSHPOOL_POOLS: pool names; empty = every push pool"
    )
    prefetch_seconds: Optional[float] = Field(
        None, ge=0, description="PUSHPOOL_PREFETCH_SECONDS: claim runs due within this many seconds; "
        "unset = each backend's typical container start time (Provider.default_prefetch_seconds)"
    )
    webhook_secret: Optional[SecretStr] = Field(None, description="PUSHPOOL_WEBHOOK_SECRET")
    max_concurrency: int = Field(8, ge=1, le=512, description="PUSHPOOL_MAX_CONCURRENCY")
    pending_timeout_seconds: float = Field(
        120.0, gt=0, description="PUSHPOOL_PENDING_TIMEOUT_SECONDS: a run PENDING this long with no "
        "infrastructure_pid is submitted again (idempotently) by the reconciler"
    )
    max_resubmissions: int = Field(
        3, ge=0, description="PUSHPOOL_MAX_RESUBMISSIONS: after this many, such a run is CRASHED instead"
    )
    tick_seconds: float = Field(
        60.0, gt=0, description="PUSHPOOL_TICK_SECONDS: the period of the timer that triggers the dispatcher"
    )
    dispatcher_name: str = Field(
        default_factory=lambda: f"pushpool-{os.uname().nodename}",
        description="PUSHPOOL_DISPATCHER_NAME: the worker name heartbeats and labels carry",
    )

    @field_validator("api_url")
    @classmethod
    def _strip_trailing_slash(cls, value: Optional[str]) -> Optional[str]:
        return value.rstrip("/") if value else value

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **overrides: Any) -> "Settings":
        env = dict(os.environ if environ is None else environ)
        profile = _active_profile_settings(env)
        for name in PREFECT_SETTING_NAMES:
            if not env.get(name) and profile.get(name):
                env[name] = profile[name]

        values: dict[str, Any] = {
            "api_url": env.get("PREFECT_API_URL") or None,
            "api_key": env.get("PREFECT_API_KEY") or None,
            "api_auth_string": env.get("PREFECT_API_AUTH_STRING") or None,
            "pools": [p.strip() for p in env.get("PUSHPOOL_POOLS", "").split(",") if p.strip()],
            "webhook_secret": env.get("PUSHPOOL_WEBHOOK_SECRET") or None,
        }
        if env.get("PUSHPOOL_PREFETCH_SECONDS"):
            values["prefetch_seconds"] = env["PUSHPOOL_PREFETCH_SECONDS"]
        if env.get("PUSHPOOL_MAX_CONCURRENCY"):
            values["max_concurrency"] = env["PUSHPOOL_MAX_CONCURRENCY"]
        for name, field in (
            ("PUSHPOOL_PENDING_TIMEOUT_SECONDS", "pending_timeout_seconds"),
            ("PUSHPOOL_MAX_RESUBMISSIONS", "max_resubmissions"),
            ("PUSHPOOL_TICK_SECONDS", "tick_seconds"),
        ):
            if env.get(name):
                values[field] = env[name]
        if env.get("PUSHPOOL_DISPATCHER_NAME"):
            values["dispatcher_name"] = env["PUSHPOOL_DISPATCHER_NAME"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def secret_values(self) -> list[str]:
        """Every credential value this process knows, for log redaction."""
        secrets = [self.api_key, self.api_auth_string, self.webhook_secret]
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]


def pushpool_home(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Where pushpool keeps local files (process:push run records, the
    quickstart's embedded server): `$PUSHPOOL_HOME`, else the user's data dir."""
    env = os.environ if environ is None else environ
    if env.get("PUSHPOOL_HOME"):
        return Path(env["PUSHPOOL_HOME"]).expanduser()
    data_home = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "pushpool"


def prefect_home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _active_profile_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings of the active profile in `$PREFECT_HOME/profiles.toml`, as the
    `prefect` CLI would see them. Missing or unreadable files mean no settings."""
    path = Path(environ.get("PREFECT_PROFILES_PATH") or prefect_home(environ) / "profiles.toml")
    try:
        import tomllib

        document = tomllib.loads(path.read_text())
    except (OSError, ValueError, ImportError):
        return {}
    active = environ.get("PREFECT_PROFILE") or document.get("active") or "ephemeral"
    profile = document.get("profiles", {}).get(active, {})
    return {str(k): str(v) for k, v in profile.items() if isinstance(v, (str, int, float))}
