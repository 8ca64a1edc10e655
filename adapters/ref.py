"""An adapter's identity as a value: ``domain`` or ``domain@vN`` (vLLM's ``LoRARequest`` idea).

Every place that names an adapter version formats and parses it through :class:`AdapterRef`,
so the spelling ``polyp@v3`` is defined once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidAdapterRef

DOMAIN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_PATTERN = re.compile(r"^v(\d+)$")


@dataclass(frozen=True, order=True)
class AdapterRef:
    """``domain`` with an optional version; ``version=None`` means "the newest" or "unversioned".

    >>> AdapterRef.parse("polyp@v3")
    AdapterRef(domain='polyp', version=3)
    >>> str(AdapterRef("polyp", 3))
    'polyp@v3'
    """

    domain: str
    version: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str) or not DOMAIN_PATTERN.match(self.domain):
            raise InvalidAdapterRef(f"invalid domain name {self.domain!r} (letters, digits, '-', '_'; "
                                    "at most 64 characters)")
        if self.version is not None and (isinstance(self.version, bool) or not isinstance(self.version, int)
                                         or self.version < 1):
            raise InvalidAdapterRef(f"invalid version {self.version!r} for {self.domain!r}; expected an integer >= 1")

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        """``"polyp"`` -> ``AdapterRef("polyp")``; ``"polyp@v3"`` -> ``AdapterRef("polyp", 3)``."""
        domain, sep, ver = str(text).partition("@")
        if not sep:
            return cls(domain)
        m = VERSION_PATTERN.match(ver)
        if not m:
            raise InvalidAdapterRef(f"invalid version {ver!r} in {text!r}; expected vN, e.g. {domain}@v1")
        return cls(domain, int(m.group(1)))

    @classmethod
    def of(cls, domain: str, version: str | int) -> "AdapterRef":
        """``("polyp", "v3")``, ``("polyp", "3")`` or ``("polyp", 3)`` -> ``polyp@v3``, validated."""
        text = str(version)
        m = VERSION_PATTERN.match(text if text.startswith("v") else f"v{text}")
        if not m:
            raise InvalidAdapterRef(f"invalid version {text!r} for {domain!r}; expected vN or N, e.g. v1")
        return cls(domain, int(m.group(1)))

    def at(self, version: int) -> "AdapterRef":
        """The same domain at ``version``."""
        return AdapterRef(self.domain, version)

    @property
    def version_dir(self) -> str:
        """The registry folder name of this version (``v3``)."""
        if self.version is None:
            raise InvalidAdapterRef(f"{self.domain!r} names no version")
        return f"v{self.version}"

    def __str__(self) -> str:
        return self.domain if self.version is None else f"{self.domain}@v{self.version}"
