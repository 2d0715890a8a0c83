"""Lookups over an ONNX graph shared by the lint and the Q/DQ placement."""

from __future__ import annotations

from typing import Any


def producers_and_consumers(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(tensor name -> the node that writes it, tensor name -> the nodes that read it, in graph order)."""
    producer: dict[str, Any] = {}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.output:
            producer[name] = node
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    return producer, consumers
