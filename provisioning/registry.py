"""Which provisioner serves which push type. Named by import path, imported on
demand, so the CLI never imports a cloud SDK it does not need."""

from __future__ import annotations

import importlib
from typing import Any

from provisioning.plan import ProvisioningError

PROVISIONERS: dict[str, str] = {
    "ecs:push": "provisioning.aws_ecs:EcsPushProvisioner",
}


def has_provisioner(push_type: str) -> bool:
    return push_type in PROVISIONERS


def provisioner_for(push_type: str, **kwargs: Any):
    if push_type not in PROVISIONERS:
        raise ProvisioningError(
            f"Automatic infrastructure provisioning is not available for {push_type!r} work pools "
            f"(available for: {', '.join(sorted(PROVISIONERS))})."
        )
    module_name, _, attribute = PROVISIONERS[push_type].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProvisioningError(
            f"Provisioning {push_type!r} needs an optional dependency that is not installed ({exc.name}). "
            "Install it with: pip install 'pushpool[aws]'"
        ) from exc
    return getattr(module, attribute)(**kwargs)
