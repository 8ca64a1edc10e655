"""Captured samples for online self-training: the record, the store interface, and ``open_store``.

The service captures a request (downscaled image, prompts, the served mask) off the request path;
the self-training worker reads a domain's samples back by time; operators delete a request or a
client's data and apply retention. Two backends implement :class:`SampleStore`:
:class:`~wesam.adapters.online.store_sqlite.SqliteSampleStore` (one host) and
:class:`~wesam.adapters.online.store_redis.RedisSampleStore` (shared by several hosts).

Each domain's samples form an append-only log, as a Redis Stream does: a sample is filed at its
``created`` time in whole milliseconds, or, when it arrives after a newer sample of its domain,
at that newest time (the log never goes back). Order, ``since``/``until`` windows and retention
use that filed time, so a reader that pages with ``since=<last until>`` never misses a late
sample. Both backends keep this rule, so they answer every query alike.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from wesam.errors import WesamError

from ..errors import InvalidAdapterRef
from ..ref import AdapterRef

MAX_ID_CHARS = 256
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG


class SampleStoreError(WesamError, RuntimeError):
    """A sample store that cannot be opened or used: an unreachable server, a newer schema, a
    backend failure (``config`` for a bad URL)."""

    kind = "sample_store"


class InvalidSample(SampleStoreError, ValueError):
    """A sample record, or an argument naming samples (id, domain, window, limit), that is not
    well formed."""

    kind = "invalid_argument"


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidSample(f"{name} must be a non-empty printable string of at most {MAX_ID_CHARS} "
                            f"characters, got {value!r:.80}")
    return value


def check_domain(domain: str) -> str:
    """``domain`` if it is a valid domain name (as :class:`AdapterRef` defines it), else InvalidSample."""
    try:
        AdapterRef(domain)
    except InvalidAdapterRef as exc:
        raise InvalidSample(f"domain: {exc}") from exc
    return domain


def check_request_id(request_id: object) -> str:
    """``request_id`` if well formed, else InvalidSample."""
    return _check_text("request_id", request_id)


def check_client(client: object) -> str:
    """``client`` if well formed, else InvalidSample."""
    return _check_text("client", client)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidSample(f"{name} must be a finite number, got {value!r:.80}")
    return float(value)


def _json_text(name: str, value: object) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidSample(f"{name} must be JSON-serialisable (lists, str, finite numbers): {exc}") from exc


def _check_rle(rle: object) -> None:
    if not isinstance(rle, dict):
        raise InvalidSample(f"mask_rle must be a COCO RLE dict or None, got {type(rle).__name__}")
    size = rle.get("size")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise InvalidSample(f"mask_rle['size'] must be [height, width] of positive ints, got {size!r:.80}")
    if not isinstance(rle.get("counts"), (str, list)):
        raise InvalidSample("mask_rle['counts'] must be a str (compressed; decode pycocotools' bytes) "
                            "or a list of ints")
    _json_text("mask_rle", rle)


@dataclass(frozen=True)
class CapturedSample:
    """One served request kept for self-training, validated on construction.

    ``image`` is the encoded (PNG/JPEG) image already downscaled to the model's input size;
    ``prompts`` and ``mask_rle`` are in that stored image's frame, ``image_size`` is the original
    (H, W). ``adapter`` is the ``domain@vN`` that served the request (None: the base model).
    Numbers are normalised (``image_size`` to a tuple of ints, ``created``/``score`` to float).
    """

    request_id: str
    domain: str
    client: str
    created: float
    image: bytes = field(repr=False)
    image_size: tuple[int, int]
    prompts: dict[str, Any]
    adapter: str | None = None
    mask_rle: dict[str, Any] | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        check_request_id(self.request_id)
        check_domain(self.domain)
        check_client(self.client)
        created = _finite("created", self.created)
        if created <= 0:
            raise InvalidSample(f"created must be unix seconds > 0, got {self.created!r}")
        if not isinstance(self.image, (bytes, bytearray, memoryview)) or not any(
                bytes(self.image[:len(m)]) == m for m in IMAGE_MAGIC):
            raise InvalidSample("image must be the encoded PNG or JPEG bytes of the stored image")
        size = self.image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
            raise InvalidSample(f"image_size must be the original (height, width) as positive ints, got {size!r:.80}")
        if not isinstance(self.prompts, dict):
            raise InvalidSample(f"prompts must be a dict, got {type(self.prompts).__name__}")
        _json_text("prompts", self.prompts)
        if self.adapter is not None:
            try:
                AdapterRef.parse(_check_text("adapter", self.adapter))
            except InvalidAdapterRef as exc:
                raise InvalidSample(f"adapter: {exc}") from exc
        if self.mask_rle is not None:
            _check_rle(self.mask_rle)
        object.__setattr__(self, "created", created)
        object.__setattr__(self, "image", bytes(self.image))
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "score", None if self.score is None else _finite("score", self.score))

    def to_dict(self) -> dict[str, Any]:
        """Every field except ``image``, as JSON-ready values."""
        out = asdict(self)
        del out["image"]
        out["image_size"] = list(self.image_size)
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON (what the stores keep next to the image bytes)."""
        return _json_text("sample", self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], image: bytes) -> CapturedSample:
        """The inverse of :meth:`to_dict`; unknown keys (a newer writer's additions) are ignored."""
        try:
            return cls(request_id=data["request_id"], domain=data["domain"], client=data["client"],
                       created=data["created"], image=image, image_size=tuple(data["image_size"]),
                       prompts=data["prompts"], adapter=data.get("adapter"), mask_rle=data.get("mask_rle"),
                       score=data.get("score"))
        except KeyError as exc:
            raise InvalidSample(f"sample record lacks the field {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise InvalidSample(f"malformed sample record: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes, image: bytes) -> CapturedSample:
        """The inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidSample(f"sample record is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidSample("sample record must be a JSON object")
        return cls.from_dict(data, image)


def time_ms(t: float) -> int:
    """Unix seconds -> the whole milliseconds the log files and compares samples by."""
    return math.floor(t * 1000)


def check_window(since: float | None, until: float | None, limit: int | None) -> None:
    """Validate :meth:`SampleStore.samples` arguments."""
    for name, value in (("since", since), ("until", until)):
        if value is not None:
            _finite(name, value)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidSample(f"limit must be an int >= 0 or None, got {limit!r}")


def check_retention(max_age_s: float | None, max_per_domain: int | None, now: float | None) -> None:
    """Validate :meth:`SampleStore.purge` arguments."""
    if max_age_s is not None and _finite("max_age_s", max_age_s) < 0:
        raise InvalidSample(f"max_age_s must be >= 0, got {max_age_s!r}")
    if max_per_domain is not None and (isinstance(max_per_domain, bool) or not isinstance(max_per_domain, int)
                                       or max_per_domain < 0):
        raise InvalidSample(f"max_per_domain must be an int >= 0 or None, got {max_per_domain!r}")
    if now is not None:
        _finite("now", now)


class SampleStore(ABC):
    """Where captured samples live until the self-training worker and retention are done with them.

    Every method is one atomic operation, safe to call from several threads and processes at once
    (several service workers write, the self-training worker reads and purges). Backend failures
    raise :class:`SampleStoreError`; malformed arguments raise :class:`InvalidSample`.
    """

    #: Where the store lives, safe to log (a path, or a URL without its password).
    location: str

    @abstractmethod
    def add(self, sample: CapturedSample) -> bool:
        """Store ``sample``; False (and nothing written) when its ``request_id`` is already stored."""

    @abstractmethod
    def get(self, request_id: str) -> CapturedSample | None:
        """The sample captured for ``request_id``, or None."""

    @abstractmethod
    def delete(self, request_id: str) -> bool:
        """Remove one sample; False when there was none."""

    @abstractmethod
    def delete_client(self, domain: str, client: str) -> int:
        """Remove every sample of ``client`` in ``domain`` (a data-deletion request); how many."""

    @abstractmethod
    def samples(self, domain: str, *, since: float | None = None, until: float | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[CapturedSample]:
        """``domain``'s samples filed at ``since <= t < until``, oldest first (or newest first),
        at most ``limit`` of them."""

    @abstractmethod
    def count(self, domain: str | None = None) -> int:
        """How many samples ``domain`` (or the whole store) holds."""

    @abstractmethod
    def domains(self) -> list[str]:
        """The domains that hold samples, sorted."""

    @abstractmethod
    def client_counts(self, domain: str) -> dict[str, int]:
        """``{client: number of samples}`` in ``domain``."""

    @abstractmethod
    def purge(self, *, max_age_s: float | None = None, max_per_domain: int | None = None,
              now: float | None = None) -> int:
        """Retention: remove samples filed more than ``max_age_s`` before ``now`` (default: the
        clock), then each domain's oldest beyond ``max_per_domain``; how many were removed."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


