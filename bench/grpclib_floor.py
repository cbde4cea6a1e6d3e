# SPDX-License-Identifier: Apache-2.0
"""The floor for a DRA call: a plain grpclib server answering NodeUnprepareResources
at once, on a unix socket, in its own process (the bench calls it with grpcio).

    python -m bench.grpclib_floor <socket path>

Prints "ready" when it serves; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from typing import Any

from grpclib.const import Cardinality, Handler
from grpclib.server import Server

from proto_gen.generated.k8s.io.kubelet.pkg.apis.dra import v1 as dra_v1


class Trivial:
    """DRA v1 NodeUnprepareResources that answers every claim with success."""

    def __mapping__(self) -> Mapping[str, Any]:
        out = {}
        for path, handler in dra_v1.DraPluginBase().__mapping__().items():
            if path.endswith("/NodeUnprepareResources"):
                out[path] = Handler(
                    self.unprepare,
                    Cardinality.UNARY_UNARY,
                    handler.request_type,
                    handler.reply_type,
                )
        return out

    async def unprepare(self, stream: Any) -> None:
        request = await stream.recv_message()
        reply = dra_v1.NodeUnprepareResourcesResponse(
            claims={c.uid: dra_v1.NodeUnprepareResourceResponse() for c in request.claims}
        )
        await stream.send_message(reply)


async def serve(path: str) -> None:
    server = Server([Trivial()])
    await server.start(path=path)
    print("ready", flush=True)
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
