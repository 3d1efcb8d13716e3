"""A spy on the demo generation pipeline: the keyword arguments of every call, in order."""

from __future__ import annotations


def spy_on_pipeline(monkeypatch) -> list[dict]:
    """Record the keyword arguments of each RetrievalDiffusionPipeline call (the call still
    runs); the list is filled as calls happen."""
    from dprdm.generation.pipeline import RetrievalDiffusionPipeline

    calls: list[dict] = []
    original = RetrievalDiffusionPipeline.__call__

    def spy(self, conditions, *args, **kwargs):
        calls.append(kwargs)
        return original(self, conditions, *args, **kwargs)

    monkeypatch.setattr(RetrievalDiffusionPipeline, "__call__", spy)
    return calls
