"""The data plane without agents: wire codecs and their error bounds, role policy, frames, the stream
(zero-copy views, backpressure both ways), the receive buffer pool and the mailbox bound."""
import asyncio
import gc
import math
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from peer import transport
from peer.buffers import BufferPool
from peer.dataplane import Mailbox, wire_policy
from peer.transport import FrameStream, RawFrame, adopt
from pipeline.admission import MessageKey
from pipeline.config import ConfigError, JobConfig
from protocols import ProtocolError, decode_frame, encode_frame, message
from protocols.compression import BLOCK, WirePolicy, apply_policy, pack, unpack
from protocols.frames import assemble, encode_parts


def round_trip(t: torch.Tensor, codec: str) -> torch.Tensor:
    """Through a whole frame, as a fwd activation would travel."""
    msg = message("fwd", job="j", rotation=0, step=0, mb=0, mode="train", x=t, y=torch.zeros(1, dtype=torch.int64))
    out = decode_frame(encode_frame(apply_policy(msg, WirePolicy(activation=codec))))["x"]
    assert out.dtype == torch.float32 and out.shape == t.shape
    return out


def floats(min_magnitude: float, max_magnitude: float):
    mags = st.floats(min_magnitude, max_magnitude, width=32)
    values = st.one_of(st.just(0.0), mags, mags.map(lambda v: -v))
    return arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 150)), elements=values)


@settings(max_examples=50, deadline=None)
@given(floats(2.0 ** -100, 2.0 ** 100))
def test_bfloat16_relative_error_is_at_most_2_to_the_minus_8(a):
    x = torch.from_numpy(a)
    err = (round_trip(x, "bfloat16") - x).abs()
    assert torch.all(err <= x.abs() * 2 ** -8)


@settings(max_examples=50, deadline=None)
@given(floats(0, 65504))
def test_float16_relative_error_is_at_most_2_to_the_minus_11_above_the_subnormals(a):
    x = torch.from_numpy(a)
    err = (round_trip(x, "float16") - x).abs()
    assert torch.all(err <= torch.maximum(x.abs() * 2 ** -11, torch.full_like(x, 2 ** -25)))


def test_float16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 7e4, 1.0])
    assert round_trip(x, "float16").tolist() == [65504.0, -65504.0, 65504.0, 1.0]


@settings(max_examples=50, deadline=None)
@given(floats(2.0 ** -60, 2.0 ** 60))
def test_int8_error_is_at_most_half_a_step_of_its_block(a):
    x = torch.from_numpy(a)
    got = round_trip(x, "int8")
    flat = x.reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)
    step = (blocks.abs().amax(1) / 127).repeat_interleave(BLOCK)[:flat.numel()]
    assert torch.all((got.reshape(-1) - flat).abs() <= step / 2 * (1 + 1e-5))
    assert torch.equal(got.reshape(-1)[flat == 0], flat[flat == 0])  # zeros stay zeros


def test_int8_travels_in_about_a_quarter_of_the_bytes():
    x = torch.randn(256, 1024)
    exact, small = (len(encode_frame({"x": pack(x, c)})) for c in ("float32", "int8"))
    assert small < exact * 0.27 and small >= x.numel()


@pytest.mark.parametrize("codec", ["bfloat16", "float16", "int8"])
def test_packed_tensors_of_any_shape_round_trip(codec):
    for shape in [(), (0,), (3, 0, 2), (1,), (7, 65), (2, 3, 4, 5)]:
        x = torch.randn(shape)
        assert torch.allclose(round_trip(x, codec), x, atol=0.05, rtol=0.01)


def test_policy_packs_only_activations_and_gradients():
    x, y, g = torch.randn(4, 8), torch.arange(4), torch.randn(4, 8)
    policy = WirePolicy.from_options("bfloat16")
    fwd = apply_policy(message("fwd", job="j", rotation=0, step=0, mb=0, mode="train", x=x, y=y), policy)
    bwd = apply_policy(message("bwd", job="j", rotation=0, step=0, mb=0, grad=g), policy)
    assert fwd["x"].codec == "bfloat16" and fwd["y"] is y and bwd["grad"].codec == "bfloat16"
    assert WirePolicy.from_options("float16", "int8") == WirePolicy("int8", "int8")  # int8 takes precedence
    assert apply_policy(message("fwd", job="j", rotation=0, step=0, mb=0, mode="train", x=x, y=y), WirePolicy())["x"] is x


