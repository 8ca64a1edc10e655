"""The objects of the process that holds the model: engine, batcher, gRPC endpoint.

With one HTTP worker that process is the worker itself (no model-runtime process, no hop between
them); with several it is the ``SamRuntime`` process the workers call. Either way the model, the
embedding cache, the batcher and the gRPC endpoint exist once, and HTTP and gRPC requests meet in
the same batches.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .config import ServeConfig
from .front import LocalRuntime

if TYPE_CHECKING:
    import grpc

    from .batcher import Batcher
    from .engine import SegmentEngine
    from .metrics import Metrics

log = logging.getLogger("wesam.service")


class ModelHost:
    def __init__(self, engine: SegmentEngine, batcher: Batcher, grpc_server: grpc.Server | None = None) -> None:
        self.engine = engine
        self.batcher = batcher
        self.grpc = grpc_server
        self.runtime = LocalRuntime(engine, batcher)  # the ``RuntimeClient`` of the front and the admin API

    @classmethod
    def start(cls, config: ServeConfig, metrics: Metrics | None = None) -> "ModelHost":
        """Load the model and the adapters, start the registry watcher, the model threads and (when
        ``config.grpc_port`` is set) the gRPC endpoint."""
        from .batcher import Batcher
        from .engine import SegmentEngine

        engine = SegmentEngine.from_config(config, metrics)
        engine.start_watcher()
        batcher = Batcher(engine, config, metrics)
        server = None
        try:
            if config.grpc_port:
                from .grpc_server import start_grpc_server

                server = start_grpc_server(engine, config, metrics, batcher=batcher)
        except BaseException:
            batcher.close()
            engine.close()
            raise
        return cls(engine, batcher, server)

    def status(self) -> dict[str, Any]:
        return {**self.engine.status(), "queue": self.batcher.status()}

    def close(self) -> None:
        """gRPC first (no new requests), then the batcher (finishes what is queued), then the engine
        (registry watcher; capture writes what requests it finished queued)."""
        if self.grpc is not None:
            self.grpc.stop(grace=2).wait(5)
        self.batcher.close()
        self.engine.close()
