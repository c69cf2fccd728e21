"""The per-layer data path the actors set up themselves: one TCP connection per device.

Ray places, starts, restarts and watches each device's server (an actor); the server then
opens a listening socket on its node's address (`ExpertServer.open_channel`) and returns
host and port through an ordinary Ray call. The coordinator connects once (TCP_NODELAY) and
sends each MoE layer's call (server.pack_call's bytes) as one length-prefixed frame, and
reads the answer the same way: no Ray task, object or scheduler per layer. Chosen over
Ray's actor calls by measurement (docs/cluster.md, Data path).

A frame is a little-endian header (sequence number, kind or status, payload bytes) then the
payload. One call is outstanding per connection at a time; an answer whose sequence number
is not the call's, a closed connection, an error or a missed deadline fails that call, and
the coordinator then drops the connection (a late answer is never read as the next one's)
and treats the device as it treats a failed Ray call.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence

from ..errors import ClusterError

REQUEST = struct.Struct("<QBQ")  # sequence number, kind, payload bytes
REPLY = struct.Struct("<QBQ")  # sequence number, status, payload bytes
FORWARD, PING = 0, 1  # kinds: a layer's call (pack_call's bytes); a round trip (any payload, answered empty)
OK, FAILED = 0, 1  # statuses: FAILED's payload is the error's message
JOIN_BYTES = 64 << 10  # a header and a payload up to this size go out in one send (one segment)
MAX_FRAME_BYTES = 1 << 30  # a header naming more is not a frame of ours (a 4096-token prefill at hidden 8192: 128 MB)


def send_frame(sock: socket.socket, header: bytes, payload: bytes | memoryview) -> None:
    """A frame's header (REQUEST or REPLY packed) and payload, on a blocking socket."""
    if len(payload) <= JOIN_BYTES:
        sock.sendall(header + bytes(payload))
    else:
        sock.sendall(header)
        sock.sendall(payload)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    """n bytes from a blocking socket; None if it closes before the first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ConnectionError(f"the connection closed {got} bytes into a frame of {n}")
        got += k
    return buf


def recv_frame(sock: socket.socket, header: struct.Struct) -> tuple[int, int, bytearray] | None:
    """One whole frame from a blocking socket: (sequence number, kind or status, payload); None
    if the connection closes before it. A header naming more than MAX_FRAME_BYTES, or a
    connection that closes inside a frame, is a ConnectionError (not a peer of ours)."""
    head = _recv_exactly(sock, header.size)
    if head is None:
        return None
    seq, kind, n = header.unpack(head)
    if n > MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame header names {n} bytes: not a peer of ours")
    payload = _recv_exactly(sock, n) if n else bytearray()
    if payload is None:
        raise ConnectionError("the connection closed between a frame's header and its payload")
    return seq, kind, payload


def shut(sock: socket.socket) -> None:
    """Shut both ways (a thread blocked reading it wakes), whatever state it is in."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# -- the device's side ---------------------------------------------------------------------
