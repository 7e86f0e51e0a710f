"""Batched decoding for the API server: one thread owns the model and runs every request's tokens through shared
forward passes (continuous batching).

A request waits in a bounded queue. Between decode steps the scheduler takes newcomers (up to --max_batch_size rows
in all), prefills them together (left-padded, each row's own positions, see modeling_chatglm's docstring) and merges
their KV caches into the running batch of the same model (base or adapter): both caches are left-padded with masked
columns to a common length, which changes no real token's attention, so a row decodes exactly as it would alone. Each
decode step is one forward over all rows of a model; a finished, cancelled or timed-out row is dropped from the
batch at once, and columns that only padding still uses are cut, so each row's cache grows and is freed with it.

    engine = BatchEngine(model, tokenizer, max_batch_size=16)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0))
    ... request.events gets ("token", id), then ("done", finish_reason) or ("error", message) ...
"""

import collections
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from glm_tune.chat_model import StopOnStrings
from modeling_chatglm import get_position_ids

BASE = None  # the adapter name of the plain base model


class QueueFull(Exception):
    """The waiting queue holds --max_queue requests already."""


class ShuttingDown(Exception):
    """The engine takes no new requests (shutting down)."""


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens (vLLM's extension; benchmarks want fixed lengths)


class Request:
    """One generation: its prompt ids, settings and adapter; `emit` hands the engine's events to the consumer
    (a callable, called from the engine thread)."""

    def __init__(self, prompt_ids, params, adapter=BASE, emit=None, timeout=None):
        self.prompt_ids, self.params, self.adapter = list(prompt_ids), params, adapter
        self.emit = emit or (lambda event: None)
        self.output_ids = []
        self.arrived = time.monotonic()
        self.deadline = None if timeout is None else self.arrived + timeout
        self.first_token_at = None
        self.finished_at = None
        self.finish_reason = None
        self.cancelled = threading.Event()
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.stop_check = None  # StopOnStrings, set by the engine (needs the tokenizer)
        self.answer_start = self.has_sop = None  # the first answer token's 2D position (see next_position)

    def cancel(self):
        """The consumer went away: the engine frees the row at its next step."""
        self.cancelled.set()


def choose_tokens(logits, requests):
    """Next token of each row: argmax for greedy rows; for the others temperature, then nucleus (top_p) sampling
    with the row's own generator, so a seeded request samples the same tokens whatever shares its batch."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for i, request in enumerate(requests):
        p = request.params
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the likeliest tokens whose mass before them is below top_p (the first one always)
            keep = (sorted_probs.cumsum(-1) - sorted_probs) < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[i] = int(torch.multinomial(probs.cpu(), 1, generator=request.generator))
    return tokens


class RowBatch:
    """The running rows of one model: their requests, a 2D padding mask [rows, length] and per-layer KV tensors
    [rows, heads, length, head_dim], all left-padded to one length."""

    def __init__(self):
        self.requests, self.mask, self.kv = [], None, None

    def __len__(self):
        return len(self.requests)

    def merge(self, requests, mask, kv):
        """Add prefilled rows: pad the shorter side's cache on the left with masked zero columns."""
        if not self.requests:
            self.requests, self.mask, self.kv = list(requests), mask, kv
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old_mask, old_kv = _left_pad(self.mask, self.kv, width)
        new_mask, new_kv = _left_pad(mask, kv, width)
        self.requests += requests
        self.mask = torch.cat((old_mask, new_mask))
        self.kv = [(torch.cat((k0, k1)), torch.cat((v0, v1))) for (k0, v0), (k1, v1) in zip(old_kv, new_kv)]

    def keep(self, rows):
        """Keep only `rows` (indices), then drop leading columns that no kept row uses."""
        if len(rows) == len(self.requests):
            return
        self.requests = [self.requests[i] for i in rows]
        if not rows:
            self.mask = self.kv = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())
        self.mask = mask[:, first:]
        self.kv = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                   for k, v in self.kv]


def next_position(request, config):
    """The 2D position (position, block) of the row's newest token. After `<sop>` the position stays at the mask
    token and the block counts up (modeling_chatglm's rule), so only rows without `<sop>` need the whole row."""
    n = len(request.output_ids)
    if request.answer_start is None:
        ids = torch.tensor([request.prompt_ids + request.output_ids[:1]])
        request.answer_start = get_position_ids(ids, config)[0, :, -1].tolist()
        request.has_sop = config.bos_token_id in request.prompt_ids
    if request.has_sop:
        position, block = request.answer_start
        return position, block + n - 1
    return get_position_ids(torch.tensor([request.prompt_ids + request.output_ids]), config)[0, :, -1].tolist()


def _left_pad(mask, kv, width):
    extra = width - mask.shape[1]
    if extra == 0:
        return mask, kv
    mask = torch.nn.functional.pad(mask, (extra, 0), value=0)
    kv = [(torch.nn.functional.pad(k, (0, 0, extra, 0)), torch.nn.functional.pad(v, (0, 0, extra, 0))) for k, v in kv]
    return mask, kv


