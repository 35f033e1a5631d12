"""Which provider serves which push type: the built-ins, plus any installed
package's entry points in the group `pushpool.providers`
(`"my-type:push" = "my_package.module:MyProvider"`).

Built-ins are named by import path and imported only when asked for, so the
dispatcher never pays for a cloud SDK it does not use.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Optional

from providers.base import Provider

ENTRY_POINT_GROUP = "pushpool.providers"

BUILTIN_PROVIDERS: dict[str, str] = {
    "process:push": "providers.process:ProcessProvider",
    "ecs:push": "providers.ecs:EcsProvider",
}

ALIASES: dict[str, str] = {
    "cloud-run:push": "cloud-run-v2:push",
}


class UnknownPushType(LookupError):
    def __init__(self, push_type: str, known: list[str]):
        self.push_type, self.known = push_type, known
        super().__init__(f"Unknown work pool type {push_type!r}. Known types: {', '.join(known)}")


class ProviderUnavailable(UnknownPushType):
    def __init__(self, push_type: str, path: str, error: ModuleNotFoundError):
        LookupError.__init__(
            self, f"The provider for {push_type!r} ({path}) is not installed here: {error}"
        )
        self.push_type, self.known = push_type, []


class ProviderRegistry:
    def __init__(self, extra: Optional[dict[str, str]] = None, *, load_entry_points: bool = True):
        self._paths: dict[str, str] = dict(BUILTIN_PROVIDERS)
        if load_entry_points:
            for entry_point in entry_points(group=ENTRY_POINT_GROUP):
                self._paths.setdefault(entry_point.name, entry_point.value)
        self._paths.update(extra or {})
        self._loaded: dict[str, type[Provider]] = {}

    def canonical(self, push_type: str) -> str:
        return ALIASES.get(push_type, push_type)

    def known_types(self) -> list[str]:
        return sorted(self._paths)

    def __contains__(self, push_type: str) -> bool:
        return self.canonical(push_type) in self._paths

    def provider_class(self, push_type: str) -> type[Provider]:
        push_type = self.canonical(push_type)
        if push_type not in self._paths:
            raise UnknownPushType(push_type, self.known_types())
        if push_type not in self._loaded:
            module_name, _, attribute = self._paths[push_type].partition(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                # A built-in left out of this install (a Lambda zip with only ecs:push)
                # is as unknown here as a type nobody wrote.
                raise ProviderUnavailable(push_type, self._paths[push_type], exc) from None
            provider = getattr(module, attribute)
            if not (isinstance(provider, type) and issubclass(provider, Provider)):
                raise TypeError(f"{self._paths[push_type]} is not a pushpool Provider")
            self._loaded[push_type] = provider
        return self._loaded[push_type]

    def create(self, push_type: str) -> Provider:
        return self.provider_class(push_type)()
