"""Broker URLs and the delivery options their query strings set."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit, urlunsplit

import attrs

from brokers.base import BrokerError

__all__ = ("CLUSTER_SCHEMES", "REDIS_CONNECTION_OPTIONS", "BrokerOptions", "parse_url", "redact_url")


@attrs.frozen
class BrokerOptions:
    """Delivery options shared by every adapter (query parameters of the URL).

    Attributes:
        visibility_timeout: Seconds an uncommitted delivery stays with its
            consumer before another consumer may claim it.
        max_deliveries: Deliveries after which a message is dead-lettered.
        maxlen: Approximate number of entries kept per topic (on Redis
            Cluster, across its partitions). ``None``: the
            adapter's default (Redis: ``REDIS_DEFAULT_MAXLEN``; memory: only
            what some group still needs); ``0``: no bound by length.
            Trimming never drops an entry still pending or undelivered.
        retention: Seconds an entry that every group is done with is kept
            (Redis; ``0``: no bound by age). Entries older than this, or past
            ``maxlen``, are trimmed, never one still pending or undelivered.
        dedupe_ttl: Seconds a settled message id is remembered per group
            (``0``: not at all, which turns dedupe off).
        dedupe_max: Most settled message ids remembered per group (Redis;
            on Redis Cluster, across its partitions):
            past it the oldest go first, even before ``dedupe_ttl``.
        claim_interval: Seconds between reclaim sweeps (default: a quarter of
            ``visibility_timeout``, at most 5).
        prefix: Key prefix on Redis.
        partitions: Redis Cluster only: how many partitions (hash tags) the
            keys are spread over (``None``: 16). One business transaction
            stays in one partition. Plain Redis has one partition.
        replicas: Redis Cluster only: a commit (and a publish) is
            acknowledged only once this many replicas of its master have it
            (``WAIT``, up to 1 s; fewer is an error, and the caller's retry
            is deduped). ``None``: acknowledged by the master alone.
    """

    visibility_timeout: float = 30.0
    max_deliveries: int = 5
    maxlen: int | None = None
    retention: float = 86400.0
    dedupe_ttl: float = 86400.0
    dedupe_max: int = 100_000
    claim_interval: float | None = None
    prefix: str = "choreo"
    partitions: int | None = None
    replicas: int | None = None

    @property
    def effective_claim_interval(self) -> float:
        if self.claim_interval is not None:
            return self.claim_interval
        return min(5.0, max(0.05, self.visibility_timeout / 4))


_CONVERTERS = {
    "visibility_timeout": float,
    "max_deliveries": int,
    "maxlen": int,
    "retention": float,
    "dedupe_ttl": float,
    "dedupe_max": int,
    "claim_interval": float,
    "prefix": str,
    "partitions": int,
    "replicas": int,
}

#: The URL schemes of Redis Cluster (``redis+cluster://host:port[,host:port...]/``).
CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})


#: Connection options of redis-py that a ``redis://`` / ``rediss://`` URL may
#: carry beside choreo's own (TLS files, timeouts, the client name...).
REDIS_CONNECTION_OPTIONS = frozenset({
    "db", "client_name", "health_check_interval", "max_connections", "protocol", "retry_on_timeout",
    "socket_connect_timeout", "socket_keepalive", "socket_timeout", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path",
    "ssl_cert_reqs", "ssl_certfile", "ssl_check_hostname", "ssl_ciphers", "ssl_keyfile", "ssl_min_version",
    "ssl_password",
})
_ADAPTER_OPTIONS = {
    "redis": REDIS_CONNECTION_OPTIONS, "rediss": REDIS_CONNECTION_OPTIONS,
    # A cluster has no databases: db is refused.
    **dict.fromkeys(CLUSTER_SCHEMES, REDIS_CONNECTION_OPTIONS - {"db"}),
}


def parse_url(url: str) -> tuple[str, BrokerOptions]:
    """Split a broker URL into its scheme and delivery options.

    Query parameters are choreo's options (``BrokerOptions``) or, on Redis,
    redis-py's connection options (``REDIS_CONNECTION_OPTIONS``), which the
    adapter passes on; anything else is refused by name.

    Raises:
        BrokerError: no scheme, an unknown option, or an option that does
            not parse or is out of range.
    """
    parts = urlsplit(url)
    if not parts.scheme:
        raise BrokerError(f"broker URL {url!r} has no scheme: use memory://, redis:// or rediss://")
    passed_on = _ADAPTER_OPTIONS.get(parts.scheme, frozenset())
    values: dict[str, object] = {}
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        convert = _CONVERTERS.get(name)
        if convert is None:
            if name not in passed_on:
                known = sorted({*_CONVERTERS, *passed_on})
                raise BrokerError(f"unknown broker option {name!r} in {redact_url(url)}; known: {', '.join(known)}")
            continue
        try:
            values[name] = convert(raw)
        except ValueError:
            raise BrokerError(f"broker option {name}={raw!r} is not a valid {convert.__name__}") from None
    options = BrokerOptions(**values)  # type: ignore[arg-type]
    if options.visibility_timeout <= 0:
        raise BrokerError("broker option visibility_timeout must be positive")
    if options.max_deliveries < 1:
        raise BrokerError("broker option max_deliveries must be at least 1")
    if options.maxlen is not None and options.maxlen < 0:
        raise BrokerError("broker option maxlen must be 0 (no bound) or more")
    if options.retention < 0:
        raise BrokerError("broker option retention must be 0 (no bound) or more")
    if options.dedupe_ttl < 0:
        raise BrokerError("broker option dedupe_ttl must be 0 (dedupe off) or more")
    if options.dedupe_max < 2:
        raise BrokerError("broker option dedupe_max must be at least 2")
    if options.partitions is not None:
        if parts.scheme not in CLUSTER_SCHEMES:
            raise BrokerError(
                "broker option partitions needs a redis+cluster:// or rediss+cluster:// URL "
                "(plain Redis keeps one partition)"
            )
        if not 1 <= options.partitions <= 16384:
            raise BrokerError("broker option partitions must be between 1 and 16384")
    if options.replicas is not None:
        if parts.scheme not in CLUSTER_SCHEMES:
            raise BrokerError("broker option replicas needs a redis+cluster:// or rediss+cluster:// URL")
        if options.replicas < 1:
            raise BrokerError("broker option replicas must be at least 1")
    return parts.scheme, options


def redact_url(url: str) -> str:
    """The URL with any password replaced, safe for logs and errors."""
    parts = urlsplit(url)
    # Split by hand: a cluster's host list is no netloc urllib can take apart.
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