@pytest.mark.parametrize("wire_dtype, compress", [("bfloat16", "none"), ("float16", "none"), ("float32", "int8")])
def test_layer_state_moved_by_a_swap_is_never_lossy(wire_dtype, compress):
    state = {3: {"params": {"weight": torch.randn(5, 7), "bias": torch.randn(5)},
                 "optim": {0: {"momentum_buffer": torch.randn(5, 7)}}}}
    msg = message("swap_receive", job="j", rotation=1, attempt=0, layers=state, checksum="c")
    out = decode_frame(encode_frame(apply_policy(msg, WirePolicy.from_options(wire_dtype, compress))))
    assert torch.equal(out["layers"][3]["params"]["weight"], state[3]["params"]["weight"])
    assert torch.equal(out["layers"][3]["optim"][0]["momentum_buffer"], state[3]["optim"][0]["momentum_buffer"])
    assert WirePolicy.from_options(wire_dtype, compress).codec("state") == "float32"


def test_job_config_validates_and_carries_the_wire_options():
    cfg = JobConfig(wire_dtype="bfloat16", compress="int8")
    assert wire_policy(cfg) == WirePolicy("int8", "int8")
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="wire dtype"):
        JobConfig(wire_dtype="float8")
    with pytest.raises(ConfigError, match="compression"):
        JobConfig(compress="zstd")


def test_train_flags_reach_the_job_config():
    import argparse
    from peer.cli import train as cli_train

    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers())
    args = parser.parse_args(["train", "--peer", "http://x:1", "--wire-dtype", "float16", "--compress", "int8"])
    config = cli_train.config_from_args(args)
    assert (config["wire_dtype"], config["compress"]) == ("float16", "int8")


@pytest.mark.parametrize("codec, shape, parts", [
    ("float8", [2], [torch.zeros(2)]),                                        # unknown codec
    ("bfloat16", [2], [torch.zeros(2)]),                                      # part of the wrong dtype
    ("bfloat16", [3], [torch.zeros(2, dtype=torch.bfloat16)]),                # wrong count
    ("int8", [2], [torch.zeros(2, dtype=torch.int8)]),                        # scales missing
    ("int8", [70], [torch.zeros(70, dtype=torch.int8), torch.zeros(1)]),      # too few scales
    ("float16", [-1], [torch.zeros(1, dtype=torch.float16)]),                 # bad shape
])
def test_inconsistent_packed_tensors_are_refused(codec, shape, parts):
    with pytest.raises(ProtocolError):
        unpack(codec, shape, parts)


def test_encoding_hands_out_views_of_the_tensors():
    t = torch.zeros(1000)
    head, payload = encode_parts({"t": t})
    t[0] = 7  # a view, not a copy: the change shows
    assert np.frombuffer(payload, dtype=np.float32)[0] == 7
    assert decode_frame(bytes(head) + bytes(payload))["t"][0] == 7