class Listener:
    """A listening socket on `host` (port chosen by the system) whose connections are each
    served on a thread: every frame is answered with handler(payload) (FORWARD) or nothing
    (PING); an exception becomes a FAILED answer carrying its message.

    priority > 0 runs those threads under SCHED_FIFO at that priority, so a call is taken up
    as soon as it arrives rather than after whatever else holds the core: the accepting thread
    takes the policy and the connections' threads inherit it. Where that is not allowed (no
    CAP_SYS_NICE) they serve at ordinary priority and priority_error says why."""

    def __init__(self, host: str, handler: Callable[[bytes], bytes], priority: int = 0):
        self.handler = handler
        self.priority = priority
        self.priority_error: str | None = None
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        started = threading.Event()
        threading.Thread(target=self._accept, args=(started,), name="edgemoe-channel-accept", daemon=True).start()
        started.wait()  # priority_error is known

    def _accept(self, started: threading.Event) -> None:
        if self.priority > 0:
            try:  # pid 0: this thread, and the threads it starts
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
            except (OSError, AttributeError) as e:  # not permitted, or not Linux
                self.priority_error = f"SCHED_FIFO priority {self.priority}: {e}"
        started.set()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the server is going away
                return
            threading.Thread(target=self._serve, args=(conn,), name="edgemoe-channel", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                frame = recv_frame(conn, REQUEST)
                if frame is None:
                    return
                seq, kind, payload = frame
                try:
                    out = self.handler(bytes(payload)) if kind == FORWARD else b""
                    status = OK
                except Exception as e:  # the coordinator is told, as a Ray call would tell it
                    out, status = f"{type(e).__name__}: {e}".encode(), FAILED
                send_frame(conn, REPLY.pack(seq, status, len(out)), out)
        except OSError:  # the coordinator went away or dropped the connection, or is not ours
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


# -- the coordinator's side ------------------------------------------------------------------
class Channel:
    """The coordinator's connection to one device's Listener."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.seq = 0
        self.broken: str | None = None  # why it may not be used again
        self._head = bytearray()
        self._body: bytearray | None = None
        self._got = 0

    def send(self, payload: bytes, deadline: float, kind: int = FORWARD) -> None:
        """Send one call; it must be answered (receive) before the next is sent."""
        if self.broken:
            raise ConnectionError(self.broken)
        self.seq += 1
        self._head, self._body, self._got = bytearray(), None, 0
        self.sock.settimeout(max(deadline - time.monotonic(), 1e-4))
        try:
            send_frame(self.sock, REQUEST.pack(self.seq, kind, len(payload)), payload)
        except BaseException as e:
            self.close(f"sending failed: {type(e).__name__}: {e}")
            raise

    def _take(self) -> bytes | None:
        """Read what the socket has (it is readable); the answer once it is whole."""
        if self._body is None:
            chunk = self.sock.recv(REPLY.size - len(self._head))
            if not chunk:
                raise ConnectionError("the device closed the connection")
            self._head += chunk
            if len(self._head) < REPLY.size:
                return None
            seq, status, n = REPLY.unpack(self._head)
            if seq != self.seq or n > MAX_FRAME_BYTES:
                raise ConnectionError(f"an answer to call {seq} ({n} bytes) came for call {self.seq}")
            self._status = status
            self._body = bytearray(n)
            if n:
                return None
        else:
            k = self.sock.recv_into(memoryview(self._body)[self._got :])
            if k == 0:
                raise ConnectionError("the device closed the connection in the middle of an answer")
            self._got += k
        if self._got < len(self._body):
            return None
        if self._status != OK:
            raise ClusterError(self._body.decode(errors="replace"))
        return bytes(self._body)

    def call(self, payload: bytes, deadline: float, kind: int = FORWARD) -> bytes:
        self.send(payload, deadline, kind)
        (answer,) = receive([self], deadline)
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            raise TimeoutError("no answer in time")
        return answer

    def close(self, why: str = "closed") -> None:
        if self.broken is None:
            self.broken = why
        shut(self.sock)
        self.sock.close()


def receive(channels: Sequence[Channel], deadline: float) -> list[bytes | BaseException | None]:
    """Each channel's answer to the call it sent (bytes), or why it failed (the exception), or
    None when none came by `deadline` (time.monotonic). A channel that failed or missed the
    deadline is closed."""
    out: list[bytes | BaseException | None] = [None] * len(channels)
    pending = {}
    for i, ch in enumerate(channels):
        if ch.broken:
            out[i] = ConnectionError(ch.broken)
        else:
            ch.sock.setblocking(False)
            pending[ch.sock.fileno()] = i
    try:
        while pending:
            left = deadline - time.monotonic()
            readable, _, _ = select.select(list(pending), [], [], max(left, 0.0))
            if not readable:
                if left <= 0:
                    break
                continue
            for fd in readable:
                i = pending[fd]
                try:
                    while True:  # everything there is: an answer arrives in as few wake-ups as it can
                        whole = channels[i]._take()
                        if whole is not None:
                            out[i] = whole
                            del pending[fd]
                            break
                except (BlockingIOError, InterruptedError):
                    continue
                except Exception as e:  # the connection or the device failed: this call fails
                    out[i] = e
                    del pending[fd]
    finally:
        for ch, answer in zip(channels, out):
            if isinstance(answer, BaseException):
                ch.close(f"{type(answer).__name__}: {answer}")
            elif answer is None:
                ch.close("no answer by its deadline")
            else:
                ch.sock.setblocking(True)
    return out
