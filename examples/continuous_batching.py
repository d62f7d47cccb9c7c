"""Continuous batching: a toy token generator whose batch stays full as requests come and go.

Each request asks for a number of tokens. The generator runs one "forward pass" per
step for everyone in the batch; between steps, requests that got all their tokens
leave and queued requests take their places, so nobody waits for the longest
request of a batch to finish.

Run: python examples/continuous_batching.py
"""

import asyncio

import streamwise

VOCAB = "the quick brown fox jumps over a lazy dog while streams arrive token by token".split()


@streamwise.deployment(max_ongoing_requests=32)
class TokenGenerator:
    def __init__(self) -> None:
        self.history: list[tuple[int, int, list[str], list[str]]] = []

    @streamwise.batch(max_batch_size=4, batch_wait_timeout_s=0.005, continuous=True)
    async def generate(self, batch: streamwise.ContinuousBatch):
        """Callers pass (prompt, max_tokens) and receive a stream of tokens."""
        emitted: dict[streamwise.BatchRequest, int] = {}  # per-request state (a KV cache, say)
        async for step in batch:
            for request in step.joined:
                emitted[request] = 0
            for request in step.left:
                del emitted[request]
            if step.joined or step.left:
                self.history.append(
                    (
                        step.index,
                        len(step.requests),
                        [request.item[0] for request in step.joined],
                        [request.item[0] + (" (cancelled)" if request.cancelled else "") for request in step.left],
                    )
                )
            await asyncio.sleep(0.01)  # one forward pass for the whole batch
            tokens = []
            for request in step.requests:
                prompt, max_tokens = request.item
                done = emitted[request]
                if done == max_tokens:
                    tokens.append(StopIteration())  # this caller's stream ends here
                else:
                    tokens.append(VOCAB[(sum(map(ord, prompt)) + done) % len(VOCAB)])
                    emitted[request] = done + 1
            yield tokens

    async def membership_changes(self) -> list[tuple[int, int, list[str], list[str]]]:
        return self.history


REQUESTS = [  # (prompt, max_tokens, seconds after start)
    ("alpha", 12, 0.0),
    ("beta", 3, 0.0),
    ("gamma", 5, 0.0),
    ("delta", 8, 0.0),
    ("epsilon", 4, 0.02),  # the batch is full: joins when beta finishes
    ("zeta", 6, 0.05),
    ("eta", 2, 0.12),
]


async def ask(handle: streamwise.DeploymentHandle, prompt: str, max_tokens: int, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    words = [word async for word in handle.generate.remote((prompt, max_tokens))]
    print(f"{prompt:>8}: {' '.join(words)}", flush=True)


async def client(handle: streamwise.DeploymentHandle) -> None:
    await asyncio.gather(*(ask(handle, *request) for request in REQUESTS))
    print("\nbatch membership, step by step:")
    for index, size, joined, left in await handle.membership_changes.remote():
        print(f"  step {index:>2}: {size} in batch; joined {joined or '-'}; left {left or '-'}")


def main() -> None:
    handle = streamwise.run(TokenGenerator.bind())
    try:
        asyncio.run(client(handle))
    finally:
        streamwise.shutdown()


if __name__ == "__main__":
    main()
