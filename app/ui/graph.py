"""A workflow's steps laid out as a graph: one column per depth, edges from each
dependency. Pure: the run page's template draws it as SVG."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NODE_W, NODE_H, COL_W, ROW_H, PAD = 160, 44, 210, 66, 16


@dataclass(frozen=True)
class Node:
    id: str
    status: str
    x: int
    y: int


@dataclass(frozen=True)
class Edge:
    path: str


@dataclass(frozen=True)
class Graph:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int
    node_w: int = NODE_W
    node_h: int = NODE_H


def layout(steps: list[Any]) -> Graph:
    """Place each step (``id``, ``depends_on``, ``status``) in the column of its depth
    (the longest chain of dependencies before it), in spec order within a column."""
    by_id = {s.id: s for s in steps}
    depth: dict[str, int] = {}

    def depth_of(step_id: str, seen: frozenset[str] = frozenset()) -> int:
        if step_id not in depth:
            deps = [d for d in by_id[step_id].depends_on if d in by_id and d not in seen]
            inner = seen | {step_id}
            depth[step_id] = 1 + max((depth_of(d, inner) for d in deps), default=-1)
        return depth[step_id]

    rows: dict[int, int] = {}
    place: dict[str, tuple[int, int]] = {}
    nodes = []
    for s in steps:
        col = depth_of(s.id)
        row = rows.get(col, 0)
        rows[col] = row + 1
        x, y = PAD + col * COL_W, PAD + row * ROW_H
        place[s.id] = (x, y)
        nodes.append(Node(s.id, str(s.status), x, y))
    edges = []
    for s in steps:
        x2, y2 = place[s.id]
        for dep in s.depends_on:
            if dep not in place:
                continue
            x1, y1 = place[dep]
            sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H // 2, x2, y2 + NODE_H // 2
            mid = (sx + ex) // 2
            edges.append(Edge(f"M{sx},{sy} C{mid},{sy} {mid},{ey} {ex},{ey}"))
    width = PAD * 2 + (max(rows, default=0)) * COL_W + NODE_W
    height = PAD * 2 + max(rows.values(), default=1) * ROW_H
    return Graph(nodes, edges, width, height)
