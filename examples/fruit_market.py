"""The FruitMarket app, served over gRPC with the built-in schema.

Run:    python examples/fruit_market.py          (serves on port 9000 until Ctrl-C)
or:     streamwise run examples.fruit_market:app --grpc-port 9000
Then:   python examples/fruit_market_client.py
"""

import struct
import threading

import streamwise


@streamwise.deployment
class FruitMarket:
    def __init__(
        self,
        orange_stand: streamwise.DeploymentHandle,
        apple_stand: streamwise.DeploymentHandle,
    ):
        self.directory = {
            "ORANGE": orange_stand,
            "APPLE": apple_stand,
        }

    async def __call__(self, inputs: dict[str, bytes]) -> bytes:
        """Predict: the input map of the built-in schema, the prediction as bytes."""
        costs = 0
        for fruit, amount in inputs.items():
            if fruit not in self.directory:
                continue
            fruit_stand = self.directory[fruit]
            costs += await fruit_stand.remote(int(amount))
        return bytearray(struct.pack("f", costs))


@streamwise.deployment
class OrangeStand:
    def __init__(self):
        self.price = 2.0

    def __call__(self, num_oranges: int):
        return num_oranges * self.price


@streamwise.deployment
class AppleStand:
    def __init__(self):
        self.price = 3.0

    def __call__(self, num_apples: int):
        return num_apples * self.price


app = FruitMarket.bind(OrangeStand.bind(), AppleStand.bind())


if __name__ == "__main__":
    streamwise.run(app, grpc_options=streamwise.GrpcOptions(port=9000))
    print(f"FruitMarket serving gRPC on {streamwise.ingress_address()}; Ctrl-C to stop")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        streamwise.shutdown()
