"""CUDA graphs for small fixed-shape tensor functions that run again and again.

A planner's decision is some hundreds of tiny kernels. Launched one by one from Python it
costs the host tens of milliseconds per streamed chunk - more than the GPU spends on it,
and host time is what a pruned stream waits for (docs/streaming.md). Captured once in a
CUDA graph, a decision is a handful of input copies and one launch.

:class:`Graphs` runs ``fn(*inputs)``: on the CPU as it is; on CUDA eagerly the first time
a key (with the inputs' shapes) is seen, captured the second time, replayed from then on.
Only functions marked :func:`graph_safe` belong here: a capture that fails (a host sync
inside) leaves CUDA's random generator unusable in this process.

``compile=True`` runs ``torch.compile`` on the function before capturing it: inductor fuses
the elementwise work around each gather, so the graph replays fewer, larger kernels (a
streamed chunk's decisions on an H200: 2.85 -> 1.09 GPU ms, docs/planners.md). Compiling
takes seconds per key, once; the results are the same.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import warnings

import torch


COMPILE_LOCK = threading.RLock()
"""Held while a :class:`Graphs` compiles and captures a function (``compile=True``). dynamo's
tracing is process-wide: a ``torch.compile``'d function called in one thread while another
traces raises. Code that runs compiled functions beside a thread that may capture holds this
lock around them (the streaming runner does, around a chunk's passes, when compiled)."""


class Graphs:
    """A bounded cache of captured functions, safe to call from several threads.

    Args:
        size: graphs kept (least recently used dropped first); each holds its inputs'
            copies and a private memory pool for its intermediates.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self._entries: collections.OrderedDict = collections.OrderedDict()  # key -> _Entry | "seen"
        self._lock = threading.Lock()  # one replay at a time: the static buffers are shared

    def __call__(self, key, fn, *inputs: torch.Tensor, first=None, compile: bool = False) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` - a tuple of tensors, computed from ``inputs`` alone, with shapes
        fixed by the inputs' and no host syncs - as a fresh tuple (the caller owns it).
        ``key`` names everything else the function depends on (it must be hashable).
        ``first``: what runs instead of ``fn`` where nothing is captured (the CPU, a key's
        first call) - the same result by a way free to sync, e.g. one that stops early.
        ``compile``: capture ``torch.compile(fn)`` (CUDA only; compiled and run once before
        the capture)."""
        first = first or fn
        if not inputs[0].is_cuda:
            return first(*inputs)
        key = (key, compile, tuple((t.shape, t.dtype, t.device) for t in inputs))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._put(key, "seen")
                return first(*inputs)  # eagerly: lazy initialisation (Triton, cuBLAS) happens outside a capture
            if entry == "seen":
                entry = _Entry.capture(fn, inputs, compile)
            self._put(key, entry)
            return entry.replay(inputs)

    def clear(self):
        """Drop every graph (and its memory)."""
        with self._lock:
            for entry in self._entries.values():
                if isinstance(entry, _Entry):
                    entry.done.synchronize()
            self._entries.clear()

    def _put(self, key, entry):
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            _, old = self._entries.popitem(last=False)
            if isinstance(old, _Entry):
                old.done.synchronize()  # its last replay may still be running


class _Entry:
    """One captured function: its graph, the inputs it reads and the outputs it writes."""

    def __init__(self, graph, inputs, outputs):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        self.done = torch.cuda.Event()  # the last replay's end: the next one's copies wait for it

    @classmethod
    def capture(cls, fn, inputs, compile: bool = False) -> _Entry:
        static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # the clones are made
        # not torch.cuda.graph(): it synchronizes the device and empties the allocator's cache
        # first, which would stall a stream running on the main thread. thread_local: that
        # thread may launch and sync while this one captures
        with torch.cuda.device(device), torch.cuda.stream(side), COMPILE_LOCK if compile else contextlib.nullcontext():
            if compile:
                fn = _compile(fn, static)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = tuple(fn(*static))
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        entry = cls(graph, static, outputs)
        entry.done.record(torch.cuda.current_stream(device))
        return entry

    def replay(self, inputs) -> tuple[torch.Tensor, ...]:
        with torch.cuda.device(inputs[0].device):
            torch.cuda.current_stream().wait_event(self.done)  # a replay on another stream is done
            for static, value in zip(self.inputs, inputs):
                static.copy_(value)
            self.graph.replay()
            outputs = tuple(t.clone() for t in self.outputs)
            self.done.record()
        return outputs


def _compile(fn, inputs):
    """``torch.compile(fn)`` (one whole graph, static shapes), compiled now by a call on
    ``inputs`` - outside any capture: a first call compiles, loads kernels and may sync. Past
    dynamo's recompile limit (one compile per captured key) ``fn`` itself, with a warning."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    try:
        compiled(*inputs)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        warnings.warn("torch.compile's recompile limit is reached for this function: capturing it uncompiled "
                      "(raise torch._dynamo.config.recompile_limit to compile more)", stacklevel=4)
        return fn
    except Exception as error:  # e.g. a planner's own postprocess that dynamo cannot trace whole
        raise RuntimeError(f"torch.compile could not compile {_name(fn)} ({error_line(error)}); "
                           "run it with compile=False") from error
    return compiled


def error_line(error: BaseException) -> str:
    """``TypeName: the message's first line`` - a compile failure's cause, short enough for
    the one-line error or warning that falls back from it."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _name(fn) -> str:
    """``Lipar._settle`` for a (partial of a) planner's bound method, else the qualified name."""
    fn = getattr(fn, "func", fn)  # a functools.partial
    owner = getattr(fn, "__self__", None)
    return f"{type(owner).__name__}.{fn.__name__}" if owner is not None else getattr(fn, "__qualname__", repr(fn))


def graph_safe(fn):
    """Mark ``fn`` as safe to capture in a CUDA graph: tensor ops only, shapes fixed by its
    inputs' shapes, no host syncs (``.item()``, ``bool(tensor)``, ``nonzero``), no random
    numbers. A planner's ``postprocess`` marked so is captured with its decisions; unmarked,
    its decisions run eagerly."""
    fn.graph_safe = True
    return fn
