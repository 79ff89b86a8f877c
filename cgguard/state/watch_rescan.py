"""State: finding the cgroup tree again after lost inotify events (a queue overflow, or watches
the kernel refused), for :class:`~cgguard.state.watch_tree.CgroupTree`.

The rescan is a generator of small steps, so the agent's loop can carry it out in slices between
its other work: the thousands of cgroups a tenant makes to overflow the queue take seconds to
walk, and meanwhile bombs elsewhere are still sampled and removed.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from cgguard.state.watch_tree import CgroupTree, Node


def rescan_steps(tree: CgroupTree) -> Iterator[list[tuple[Node, str]]]:
    """The rescan, one cgroup at a time: the walk from the root, then every watched cgroup's
    ``cgroup.events`` read again (a "populated" change lost with the events)."""
    new: set[int] = set()
    root = tree.nodes.get("")
    if root is not None:
        yield from walk(tree, root, new)
    for n in list(tree.nodes.values()):
        # A node just added read its cgroup.events.
        if n.watched and id(n) not in new and tree.nodes.get(n.rel) is n:
            was = n.populated
            tree._read_events(n)
            if n.populated and not was:
                yield [(n, "added")]
                continue
            if was and not n.populated:
                yield [(n, "events")]
                continue
        yield []


def walk(tree: CgroupTree, top: Node, new: set[int]) -> Iterator[list[tuple[Node, str]]]:
    """Bring the tree below ``top`` in line with cgroupfs, one cgroup at a time, top levels first
    (where a tenant's new cgroups hang, found before the thousands of leaves that overflowed the
    queue): drop what is gone, add what is new (its id into ``new``; each watched one yielded as
    'added'). Between steps the loop may handle inotify events (a cgroup made or removed
    meanwhile): every step checks that what it holds is still known."""
    queue = deque([top])
    while queue:
        node = queue.popleft()
        if tree.nodes.get(node.rel) is not node:
            continue  # removed since it was found
        listed = tree.fs.children(node.rel)
        names = {rel.rsplit("/", 1)[-1] for rel in listed}
        for name, child in list(node.children.items()):
            if name not in names:
                tree._remove(child)
        for child_rel in listed:
            child = node.children.get(child_rel.rsplit("/", 1)[-1])
            if child is None:
                child = tree._add(child_rel, node)
                if child is None:
                    continue
                new.add(id(child))
                # One step per cgroup added (a parent may have 16,000 new children).
                yield [(child, "added")] if child.watched else []
                if tree.nodes.get(node.rel) is not node:
                    break  # removed meanwhile, with what was added below it
            queue.append(child)
        yield []


def add_path(tree: CgroupTree, rel: str) -> list[Node]:
    """Know ``rel`` and the cgroups above it now (a verdict names a cgroup whose creation was
    lost with an overflow, before the rescan reached it). Returns the watched ones added."""
    node = tree.nodes.get("")
    added: list[Node] = []
    cur = ""
    for part in rel.strip("/").split("/") if rel.strip("/") else ():
        cur = f"{cur}/{part}" if cur else part
        nxt = tree.nodes.get(cur)
        if nxt is None and node is not None:
            nxt = tree._add(cur, node)
            if nxt is not None:
                added.append(nxt)
        if nxt is None:
            break
        node = nxt
    return [n for n in added if n.watched]
