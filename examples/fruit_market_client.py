"""Client for examples/fruit_market.py: the built-in schema's Predict over gRPC.

Only the import of the generated code differs from a Ray Serve client of the same app.
Run: python examples/fruit_market_client.py [host:port]
"""

import asyncio
import struct
import sys

import grpc

from streamwise.proto import predict_pb2 as serve_pb2
from streamwise.proto import predict_pb2_grpc as serve_pb2_grpc


async def send_request(target="localhost:9000"):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = serve_pb2_grpc.PredictAPIsServiceStub(channel)
        response = await stub.Predict(
            serve_pb2.PredictRequest(
                input={"ORANGE": bytes("10", "utf-8"), "APPLE": bytes("3", "utf-8")}
            )
        )
    return response


async def main(target="localhost:9000"):
    resp = await send_request(target)
    print(struct.unpack("f", resp.prediction))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
