"""The Redis key layout (``brokers.redis_keys.Keys``): pinned, and the one
source of every key name the adapter and its Lua scripts use."""

from __future__ import annotations

import pytest

from brokers import CommitStatus, Message, StateWrite, Subscription
from brokers.redis_keys import Keys
from brokers.redis_streams import RedisStreamsBroker
from tests.deliveries import collect
from tests.redis_server import RedisServer

SUB = Subscription("order.created", "inventory.reserve")


def test_layout_is_the_one_existing_data_was_written_with() -> None:
    """Every kind of key keeps its wire name, so a new release reads what an older one wrote."""
    keys = Keys("choreo")
    assert keys.stream("order.created") == "choreo:order.created"
    assert keys.private_stream("billing.charge", "order.created") == "choreo:_group:billing.charge:order.created"
    assert keys.delayed() == "choreo:_delayed"
    assert keys.dead_letters() == "choreo:_dead"
    assert keys.seen("billing.charge", "7") == "choreo:_seen:billing.charge:#7"
    assert keys.seen_head("billing.charge") == "choreo:_seen:billing.charge:#"
    assert keys.state("saga:1") == "choreo:_state:saga:1"
    assert keys.state_index() == "choreo:_state_keys"
    assert keys.pattern() == "choreo:*"


def test_stream_keys_parse_back_to_their_topic_and_group() -> None:
    """Parsing a stream key inverts ``stream`` and ``private_stream``; other keys are no stream of a topic."""
    keys = Keys("app")
    assert keys.parse_stream(keys.stream("a.b:c")) == ("a.b:c", None)
    assert keys.parse_stream(keys.private_stream("g.h", "a.b:c")) == ("a.b:c", "g.h")
    for other in (keys.dead_letters(), keys.delayed(), keys.state_index(), "other:a.b", "app:"):
        assert keys.parse_stream(other) is None


def test_lua_functions_are_rendered_from_the_key_methods() -> None:
    """The scripts' key functions spell the same names, with any prefix quoted safely."""
    lua = Keys("choreo").lua()
    assert "return 'choreo:_seen:' .. group .. ':\\035' .. bucket end" in lua
    assert "return 'choreo:_group:' .. group .. ':' .. topic" in lua
    odd = Keys("it's\n").lua()
    assert "'it\\039s\\010:_dead'" in odd and "it's" not in odd


def test_cluster_layout_puts_each_partition_under_one_hash_tag() -> None:
    """On Redis Cluster every name starts with ``<prefix>:{<n>}``; partitions
    are pinned (CRC-32 of the key), since changing them would split transactions."""
    keys = Keys("choreo", 16)
    assert keys.stream("order.created", 7) == "choreo:{7}:order.created"
    assert keys.private_stream("g", "order.created", 7) == "choreo:{7}:_group:g:order.created"
    assert [keys.delayed(3), keys.dead_letters(3), keys.seen("g", "5", 3), keys.seen_head("g", 3),
            keys.state("saga:1", 3), keys.state_index(3)] == [
        "choreo:{3}:_delayed", "choreo:{3}:_dead", "choreo:{3}:_seen:g:#5", "choreo:{3}:_seen:g:#",
        "choreo:{3}:_state:saga:1", "choreo:{3}:_state_keys"]
    assert keys.route(7) == ["choreo:{7}", "choreo:{7}:_guard"] and Keys("choreo").route(0) == []
    assert [keys.partition_of(k) for k in ("order-1", "01J9ZK3V6Q8X4Y2B5N7M0C1D2E", "")] == [15, 9, 0]
    assert keys.locate_stream("choreo:{7}:_group:g:a:b") == ("a:b", "g", 7)
    assert keys.locate_stream("choreo:{16}:a.b") is None  # no such partition
    assert keys.locate_stream("choreo:a.b") is None
    assert Keys("choreo").locate_stream("choreo:a.b") == ("a.b", None, 0)
    with pytest.raises(ValueError, match="hash tags"):
        Keys("my{app}", 16)


def test_cluster_lua_functions_start_from_the_partition_the_script_runs_in() -> None:
    lua = Keys("choreo", 16).lua()
    assert lua.startswith("local root = KEYS[1]\n")
    assert "return root .. ':_seen:' .. group .. ':\\035' .. bucket end" in lua
    assert "return root .. ':_seen:' .. group .. ':\\035' end" in lua


@pytest.mark.redis
async def test_every_key_lands_where_keys_says(redis_server: RedisServer) -> None:
    """With an unusual prefix, publish, retry, settle, state and dead letters all use Keys' names."""
    redis_server.command("FLUSHALL")
    prefix = "my app's"
    broker = RedisStreamsBroker(redis_server.url + "?prefix=my%20app%27s")
    keys = Keys(prefix)
    await broker.connect()
    try:
        await broker.subscribe([SUB])
        await broker.publish([Message(SUB.topic, "m1", b"one"), Message(SUB.topic, "m2", b"two")])
        first, second = await collect(broker, "c", [SUB], 2)
        retry = Message(SUB.topic, "m1", b"one", delay=60, group=SUB.group)
        state = [StateWrite("k", b"v", 0)]
        assert await broker.commit(first, publish=[retry], state=state) is CommitStatus.OK
        assert await broker.commit(second, dead_letter="bad") is CommitStatus.OK
        stored = set(redis_server.command("--raw", "KEYS", "*").decode().split("\n")) - {""}
        assert stored == {keys.stream(SUB.topic), keys.private_stream(SUB.group, SUB.topic), keys.delayed(),
                          keys.dead_letters(), keys.seen(SUB.group, "0"), keys.seen_head(SUB.group), keys.state("k"),
                          keys.state_index()}
        assert [m.message_id for m in await broker.delayed()] == ["m1"]
        assert [e.message_id for e in await broker.history()] == ["m1", "m2"]
        assert await broker.list_state("") == {"k": (await broker.get_state("k"))}
    finally:
        await broker.close()
