"""The fast builders make exactly what ``__init__`` makes; memos stay bounded."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from brokers.base import Delivery, Message, new_delivery, new_message
from brokers.speedups import MAX_REMEMBERED, remember, slot_setters

_optional_text = st.none() | st.text()


@given(st.text(), st.text(), st.binary(), st.none() | st.floats(allow_nan=False), _optional_text)
def test_new_message_is_message(topic: str, id: str, body: bytes, delay: float | None, group: str | None) -> None:
    assert new_message(topic, id, body, delay, group) == Message(topic, id, body, delay, group)
    assert new_message(topic, id, body) == Message(topic, id, body)


@given(st.text(), st.text(), st.text(), st.text(), _optional_text, st.binary(), st.integers(min_value=1))
def test_new_delivery_is_delivery(
    topic: str, group: str, consumer: str, entry: str, message_id: str | None, body: bytes, deliveries: int
) -> None:
    built = new_delivery(topic, group, consumer, entry, message_id, body, deliveries)
    assert built == Delivery(topic, group, consumer, entry, message_id, body, deliveries)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.topic = "other"  # type: ignore[misc]


def test_slot_setters_refuse_classes_without_slots() -> None:
    @attrs.define(slots=False)
    class Loose:
        a: int

    class Plain:
        a: int = 0

    with pytest.raises(TypeError, match="Loose"):
        slot_setters(Loose)
    with pytest.raises(TypeError, match="Plain"):
        slot_setters(Plain)


def test_remember_stops_at_its_bound() -> None:
    memo: dict[str, str] = {}
    for n in range(MAX_REMEMBERED + 5):
        assert remember(memo, f"name{n}", f"value{n}") == f"value{n}"
    assert len(memo) == MAX_REMEMBERED
    assert f"name{MAX_REMEMBERED}" not in memo
