"""A service: a group of an agent's routes over the shared node. Its control-plane calls are declared in
protocols.calls and served by methods marked `@serves(name)`: the request is read and validated before
the method runs, its reply (or each event of a streamed reply) is checked against the declaration before
it is sent, and errors become replies that name their cause:

    400  the request is malformed (protocols.ProtocolError; `error` is its code)
    409  the request is well formed but cannot be done (any other SplitringError: config, spec, job, plan)
    500  anything else: a bug or a failed computation, with the exception named (and logged in full)
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from protocols import ProtocolError, SplitringError, validate
from protocols.calls import CALLS, Call, check_event, check_reply

if TYPE_CHECKING:
    from peer.node import Node

log = logging.getLogger("splitring.service")


def json_error(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"error": code, "message": text}, status=status)


def serves(name: str):
    """Mark a service method as the server of the call `name` (protocols.calls.CALLS). The method takes
    (msg, request) — msg the validated request message, or {} for calls without a body — and returns the
    reply (a dict), or, for a streaming call, is an async generator of events."""
    call = CALLS[name]

    def mark(method):
        method.call = call
        return method
    return mark


class Service:
    def __init__(self, node: "Node"):
        self.node = node

    def routes(self) -> list[web.RouteDef]:
        """The routes of this service: its declared calls, then its other routes."""
        calls = [getattr(self, n) for n in dir(type(self)) if isinstance(getattr(getattr(self, n), "call", None), Call)]
        return [web.route(m.call.method, m.call.path, self._serve(m.call, m)) for m in calls] + self.other_routes()

    def other_routes(self) -> list[web.RouteDef]:
        return []

    async def start(self) -> None:
        """Called once the node has started (its session, links and discovery exist)."""

    async def close(self) -> None:
        pass

    async def read(self, request: web.Request, kind: str) -> dict:
        body = await request.read()
        if request.content_type == "application/json":
            try:
                msg = json.loads(body)
            except ValueError as e:
                raise ProtocolError("malformed", f"body is not JSON: {e}") from None
            except RecursionError:
                raise ProtocolError("malformed", "body is nested too deeply") from None
        else:
            msg = await self.node.codec.decode(body, self.node.max_control_body)
        return validate(msg, {kind})

    def _serve(self, call: Call, method):
        async def handler(request: web.Request):
            try:
                msg = await self.read(request, call.request) if call.request else {}
                if not call.stream:
                    reply = await method(msg, request)   # a web.Response: a status of the method's own
                    return reply if isinstance(reply, web.Response) else web.json_response(check_reply(call, reply))
                events = method(msg, request)
                first = await anext(events, None)   # errors before the first event are answered as errors
            except ProtocolError as e:
                self.node.m_rejected.labels(e.code).inc()
                log.warning("%s %s refused: %s", request.method, request.path, e.message)
                return json_error(400, e.code, e.message)
            except SplitringError as e:
                log.warning("%s %s failed: %s", request.method, request.path, e)
                return json_error(409, "job", str(e))
            except (asyncio.CancelledError, web.HTTPException):
                raise
            except Exception as e:   # a bug or a failed computation: the caller still learns the real cause
                log.exception("%s %s failed", request.method, request.path)
                return json_error(500, "internal", f"peer {self.node.peer_id}: {type(e).__name__}: {e}")
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            if first is None:
                return resp
            await resp.write((json.dumps(check_event(call, first)) + "\n").encode())
            async for event in events:
                await resp.write((json.dumps(check_event(call, event)) + "\n").encode())
            return resp
        return handler
