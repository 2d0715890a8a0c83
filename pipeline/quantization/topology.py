"""Node order: the ONNX spec requires `graph.node` to be topologically sorted.

onnxruntime.quantization's QDQQuantizer appends the Q/DQ nodes it creates to
the end of `graph.node` and leaves the sorting to `ONNXModel.save_model_to_file`
(what `quantize_static` calls); qdq.py drives the quantizer directly and saves
the model itself, so it sorts here. ONNX Runtime sorts on load and never
noticed; `onnx.checker.check_model(full_check=True)`, `polygraphy check lint`
and any tool that reads the nodes in file order reject an unsorted graph.
"""

from __future__ import annotations

from typing import Iterator

import onnx

__all__ = ["sort_nodes_topologically"]


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _outer_scope_inputs(node: onnx.NodeProto) -> set[str]:
    """Names the node's subgraphs (If/Loop/Scan bodies) read from the enclosing graph: implicit inputs."""
    names: set[str] = set()
    for graph in _subgraphs(node):
        local = ({value.name for value in graph.input} | {init.name for init in graph.initializer}
                 | {init.values.name for init in graph.sparse_initializer}
                 | {output for inner in graph.node for output in inner.output})
        for inner in graph.node:
            names |= {name for name in (*inner.input, *_outer_scope_inputs(inner)) if name and name not in local}
    return names


def sort_nodes_topologically(graph: onnx.GraphProto) -> bool:
    """Order graph.node so every node comes after the producers of its inputs, in place; True if it moved any.

    Stable: an already sorted graph keeps its order exactly (and its proto untouched); otherwise each node
    is emitted at its original position, after its not yet emitted producers (in their original order), so
    a Q/DQ node the quantizer appended lands just before its first consumer. Nodes are moved, never changed.
    Graph inputs, initializers (dense and sparse), empty optional inputs ("") and names no node produces
    (for the checker to report) add no dependency; a node's subgraphs' outer-scope reads count as its inputs.
    Raises ValueError on a cycle.
    """
    nodes = list(graph.node)
    available = ({value.name for value in graph.input} | {init.name for init in graph.initializer}
                 | {init.values.name for init in graph.sparse_initializer})
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for output in node.output:
            if output:
                producer.setdefault(output, index)
    dependencies = [
        sorted({producer[name] for name in (*node.input, *_outer_scope_inputs(node))
                if name and name not in available and name in producer})
        for node in nodes
    ]
    order: list[int] = []
    state = [0] * len(nodes)  # 0: not visited, 1: on the path being emitted, 2: emitted
    for root in range(len(nodes)):
        if state[root]:
            continue
        state[root] = 1
        path = [(root, iter(dependencies[root]))]
        while path:  # iterative depth-first: chains of thousands of nodes exceed Python's recursion limit
            index, pending = path[-1]
            for dependency in pending:
                if state[dependency] == 1:
                    raise ValueError(f"graph {graph.name!r} has a cycle through node {nodes[dependency].name!r}")
                if state[dependency] == 0:
                    state[dependency] = 1
                    path.append((dependency, iter(dependencies[dependency])))
                    break
            else:
                path.pop()
                state[index] = 2
                order.append(index)
    if order == list(range(len(nodes))):
        return False
    reordered = [nodes[index] for index in order]
    graph.ClearField("node")
    graph.node.extend(reordered)
    return True
