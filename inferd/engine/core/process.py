"""The engine core in its own process: its loop, and how it uses the messages of engine/messages.py.

The API process (engine/client/async_client.py) spawns `run_core` with two ZMQ ipc
addresses: it PUSHes `AddRequest`/`Abort`/`Shutdown` to the core and PULLs
what the core sends back. Messages are msgspec structs (a tagged union) encoded
as msgpack; engine dataclasses (`SamplingParams`, `EngineCoreOutput`,
`TokenizerSpec`) travel as they are, so there is one definition of each.

The core process loads the checkpoint (weights are loaded once, here), replies
`CoreReady` with the `TokenizerSpec` and model facts the API side needs, then loops:
drain its inbox, run one `EngineCore.step()` while there is work, and send an
`Outputs` batch (token deltas, first-scheduled times, engine stats). While idle
it blocks on its inbox and sends a `Stats` heartbeat now and then. A rejected
request gets `Rejected`; an exception in a step is fatal: the core sends `Fatal`
and exits, and the API side fails every request in flight. The core also exits
when its parent process is gone, so it never outlives the server.

The process plumbing (sockets, startup failure, parent watch, `Fatal`) lives in
engine/process_link.py and every message in engine/messages.py; this module holds
the core's loop.
"""

from __future__ import annotations

import gc
import logging
import os
import time

from inferd.engine.config import EngineConfig
from inferd.engine.messages import Abort, AddRequest, CoreReady, Outputs, Rejected, Stats, ToEngineCore
from inferd.engine.process_link import HEARTBEAT_S, ParentLink, run_child
from inferd.models.checkpoint import TokenizerSpec

log = logging.getLogger(__name__)


# -- the loop -----------------------------------------------------------------------------

def run_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int,
             log_level: int = logging.INFO) -> None:
    """Process entry point (spawn target)."""
    run_child(lambda link: _CoreLoop(link, *_build_core(config)), ToEngineCore, input_addr, output_addr,
              parent_pid, log_level, tag="core", failed="engine core failed to start", log=log)


def _build_core(config: EngineConfig):
    from inferd.engine.core.engine_core import EngineCore
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
        s, kv, spec = self.core.scheduler, self.core.kv, self.core.speculator
        stats = Stats(len(s.running), len(s.waiting), kv.usage, kv.num_free_blocks, kv.num_blocks,
                      s.num_preemptions, kv.prefix_queries, kv.prefix_hits)
        if spec is not None:
            d = spec.stats
            stats.spec_decode_num_drafts, stats.spec_decode_num_draft_tokens = d.num_drafts, d.num_draft_tokens
            stats.spec_decode_num_accepted_tokens = d.num_accepted_tokens
            stats.spec_decode_num_accepted_tokens_per_pos = list(d.accepted_per_pos)
        if self.core.vision is not None:
            stats.images_encoded = self.core.vision.num_encoded
            stats.image_encoder_cache_hits = self.core.vision.num_cache_hits
        return stats

    def run(self) -> None:
        core = self.core
        self.link.send(CoreReady(self.spec, self.source, core.max_model_len, core.model_config.vocab_size,
                             core.kv.num_blocks, core.kv.block_size, core.config.max_num_seqs, os.getpid(),
                             core.vision_spec))
        # the checkpoint, torch and the engine's tables live as long as the process: out of the
        # collector's view, and with a young generation big enough for a step's few thousand
        # short-lived objects (collections took ~1% of a 512-token prompt step in process)
        gc.freeze()
        gc.set_threshold(20_000, 20, 20)
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
                self.core.add_request(cid, msg.prompt_token_ids, params, msg.priority, msg.images)
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
            waiting = {r.request_id for r in self.core.scheduler.waiting} | self.core.compiling
            for cid in [c for c in self.queued if c not in waiting]:
                scheduled.append((self.queued.pop(cid), started))
        self.link.send(Outputs(outputs, scheduled, self.stats()))
