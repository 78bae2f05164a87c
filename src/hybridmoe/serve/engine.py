"""The generation engine: one worker thread owns the model and interleaves many requests.

Scheduling, one loop iteration at a time:

1. **Admit.** While fewer than ``max_batch_size`` sequences are running, waiting requests are prefilled in
   batches (:func:`~hybridmoe.serve.prefill.prefill_batch`, one left-padded forward): the waiting requests in
   arrival order, whatever their adapters, up to the free slots and ``max_prefill_tokens`` padded tokens (a longer
   prompt goes alone). Prefill samples every row's first token; the rows that are not finished then join the running
   :class:`~hybridmoe.serve.batch.DecodeBatch` (or become it if there is none).
2. **Decode.** One decode step of the running batch. Its rows may use different adapters and the base model: each
   forward runs row i with its request's adapter (:meth:`~hybridmoe.serve.adapters.AdapterSet.use`: per-row Linear
   LoRA, :mod:`~hybridmoe.serve.mixed_lora`; per-row expert LoRA in the routed experts), so every request gets a
   token per step whatever the mix. Only a model whose KV cache cannot be padded (sliding-window or static layers) keeps
   one batch of one row per request; those batches take turns, one step each.
   On CUDA the step replays CUDA graphs (:mod:`hybridmoe.batch_decode`, or chat's decoder for a lone row); there the
   adapters come as static per-row masks (:meth:`~hybridmoe.serve.adapters.AdapterSet.use_static`), and greedy rows,
   with or without logprobs, take their tokens in one batched pass (one host transfer).

Before serving, :meth:`Engine.warm_up` runs a batched prefill and two decode steps per batch size, so the first
requests do not pay CUDA's lazy setup or the graph captures.

A prompt whose padded prefill is larger than ``prefill_chunk_tokens`` is prefilled in chunks
(:class:`~hybridmoe.serve.prefill.ChunkedPrefill`), one chunk per loop iteration, with a decode step of the running
requests after each chunk: a long prompt does not stall the streams already running. The ``n`` choices of one
request share one prompt row in the prefill; its KV cache is then copied to ``n`` decode rows.

Per-request state is a :class:`~hybridmoe.serve.sampling.ServeStream`, the same sampling / stop / text code as
``hybridmoe chat`` plus the server's extras (penalties, min-p, logprobs, grammars). Work that must not overlap a
forward (loading or unloading an adapter) is queued with :meth:`Engine.call` and runs between two steps.
:meth:`Engine.drain` begins a graceful shutdown: new requests are refused, running ones get a grace period. A failure in one sequence (non-finite logits: :class:`~hybridmoe.errors.NonFiniteError`) fails
that request only. A batched prefill that raises (out of memory, a bug) is retried one request at a time, so it
fails only the requests that fail alone; an unexpected exception in a decode step fails that batch's requests; the
loop goes on.

Results go back to the asyncio side through :class:`Handle`: the worker posts events with
``loop.call_soon_threadsafe``, the HTTP handler awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridmoe.errors import NonFiniteError
from hybridmoe.generation import SamplingConfig, input_device

from .adapters import AdapterSet
from .batch import DecodeBatch, batchable
from .events import Delta, Event, Failed, Finished, Handle
from .prefill import ChunkedPrefill, prefill_batch
from .sampling import ServeStream, TokenLogprob

__all__ = ["Delta", "Engine", "Event", "Failed", "Finished", "Handle"]

log = logging.getLogger("hybridmoe.serve")


def _out_of_memory(model, tokens: int, max_new_tokens: int) -> Failed:
    """The failure of a request that ran the GPU out of memory: one logged line, with what fits (no traceback)."""
    from hybridmoe.chat import generation_oom_line

    line = generation_oom_line(model, tokens, max_new_tokens, advice="send shorter prompts or a lower max_tokens, or "
                               "start the server with a lower --max-batch-size")
    log.error("%s", line)
    return Failed(line, "out_of_memory")


@dataclass
class _Request:
    prompt_ids: list[int]  # the n choices of a request share this list object (and so one prefill row)
    adapter: str | None  # None = the base model
    cfg: SamplingConfig
    handle: Handle
    stream: ServeStream | None = None  # set at prefill
    index: int = 0  # choice index within the request
    deadline: float | None = None  # time.monotonic() after which the request fails with "timeout"
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None  # for the time-to-first-token and inter-token-latency metrics
    solo: bool = False  # prefill alone (a batched prefill with it failed)


@dataclass
class _Call:
    """A function to run on the worker between two steps (it owns the model); the result goes to ``future``."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class _Wake:
    """Put on the queue to wake an idle worker for a :class:`_Call`."""


