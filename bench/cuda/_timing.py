"""Shared by the bench/cuda check scripts: device time per call of a function captured as a CUDA graph."""

from __future__ import annotations

import statistics

import torch


def graph_us(fn, calls: int, reps: int = 50) -> float:
    """Microseconds per call of ``fn`` (which makes ``calls`` calls): warmed up on a side stream, captured as
    one CUDA graph, median of ``reps`` replays timed with CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return replay_us(g, calls, reps)


def replay_us(graph, calls: int = 1, reps: int = 50, warmup: int = 0) -> float:
    """Microseconds per call of an already captured graph (``calls`` calls per replay): ``warmup`` untimed
    replays, then the median of ``reps`` replays timed with CUDA events."""
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)
