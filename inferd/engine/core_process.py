"""The engine core in its own process, and the typed messages it exchanges.

The API process (engine/async_client.py) spawns `run_core` with two ZMQ ipc
addresses: it PUSHes `AddRequest`/`Abort`/`Shutdown` to the core and PULLs
what the core sends back. Messages are msgspec structs (a tagged union) encoded
as msgpack; engine dataclasses (`SamplingParams`, `EngineCoreOutput`,
`TokenizerSpec`) travel as they are, so there is one definition of each.

The core process loads the checkpoint (weights are loaded once, here), replies
`Ready` with the `TokenizerSpec` and model facts the API side needs, then loops:
drain its inbox, run one `EngineCore.step()` while there is work, and send an
`Outputs` batch (token deltas, first-scheduled times, engine stats). While idle
it blocks on its inbox and sends a `Stats` heartbeat now and then. A rejected
request gets `Rejected`; an exception in a step is fatal: the core sends `Fatal`
and exits, and the API side fails every request in flight. The core also exits
when its parent process is gone, so it never outlives the server.

The process plumbing (sockets, startup failure, parent watch, `Fatal`) and the
messages every model process shares (`Shutdown`, `StartupFailed`, `Fatal`) live
in engine/process_link.py; this module holds the core's own protocol and loop.
"""

from __future__ import annotations

import logging
import os
import time

import msgspec

from inferd.engine.config import EngineConfig
from inferd.engine.process_link import HEARTBEAT_S, Fatal, ParentLink, Shutdown, StartupFailed, run_child
from inferd.engine.sampling_params import SamplingParams
from inferd.engine.scheduler import EngineCoreOutput
from inferd.models.checkpoint import TokenizerSpec

log = logging.getLogger(__name__)


# -- API process -> core ------------------------------------------------------------------

class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str                                  # the user's request (for `Rejected`)
    prompt_token_ids: list[int]
    children: list[tuple[str, SamplingParams]]       # core request ids: one per sample
    priority: int = 0                                # lower is scheduled sooner


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


ToCore = AddRequest | Abort | Shutdown


# -- core -> API process ------------------------------------------------------------------

class Ready(msgspec.Struct, tag="ready", array_like=True):
    tokenizer: TokenizerSpec
    source: str          # the checkpoint's path
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    pid: int


class Stats(msgspec.Struct, tag="stats", array_like=True):
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0   # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0  # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0     # of those, served from it


class Outputs(msgspec.Struct, tag="outputs", array_like=True):
    outputs: list[EngineCoreOutput]
    scheduled: list[tuple[str, float]]  # (user's request id, monotonic time) on first scheduling
    stats: Stats


class Rejected(msgspec.Struct, tag="rejected", array_like=True):
    request_id: str
    param: str | None
    message: str


FromCore = Ready | StartupFailed | Stats | Outputs | Rejected | Fatal


# -- the loop -----------------------------------------------------------------------------

def run_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int,
             log_level: int = logging.INFO) -> None:
    """Process entry point (spawn target)."""
    run_child(lambda link: _CoreLoop(link, *_build_core(config)), ToCore, input_addr, output_addr,
              parent_pid, log_level, tag="core", failed="engine core failed to start", log=log)


def _build_core(config: EngineConfig):
    from inferd.engine.core import EngineCore
    from inferd.engine.tokenizer import Tokenizer
    from inferd.models.loader import load_checkpoint

    ckpt = load_checkpoint(config.model, progress=False)
    eos = Tokenizer(ckpt.tokenizer).eos_token_ids
    return EngineCore(config, ckpt, eos), ckpt.tokenizer, ckpt.source


class _CoreLoop:
    def __init__(self, link: ParentLink, core, spec: TokenizerSpec, source: str):
        self.link, self.core = link, core
        self.spec, self.source = spec, source
        self.queued: dict[str, str] = {}  # never scheduled yet: core id -> user's request id
        self.running = True

    def stats(self) -> Stats:
        s, kv = self.core.scheduler, self.core.kv
        return Stats(len(s.running), len(s.waiting), kv.usage, kv.num_free_blocks, kv.num_blocks,
                     s.num_preemptions, kv.prefix_queries, kv.prefix_hits)

    def run(self) -> None:
        core = self.core
        self.link.send(Ready(self.spec, self.source, core.max_model_len, core.model_config.vocab_size,
                             core.kv.num_blocks, core.kv.block_size, core.config.max_num_seqs, os.getpid()))
        last_stats, last_sent = None, 0.0
        while self.running:
            busy = core.has_unfinished
            if self.link.poll(0 if busy else int(HEARTBEAT_S * 1000)):
                self.drain_inbox()
            if not self.running or not self.link.parent_alive():
                break
            if core.has_unfinished:
                self.step()
                continue
            stats = self.stats()  # idle: report changes at once, otherwise a heartbeat
            now = time.monotonic()
            if stats != last_stats or now - last_sent >= HEARTBEAT_S:
                self.link.send(stats)
                last_stats, last_sent = stats, now

    def drain_inbox(self) -> None:
        while self.running and (msg := self.link.receive()) is not None:
            if isinstance(msg, AddRequest):
                self.add(msg)
            elif isinstance(msg, Abort):
                for rid in msg.request_ids:
                    self.core.abort(rid)
                    self.queued.pop(rid, None)
            else:
                self.running = False

    def add(self, msg: AddRequest) -> None:
        added = []
        try:
            for cid, params in msg.children:
                self.core.add_request(cid, msg.prompt_token_ids, params, msg.priority)
                added.append(cid)
        except Exception as e:  # noqa: BLE001 - bad input must not take the core down
            for cid in added:
                self.core.abort(cid)
            message = str(e) if not hasattr(e, "param") else str(e).removeprefix(f"{e.param}: ")
            self.link.send(Rejected(msg.request_id, getattr(e, "param", None), message))
            return
        self.queued.update((cid, msg.request_id) for cid in added)

    def step(self) -> None:
        started = time.monotonic()
        try:
            outputs = self.core.step()
        except Exception:  # noqa: BLE001 - state is unknown now: report and exit
            self.link.report_fatal("engine core step failed")
            self.running = False
            return
        scheduled = []
        if self.queued:
            waiting = {r.request_id for r in self.core.scheduler.waiting}
            for cid in [c for c in self.queued if c not in waiting]:
                scheduled.append((self.queued.pop(cid), started))
        self.link.send(Outputs(outputs, scheduled, self.stats()))