# --- the stream over loopback ------------------------------------------------------------------
async def stream_pair(max_frame: int = 1 << 30) -> tuple[FrameStream, FrameStream, asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future = loop.create_future()

    def factory():
        s = FrameStream(max_frame)
        accepted.set_result(s)
        return s

    server = await loop.create_server(factory, "127.0.0.1", 0)
    _, client = await loop.create_connection(FrameStream, "127.0.0.1", server.sockets[0].getsockname()[1])
    return client, await accepted, server


async def until(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll a state of this event loop's objects (each poll lets the loop run) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def settle() -> None:
    """Let every task that can run, run until it waits (no clock involved: yields to the loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def receive(stream: FrameStream) -> dict:
    frame = await stream.recv()
    assert isinstance(frame, RawFrame)
    return assemble(frame.body, frame.tensors)


def test_stream_carries_frames_of_every_size_into_writable_tensors():
    async def main():
        client, server, srv = await stream_pair()
        sizes = [0, 1, 1000, transport.COALESCE - 64, transport.READ_MAX, 3 * transport.CHUNK + 5]
        sent = [{"i": i, "t": torch.randn(n // 4 + 1), "b": torch.arange(n % 7, dtype=torch.bfloat16)}
                for i, n in enumerate(sizes)]
        sender = asyncio.create_task(asyncio.wait([asyncio.create_task(client.send(encode_parts(m))) for m in sent]))
        for m in sent:
            got = await receive(server)
            assert got["i"] == m["i"] and torch.equal(got["t"], m["t"]) and torch.equal(got["b"], m["b"])
            got["t"].add_(1)  # received tensors are writable (no read-only frombuffer views)
        await sender
        client.close()
        assert await server.recv() is None
        srv.close()
    asyncio.run(main())


def test_the_readers_low_water_mark_never_waits_for_bytes_not_yet_sent():
    """While a large payload's rest is due the reader asks to be woken only once it is there (SO_RCVLOWAT,
    at most READ_MAX): after each read the mark must follow what is still due, and after the payload be back
    at one byte, or the reader would wait for bytes that never come."""
    async def main():
        client, server, srv = await stream_pair()
        sock = server.transport.get_extra_info("socket")
        for n in (transport.DIRECT, transport.READ_MAX + 5, 3 * transport.CHUNK):
            big = torch.rand(n // 4)
            await client.send(encode_parts({"t": big}))
            assert torch.equal((await asyncio.wait_for(receive(server), 30))["t"], big)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            await client.send(encode_parts({"i": n}))   # 30-odd bytes, alone on the wire
            assert (await asyncio.wait_for(receive(server), 10))["i"] == n
        srv.close()
    asyncio.run(main())


def test_a_malformed_stream_yields_one_error_and_ends():
    async def main():
        client, server, srv = await stream_pair(max_frame=1 << 20)
        client.transport.write(b"\x00\x00\x00\x05notcbor")
        err = await server.recv()
        assert isinstance(err, ProtocolError) and err.code == "malformed"
        assert await server.recv() is None
        client2, server2, srv2 = await stream_pair(max_frame=1 << 20)
        await client2.send(encode_parts({"t": torch.zeros(1 << 19)}))  # 2 MiB: over this stream's limit
        err = await server2.recv()
        assert isinstance(err, ProtocolError) and err.code == "too_large"
        for s in (srv, srv2):
            s.close()
    asyncio.run(main())


def test_a_frame_goes_out_in_writes_of_at_most_chunk_bytes_and_arrives_intact():
    """Header and payloads are gathered into writelines calls of at most CHUNK bytes (one for a small
    frame), the pieces straddling tensor boundaries."""
    class Recording:
        def __init__(self, inner):
            self.inner, self.writes = inner, []

        def writelines(self, views):
            self.writes.append(sum(len(v) for v in views))
            self.inner.writelines(views)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    async def main():
        client, server, srv = await stream_pair()
        client.transport = recording = Recording(client.transport)
        chunk = transport.CHUNK
        msg = {"a": torch.rand(3 * chunk // 16), "b": torch.rand(5), "c": torch.rand(chunk // 8), "d": torch.zeros(0),
               "e": torch.rand(5 * chunk // 16)}   # 3/4, tiny, 1/2, empty, 5/4 of a chunk
        parts = encode_parts(msg)
        await client.send(parts)
        got = await receive(server)
        assert all(torch.equal(got[k], v) for k, v in msg.items())
        assert sum(recording.writes) == sum(len(p) for p in parts)
        assert max(recording.writes) == chunk and len(recording.writes) == 3   # 2.5 chunks and a bit
        small = encode_parts({"t": torch.rand(32 * 1024)})   # 128 KiB: header and payload in one write
        await client.send(small)
        await receive(server)
        assert recording.writes[3:] == [sum(len(p) for p in small)]
        srv.close()
    asyncio.run(main())


def test_frames_sent_in_one_turn_of_the_loop_go_out_in_one_write_in_order():
    """Frames under COALESCE bytes are queued and written together at the end of the turn (or once COALESCE
    bytes wait); a larger frame first writes what is queued, so the order holds."""
    writes = []

    async def main():
        client, server, srv = await stream_pair()
        inner = client.transport.writelines
        client.transport.writelines = lambda views: (writes.append(sum(len(v) for v in views)), inner(views))
        small = [encode_parts({"i": i, "t": torch.rand(4096)}) for i in range(3)]   # 16 KiB each
        large = encode_parts({"i": 3, "t": torch.rand(transport.COALESCE // 4)})
        for parts in small:
            await client.send(parts)
        assert writes == []   # queued: this turn of the loop has not ended
        await client.send(large)
        assert writes[0] == sum(len(p) for parts in small for p in parts)   # the queue first, in one write
        many = [encode_parts({"i": 4 + i, "t": torch.rand(transport.COALESCE // 16)}) for i in range(5)]   # 1/4 each
        for parts in many:
            await client.send(parts)   # the fourth fills the queue to COALESCE: written at once
        assert len(writes) == 3 and writes[-1] == sum(len(p) for parts in many[:4] for p in parts)
        for i in range(9):
            assert (await receive(server))["i"] == i
        srv.close()
    asyncio.run(main())


def feed(stream: FrameStream, data: memoryview, reads: list[int]) -> list[dict]:
    """Hand `data` to the stream's reader as the kernel would, in reads of the given sizes (cycled)."""
    class Transport:
        def pause_reading(self): pass

    stream.transport = Transport()
    pos, k = 0, 0
    while pos < len(data):
        buf = stream.get_buffer(-1)
        n = min(len(buf), reads[k % len(reads)], len(data) - pos)
        buf[:n] = data[pos:pos + n]
        stream.buffer_updated(n)
        pos, k = pos + n, k + 1
    return [assemble(f.body, f.tensors) for f in stream._frames]


def test_two_frames_cut_at_every_byte_are_read_whole():
    sent = [{"i": i, "t": torch.rand(5 + i)} for i in range(2)]
    data = memoryview(b"".join(b"".join(encode_parts(m)) for m in sent))
    for cut in range(1, len(data)):
        got = feed(FrameStream(), data, [cut, len(data)])
        assert [g["i"] for g in got] == [0, 1] and all(torch.equal(g["t"], m["t"]) for g, m in zip(got, sent)), cut


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 3, 100, 4000, transport.READ_MAX // 4 - 1, transport.READ_MAX // 4,
                                       transport.READ_MAX // 4 + 7, transport.READ_MAX // 2]), min_size=1, max_size=8),
       reads=st.lists(st.integers(1, 3 * transport.READ_MAX), min_size=1, max_size=20))
