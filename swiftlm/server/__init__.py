"""OpenAI-compatible HTTP server. `swiftlm serve` calls `add_serve_arguments` then `serve`."""
from swiftlm.server.app import (
                                         GracefulServer,
                                         add_serve_arguments,
                                         build_app,
                                         run_server,
                                         serve,
)
from swiftlm.server.async_engine import (
                                         AsyncEngine,
                                         EngineInternalError,
                                         EngineOverloadedError,
                                         EngineShutdownError,
)

__all__ = ["AsyncEngine", "EngineInternalError", "EngineOverloadedError", "EngineShutdownError", "GracefulServer",
           "add_serve_arguments", "build_app", "run_server", "serve"]
