"""Two deployments, one stream: words travel from Tokenizer to Model to you as they are made.

Run: python examples/quickstart.py
"""

import asyncio

import streamwise


@streamwise.deployment(num_replicas=2, max_ongoing_requests=16)
class Tokenizer:
    async def __call__(self, text: str) -> list[str]:
        return text.split()

    async def stream(self, text: str):
        for word in text.split():
            await asyncio.sleep(0.05)  # pretend each word takes work
            yield word


@streamwise.deployment
class Model:
    def __init__(self, tokenizer: streamwise.DeploymentHandle):
        self.tokenizer = tokenizer

    async def generate(self, prompt: str):
        async for word in self.tokenizer.stream.remote(prompt):
            yield word.upper()

    def count(self, prompt: str) -> int:  # sync methods run in the replica's thread pool
        return len(prompt.split())


def main() -> None:
    handle = streamwise.run(Model.bind(Tokenizer.bind()))
    try:
        for word in handle.generate.remote("streams arrive one word at a time"):
            print(word, flush=True)
        print("words:", handle.count.remote("a b c").result())
    finally:
        streamwise.shutdown()


if __name__ == "__main__":
    main()