@dataclass
class _Group:
    batch: DecodeBatch
    requests: list[_Request] = field(default_factory=list)  # row i of the batch is requests[i], with its adapter


class Engine:
    """Owns the model on a worker thread; :meth:`submit` is safe to call from the event loop."""

    def __init__(self, adapters: AdapterSet, tokenizer, max_batch_size: int = 16,
                 max_prefill_tokens: int = 8192, prefill_chunk_tokens: int | None = None,
                 graph_decode: bool | None = None) -> None:
        self.adapters = adapters
        # Decode steps replay CUDA graphs: a lone request on the static-cache decoder `hybridmoe chat` uses, several
        # on the batch decoder (serve.batch.DecodeBatch, hybridmoe.batch_decode): on by default on CUDA.
        if graph_decode is None:
            graph_decode = adapters is not None and input_device(adapters.model).type == "cuda"
        self.graph_decode = graph_decode
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens (rows x longest prompt) per batched prefill
        # padded tokens per prefill forward; a larger prefill is chunked, with decode steps in between
        self.prefill_chunk_tokens = prefill_chunk_tokens or max_prefill_tokens
        self.metrics = None  # a ServeMetrics (set by the app): told about tokens and finished requests
        self._waiting: queue.Queue[_Request | list[_Request] | _Wake | None] = queue.Queue()  # None: stop
        self._pending: deque[_Request] = deque()  # taken off the queue by the worker, not yet prefilled (FIFO)
        self._prefilling: tuple[list[_Request], list[int], ChunkedPrefill] | None = None  # a chunked prefill under way
        self._calls: queue.Queue[_Call] = queue.Queue()
        self._groups: list[_Group] = []
        self._next = 0  # round-robin cursor into _groups
        self._stop = threading.Event()
        self._drain_deadline: float | None = None  # set by drain(): past it, what still runs fails
        self._thread = threading.Thread(target=self._run, name="hybridmoe-engine", daemon=True)
        self.batchable: bool | None = None  # learnt from the first prefilled cache
        # counters for /health and the load benchmark (written by the worker only)
        self.stats = {"prefills": 0, "prefill_batches": 0, "max_prefill_batch": 0, "prefill_chunks": 0,
                      "prefill_s": 0.0, "prefill_tokens": 0, "decode_steps": 0, "decode_s": 0.0,
                      # of decode_s: queueing the forward (host time until batch.step returns), and sampling + text
                      # (the first row's token waits for the GPU: the forward's device time beyond its queueing)
                      "decode_queue_s": 0.0, "decode_sample_s": 0.0, "decoded_tokens": 0,
                      "max_batch": 0, "timeouts": 0,
                      "decode_steps_during_prefill": 0,  # decode steps run between two chunks of a prefill
                      # forwards whose rows used more than one adapter (the base model counts as one)
                      "mixed_decode_steps": 0, "mixed_prefill_chunks": 0}

    # -- before serving --------------------------------------------------------------------------------------------
    def warm_up(self, prompt_len: int = 8, positions: int = 512) -> float:
        """Run the model before the first request (call before :meth:`start`, or on the worker through :meth:`call`
        after a runtime adapter load or unload, which closes the captured decoders): one batched prefill of
        ``max_batch_size`` rows, then two decode steps at each batch size the batch decoder has graphs for (16, 8, 4,
        2), then a lone row on the batch-1 decoder of the base model and of each adapter. CUDA's lazy setup, the first
        copies of resident expert layers and of the adapters' LoRA, and the CUDA-graph captures then happen here, not
        inside the first requests' time to first token. The rows cycle through the base model and every loaded
        adapter (mixed batches, as requests make them). The decoders are sized for ``positions`` per row (a request
        that needs more gets larger ones, captured once, when it comes). Returns the seconds it took; no counters
        touched. A failure is logged and serving goes on without it."""
        if self.adapters is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self._warm_up(prompt_len, positions)
        except Exception as e:  # not fatal: the first requests then pay the setup (and meet the error, if it stays)
            log.warning("warming up failed (%s: %s); serving without it", type(e).__name__, e)
            log.debug("where the warm-up failed", exc_info=True)
            self.adapters.use([None])
        return time.perf_counter() - t0

    def _warm_up(self, prompt_len: int, positions: int) -> None:
        from hybridmoe.batch_decode import _bucket_rows
        from hybridmoe.decode_graph import MAX_DECODERS

        from . import prefill  # (the module's function, not this module's name for it, which tests replace)

        model, cap = self.adapters.model, self.max_batch_size
        sizes = sorted({_bucket_rows(n, cap) for n in range(1, cap + 1)}, reverse=True)  # e.g. 16, 8, 4, 2, 1
        room = positions - prompt_len - 2 * len(sizes) - 1
        names = [None, *self.adapters.names]
        adapters = [names[i % len(names)] for i in range(cap)]  # row i: the base model, then each adapter in turn
        with torch.inference_mode():
            self.adapters.use(adapters)
            logits, batch = prefill.prefill_batch(model, [list(range(1, prompt_len + 1))] * cap, capacity=cap)
            batch.graphs = self.graph_decode
            tok = logits.argmax(-1, keepdim=True)  # [cap, 1]
            for n in sizes:
                batch.remove(list(range(n, len(batch))))
                tok = tok[:n]
                # a lone row: the batch-1 decoder of the base model and of each adapter (one each)
                for rows in [adapters[:n]] if n > 1 else [[a] for a in names[:MAX_DECODERS]]:
                    batch.detach()  # (a lone row keeps its decoder: hand it back so the next adapter takes its own)
                    for _ in range(2):  # a decoder's first step runs eagerly, its second captures
                        if batch.path(room) == "multi":
                            self.adapters.use_static(rows, cap, input_device(model))
                        else:
                            self.adapters.use(rows)
                        tok = batch.step(tok, room).argmax(-1, keepdim=True)
            batch.remove(list(range(len(batch))))
            self.adapters.use([None])
            if input_device(model).type == "cuda":
                torch.cuda.synchronize()

    # -- control, from any thread ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def drain(self, grace: float) -> None:
        """Begin a graceful shutdown: new requests are refused (503 ``shutting_down``); the running and queued ones
        get ``grace`` seconds to finish, then fail with ``shutting_down`` (a final error event in a stream)."""
        self._drain_deadline = time.monotonic() + grace
        self._waiting.put(_Wake())  # an idle worker re-checks the deadline

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._waiting.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def running(self) -> int:
        prefilling = len(self._prefilling[0]) if self._prefilling else 0
        return sum(len(g.requests) for g in self._groups) + prefilling

    @property
    def waiting(self) -> int:
        return self._waiting.qsize() + len(self._pending)

    def submit(self, prompt_ids: list[int], adapter: str | None, cfg: SamplingConfig | list[SamplingConfig],
               timeout: float | None = None) -> Handle:
        """Queue a request (one choice per config in ``cfg``); call from a running event loop (its events are
        delivered there). ``timeout`` seconds from now, an unfinished request fails with code ``timeout``."""
        cfgs = cfg if isinstance(cfg, list) else [cfg]
        metrics = self.metrics
        handle = Handle(asyncio.get_running_loop(), len(cfgs), metrics.failed if metrics is not None else None)
        if not self.alive or self._drain_deadline is not None:
            handle.post(Failed("the server is shutting down", "shutting_down"))
            return handle
        deadline = time.monotonic() + timeout if timeout else None
        self._waiting.put([_Request(prompt_ids, adapter, c, handle, index=i, deadline=deadline)
                           for i, c in enumerate(cfgs)])
        return handle

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread between two steps and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        if not self.alive:
            raise RuntimeError("the engine is not running")
        call = _Call(fn, loop, loop.create_future())
        self._calls.put(call)
        self._waiting.put(_Wake())
        return await call.future

    def requests_for(self, adapter: str) -> int:
        """Requests of ``adapter`` waiting or running. Call on the worker (from a :meth:`call`)."""
        self._collect(block=False)
        prefilling = self._prefilling[0] if self._prefilling else []
        reqs = [*self._pending, *prefilling, *(r for g in self._groups for r in g.requests)]
        return sum(r.adapter == adapter and not r.handle.cancelled.is_set() for r in reqs)

    # -- the worker --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # a bug in the scheduler itself: fail what is running, keep serving
                    log.exception("engine iteration failed")
                    self._fail_running(f"internal error: {type(e).__name__}: {e}", "internal_error")
        self._fail_running("the server is shutting down", "shutting_down")
        self._fail_waiting("the server is shutting down", "shutting_down")

    def _iteration(self) -> None:
        self._run_calls()
        if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
            self._fail_running("the server is shutting down", "shutting_down")
            self._fail_waiting("the server is shutting down", "shutting_down")
            self._drain_deadline = float("inf")  # failed once; new requests are refused by submit()
        idle = not self._groups and self._prefilling is None
        wait = None  # idle: wait for work (or a stop/call), but wake in time for a drain deadline
        if idle and self._drain_deadline is not None and self._drain_deadline != float("inf"):
            wait = max(self._drain_deadline - time.monotonic(), 0.0)
        self._admit(block=idle, timeout=wait)
        if self._prefilling is not None:
            self._prefill_chunk()
        if self._groups:
            i = self._next % len(self._groups)
            group = self._groups[i]
            self._decode(group)
            self._next = i + 1 if group in self._groups else i  # a finished group's turn passes on

    def _run_calls(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result = call.fn()
            except Exception as e:
                call.loop.call_soon_threadsafe(_set_exception, call.future, e)
            else:
                call.loop.call_soon_threadsafe(_set_result, call.future, result)

    def _admit(self, block: bool, timeout: float | None = None) -> None:
        self._collect(block, timeout)
        while self._pending and self._prefilling is None and self.running < self.max_batch_size:
            self._prefill(self._next_prefill())

    def _collect(self, block: bool, timeout: float | None = None) -> None:
        """Move submitted requests from the queue to ``_pending``; waits for one (at most ``timeout`` s) if ``block``
        and none is pending."""
        block = block and not self._pending
        while True:
            try:
                req = self._waiting.get(block=block, timeout=timeout if block else None)
            except queue.Empty:
                return
            if req is None or isinstance(req, _Wake):  # stop() or call() woke us
                return
            block = False
            self._pending.extend(req if isinstance(req, list) else [req])

    def _next_prefill(self) -> list[_Request]:
        """Take the next prefill batch off ``_pending``: the oldest request and the following ones, in order and
        whatever their adapters, within the free slots and the padded-token budget. Cancelled requests are dropped on
        the way."""
        room = self.max_batch_size - self.running
        limit = room if self.batchable else 1  # until the first cache shows that padding works: one at a time
        now = time.monotonic()
        live = deque()
        for req in self._pending:
            if req.handle.cancelled.is_set():
                continue
            if req.deadline is not None and now > req.deadline:
                self._time_out(req)
                continue
            live.append(req)
        if not live:
            self._pending = live
            return []
        if live[0].solo:
            self._pending = deque(list(live)[1:])
            return [live[0]]
        chosen: list[_Request] = []
        rest: deque[_Request] = deque()
        longest = 0
        prompts: set[int] = set()  # prefill rows: the choices of one request share theirs
        for req in live:
            width = max(longest, len(req.prompt_ids))
            rows = len(prompts | {id(req.prompt_ids)})
            fits = not chosen or (len(chosen) < limit and rows * width <= self.max_prefill_tokens and not req.solo)
            if fits:
                chosen.append(req)
                prompts.add(id(req.prompt_ids))
                longest = width
            else:
                rest.append(req)
        self._pending = rest
        return chosen

    def _prefill(self, reqs: list[_Request]) -> None:
        """Start prefilling ``reqs`` (any adapters): prompts shared by several choices once. A prefill within
        ``prefill_chunk_tokens`` runs here in one forward; a larger one runs chunk by chunk (:meth:`_prefill_chunk`)."""
        if not reqs:
            return
        rows: list[int] = []  # reqs[i] is prefill row rows[i]
        unique: dict[int, int] = {}  # id(prompt list) -> row
        for req in reqs:
            rows.append(unique.setdefault(id(req.prompt_ids), len(unique)))
        prompts = [r.prompt_ids for r in {id(r.prompt_ids): r for r in reqs}.values()]  # in row order
        t0 = time.perf_counter()
        try:
            device = input_device(self.adapters.model)
            for req in reqs:
                prompt = torch.tensor([req.prompt_ids], dtype=torch.long, device=device)  # [1, T]
                req.stream = ServeStream(self.adapters.model, self.tokenizer, prompt, req.cfg,
                                         diagnose=_diagnosis(req.adapter))
            padded = len(prompts) * max(len(p) for p in prompts)
            if padded <= self.prefill_chunk_tokens:
                self._use_adapters(_row_adapters(reqs, rows), prefill=True)
                logits, batch = prefill_batch(self.adapters.model, prompts, capacity=len(prompts))  # [U, V]
            else:
                # chunk by chunk from the next loop iteration on, a decode step after each chunk
                self._prefilling = (reqs, rows, ChunkedPrefill(self.adapters.model, prompts, len(prompts)))
                self.stats["prefill_s"] += time.perf_counter() - t0
                return
        except Exception as e:
            self._prefill_failed(reqs, e)
            return
        self.stats["prefill_chunks"] += 1
        self._prefilled(reqs, rows, logits, batch, t0)

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the prefill under way; the last chunk hands its rows to a decode group."""
        reqs, rows, job = self._prefilling
        t0 = time.perf_counter()
        try:
            self._use_adapters(_row_adapters(reqs, rows), prefill=True)  # a decode step in between switched them
            done = job.step(self.prefill_chunk_tokens)
        except Exception as e:
            self._prefilling = None
            self._prefill_failed(reqs, e)
            return
        self.stats["prefill_chunks"] += 1
        if done is None:
            self.stats["prefill_s"] += time.perf_counter() - t0
            return
        self._prefilling = None
        self._prefilled(reqs, rows, *done, t0)

    def _prefill_failed(self, reqs: list[_Request], e: Exception) -> None:
        """A prefill raised: requests that were batched go back to the queue's front to be prefilled alone, so each
        fails or succeeds on its own; a lone request fails."""
        if len(reqs) > 1 and not isinstance(e, NonFiniteError):
            log.warning("a batched prefill of %d requests failed (%s: %s); prefilling them one at a time",
                        len(reqs), type(e).__name__, e)
            for req in reversed(reqs):
                req.solo = True
                self._pending.appendleft(req)
            return
        for req in reqs:
            self._fail_prefill(req, e)

    def _prefilled(self, reqs: list[_Request], rows: list[int], logits: torch.Tensor, batch: DecodeBatch,
                   t0: float) -> None:
        """Sample the first tokens of ``reqs`` from the prefill's ``logits`` [U, V]; the unfinished rows join a group."""
        if rows != list(range(len(rows))):  # choices of one prompt: copy its row (cache and logits) to each
            batch.select(rows)
            logits = logits[rows]  # [N, V]
        batch.capacity = len(reqs)
        done = self._accept(reqs, logits)
        self.stats["prefills"] += len(reqs)
        self.stats["prefill_batches"] += 1
        prompt_tokens = sum(len(p) for p in {id(r.prompt_ids): r.prompt_ids for r in reqs}.values())  # shared: once
        self.stats["prefill_tokens"] += prompt_tokens
        self.stats["max_prefill_batch"] = max(self.stats["max_prefill_batch"], len(reqs))
        self.stats["prefill_s"] += time.perf_counter() - t0  # accept() synced on every row's token
        if self.metrics is not None:
            self.metrics.prefilled(prompt_tokens)
        if len(done) == len(reqs):
            return
        if self.batchable is None:
            self.batchable = batchable(batch.cache)
            if not self.batchable:
                log.warning("this model's KV cache is not a plain DynamicCache; serving requests one at a time")
        batch.remove(done)
        self._join(batch, [r for i, r in enumerate(reqs) if i not in set(done)])

    def _fail_prefill(self, req: _Request, e: Exception) -> None:
        """A prefill of ``req`` alone raised ``e``: that request fails, the server goes on."""
        if isinstance(e, NonFiniteError):
            req.handle.post(Failed(str(e), "non_finite_logits"))
        elif isinstance(e, torch.cuda.OutOfMemoryError):  # one line with an estimate of what fits, no traceback
            req.handle.post(_out_of_memory(self.adapters.model, len(req.prompt_ids), req.cfg.max_new_tokens))
        else:  # a bug
            log.error("prefill failed", exc_info=e)
            req.handle.post(Failed(f"internal error during prefill: {type(e).__name__}: {e}", "internal_error"))

    def _join(self, batch: DecodeBatch, reqs: list[_Request]) -> None:
        """Add the prefilled ``batch`` (row i is ``reqs[i]``) to a decode group with room for all of its rows (any
        adapters), or make it a new group."""
        for group in self._groups:
            if len(group.requests) + len(reqs) > group.batch.capacity:
                continue
            try:
                group.batch.join(batch)
            except Exception as e:  # e.g. out of memory while padding: the group's caches may be half-updated
                log.exception("joining a decode batch failed")
                for r in [*group.requests, *reqs]:
                    r.handle.post(Failed(f"internal error joining a batch: {type(e).__name__}: {e}", "internal_error"))
                self._groups.remove(group)
                return
            group.requests.extend(reqs)
            return
        batch.capacity = self.max_batch_size if self.batchable else 1
        batch.graphs = self.graph_decode
        self._groups.append(_Group(batch, list(reqs)))

    def _decode(self, group: _Group) -> None:
        now = time.monotonic()
        cancelled = []
        for i, r in enumerate(group.requests):
            if r.handle.cancelled.is_set():
                cancelled.append(i)
            elif r.deadline is not None and now > r.deadline:
                self._time_out(r)
                cancelled.append(i)
        self._drop(group, cancelled)
        if not group.requests:
            return
        room = max(r.cfg.max_new_tokens - len(r.stream.token_ids) for r in group.requests)  # positions still to come
        self._use_adapters([r.adapter for r in group.requests], prefill=False,
                           static=group.batch.path(room) == "multi")
        t0 = time.perf_counter()
        tokens = torch.stack([r.stream.last_id for r in group.requests])  # [B, 1] int64, compute device
        try:
            logits = group.batch.step(tokens, room)  # [B, V] fp32
            if self.graph_decode and not group.batch.graphs:  # the static decoder failed on this model: not again
                self.graph_decode = False
        except torch.cuda.OutOfMemoryError:  # the batch's KV caches outgrew the card: its requests fail, one line
            longest = max(r.stream.length for r in group.requests)
            failed = _out_of_memory(self.adapters.model, longest, max(r.cfg.max_new_tokens for r in group.requests))
            for r in group.requests:
                r.handle.post(failed)
            self._drop(group, list(range(len(group.requests))))
            return
        except Exception as e:  # a bug: this batch fails, the server keeps serving
            log.exception("decode step failed")
            for r in group.requests:
                r.handle.post(Failed(f"internal error during decode: {type(e).__name__}: {e}", "internal_error"))
            self._drop(group, list(range(len(group.requests))))
            return
        t1 = time.perf_counter()
        done = self._accept(group.requests, logits)
        self.stats["decode_queue_s"] += t1 - t0
        self.stats["decode_sample_s"] += time.perf_counter() - t1
        self.stats["decode_steps"] += 1
        self.stats["decode_steps_during_prefill"] += self._prefilling is not None
        self.stats["decode_s"] += time.perf_counter() - t0  # accept() synced on every row's token
        self.stats["decoded_tokens"] += len(group.requests)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(group.requests))
        self._drop(group, done)

    def _use_adapters(self, rows: list[str | None], prefill: bool, static: bool = False) -> None:
        """Set the adapter of each row of the next forward (call right before it: it counts the forwards that mix
        adapters). ``static``: the step runs on the batched graph decoder (AdapterSet.use_static)."""
        if static:
            self.adapters.use_static(rows, self.max_batch_size, input_device(self.adapters.model))
        else:
            self.adapters.use(rows)
        if len(set(rows)) > 1:
            self.stats["mixed_prefill_chunks" if prefill else "mixed_decode_steps"] += 1
            if self.metrics is not None:
                self.metrics.mixed_forward("prefill" if prefill else "decode")

    def _drop(self, group: _Group, rows: list[int]) -> None:
        """Remove ``rows`` from the group's batch; an empty group leaves the round-robin."""
        if rows:
            group.batch.remove(rows)
            group.requests = [r for i, r in enumerate(group.requests) if i not in set(rows)]
        if not group.requests and group in self._groups:
            self._groups.remove(group)

    def _accept(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """Sample each request's next token from its row of ``logits`` [N, V] and send the new text; returns the rows
        that are done (finished, or failed on non-finite logits: that request alone). accept() syncs (.item())."""
        done = []
        # Plain greedy rows (the common case), and greedy rows that only ask for logprobs: one finiteness check, one
        # argmax and one log-softmax / top-k for the whole batch, and one host transfer, instead of a few syncs per
        # row. The same tokens and logprobs as each row's accept() (of the same fp32 logits).
        fast = [r.stream.plain_greedy for r in reqs]
        lp_k = [None if fast[i] else getattr(r.stream, "greedy_logprobs", None) for i, r in enumerate(reqs)]
        batched = _batched_greedy(logits, fast, lp_k) if any(fast) or any(k is not None for k in lp_k) else None
        for i, req in enumerate(reqs):
            if req.handle.cancelled.is_set():  # a sibling choice failed, or the client left during the prefill
                done.append(i)
                continue
            try:
                token = batched[0][i] if batched is not None else -1
                if fast[i] and token >= 0:
                    self._emit(req, req.stream.accept_argmax(token, batched[1][i]))
                elif lp_k[i] is not None and token >= 0:
                    self._emit(req, req.stream.accept_argmax_logprob(token, batched[1][i], batched[2][i]))
                else:  # sampling, extras, or non-finite logits (accept() names the step)
                    self._emit(req, req.stream.accept(logits[i : i + 1]))  # [1, V]
            except NonFiniteError as e:
                req.handle.post(Failed(str(e), "non_finite_logits"))
                req.handle.cancel()  # the request's other choices stop too
                done.append(i)
                continue
            except Exception as e:  # a bug (e.g. in a grammar): this request fails, the batch goes on
                log.exception("sampling failed")
                req.handle.post(Failed(f"internal error while sampling: {type(e).__name__}: {e}", "internal_error"))
                req.handle.cancel()
                done.append(i)
                continue
            now = time.monotonic()
            if self.metrics is not None:
                self.metrics.token(now - (req.last_token_at or req.arrival), first=req.last_token_at is None)
            req.last_token_at = now
            if req.stream.stop_reason is not None:
                self._finish(req)
                done.append(i)
        return done

    def _emit(self, req: _Request, delta: str) -> None:
        stream = req.stream
        logprobs = None
        if stream.logprobs:  # every accepted token reaches the client with its logprob, even with no new text
            logprobs, stream.logprobs = stream.logprobs, []
        if delta or logprobs:
            req.handle.post(Delta(delta, req.index, logprobs))

    def _finish(self, req: _Request) -> None:
        self._emit(req, req.stream.flush())
        s = req.stream
        req.handle.post(Finished(s.stop_reason, s.n_prompt, len(s.token_ids), req.index))
        if self.metrics is not None:
            self.metrics.finished(s.stop_reason, time.monotonic() - req.arrival)

    def _time_out(self, req: _Request) -> None:
        self.stats["timeouts"] += 1
        req.handle.post(Failed("the request took longer than the server's --request-timeout; ask for fewer "
                               "max_tokens or retry when the server is less busy", "timeout"))
        req.handle.cancel()  # its other choices stop too

    def _fail_running(self, message: str, code: str) -> None:
        for g in self._groups:
            for r in g.requests:
                r.handle.post(Failed(message, code))
        self._groups = []
        if self._prefilling is not None:
            for r in self._prefilling[0]:
                r.handle.post(Failed(message, code))
            self._prefilling = None

    def _fail_waiting(self, message: str, code: str) -> None:
        while self._pending:
            self._pending.popleft().handle.post(Failed(message, code))
        while True:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            for r in req if isinstance(req, list) else [req] if isinstance(req, _Request) else []:
                r.handle.post(Failed(message, code))
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call.loop.call_soon_threadsafe(_set_exception, call.future, RuntimeError(message))


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _batched_greedy(logits: torch.Tensor, fast: list[bool], lp_k: list[int | None]):
    """For :meth:`Engine._accept`: (argmax per row, -1 where the row's logits are not finite; the argmax [B, 1] on
    the device; ``{row: TokenLogprob}`` for rows with ``lp_k[row]`` set), from ``logits`` [B, V] fp32, with one
    device-to-host transfer."""
    b = logits.shape[0]
    picked = torch.where(torch.isfinite(logits).all(dim=-1, keepdim=True), logits.argmax(dim=-1, keepdim=True), -1)
    rows = [i for i in range(b) if lp_k[i] is not None]
    if not rows:
        return picked.view(-1).tolist(), picked, {}
    k = max(lp_k[i] for i in rows)
    sel = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits[sel].float(), dim=-1)  # [R, V]
    chosen = logp.gather(1, picked[sel].clamp(min=0))  # [R, 1]
    values, ids = torch.topk(logp, k) if k > 0 else (logp[:, :0], logp[:, :0])  # [R, k]
    # one transfer (float64 holds every token id and fp32 value exactly)
    host = torch.cat([picked.view(-1).double(), chosen.view(-1).double(), values.reshape(-1).double(),
                      ids.reshape(-1).double()]).tolist()
    tokens = [int(t) for t in host[:b]]
    chosen_h, rest = host[b:b + len(rows)], host[b + len(rows):]
    values_h, ids_h = rest[:len(rows) * k], rest[len(rows) * k:]
    logprobs = {}
    for j, i in enumerate(rows):
        top = [(int(ids_h[j * k + t]), values_h[j * k + t]) for t in range(lp_k[i])]
        logprobs[i] = TokenLogprob(tokens[i], chosen_h[j], top)
    return tokens, picked, logprobs


def _row_adapters(reqs: list[_Request], rows: list[int]) -> list[str | None]:
    """The adapter of each prefill row (``reqs[i]`` is row ``rows[i]``; choices sharing a row share its adapter)."""
    out: list[str | None] = [None] * (max(rows) + 1)
    for req, row in zip(reqs, rows):
        out[row] = req.adapter
    return out


def _diagnosis(adapter: str | None):
    """The detail added to a non-finite-logits error: which served model produced it."""
    return lambda: f"served model: adapter '{adapter}'" if adapter is not None else "served model: the base model"