F = TypeVar("F", bound=Callable[..., Any])


def backend_errors(*errors: type[BaseException]) -> Callable[[F], F]:
    """Method decorator: the backend library's ``errors`` become :class:`SampleStoreError` naming
    the store's ``location``, so callers handle one wesam error instead of driver tracebacks."""

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def wrapper(self: SampleStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except errors as exc:
                raise SampleStoreError(f"sample store {self.location}: {exc}") from exc

        return wrapper  # type: ignore[return-value]

    return decorate


def redact_url(url: str) -> str:
    """``url`` without its user and password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse_store_url(url: str) -> tuple[str, str]:
    """The one reading of a store URL: ``("sqlite", path)`` for ``sqlite:///abs/path.db`` or a plain
    path, ``("redis", url)`` for ``redis://`` / ``rediss://``. Anything else raises
    :class:`SampleStoreError` (kind ``config``); the serving configuration checks URLs with it too."""
    if not isinstance(url, str) or not url.strip():
        raise SampleStoreError(f"sample store URL must be a non-empty string, got {url!r}", kind="config")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "sqlite", url
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise SampleStoreError(f"SQLite URL {url!r} must name an absolute path: sqlite:///abs/path.db "
                                   "(or give the plain path)", kind="config")
        return "sqlite", rest
    if scheme in ("redis", "rediss"):
        return "redis", url
    raise SampleStoreError(f"unsupported sample store URL {redact_url(url)!r}; expected sqlite:///abs/path.db, "
                           "a filesystem path, or redis://host:port/db", kind="config")


def open_store(url: str, *, create: bool = True) -> SampleStore:
    """Open the store ``url`` names (see :func:`parse_store_url`). With ``create=False`` a SQLite
    file that does not exist is refused instead of created (an operator's typo must not make an
    empty store)."""
    backend, target = parse_store_url(url)
    # Imported here: the backends import this module, and SQLite users need not import redis.
    if backend == "sqlite":
        from .store_sqlite import SqliteSampleStore

        if not create and not Path(target).expanduser().is_file():
            raise SampleStoreError(f"no sample store at {target}", kind="config")
        return SqliteSampleStore(target)
    from .store_redis import RedisSampleStore

    return RedisSampleStore(target)