def test_frames_are_read_whole_however_the_stream_is_cut(sizes, reads):
    """The reader reads ahead and parses headers where they lie, or reads a large payload's rest straight
    into its tensor: frames arrive intact whatever the kernel hands over per read (cut anywhere, many
    frames in one read)."""
    sent = [{"i": i, "t": torch.rand(n), "e": torch.zeros(0, 2), "b": torch.arange(n % 5, dtype=torch.bfloat16)}
            for i, n in enumerate(sizes)]
    got = feed(FrameStream(), memoryview(b"".join(b"".join(encode_parts(m)) for m in sent)), reads)
    assert len(got) == len(sent)
    for g, m in zip(got, sent):
        assert g["i"] == m["i"] and all(torch.equal(g[k], m[k]) and g[k].shape == m[k].shape for k in "teb")


def test_a_receiver_that_stops_reading_stops_the_sender_with_bounded_buffers():
    async def main():
        client, server, srv = await stream_pair()
        frame = encode_parts({"t": torch.ones(1 << 20)})  # 4 MiB
        total = 64  # 256 MiB offered

        sent = []

        async def send_all():
            for k in range(total):
                await client.send(frame)
                sent.append(k)

        sending = asyncio.create_task(send_all())
        # nobody calls server.recv(): buffers fill until the receiver has stopped reading and the sender's
        # transport has told it to pause writing (its send waits for room)
        await until(lambda: not server.transport.is_reading() and not client._writable.is_set(),
                    "the receiver stops reading and the sender is paused")
        stuck = len(sent)
        await settle()
        assert not sending.done() and len(sent) == stuck < total   # everything stopped
        assert server.queued <= (16 << 20) + (4 << 20) + 64  # RECV_HIGH, plus the frame that crossed it
        assert client.transport.get_write_buffer_size() <= (16 << 20) + (4 << 20)  # WRITE_HIGH + CHUNK
        for _ in range(total):  # the consumer comes back: everything arrives, in order, intact
            assert (await receive(server))["t"].sum() == 1 << 20
        await sending
        srv.close()
    asyncio.run(main())


def test_adopting_a_connection_after_an_upgrade_exchange():
    async def main():
        loop = asyncio.get_running_loop()
        got: asyncio.Future = loop.create_future()

        class Upgrader(asyncio.Protocol):
            def connection_made(self, tr):
                self.tr = tr

            def data_received(self, data):
                assert data.startswith(b"GET /data HTTP/1.1") and b"Upgrade: splitring-data/1" in data
                self.tr.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: splitring-data/1\r\n\r\n")
                got.set_result(adopt(self.tr, FrameStream()))

        srv = await loop.create_server(Upgrader, "127.0.0.1", 0)
        client = await transport.connect(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}")
        server = await got
        await client.send(encode_parts(message("ping", seq=3)))
        assert (await receive(server))["seq"] == 3
        srv.close()
    asyncio.run(main())


