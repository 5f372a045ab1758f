"""Helpers for driving `/ws/worker` with channels' WebsocketCommunicator."""

import asyncio
import json
import uuid
from collections.abc import Coroutine
from typing import Any

from channels.testing import WebsocketCommunicator

from fetchml.asgi import application

TIMEOUT = 5.0
CAPABILITIES = {
    "cpu_cores": 8,
    "memory_gb": 32,
    "gpu_count": 2,
    "gpu_type": "A100",
    "batch_slots": 2,
    "service_slots": 1,
}


def run(scenario: Coroutine) -> Any:
    return asyncio.run(scenario)


async def connect(raw_key: str | None, *, query: str = "") -> WebsocketCommunicator:
    headers = [(b"x-api-key", raw_key.encode())] if raw_key else []
    path = "/ws/worker" + (f"?{query}" if query else "")
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def send(communicator: WebsocketCommunicator, message: dict[str, Any]) -> None:
    await communicator.send_to(text_data=json.dumps({"version": 1, **message}))


async def receive(communicator: WebsocketCommunicator) -> dict[str, Any]:
    return json.loads(await communicator.receive_from(timeout=TIMEOUT))


async def send_batch(communicator: WebsocketCommunicator, messages: list[dict[str, Any]]) -> None:
    """One `batch` frame holding `messages` (each given version 1 unless it says otherwise)."""
    inner = [{"version": 1, **message} for message in messages]
    await communicator.send_to(text_data=json.dumps({"type": "batch", "version": 1, "messages": inner}))


async def close_code(communicator: WebsocketCommunicator) -> int:
    return (await closed_with(communicator))[0]


async def closed_with(communicator: WebsocketCommunicator) -> tuple[int, str]:
    """The close code and reason the server ends the connection with (what it sends before skipped)."""
    output = await communicator.receive_output(timeout=TIMEOUT)
    while output["type"] != "websocket.close":
        output = await communicator.receive_output(timeout=TIMEOUT)
    return output["code"], output.get("reason", "")


async def start_worker(
    raw_key: str,
    *,
    name: str = "box-1",
    running: list[dict] | None = None,
    features: list[str] | None = None,
    instance: str | None = None,
    **capabilities: Any,
) -> tuple[WebsocketCommunicator, dict[str, Any]]:
    """Connect and say hello (listing `features`, naming the agent `instance`, when given); returns
    the communicator and the welcome."""
    communicator = await connect(raw_key)
    await send(
        communicator,
        {
            "type": "hello",
            "name": name,
            "agent_version": "0.1.0",
            "hostname": "10.0.0.7",
            "capabilities": {**CAPABILITIES, **capabilities},
            "running": running or [],
        }
        | ({"features": features} if features is not None else {})
        | ({"instance": instance} if instance is not None else {}),
    )
    welcome = await receive(communicator)
    assert welcome["type"] == "welcome", welcome
    return communicator, welcome


async def refused_then_still_answering(communicator: WebsocketCommunicator, frame: str) -> tuple[dict, dict]:
    """Send `frame`; the `error` it gets, and the answer to a heartbeat naming an unknown run
    sent after it (a `stop`, if the connection still answers)."""
    await communicator.send_to(text_data=frame)
    error = await receive(communicator)
    unknown = {"task_id": str(uuid.uuid4()), "token": str(uuid.uuid4())}
    await send(communicator, {"type": "heartbeat", "running": [unknown]})
    return error, await receive(communicator)


async def expect_nothing(communicator: WebsocketCommunicator) -> None:
    assert await communicator.receive_nothing(timeout=0.2)