class BatchEngine:
    """The scheduler thread over one model (a PeftModel serves several adapters: rows of different adapters run in
    separate forwards within the same step)."""

    def __init__(self, model, tokenizer, max_batch_size=16, max_queue=64, adapters=()):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.adapters = dict(adapters)  # served name -> PEFT adapter name
        self.config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.device = next(model.parameters()).device
        self.eos = {tokenizer.eos_token_id}
        self.waiting = collections.deque()
        self.batches = {}
        self.lock = threading.Condition()
        self.accepting = True
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)

    # -- the consumer side ---------------------------------------------------------------------------------------

    def start(self):
        self.thread.start()
        return self

    def submit(self, request):
        with self.lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            if request.params.stop:
                request.stop_check = StopOnStrings(self.tokenizer, len(request.prompt_ids), request.params.stop)
            self.waiting.append(request)
            self.lock.notify()
        return request

    def busy(self):
        with self.lock:
            return bool(self.waiting) or any(len(b) for b in self.batches.values())

    def load(self):
        """(rows decoding, requests waiting)."""
        with self.lock:
            return sum(len(b) for b in self.batches.values()), len(self.waiting)

    def stop_accepting(self):
        with self.lock:
            self.accepting = False

    def close(self):
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join()

    # -- the engine thread -----------------------------------------------------------------------------------------

    def _run(self):
        while True:
            with self.lock:
                while not self.stopped and not self.waiting and not any(len(b) for b in self.batches.values()):
                    self.lock.wait()
                if self.stopped:
                    return
                room = self.max_batch_size - sum(len(b) for b in self.batches.values())
                newcomers = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            try:
                with torch.inference_mode():
                    self._step(newcomers)
            except Exception as error:  # a failed forward fails its requests, not the server
                for request in newcomers + [r for b in self.batches.values() for r in b.requests]:
                    self._finish(request, None, error=f"{type(error).__name__}: {error}")
                self.batches.clear()

    def _step(self, newcomers):
        now = time.monotonic()
        live = []
        for request in newcomers:
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(request, None, error="timeout: the request waited longer than --request_timeout")
            else:
                live.append(request)
        for adapter, batch in list(self.batches.items()):
            if len(batch):
                self._decode(adapter, batch)
        by_adapter = collections.defaultdict(list)
        for request in live:
            by_adapter[request.adapter].append(request)
        for adapter, requests in by_adapter.items():  # a newcomer's prefill gives its first token
            self._prefill(adapter, requests)

    def _use_adapter(self, adapter):
        if not self.adapters:
            return self.model
        lora = self.model.base_model
        if adapter is BASE:
            lora.disable_adapter_layers()
        else:
            lora.enable_adapter_layers()
            lora.set_adapter(self.adapters[adapter])
        return self.model.get_base_model()

    def _forward(self, adapter, input_ids, mask, position_ids=None, kv=None):
        model = self._use_adapter(adapter)
        cache = DynamicCache(ddp_cache_data=kv) if kv is not None else DynamicCache(config=self.config)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                     use_cache=True, logits_to_keep=1)
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.logits[:, -1], kv

    def _prefill(self, adapter, requests):
        width = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                            device=self.device)
        logits, kv = self._forward(adapter, ids, mask)
        batch = self.batches.setdefault(adapter, RowBatch())
        old = len(batch)
        batch.merge(requests, mask, kv)
        self._advance(batch, logits, range(old, len(batch)))

    def _decode(self, adapter, batch):
        last = torch.tensor([[r.output_ids[-1]] for r in batch.requests], device=self.device)
        mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        positions = torch.tensor([[[p] for p in next_position(r, self.config)] for r in batch.requests],
                                 device=self.device)
        logits, kv = self._forward(adapter, last, mask, positions, batch.kv)
        batch.mask, batch.kv = mask, kv
        self._advance(batch, logits, range(len(batch)))

    def _advance(self, batch, logits, rows):
        """Append each row's next token (rows index `batch` and, in order, `logits`), then drop finished rows."""
        requests = [batch.requests[i] for i in rows]
        tokens = choose_tokens(logits, requests)
        now = time.monotonic()
        for request, token in zip(requests, tokens):
            request.output_ids.append(token)
            if request.first_token_at is None:
                request.first_token_at = now
            request.emit(("token", token))
        keep = []
        for i, request in enumerate(batch.requests):
            reason = self._finish_reason(request, now)
            if reason is None:
                keep.append(i)
            elif reason == "timeout":
                self._finish(request, None, error="timeout: the request ran longer than --request_timeout")
            else:
                self._finish(request, reason)
        batch.keep(keep)

    def _finish_reason(self, request, now):
        if request.cancelled.is_set():
            return "cancelled"
        if request.output_ids and request.output_ids[-1] in self.eos and not request.params.ignore_eos:
            return "stop"
        if request.stop_check is not None:
            row = torch.tensor([request.prompt_ids + request.output_ids])
            if bool(request.stop_check(row, None)[0]):
                return "stop"
        if len(request.output_ids) >= request.params.max_new_tokens:
            return "length"
        if request.deadline is not None and now > request.deadline:
            return "timeout"
        return None

    def _finish(self, request, reason, error=None):
        request.finish_reason = reason
        request.finished_at = time.monotonic()
        request.emit(("error", error) if error else ("done", reason))