# --- buffers and mailbox ------------------------------------------------------------------------
def test_pool_reuses_a_buffer_only_when_no_tensor_uses_it():
    pool = BufferPool(max_free_bytes=1000)
    a, raw = pool.tensor(torch.float32, (4, 8), 128)
    raw[:4] = np.float32(2.5).tobytes()  # the byte view is the tensor's memory
    assert a[0, 0] == 2.5
    view = a.reshape(-1)[3:]
    del a, raw
    gc.collect()
    assert pool.free_bytes == 0  # a view still uses it
    del view
    assert pool.free_bytes == 128
    b, _ = pool.tensor(torch.int64, (16,), 128)
    assert pool.free_bytes == 0 and b.shape == (16,)
    big = [pool.tensor(torch.uint8, (600,), 600)[0] for _ in range(3)]
    del big
    assert pool.free_bytes == 600  # bounded: the rest went back to the allocator


def test_mailbox_holds_a_bounded_number_of_unread_messages_per_kind():
    async def main():
        box = Mailbox(limit=3)
        for mb in range(3):
            box.deliver(MessageKey(0, "train", 0, "fwd", mb), {"mb": mb})
        box.deliver(MessageKey(0, "train", 0, "bwd", 0), {})  # the other neighbour has its own room
        with pytest.raises(ProtocolError) as e:
            box.deliver(MessageKey(0, "train", 0, "fwd", 3), {})
        assert e.value.code == "overflow"
        waiting = asyncio.create_task(box.room("fwd"))
        await settle()
        assert not waiting.done()   # it ran as far as it could: it waits for room
        assert (await box.get(MessageKey(0, "train", 0, "fwd", 0), 1))["mb"] == 0
        await asyncio.wait_for(waiting, 5)
        box.deliver(MessageKey(0, "train", 0, "fwd", 3), {})
    asyncio.run(main())


def test_mailbox_counts_the_bytes_of_messages_waiting_unread():
    """What a peer holds for its neighbours, counted against its memory budget (peer.worker.check_budget)."""
    async def main():
        box = Mailbox(limit=2)
        a, b = MessageKey(0, "train", 0, "fwd", 0), MessageKey(0, "train", 0, "bwd", 0)
        box.deliver(a, {"x": torch.zeros(4, 8), "mb": 0})            # 128 bytes
        box.deliver(b, {"g": torch.zeros(2, 8, dtype=torch.float64)})   # 128 bytes
        assert box.unread_bytes == 256
        await box.get(a, 1)
        assert box.unread_bytes == 128
        box.deliver(MessageKey(1, "train", 0, "fwd", 0), {"x": torch.zeros(3)})
        box.new_rotation(1)   # what rotation 0 left unread is forgotten, and no longer counted
        assert box.unread_bytes == 12
    asyncio.run(main())


def test_quantize_matches_its_definition_on_a_hand_example():
    x = torch.tensor([0.0, 1.0, -2.54, 0.5] + [0.0] * (BLOCK - 4) + [3.0])
    got = round_trip(x, "int8")
    s = 2.54 / 127
    want = [0.0, round(1.0 / s) * s, -127 * s, round(0.5 / s) * s] + [0.0] * (BLOCK - 4) + [3.0]
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert math.isclose(got[-1].item(), 3.0, rel_tol=1e-6)  # its own block, its own scale


_IN_HEAP = """
import sys, torch
if sys.argv[1] == "keep":
    from peer.cli.common import keep_freed_memory
    keep_freed_memory()
block = torch.empty(4 << 20)   # 16 MiB
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
lo, hi = (int(a, 16) for a in heap.split()[0].split("-"))
print(lo <= block.data_ptr() < hi)
"""


def test_agents_keep_freed_memory_in_the_heap():
    """keep_freed_memory (every agent calls it) has glibc serve blocks up to 32 MiB from its heap, which it
    keeps when they are freed, where by default a large block is a mapping of its own, given back when freed
    and faulted in anew the next time (a stage frees and allocates the same sizes every microbatch)."""
    def in_heap(mode):
        out = subprocess.run([sys.executable, "-c", _IN_HEAP, mode], capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"
    assert not in_heap("default")
    assert in_heap("keep")
