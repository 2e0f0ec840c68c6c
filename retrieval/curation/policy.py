"""Which member of a duplicate group survives (the representative).

Default `highest-resolution`: the copy with the most pixels carries the most information (a
thumbnail or a downscaled re-post never wins over its original); ties go to the larger file (less
compression), then the shorter path, then the lower id, so the choice is deterministic.
Members of a reference set always win over corpus images (see dedup.py), and under every policy a
real file wins over a symbolic link (moving the real file out would leave the kept link dangling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from retrieval.errors import RetrievalError

POLICIES = ("highest-resolution", "largest", "oldest", "shortest-path", "first")
DEFAULT_POLICY = "highest-resolution"


@dataclass(frozen=True)
class Candidate:
    id: int
    path: str
    size: int
    width: int
    height: int
    mtime_ns: int
    is_link: bool = False  # a symbolic link inside the corpus (to a file the group may also hold)


def _key(policy: str) -> Callable[[Candidate], tuple]:
    tail = lambda c: (len(c.path), c.path, c.id)  # noqa: E731
    keys: dict[str, Callable[[Candidate], tuple]] = {
        "highest-resolution": lambda c: (-c.width * c.height, -c.size, *tail(c)),
        "largest": lambda c: (-c.size, -c.width * c.height, *tail(c)),
        "oldest": lambda c: (c.mtime_ns, *tail(c)),
        "shortest-path": lambda c: tail(c),
        "first": lambda c: (c.id,),  # first indexed
    }
    try:
        key = keys[policy]
    except KeyError:
        raise RetrievalError(f"unknown keep policy {policy!r}; choose one of {', '.join(POLICIES)}") from None
    return lambda c: (c.is_link, *key(c))  # under every policy a real file wins over a link


def choose(members: list[Candidate], policy: str = DEFAULT_POLICY) -> Candidate:
    """The member to keep under `policy`."""
    if not members:
        raise ValueError("an empty group has no representative")
    return min(members, key=_key(policy))


def check_policy(policy: str) -> str:
    _key(policy)
    return policy
