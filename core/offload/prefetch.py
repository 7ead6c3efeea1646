"""Bounded-residency decoder layers: load layer i+1..i+D in the background while layer i computes.

`LayerOffloader` hooks every decoder layer of a Hugging Face causal LM whose layer parameters were
replaced by meta placeholders. Before layer i runs (forward pre-hook) it waits for layer i's weights,
binds them to the layer's modules, and schedules the next `prefetch_depth` layers (wrapping to layer 0
for the next forward pass) on one worker thread. After layer i runs (forward hook, also on exceptions)
its parameters go back to meta and its slot is freed. Only K = `resident_layers` slots exist, so no more
than K layers are ever materialised. prefetch_depth 0 is plain synchronous load-then-compute.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.offload.slots import Layout, SlotPool, make_slot_pool, plan_layout
from sinkstream.core.offload.sources import LayerSource


class OffloadError(RuntimeError):
    """Loading an offloaded layer failed or timed out; the message names the layer (and shard/tensor)."""


@dataclass
class OffloadStats:
    """Counters of one offloader (read by tests and benchmarks)."""

    loads: int = 0  # layer loads completed
    bytes_loaded: int = 0
    load_seconds: float = 0.0  # summed worker time spent loading (overlaps compute when prefetching)
    wait_seconds: float = 0.0  # main-thread time blocked waiting for a layer
    materialised: int = 0  # layers holding a slot now (loading, loaded or running)
    peak_materialised: int = 0
    peak_bound: int = 0  # layers whose parameters were bound to the model at once
    # The most recent layers in the order they started running (bounded: servers run for days).
    order: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


class PrefetchWorker:
    """One daemon thread running submitted calls in order; shutdown never waits for the running call.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a read hung in the kernel
    would keep the process alive; a daemon thread does not.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _busy, _closed and _then
        self._busy = False
        self._closed = False
        self._then: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue fn(*args); RuntimeError once shut down (as ThreadPoolExecutor.submit)."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, fn, args))
        return future

    def shutdown(self, then: Callable[[], None]) -> None:
        """Cancel the queued calls and run `then` once no call runs: now, or on the worker when the
        running call returns (the caller does not wait for it). Later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    self._jobs.get_nowait()[0].cancel()
                except queue.Empty:
                    break
            self._jobs.put(None)  # wakes an idle worker so it exits
            if self._busy:
                self._then = then
                return
        then()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            with self._lock:
                if self._closed:  # taken off the queue just before shutdown drained it
                    future.cancel()
                    return
                if not future.set_running_or_notify_cancel():
                    continue
                self._busy = True
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:
                result, error = None, exc
            with self._lock:  # idle before the caller can see the outcome, so a close() after it frees now
                self._busy = False
                then, self._then = self._then, None
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
            if then is not None:  # shut down while this call ran: the cleanup is ours
                then()
                return


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, module list) of a Hugging Face decoder's layers, e.g. ("model.layers", ...)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no base_model.layers ModuleList to offload")
    name = next(n for n, m in model.named_modules() if m is layers)
    return name, layers


class LayerOffloader:
    """Keeps at most K decoder layers materialised and prefetches the next ones on a worker thread."""

    def __init__(self, model: nn.Module, source: LayerSource, config: OffloadConfig,
                 device: torch.device | str = "cpu") -> None:
        _, layers = decoder_layers(model)
        config.validate(len(layers))
        self.config = config
        self.source = source
        self.device = torch.device(device)
        self.num_layers = len(layers)
        self.stats = OffloadStats()
        # Per layer: where each tensor goes ((module, attribute, is_parameter) by name) and its meta stand-in.
        self._targets: list[dict[str, tuple[nn.Module, str, bool]]] = []
        self._meta: list[dict[str, torch.Tensor]] = []
        self._layouts: list[Layout] = []
        slot_bytes = 0
        for layer in layers:
            targets, meta, specs = {}, {}, []
            for module_name, module in layer.named_modules():
                for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
                    for attr, tensor in table.items():
                        if tensor is None:
                            continue
                        if kind == "buffer" and attr in module._non_persistent_buffers_set:
                            raise ValueError(f"decoder layer buffer {module_name}.{attr} is not in the "
                                             "checkpoint; layer offloading cannot restore it")
                        name = f"{module_name}.{attr}" if module_name else attr
                        targets[name] = (module, attr, kind == "param")
                        meta[name] = tensor if tensor.is_meta else _to_meta(tensor, kind == "param")
                        specs.append((name, tensor.dtype, tuple(tensor.shape)))
            layout, nbytes = plan_layout(specs)
            self._targets.append(targets)
            self._meta.append(meta)
            self._layouts.append(layout)
            slot_bytes = max(slot_bytes, nbytes)
            for name in targets:
                self._bind_tensor(targets[name], meta[name])  # free the real weights, if any
        self.slots: SlotPool = make_slot_pool(config.resident_layers, slot_bytes, self.device)
        for layout in set(self._layouts):  # build every slot view now, not concurrently in two threads
            for slot in range(config.resident_layers):
                self.slots.params(slot, layout)
                self.slots.staging(slot, layout)
        # A stack (LIFO, slot 0 on top): the most recently freed slot is reused first, so only the D + 1
        # slots ever in use at once are written; the other pages of a CPU pool are never touched.
        self._free = list(reversed(range(config.resident_layers)))
        self._slot_of: dict[int, int] = {}
        self._futures: dict[int, Future] = {}
        self._bound: set[int] = set()
        self._broken: str | None = None
        self._worker = PrefetchWorker("sinkstream-prefetch")
        self._hooks = []
        for i, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(i)))
            self._hooks.append(layer.register_forward_hook(self._make_post_hook(i), always_call=True))

    # ----------------------------------------------------------------- hooks (main thread)
    def _make_pre_hook(self, i: int):
        def pre_hook(module, args):
            self.before_layer(i)
        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(module, args, output):
            self.after_layer(i)
        return post_hook

    def before_layer(self, i: int) -> None:
        """Make layer i's weights present and bound; schedule layers i+1..i+D."""
        if self._broken:
            raise OffloadError(self._broken)
        for stale in list(self._bound - {i}):  # a previous forward pass stopped inside a layer
            self.after_layer(stale)
        wanted = [(i + d) % self.num_layers for d in range(self.config.prefetch_depth + 1)]
        for layer in [j for j in self._slot_of if j not in wanted]:  # out-of-order call: make room
            self._discard(layer)
        if i not in self._slot_of:
            self._schedule(i)
        if i in self._futures:  # not yet waited for (else: bound by an interrupted earlier call)
            self._wait(i)
        if i not in self._bound:
            self.slots.wait_ready(self._slot_of[i])
            self._bind_layer(i)
        self.stats.order.append(i)
        for j in wanted[1:]:
            if j not in self._slot_of and self._free:
                self._schedule(j)

    def after_layer(self, i: int) -> None:
        """Unbind layer i and give its slot back."""
        if i not in self._bound:
            return
        for name, target in self._targets[i].items():
            self._bind_tensor(target, self._meta[i][name])
        self._bound.discard(i)
        slot = self._slot_of.pop(i)
        self.slots.released(slot)
        self._free.append(slot)
        self.stats.materialised = len(self._slot_of)

    # ----------------------------------------------------------------- scheduling
    def _schedule(self, i: int) -> None:
        if not self._free:  # cannot happen while D < K; guards the residency invariant
            raise OffloadError(f"no free slot for decoder layer {i} (all {len(self._slot_of)} taken)")
        slot = self._free.pop()
        self._slot_of[i] = slot
        self.stats.materialised = len(self._slot_of)
        self.stats.peak_materialised = max(self.stats.peak_materialised, self.stats.materialised)
        try:
            self._futures[i] = self._worker.submit(self._load, i, slot)
        except RuntimeError as exc:  # worker shut down
            self._give_back(i)
            raise OffloadError(f"the prefetch worker is not running (offloader closed?): {exc}") from exc

    def _wait(self, i: int) -> None:
        start = time.perf_counter()
        try:
            seconds = self._futures.pop(i).result(timeout=self.config.load_timeout_s)
        except FutureTimeout as exc:
            # The worker may still write into the slot: it can never be reused safely.
            self._broken = (f"decoder layer {i} did not load within {self.config.load_timeout_s:g} s; "
                            "the prefetch worker is stuck (slow or hung storage?)")
            raise OffloadError(self._broken) from exc
        except BaseException as exc:
            self._give_back(i)
            raise OffloadError(f"loading decoder layer {i} failed: {exc}") from exc
        finally:
            self.stats.wait_seconds += time.perf_counter() - start
        self.stats.loads += 1
        self.stats.load_seconds += seconds
        self.stats.bytes_loaded += sum(s.nbytes for s in self._layouts[i])

    def _discard(self, i: int) -> None:
        """Drop a prefetched layer that is not needed next (after its load finishes)."""
        future = self._futures.pop(i, None)
        if future is not None:
            try:
                future.result(timeout=self.config.load_timeout_s)
            except FutureTimeout as exc:
                self._broken = f"decoder layer {i} did not load within {self.config.load_timeout_s:g} s"
                raise OffloadError(self._broken) from exc
            except Exception:
                pass  # its error is irrelevant: the layer is not needed now
        if i in self._bound:
            self.after_layer(i)
        else:
            self._give_back(i)

    def _give_back(self, i: int) -> None:
        self._futures.pop(i, None)
        self._free.append(self._slot_of.pop(i))
        self.stats.materialised = len(self._slot_of)

    # ----------------------------------------------------------------- worker thread
    @torch.no_grad()
    def _load(self, i: int, slot: int) -> float:
        """Fill `slot` with layer i's weights; return the seconds it took."""
        start = time.perf_counter()
        layout = self._layouts[i]
        self.slots.before_fetch(slot)
        host = self.source.fetch(i, self.slots.staging(slot, layout))
        self.slots.fill(slot, layout, host)
        return time.perf_counter() - start

    # ----------------------------------------------------------------- binding
    def _bind_layer(self, i: int) -> None:
        params = self.slots.params(self._slot_of[i], self._layouts[i])
        for name, target in self._targets[i].items():
            self._bind_tensor(target, params[name])
        self._bound.add(i)
        self.stats.peak_bound = max(self.stats.peak_bound, len(self._bound))

    @staticmethod
    def _bind_tensor(target: tuple[nn.Module, str, bool], tensor: torch.Tensor) -> None:
        module, attr, is_param = target
        if is_param:
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor

    # ----------------------------------------------------------------- lifecycle
    @property
    def layer_bytes(self) -> list[int]:
        """Bytes of each decoder layer's weights in the compute dtype."""
        return [sum(s.nbytes for s in layout) for layout in self._layouts]

    def close(self) -> None:
        """Stop the worker, remove the hooks, free the slots (the layers stay on meta).

        Never blocks: if the worker is stuck in a read, the source and slots are released by the worker
        when the read returns (it may still write into its slot until then).
        """
        for future in self._futures.values():
            future.cancel()
        for handle in self._hooks:
            handle.remove()
        for i in list(self._bound):
            self.after_layer(i)
        self._worker.shutdown(then=self._release)

    def _release(self) -> None:
        self.source.close()
        self.slots.free()


def _to_meta(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=False) if is_param else meta
