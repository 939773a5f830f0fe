"""Redis Cluster for the Redis Streams adapter, through redis-py's cluster
client (``redis.asyncio.cluster.RedisCluster``): it follows MOVED and ASK,
finds the new master after a failover and retries TRYAGAIN; nothing here
speaks the cluster protocol itself.

Every key lives in one of ``partitions`` hash tags (see ``Keys``), and every
script is called with its partition's two route keys (``Keys.route``), so it
runs on the node that owns the partition and all its keys are local to it.
Neither route key ever exists: while a partition's slot migrates, Redis
answers a script in it with TRYAGAIN (redis-py retries, then the call fails
as transient and is retried later) instead of running it with half of the
partition's keys moved.

The partition count is part of the data's layout: it is stored once per
prefix in ``Keys.meta`` and a broker that counts otherwise refuses to start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from brokers.base import BrokerError
from brokers.redis_keys import Keys
from brokers.redis_lines import exchange, pack_command, resending, send_in_batches

__all__ = (
    "DEFAULT_PARTITIONS", "ClusterBatcher", "call_script", "check_cluster_server", "check_partitions", "open_cluster",
)

#: Partitions of a cluster URL without ``?partitions=``.
DEFAULT_PARTITIONS = 16
#: Milliseconds a commit waits for its replicas (``BrokerOptions.replicas``).
_WAIT_MS = 1000


async def open_cluster(url: str, safe_url: str) -> Any:
    """A cluster client for ``redis+cluster://[user:password@]host:port[,host:port...]/``
    (``rediss+cluster://`` for TLS), its slot map loaded.

    Raises:
        BrokerError: no node is reachable, or the credentials are refused.
    """
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = []
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or not port.isdigit():
            raise BrokerError(f"cluster node {host!r} in {safe_url} is not host:port")
        nodes.append(ClusterNode(name.strip("[]"), int(port)))
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    first = urlunsplit(parts._replace(scheme=scheme, netloc=f"{userinfo}{at}{hosts.split(',')[0]}", path="/"))
    client = RedisCluster.from_url(
        first, startup_nodes=nodes, decode_responses=False, protocol=2, socket_connect_timeout=5.0,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )
    try:
        await client.initialize()
        await _ping_any(client)
    except Exception as exc:
        await client.aclose()
        raise BrokerError(f"cannot connect to {safe_url}: {type(exc).__name__}: {exc}") from None
    return client


async def _ping_any(client: Any) -> None:
    """PING the masters until one answers: a master that just died (its
    replica not yet promoted) leaves the others serving their partitions,
    so it does not stop a worker from starting."""
    failure: Exception | None = None
    for node in client.get_primaries():
        try:
            await client.ping(target_nodes=node)
            return
        except (rexc.ConnectionError, rexc.TimeoutError) as exc:
            failure = exc
    raise failure or rexc.ConnectionError("the slot map names no master")


async def check_partitions(client: Any, keys: Keys, safe_url: str) -> None:
    """Record the partition count on first use; refuse a broker that counts otherwise.

    Raises:
        BrokerError: the data under this prefix was written with another count.
    """
    wanted = str(keys.count).encode()
    await client.set(keys.meta(), wanted, nx=True)
    found = await client.get(keys.meta())
    if found != wanted:
        raise BrokerError(
            f"{safe_url} holds data written with partitions={(found or b'?').decode()} under prefix "
            f"{keys.prefix!r}, but this broker has partitions={keys.count}: an event's partition would "
            f"change and its transaction split. Use partitions={(found or b'?').decode()}, or drain every "
            f"worker and start a new prefix (see docs/operations.md, Redis Cluster)"
        )


async def check_cluster_server(client: Any, safe_url: str, log: logging.Logger) -> None:
    """Warn unless every master keeps data like a database (RELIABILITY rule 7)."""
    for node in client.get_primaries():
        try:
            found = {**await client.config_get("appendonly", target_nodes=node),
                     **await client.config_get("maxmemory-policy", target_nodes=node)}
        except rexc.ResponseError as exc:
            log.info("Redis at %s: skipped the appendonly / maxmemory-policy check (%s)",
                     safe_url, str(exc).split("\n")[0][:120])
            return
        except (rexc.ConnectionError, rexc.TimeoutError):
            continue  # a master down at start-up (failing over): the others are checked
        config = {_text(k): _text(v) for k, v in found.items()}
        if config.get("appendonly", "yes") != "yes":
            log.warning("Redis Cluster node %s of %s runs with appendonly no: acknowledged events are lost "
                        "if it crashes (set appendonly yes)", node.name, safe_url)
        policy = config.get("maxmemory-policy", "noeviction")
        if policy != "noeviction":
            log.warning("Redis Cluster node %s of %s runs with maxmemory-policy %s: eviction destroys streams "
                        "and groups (set maxmemory-policy noeviction)", node.name, safe_url, policy)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: Error replies of a command that did not run where it was sent (moved,
#: being moved, cluster down, script not loaded): the cluster client sends it
#: again, following the redirection or loading the script.
NOT_RUN = (rexc.AskError, rexc.TryAgainError, rexc.ClusterDownError, rexc.NoScriptError)


async def on_node(node: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``commands`` on one connection of the cluster client's ``node``,
    packed here and written at once: their replies, an exception in place of
    each error reply.

    redis-py's cluster client packs every argument in Python; a commit batch
    or a fetch round carries hundreds, and packing them there took about a
    sixth of a cluster worker's busy time (``py-spy``). Measured with
    ``bench/cluster_scaling.py --chains 20000``, before and after
    alternating, two rounds each: worker CPU per chain 6-23% lower on the
    cluster rows, events/s 1.08-1.29 times.
    Replies that say a command did not run on ``node`` (``NOT_RUN``) are the
    caller's to send again through the cluster client, which follows
    redirections and refreshes its slot map.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: the
            node could not be reached, or did not answer in time (the
            connection is closed: the commands may have run).
    """
    connection = node.acquire_connection()
    try:
        return await exchange(connection, b"".join(pack_command(command) for command in commands), len(commands))
    except BaseException:
        # Replies may be left unread on it: it must not serve another call as it is.
        await connection.disconnect(nowait=True)
        raise
    finally:
        node.release(connection)


async def call_script(client: Any, keys: Keys, partition: int, source: str, sha: str, args: Sequence[Any]) -> Any:
    """EVALSHA ``sha`` in ``partition`` on its master (``on_node``), or
    through the cluster client where that call did not run there or the
    master could not be reached; on NOSCRIPT (a node restarted, or a replica
    just promoted: their script caches are empty) load ``source`` on every
    master and send again."""
    route = keys.route(partition)
    try:
        node = client.get_node_from_key(route[0])
        (reply,) = await on_node(node, [("EVALSHA", sha, len(route), *route, *args)])
    except (rexc.ConnectionError, rexc.TimeoutError, rexc.RedisClusterException):
        pass  # the cluster client retries, finding the partition's master anew (a slot not covered yet included)
    else:
        if not isinstance(reply, NOT_RUN):
            if isinstance(reply, Exception):
                raise reply
            return reply
    for attempt in range(2):
        try:
            return await client.execute_command("EVALSHA", sha, len(route), *route, *args)
        except rexc.NoScriptError:
            if attempt:
                raise
            await client.script_load(source)
    raise AssertionError("unreachable")  # pragma: no cover


class ClusterBatcher:
    """``ScriptBatcher`` for Redis Cluster: the commits made while others are
    on the wire go together, one batch-script call per partition (a call is
    atomic only within one slot), each through the cluster client."""

    def __init__(self, client: Any, keys: Keys, source: str, *, max_batch: int = 500, replicas: int = 0) -> None:
        self._client = client
        self._replicas = replicas
        self._keys = keys
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()
        self._max_batch = max_batch
        self._queues: dict[int, list[tuple[Sequence[Any], asyncio.Future[Any]]]] = {}
        self._senders: dict[int, asyncio.Task[None]] = {}

    def call(self, args: Sequence[Any], partition: int) -> asyncio.Future[Any]:
        """Queue a run of the script in ``partition``; await the future for its reply.

        Raises:
            redis.exceptions.RedisError: from the future: the call (or its
                whole batch) failed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queues.setdefault(partition, []).append((args, future))
        if partition not in self._senders:
            self._senders[partition] = loop.create_task(self._send_all(partition), name="choreo-redis-batch")
        return future

    async def _send_all(self, partition: int) -> None:
        try:
            await send_in_batches(self._queues[partition], self._max_batch,
                                  lambda batch: self._send(partition, batch))
        finally:
            del self._senders[partition]

    async def _send(self, partition: int, batch: list[Sequence[Any]]) -> list[Any]:
        flat: list[Any] = [len(batch)]
        for args in batch:
            flat += [len(args), *args]
        if self._replicas:
            replies = await resending(lambda: self._call_and_wait(partition, flat))
        else:
            # Resent as on a single server (see ``resending``): a batch that
            # ran before its reply was lost is refused commit by commit.
            replies = await resending(
                lambda: call_script(self._client, self._keys, partition, self._source, self._sha, flat))
        if not isinstance(replies, list) or len(replies) != len(batch):
            raise rexc.ResponseError(f"batch script returned {replies!r:.200} for {len(batch)} calls")
        return replies

    async def _call_and_wait(self, partition: int, flat: list[Any]) -> Any:
        """The batch, then WAIT on the same connection (a pipeline to the
        partition's master): the reply only once ``replicas`` replicas have
        the batch's writes.

        Raises:
            redis.exceptions.ResponseError: fewer replicas confirmed it in
                time, or the slot moved meanwhile (then WAIT spoke for
                another connection): the batch may have been applied.
        """
        client, route = self._client, self._keys.route(partition)
        for attempt in range(2):
            node = client.get_node_from_key(route[0])
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("EVALSHA", self._sha, len(route), *route, *flat)
            pipe.execute_command("WAIT", self._replicas, _WAIT_MS, target_nodes=node)
            replies, confirmed = await pipe.execute(raise_on_error=False)
            if isinstance(replies, rexc.NoScriptError) and not attempt:
                await client.script_load(self._source)
                continue
            if isinstance(replies, Exception):
                raise replies
            moved = client.get_node_from_key(route[0]).name != node.name
            if moved or isinstance(confirmed, Exception) or int(confirmed) < self._replicas:
                got = "the slot moved" if moved else f"{confirmed!r} of {self._replicas} replicas confirmed"
                raise rexc.ResponseError(
                    f"commit applied on the master but not confirmed by its replicas within {_WAIT_MS} ms "
                    f"({got}); it is safe to retry (copies are deduped)"
                )
            return replies
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Stop sending; calls still waiting fail with ``ConnectionError``."""
        for task in list(self._senders.values()):
            task.cancel()
