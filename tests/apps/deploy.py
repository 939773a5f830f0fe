"""A handler deployed late, for the deploy-order tests."""

from __future__ import annotations

from typing import Any

from choreo import App

audit = App("audit")
seen: list[str] = []


@audit.on_event("order.created")
async def take(data: dict[str, Any]) -> None:
    seen.append(data["order"])
