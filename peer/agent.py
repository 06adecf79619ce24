"""The device agent: one aiohttp application (HTTP control + WebSocket data) on one port."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pipeline.config import ConfigError, JobConfig
from pipeline.data import Dataset, fits_model
from pipeline.models import SpecError, footprint, input_shape, spec_hash
from peer.coordinator import Coordinator
from peer.dataplane import MAX_DATA_FRAME, Codec, Links
from peer.discovery import Discovery
from peer.limits import JOB_LIMITS, LIMITS, check_job
from peer.security import Guard, Pins, ServerHandshake, client_session
from peer.transport import UPGRADE, FrameStream, RawFrame, adopt
from peer.state import StateDir, write_atomic
from pipeline.profiling import measure, microbatch_rows, optimizer_state_ratio
from peer.worker import JobError, JobRuntime
from protocols import PROTOCOL_VERSION, ProtocolError, encode_frame, error_message, message, validate
from protocols.frames import encode_parts

log = logging.getLogger("splitring.agent")
CAPABILITIES = ["nsplit"]
MAX_CONTROL_BODY = LIMITS.max_control_body
STAGE_MESSAGES = ("fwd", "bwd", "input", "weights", "lend", "return")   # delivered to a job's stages


def json_error(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"error": code, "message": text}, status=status)


class Agent:
    def __init__(self, ring: str, state: StateDir, data: Dataset, host: str, port: int, interface: str,
                 advertise: str, join: list[str], threads: int = 1, memory_budget: int | None = None,
                 slowdown: float = 1.0, key: bytes | None = None, tls: tuple[ssl.SSLContext, str] | None = None,
                 busy_poll: bool = False, allow_models: list[str] = ()):
        self.ring, self.state, self.data = ring, state, data
        self.allow_models = list(allow_models)   # custom model code this agent's owner allows (--allow-model)
        self.key = key  # the ring key (peer.security.key_for); None: an open ring
        # TLS (peer.security.server_tls): the server's context and its certificate's fingerprint; None: plain
        self.tls, self.fingerprint = tls or (None, "")
        self.guard = Guard(key, fingerprint=self.fingerprint)
        self.pins = Pins()
        self.peer_id = state.peer_id
        self.host, self.port, self.interface, self.advertise, self.join = host, port, interface, advertise, join
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=torch.set_num_threads,
                                          initargs=(threads,))
        self.codec = Codec()
        self.memory_budget = memory_budget
        self.slowdown = slowdown  # test knob: compute takes this many times longer (a slower device)
        # compute on the event loop's thread, and keep the loop polling while a pass runs (see --busy-poll)
        self.busy_poll = busy_poll
        if busy_poll:   # intra-op threads are set per thread: this one computes then
            torch.set_num_threads(threads)
        self.jobs: dict[str, JobRuntime] = {}
        self.coordinated: dict[str, Coordinator] = {}
        self.registry = CollectorRegistry()
        self.m_messages = Counter("splitring_messages", "data-plane messages received", ["type"], registry=self.registry)
        self.m_rejected = Counter("splitring_rejected", "messages refused", ["code"], registry=self.registry)
        self.m_bytes = Counter("splitring_received_bytes", "data-plane bytes received", registry=self.registry)
        self.m_peers = Gauge("splitring_peers_seen", "peers of the ring seen", registry=self.registry)
        self.m_peak = Gauge("splitring_stage_memory_peak_bytes", "most memory a stage of this agent has held",
                            registry=self.registry)
        self.peak_memory = 0  # over every job this agent ran
        self.session: aiohttp.ClientSession | None = None
        self.discovery: Discovery | None = None
        self.links: Links | None = None
        self.sockets: set[web.WebSocketResponse] = set()  # incoming data-plane connections, closed on shutdown
        self.streams: set[FrameStream] = set()

    async def compute_call(self, fn, *args):
        """Run fn on the compute thread, or with busy_poll here, after the loop has seen to what is ready
        (a slowdown > 1 stretches it, as a slower device would)."""
        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            if self.slowdown > 1:
                time.sleep((self.slowdown - 1) * (time.perf_counter() - t0))
            return out
        if self.busy_poll:
            await asyncio.sleep(0)
            return timed()
        return await asyncio.get_running_loop().run_in_executor(self.compute, timed)

    @staticmethod
    async def _poll():
        """Keep the event loop turning: with a task always ready it polls its sockets without sleeping."""
        while True:
            await asyncio.sleep(0)

    def profile(self, cfg: JobConfig) -> dict:
        """This machine's per-layer costs for a job's model (cached per spec, microbatch and optimizer)."""
        key = (f"{spec_hash(cfg.model)}-{microbatch_rows(cfg)}-{optimizer_state_ratio(cfg)}-{cfg.seed}-"
               f"{self.memory_budget}")
        path = self.state.root / "profiles" / f"{key}.json"
        if path.exists():
            prof = json.loads(path.read_text())
        else:
            prof = measure(cfg, budget=self.memory_budget)
            write_atomic(path, json.dumps(prof).encode())
        for k in ("forward_s", "backward_s"):
            prof[k] = [t * self.slowdown for t in prof[k]]
        return prof

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.advertise}:{self.port}"

    # --- lifecycle ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_CONTROL_BODY, middlewares=[self.guard.middleware])
        app.on_response_prepare.append(self.guard.sign)
        app.add_routes([
            web.get("/status", self.h_status), web.get("/metrics", self.h_metrics), web.get("/ws", self.h_ws),
            web.get("/data", self.h_data), web.post("/data/probe", self.h_data_probe),
            web.post("/jobs", self.h_start_job), web.get("/jobs/{job}", self.h_job),
            web.get("/jobs/{job}/model", self.h_model), web.post("/jobs/{job}/cancel", self.h_cancel),
            web.post("/job/prepare", self.h_prepare), web.post("/job/commit", self.h_commit),
            web.post("/job/pass", self.h_pass), web.post("/job/swap/send", self.h_swap_send),
            web.post("/job/swap/receive", self.h_swap_receive), web.post("/job/abort", self.h_abort),
            web.post("/job/end", self.h_end), web.get("/job/{job}/params", self.h_params),
            web.post("/probe", self.h_probe), web.post("/plan", self.h_plan), web.post("/job/profile", self.h_profile),
        ])
        return app

    async def start(self):
        if self.key is None:
            log.warning("no ring secret: anyone who can reach this agent can join ring %r, read its status and "
                        "start or stop jobs (give --secret-file)", self.ring)
        self.session = client_session(self.key, self.pins)
        self.links = Links(self.peer_id, self.ring, self.session, self.codec, self.key, self.pins)
        self.discovery = Discovery(self.ring, self.peer_id, self.port, self.interface, self.advertise, self.join,
                                   key=self.key, tls=self.tls is not None, pins=self.pins)
        await self.discovery.start()

    async def close(self):
        for rt in self.jobs.values():
            rt.abort("agent shutting down")
            if rt.rotation >= 0:
                rt.checkpoint()
        for c in self.coordinated.values():
            if c.task and not c.task.done():
                c.task.cancel()
        if self.discovery:
            await self.discovery.close()
        for ws in list(self.sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"agent shutting down")
        for stream in list(self.streams):
            stream.close()
        if self.links:
            await self.links.close()
        if self.session:
            await self.session.close()
        self.codec.close()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.state.close()

    # --- reading requests ---------------------------------------------------------------------
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
            msg = await self.codec.decode(body, MAX_CONTROL_BODY)
        return validate(msg, {kind})

    def job_config(self, config) -> JobConfig:
        """A job's config from a request, refused unless every value is within this agent's limits and its
        model is built in or allowed by the owner: checked before any import or allocation."""
        cfg = JobConfig.from_dict(config)
        check_job(cfg, self.allow_models)
        return cfg

    def runtime(self, job: str) -> JobRuntime:
        rt = self.jobs.get(job)
        if rt is None:
            raise ProtocolError("unknown_job", f"job {job} is not known to peer {self.peer_id}")
        return rt

    @staticmethod
    def guarded(handler):
        async def wrapper(self, request):
            try:
                return await handler(self, request)
            except ProtocolError as e:
                self.m_rejected.labels(e.code).inc()
                log.warning("%s %s refused: %s", request.method, request.path, e.message)
                return json_error(400, e.code, e.message)
            except (JobError, SpecError, ConfigError) as e:
                log.warning("%s %s failed: %s", request.method, request.path, e)
                return json_error(409, "job", str(e))
            except (asyncio.CancelledError, web.HTTPException):
                raise
            except Exception as e:   # a bug or a failed computation: the caller still learns the real cause
                log.exception("%s %s failed", request.method, request.path)
                return json_error(500, "internal", f"peer {self.peer_id}: {type(e).__name__}: {e}")
        return wrapper

    # --- public -------------------------------------------------------------------------------
    async def h_status(self, request):
        public = {"peer": self.peer_id, "ring": self.ring, "version": PROTOCOL_VERSION, "capabilities": CAPABILITIES}
        if not self.guard.member(request):
            return web.json_response({**public, "private": "sign the request with the ring secret to see more"})
        return web.json_response({
            **public,
            "url": self.url, "interface": self.interface, "instance": self.discovery.instance,
            **self.discovery.public(),   # peers, conflicts, missing
            "data": {"name": self.data.name, "samples": len(self.data), "test_samples": self.data.n_test},
            "memory_budget": self.memory_budget,
            "allowed_models": self.allow_models,
            "busy_poll": self.busy_poll,
            "peak_memory_bytes": max([self.peak_memory] + [rt.peak_memory for rt in self.jobs.values()]),
            "stages": [{"job": j, "rotation": rt.rotation, "layers": list(rt.stage.range), "position": rt.position,
                        "progress": rt.progress, "peak_memory_bytes": rt.peak_memory}
                       for j, rt in self.jobs.items()],
            "jobs": {j: (c.events[-1] if c.events else {}) for j, c in self.coordinated.items()},
        })

    async def h_metrics(self, request):
        self.m_peers.set(len(self.discovery.peers()))
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    # --- data plane ---------------------------------------------------------------------------
    async def h_data(self, request):
        """The peers' data plane: an HTTP Upgrade to a stream of frames (peer.transport)."""
        if request.headers.get("Upgrade", "").lower() != UPGRADE:
            return json_error(426, "upgrade", f"the data plane needs 'Connection: Upgrade', 'Upgrade: {UPGRADE}'")
        resp = web.StreamResponse(status=101, headers={"Connection": "Upgrade", "Upgrade": UPGRADE})
        await resp.prepare(request)
        # from here on the connection is the stream's; aiohttp still hears when it ends
        stream = adopt(request.transport, FrameStream(MAX_DATA_FRAME, on_lost=request.protocol.connection_lost))
        self.streams.add(stream)

        async def frames():
            while (frame := await stream.recv()) is not None:
                yield frame
        try:
            await self._serve_data(request.remote, frames(), lambda msg: stream.send(encode_parts(msg)))
        except ConnectionError:
            pass
        finally:
            self.streams.discard(stream)
            stream.close()
        return resp

    async def h_ws(self, request):
        """The same data-plane messages in binary WebSocket frames, for tools that speak WebSocket."""
        ws = web.WebSocketResponse(max_msg_size=MAX_DATA_FRAME)
        await ws.prepare(request)
        self.sockets.add(ws)

        async def frames():
            async for frame in ws:
                binary = frame.type == aiohttp.WSMsgType.BINARY
                yield frame.data if binary else ProtocolError("malformed", "binary CBOR frames only")
        try:
            await self._serve_data(request.remote, frames(), lambda msg: ws.send_bytes(encode_frame(msg)))
        except ConnectionError:
            pass
        finally:
            self.sockets.discard(ws)
        return ws

    async def _serve_data(self, remote, frames, reply):
        """One incoming data-plane connection: hello first, then fwd/bwd for this peer's stages, pings (each
        answered by a pong) and sinks (discarded: bandwidth tests).
        Anything wrong is answered with an error reply; nothing of a job is touched by a refused message."""
        handshake = ServerHandshake(self.key, self.peer_id, self.ring, self.fingerprint)
        deadline = asyncio.timeout(LIMITS.handshake_s)   # lifted once the sender has proved itself
        try:
            async with deadline:
                await self._serve_frames(remote, frames, reply, handshake, deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
            self.m_rejected.labels("handshake_timeout").inc()
            log.warning("data plane: closed a connection from %s that did not finish its handshake in %.0f s",
                        remote, LIMITS.handshake_s)

    async def _serve_frames(self, remote, frames, reply, handshake: ServerHandshake, deadline) -> None:
        sender = None
        async for frame in frames:
            ref = None
            try:
                if isinstance(frame, ProtocolError):
                    raise frame
                self.m_bytes.inc(frame.nbytes if isinstance(frame, RawFrame) else len(frame))
                msg = validate(await self.codec.decode(frame, MAX_DATA_FRAME))
                ref = {k: msg[k] for k in ("type", "job", "rotation", "step", "mb") if k in msg}
                self.m_messages.labels(msg["type"]).inc()
                if sender is None:
                    answer = handshake.step(msg)
                    sender = handshake.sender
                    if sender:
                        deadline.reschedule(None)   # a proven neighbour may stay connected
                    if answer:
                        await reply(answer)
                elif msg["type"] in STAGE_MESSAGES:
                    rt = self.runtime(msg["job"])
                    await rt.mailbox.room(rt.box(msg))  # backpressure: stop reading this neighbour meanwhile
                    rt.accept(sender, msg)
                elif msg["type"] == "ping":
                    await reply(message("pong", seq=msg["seq"]))
                elif msg["type"] == "sink":
                    pass
                else:
                    raise ProtocolError("unknown_type", f"{msg['type']!r} is not a data-plane message")
            except ProtocolError as e:
                self.m_rejected.labels(e.code).inc()
                log.warning("data plane: refused a message from %s: %s", sender or remote, e.message)
                await reply(error_message(e.code, e.message, ref))

    @guarded
    async def h_data_probe(self, request):
        """Measure the data plane to another agent: `count` tensors of `bytes` bytes streamed one way (with
        `copies`, a fresh copy each time), or with `round_trips`, `count` pings carrying them one after
        another. Returns the seconds taken."""
        msg = await self.read(request, "data_probe")
        count, size = msg["count"], msg["bytes"]
        if not (1 <= count <= 100_000 and size <= MAX_DATA_FRAME // 2):
            raise ProtocolError("malformed", "data_probe: count from 1 to 100000, bytes up to 512 MiB")
        data = await asyncio.to_thread(torch.rand, size // 4)
        try:
            if msg.get("round_trips"):
                seconds = sum([await self.links.ping(msg["url"], data) for _ in range(count)])
            else:
                seconds = await self.links.stream(msg["url"], data, count, msg.get("copies", False))
        except (ConnectionError, OSError, TimeoutError) as e:
            return json_error(502, "unreachable", f"data_probe of {msg['url']} failed: {e!r}")
        return web.json_response({"url": msg["url"], "bytes": size, "count": count, "seconds": seconds})

    # --- jobs: the coordinator side -----------------------------------------------------------
    @guarded
    async def h_start_job(self, request):
        msg = await self.read(request, "job_start")
        cfg = self.job_config(msg["config"])
        # an unbuildable model is refused here, before anything starts (built on the meta device, off the loop)
        sizes = await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers)
        coord = Coordinator(self, cfg, sizes=sizes)
        self.coordinated[coord.job] = coord
        self._forget_old_jobs()
        queue: asyncio.Queue = asyncio.Queue()
        coord.listeners.add(queue)
        coord.task = asyncio.create_task(coord.run())
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while True:
                event = await queue.get()
                await resp.write((json.dumps(event) + "\n").encode())
                if event["event"] in ("done", "failed"):
                    break
        finally:
            coord.listeners.discard(queue)
        return resp

    def _forget_old_jobs(self) -> None:
        """Keep the last JOB_LIMITS.kept_jobs finished coordinations in memory (their models are on disk)."""
        finished = [j for j, c in self.coordinated.items() if c.task is not None and c.task.done()]
        for j in finished[:max(0, len(finished) - JOB_LIMITS.kept_jobs)]:
            del self.coordinated[j]

    async def h_job(self, request):
        coord = self.coordinated.get(request.match_info["job"])
        if coord is None:
            return json_error(404, "unknown_job", "no such job coordinated here")
        return web.json_response({"job": coord.job, "events": list(coord.events)[-5:], "summary": coord.summary})

    async def h_model(self, request):
        path = self.state.model_path(request.match_info["job"])
        if path is None or not path.exists():
            return json_error(404, "unknown_job", f"no finished model of that job here (models are kept for the "
                                                  f"last {JOB_LIMITS.kept_models} jobs, at most "
                                                  f"{JOB_LIMITS.kept_model_s / 86400:.0f} days)")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def h_cancel(self, request):
        """Cancel a job: here if this peer coordinates it, else at its coordinator (which aborts every stage)."""
        job = request.match_info["job"]
        coord, rt = self.coordinated.get(job), self.jobs.get(job)
        if coord is None and rt is not None and rt.coordinator != self.peer_id:
            url = f"{rt.urls[rt.coordinator]}/jobs/{job}/cancel"
            try:
                async with self.session.post(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    return web.json_response(await r.json(), status=r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                return json_error(502, "unreachable", f"the coordinator of job {job} did not answer: {e!r}")
        if coord is None:
            return json_error(404, "unknown_job", f"job {job} is not known to peer {self.peer_id}")
        if coord.task and not coord.task.done():
            log.warning("job %s: cancelled by a request from %s", job, request.remote)
            coord.task.cancel()
        return web.json_response({"cancelled": coord.job, "coordinator": self.peer_id})

    # --- jobs: every peer's side --------------------------------------------------------------
    @guarded
    async def h_prepare(self, request):
        msg = await self.read(request, "job_prepare")
        cfg = self.job_config(msg["config"])
        mine = await asyncio.to_thread(spec_hash, cfg.model)
        if mine != msg["spec_hash"]:
            raise JobError(f"model spec hash differs: peer {self.peer_id} has {mine}, coordinator has "
                           f"{msg['spec_hash']}; run the same splitring version and model code on every peer")
        sizes = await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers)
        problem = fits_model(self.data, input_shape(cfg.model), sizes[-1][0])
        if problem:
            raise JobError(f"peer {self.peer_id}: {problem}")
        if msg["job"] in self.jobs:
            raise ProtocolError("duplicate", f"job {msg['job']} is already prepared")
        self.jobs[msg["job"]] = JobRuntime(msg["job"], cfg, self.peer_id, msg["ring"], msg["coordinator"],
                                           self.data, self.links, self.compute_call, self.state, self.memory_budget)
        return web.json_response({"samples": len(self.data), "test_samples": self.data.n_test})

    @guarded
    async def h_profile(self, request):
        """What the planner needs from this peer for a job's model: its measured layer costs and budget."""
        cfg = self.job_config((await self.read(request, "job_profile"))["config"])
        prof = await asyncio.get_running_loop().run_in_executor(self.compute, self.profile, cfg)
        return web.json_response({"memory_budget": self.memory_budget, "profile": prof,
                                  "samples": len(self.data), "test_samples": self.data.n_test})

    @guarded
    async def h_commit(self, request):
        msg = await self.read(request, "job_commit")
        rt = self.runtime(msg["job"])
        out = await self.compute_call(rt.commit, msg["rotation"], msg["chain"], msg["ranges"], msg["head_samples"],
                                      msg["head_test_samples"], msg.get("backward_at", []))
        return web.json_response(out)

    @guarded
    async def h_pass(self, request):
        msg = await self.read(request, "job_pass")
        rt = self.runtime(msg["job"])
        if msg["rotation"] != rt.rotation or msg["mode"] not in ("train", "eval"):
            raise ProtocolError("stale", f"pass for rotation {msg['rotation']}; this stage is at {rt.rotation}")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)

        async def on_step(step, result, size, stage):
            ev = {"event": "stage_step", "step": step, "stage": stage, "staleness": result.staleness}
            if stage == len(rt.chain) - 1:   # the tail knows the loss
                loss = result.loss_sum / max(size, 1)
                if not math.isfinite(loss):
                    raise JobError(nonfinite_loss(loss, msg["mode"], step, rt))
                ev.update(event="step", steps=rt.progress["steps"], samples=result.samples,
                          loss=loss, correct=result.correct)
            elif msg["mode"] != "train" or rt.cfg.scheme != "fast-async":   # only fast-async has staleness
                return
            await resp.write((json.dumps(ev) + "\n").encode())

        rt.task = asyncio.current_task()
        poller = asyncio.create_task(self._poll()) if self.busy_poll else None
        try:
            out = await rt.run_pass(msg["mode"], on_step)
            await resp.write((json.dumps({"event": "end", **out}) + "\n").encode())
        except (JobError, TimeoutError, ProtocolError, ConnectionError, aiohttp.ClientError) as e:
            log.error("job %s: pass failed: %s", rt.job, e)
            await resp.write((json.dumps({"error": str(e), "cause": cause_of(e)}) + "\n").encode())
        except Exception as e:   # the stage's own computation failed: its real cause goes to the coordinator
            log.exception("job %s: pass failed", rt.job)
            await resp.write((json.dumps({"error": f"{type(e).__name__}: {e}", "cause": "compute"}) + "\n").encode())
        finally:
            if poller:
                poller.cancel()
        return resp

    @guarded
    async def h_swap_send(self, request):
        msg = await self.read(request, "swap_send")
        return web.json_response(await self.runtime(msg["job"]).swap_send(msg["rotation"], msg["moves"]))

    @guarded
    async def h_swap_receive(self, request):
        msg = await self.read(request, "swap_receive")
        rt = self.runtime(msg["job"])
        digest = await self.compute_call(rt.receive_layers, msg["rotation"], msg["layers"], msg["checksum"])
        return web.json_response({"checksum": digest})

    @guarded
    async def h_abort(self, request):
        msg = await self.read(request, "job_abort")
        rt = self.jobs.pop(msg["job"], None)
        if rt:
            log.warning("job %s aborted: %s", msg["job"], msg["reason"])
            rt.abort(msg["reason"])
        return web.json_response({"aborted": rt is not None})

    @guarded
    async def h_end(self, request):
        msg = await self.read(request, "job_end")
        rt = self.jobs.pop(msg["job"], None)
        if rt:
            rt.checkpoint()
            self.peak_memory = max(self.peak_memory, rt.peak_memory)
            self.m_peak.set(self.peak_memory)
        return web.json_response({"ended": rt is not None})

    async def h_probe(self, request):
        """Link probe: the caller times sending a body here."""
        return web.json_response({"bytes": len(await request.read())})

    @guarded
    async def h_plan(self, request):
        """Plan a job on the ring as it is now, without running it (for `splitring plan --peer`)."""
        msg = await self.read(request, "job_start")
        cfg = self.job_config(msg["config"])
        coord = Coordinator(self, cfg, sizes=await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers))
        plans = await coord.plan_only()
        return web.json_response({"ring": [p["peer"] for p in coord.ring], "rotations": plans})

    @guarded
    async def h_params(self, request):
        rt = self.runtime(request.match_info["job"])
        layers = {i: {k: v.detach() for k, v in m.state_dict().items()} for i, m in rt.stage.layers.items()}
        return web.Response(body=await self.codec.encode({"layers": layers}), content_type="application/cbor")


def cause_of(e: Exception) -> str:
    """How a pass failed, for the coordinator to tell the root cause from its echoes: a stage's own error
    ("job"), or waiting on a neighbour that fell silent ("timeout"), or a broken link ("link")."""
    if isinstance(e, TimeoutError):
        return "timeout"
    return "link" if isinstance(e, (ConnectionError, aiohttp.ClientError)) else "job"


def nonfinite_loss(loss: float, mode: str, step: int, rt: JobRuntime) -> str:
    what = "training" if mode == "train" else "evaluation"
    return (f"non-finite loss ({loss}) at step {step + 1} of the {what} pass of rotation {rt.rotation} (epoch "
            f"{rt.rotation // len(rt.ring) + 1}, head {rt.chain[0]}): the job stops here; lower --lr, or check "
            f"that peer's data")


async def serve(agent: Agent, ready=None) -> None:
    """Run until SIGINT/SIGTERM; then checkpoint, withdraw the mDNS record and close."""
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, agent.host, agent.port, ssl_context=agent.tls)
    await site.start()
    if agent.port == 0:
        agent.port = runner.addresses[0][1]
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready(agent)
    await stop.wait()
    log.info("shutting down")
    await agent.close()
    await runner.cleanup()
