"""Both ends of the link between the API process and a model running in its own process.

The generation engine core (engine/core/process.py, driven by
engine/client/async_client.py) and the embedding process (engine/embedding/process.py,
driven by engine/embedding/client.py) are run the same way; this module is that way.

API side, `ProcessLink`: `start()` binds two ZMQ sockets (PUSH to the child, PULL
from it), has its `ChildHost` start the child's entry point, and waits for the
child's first message, its ready message or `StartupFailed`. The host says where
the child runs and how its end is noticed: `LocalProcess` (the default) spawns it
with the spawn context, the sockets are ipc files in a private temp dir, and a
watcher thread waits on the process sentinel; a host with a `bind_host` gets TCP
sockets on that address instead, for a child on another machine (a Ray actor,
providers/ray_actor.py), which connects to them directly. `listen()` reads
what the child sends on the event loop and hands the client every message but
`Fatal`. The link holds the health state: the process exiting, `Fatal` or a
broken reader marks it dead (`dead_reason`), and `close()` stops the child (a
`Shutdown` message, then terminate, then kill) and releases everything. Either
way the client's requests in flight fail at once through its `fail_all` hook,
with `EngineDeadError` or `RequestAbortedError`.

Child side, `run_child`: the body of a child's entry point. It ignores Ctrl-C,
connects a `ParentLink`, builds the child's loop (loading the model; a failure is
sent as `StartupFailed`) and runs it. The loop receives, sends, checks that its
parent still lives (a child without a parent pid, such as a Ray actor, leaves
that to its host: Ray ends an actor whose owner died) and reports a broken state
as `Fatal`, all through the `ParentLink`.

`StartupFailed`, `Fatal` and `Shutdown` belong to every child's protocol: each
child's message unions include them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from inferd.engine.messages import Fatal, Shutdown, StartupFailed

HEARTBEAT_S = 0.5  # how often an idle child checks its parent (and the engine core's stats cadence)


class EngineDeadError(RuntimeError):
    """The model process is gone; nothing can be computed until a restart."""


class RequestAbortedError(RuntimeError):
    """The server ended the request (shutdown) before it finished."""


# -- the API process's end ----------------------------------------------------------------

class ChildHost(Protocol):
    """Where a child runs: starts it, tells the link when it ended, and stops it by force.

    `bind_host` None: the child is a process on this machine and the sockets are ipc
    files; otherwise the link binds TCP sockets on that address, which the child must
    be able to reach."""

    bind_host: str | None

    def start(self, target: Callable, args: tuple, name: str, on_exit: Callable[[str], None]) -> None:
        """Start `target(*args)`; call `on_exit(how it ended)` on the event loop when it ends."""

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def release(self) -> None:
        """After the child ended (or was killed): free what is left of it."""


class LocalProcess:
    """The child as a process of this one (spawn context), its end seen on its sentinel."""

    bind_host = None

    def __init__(self) -> None:
        self.proc: multiprocessing.process.BaseProcess | None = None

    def start(self, target: Callable, args: tuple, name: str, on_exit: Callable[[str], None]) -> None:
        loop = asyncio.get_running_loop()
        config, to_child, from_child, log_level = args
        self.proc = multiprocessing.get_context("spawn").Process(
            target=target, name=f"inferd-{name}-core", daemon=True,
            args=(config, to_child, from_child, os.getpid(), log_level))
        self.proc.start()
        threading.Thread(target=self._watch, args=(self.proc, loop, on_exit), daemon=True,
                         name=f"inferd-{name}-watch").start()

    def _watch(self, proc, loop, on_exit) -> None:
        # only wait on the sentinel here: reaping (exitcode) stays on the loop thread
        multiprocessing.connection.wait([proc.sentinel])
        try:
            loop.call_soon_threadsafe(lambda: on_exit(f"exit code {proc.exitcode}"))
        except RuntimeError:
            pass  # the event loop is already closed: we are exiting anyway

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def release(self) -> None:
        self.proc.join(0)  # reap it


class ProcessLink:
    """One child and the two sockets to it, owned by an async client.

    `name` is the child in messages ("engine core"); `kind` names the client
    ("engine": "engine is dead", "the engine output loop failed") and the
    process, threads and temp dir. `on_message` gets each message the child sends
    after its ready message; `fail_all(error)` must fail every request in flight.
    `host` runs the child (default: a local process)."""

    def __init__(self, name: str, kind: str, from_child: Any, *, on_message: Callable[[Any], None],
                 fail_all: Callable[[BaseException], None], log: logging.Logger, host: ChildHost | None = None):
        self.name, self.kind, self.log = name, kind, log
        self._on_message, self._fail_all = on_message, fail_all
        self.host: ChildHost = host or LocalProcess()
        self.ready: Any = None  # the child's ready message, once started
        self.dead_reason: str | None = None
        self.closing = False
        self.started = False
        self.exit_status: str | None = None  # how the child ended ("exit code -9"), once it has
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(from_child)
        self._push = self._pull = self._ctx = self._actx = self._tmpdir = self._reader = None
        self._exited: asyncio.Event | None = None
        self.dead = asyncio.Event()  # set once the link is dead (not when it is closed)

    async def start(self, target: Callable, config: Any, ready_type: type, timeout: float) -> Any:
        """Start `target(config, to_child, from_child, parent pid, log level)` on the host and return
        its ready message. If the child does not come up (it exits, times out or sends
        `StartupFailed`), the link is closed and the error raised."""
        # sends are sync and NOBLOCK (no high-water mark: they fail only without a peer);
        # receives are awaited on the event loop
        self._ctx, self._actx = zmq.Context(), zmq.asyncio.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._actx.socket(zmq.PULL)
        self._push.sndhwm = self._push.linger = self._pull.linger = 0
        to_child, from_child = self._bind()
        self._exited = asyncio.Event()
        self.started = True
        self.host.start(target, (config, to_child, from_child, logging.getLogger().getEffectiveLevel()),
                        self.kind, self._on_exit)
        try:
            self.ready = await self._wait_ready(ready_type, timeout)
        except BaseException:
            await self.close()
            raise
        return self.ready

    def _bind(self) -> tuple[str, str]:
        """Bind both sockets; their addresses for the child (to it, from it)."""
        host = self.host.bind_host
        if host is None:
            self._tmpdir = tempfile.mkdtemp(prefix=f"inferd-{self.kind}-")
            to_child, from_child = f"ipc://{self._tmpdir}/in", f"ipc://{self._tmpdir}/out"
            self._push.bind(to_child)
            self._pull.bind(from_child)
            return to_child, from_child
        ports = self._push.bind_to_random_port(f"tcp://{host}"), self._pull.bind_to_random_port(f"tcp://{host}")
        return tuple(f"tcp://{host}:{port}" for port in ports)

    async def _wait_ready(self, ready_type: type, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not await self._pull.poll(200):
            if self._exited.is_set():
                raise RuntimeError(f"{self.name} exited during startup ({self.exit_status})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {timeout:.0f}s")
        msg = self._decoder.decode(await self._pull.recv())
        if isinstance(msg, StartupFailed):
            raise ValueError(msg.error)
        assert isinstance(msg, ready_type), msg
        return msg

    def _on_exit(self, status: str) -> None:
        self.exit_status = status
        self._exited.set()
        if not self.closing:
            self.mark_dead(f"the {self.name} exited unexpectedly ({status})")

    def mark_dead(self, reason: str) -> None:
        """Fail the requests in flight, and every later one, with `EngineDeadError`."""
        if self.dead_reason is None:
            self.log.error("%s is dead: %s", self.kind, reason)
            self.dead_reason = reason
            self.dead.set()
        self._fail_all(EngineDeadError(self.dead_reason))

    @property
    def healthy(self) -> bool:
        return self.ready is not None and self.dead_reason is None and not self.closing

    def check_open(self, draining: bool = False) -> None:
        """Raise the error a new request would get now for the link's state, if any."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if draining or self.closing or self.ready is None:
            raise RequestAbortedError("the server is shutting down; no new requests are accepted")

    def send(self, msg) -> bool:
        """Queue `msg` for the child without waiting; False if it cannot go (no peer)."""
        try:
            self._push.send(self._encoder.encode(msg), zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError):
            return False

    def listen(self) -> None:
        """From now on, hand what the child sends to `on_message`."""
        self._reader = asyncio.create_task(self._read(), name=f"inferd-{self.kind}-outputs")

    async def _read(self) -> None:
        try:
            while True:
                msg = self._decoder.decode(await self._pull.recv())
                if isinstance(msg, Fatal):
                    self.mark_dead(f"the {self.name} failed: {msg.error.strip().splitlines()[-1]}")
                else:
                    self._on_message(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken loop would hang every request
            self.log.exception("%s output loop failed", self.kind)
            self.mark_dead(f"the {self.kind} output loop failed: {e}")
            if self.started and not self._exited.is_set():
                self.host.kill()

    async def close(self, timeout: float = 5.0) -> None:
        """Abort what is in flight, stop the child (politely, then by force) and release
        the sockets. Later calls do nothing."""
        if self.closing:
            return
        self.closing = True
        self._fail_all(RequestAbortedError("the server is shutting down; the request was aborted"))
        if self.started:
            if not self._exited.is_set():
                self.send(Shutdown())
                if not await self._wait_exit(timeout):
                    self.log.warning("%s did not stop in %.0fs; terminating it", self.name, timeout)
                    self.host.terminate()
                    if not await self._wait_exit(2.0):
                        self.host.kill()
                        await self._wait_exit(2.0)
            self.host.release()
        if self._reader is not None:
            self._reader.cancel()
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


# -- the child's end ----------------------------------------------------------------------

class ParentLink:
    """A child's end: its inbox (PULL) and outbox (PUSH), and the parent it serves."""

    def __init__(self, input_addr: str, output_addr: str, parent_pid: int | None, to_child: Any,
                 log: logging.Logger):
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.connect(input_addr)
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.LINGER, 2000)  # a last StartupFailed or Fatal still leaves on close
        self._outbox.connect(output_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(to_child)
        self.parent_pid = parent_pid
        self.log = log

    def send(self, msg) -> None:
        self._outbox.send(self._encoder.encode(msg), copy=False)

    def poll(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a message; whether one is waiting."""
        return bool(self._inbox.poll(timeout_ms))

    def receive(self) -> Any:
        """The next message already waiting, or None."""
        try:
            raw = self._inbox.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return self._decoder.decode(raw.buffer)

    def parent_alive(self) -> bool:
        # a child whose parent died is re-parented: the pid changes. Without a parent pid the host
        # watches the parent (Ray ends an actor whose owner is gone)
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def report_fatal(self, what: str) -> None:
        """Log the exception being handled and send it as `Fatal` (the API side then
        fails every request); the caller stops its loop, as its state is unknown."""
        err = traceback.format_exc()
        self.log.error("%s:\n%s", what, err)
        self.send(Fatal(err))

    def close(self) -> None:
        self._inbox.close(linger=0)
        self._outbox.close()
        self._ctx.term()


class ChildLoop(Protocol):
    def run(self) -> None: ...


def run_child(build: Callable[[ParentLink], ChildLoop], to_child: Any, input_addr: str,
              output_addr: str, parent_pid: int | None, log_level: int, *, tag: str, failed: str,
              log: logging.Logger) -> None:
    """The body of a child's entry point: connect, build the loop, run it, clean up.

    `build(link)` loads the model and returns the loop. An exception there is a
    startup failure: logged under `failed` ("engine core failed to start") and sent
    as `StartupFailed`, after which the process exits cleanly. `tag` marks the
    child's log lines ("core")."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s %(name)s[{tag}]: %(message)s")
    # Ctrl-C reaches the whole process group; the API process shuts us down in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    link = ParentLink(input_addr, output_addr, parent_pid, to_child, log)
    try:
        try:
            loop = build(link)
        except Exception as e:  # noqa: BLE001 - reported to the API process, which exits cleanly
            if isinstance(e, (ValueError, OSError)):
                log.error("%s: %s", failed, e)  # a bad model argument: no traceback
            else:
                log.exception(failed)
            link.send(StartupFailed(f"{failed}: {type(e).__name__}: {e}"))
            return
        loop.run()
    finally:
        link.close()
