"""Batch jobs from asyncio: `loop.run_in_executor` awaits each job without blocking the loop.

    python examples/asyncio_run_in_executor.py

The event loop keeps serving (here: a heartbeat) while the jobs run;
`asyncio.gather` collects their results in order. A cloudexec future is a real
`concurrent.futures.Future`, so `asyncio.wrap_future(ex.submit(...))` works too.
"""

from __future__ import annotations

import asyncio
import hashlib

from cloudexec import LocalBatchExecutor


def digest(text: str, rounds: int = 20_000) -> str:
    """A deliberately slow hash chain, standing in for real work."""
    data = text.encode()
    for _ in range(rounds):
        data = hashlib.sha256(data).digest()
    return data.hex()[:12]


async def heartbeat(stop: asyncio.Event) -> int:
    beats = 0
    while not stop.is_set():
        beats += 1
        await asyncio.sleep(0.05)
    return beats


async def main() -> None:
    loop = asyncio.get_running_loop()
    words = ["alpha", "beta", "gamma", "delta"]
    with LocalBatchExecutor(max_workers=4) as ex:
        stop = asyncio.Event()
        beating = asyncio.create_task(heartbeat(stop))
        digests = await asyncio.gather(*(loop.run_in_executor(ex, digest, w) for w in words))
        wrapped = await asyncio.wrap_future(ex.submit(digest, "epsilon"))
        stop.set()
        beats = await beating
    for word, d in zip(words + ["epsilon"], [*digests, wrapped]):
        print(f"{word}: {d}")
    print(f"the event loop stayed responsive: {beats} heartbeats while the jobs ran")


if __name__ == "__main__":
    asyncio.run(main())
