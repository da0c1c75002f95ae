"""What one element costs in Redis, by where it is kept: the unit costs behind the per-task
figures of bench/memory.py (see bench/README.md, lean tasks).

    .venv/bin/python bench/memory_units.py

On a private Redis: 100,000 elements of each kind in one key, `used_memory` before and after.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable

import redis

from minicelery.redis_server import RedisServer

N = 100_000
CHUNK = 5_000
ALPHABET = string.digits + string.ascii_letters


def ids(length: int) -> list[str]:
    return ["".join(ALPHABET[b % 62] for b in os.urandom(length)) for _ in range(N)]


def measure(r: redis.Redis, label: str, add: Callable[[redis.client.Pipeline, int], object]) -> None:
    r.flushall()
    before = int(r.info("memory")["used_memory"])
    pipe = r.pipeline(transaction=False)
    for i in range(N):
        add(pipe, i)
        if i % CHUNK == CHUNK - 1:
            pipe.execute()
    pipe.execute()
    print(f"| {label} | {(int(r.info('memory')['used_memory']) - before) / N:.1f} |", flush=True)


def main() -> None:
    print("| one element of | bytes |\n|---|---|")
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        for length in (12, 14, 15, 20, 24):
            key = ids(length)
            for size in (37, 45):
                measure(r, f"hash (hashtable), {length}-char field, {size}-byte value",
                        lambda p, i, k=key, n=size: p.hset("h", k[i], "x" * n))  # fmt: skip
            measure(r, f'hash (hashtable), field "<{length}-char id>:s", value "ready"',
                    lambda p, i, k=key: p.hset("h", k[i] + ":s", "ready"))  # fmt: skip
            measure(r, f"list, {length}-char element", lambda p, i, k=key: p.lpush("l", k[i]))
            measure(r, f"sorted set (skiplist), {length}-char member", lambda p, i, k=key: p.zadd("z", {k[i]: i}))
        key = ids(20)
        measure(r, 'hash (hashtable), field "<20-char id>:d", a 13-digit value',
                lambda p, i: p.hset("h", key[i] + ":d", "1796324515160"))  # fmt: skip
        measure(
            r, "list, a 20-char id and a 45-byte payload in one element", lambda p, i: p.lpush("l", key[i] + "x" * 45)
        )
        measure(r, "set (hashtable), 20-char member", lambda p, i: p.sadd("s", key[i]))
        measure(r, "a key per task: a 2-field hash (listpack)",
                lambda p, i: p.hset("t:" + key[i], mapping={"p": "x" * 37, "s": "ready"}))  # fmt: skip


if __name__ == "__main__":
    main()
