"""Serving wesam: a BentoML HTTP service and a KServe-v2 gRPC endpoint over SAM + domain adapters.

Layering: ``service`` imports ``export`` and ``adapters``; nothing imports ``service``. Modules:
``config`` (WESAM_SERVE_* settings), ``codec`` (images in, masks out), ``requests`` / ``schemas``
(HTTP bodies), ``cache`` (embedding LRU), ``runtime`` (torch / ONNX Runtime), ``router`` (domain ->
adapter version, registry reload), ``engine`` (the pipeline), ``front`` (HTTP front logic),
``admin`` (adapter admin API), ``grpc_server`` (KServe v2), ``metrics``, ``service`` (the BentoML
classes), ``cli`` (``wesam serve``), ``launch`` (start a server process). See docs/serving.md.
"""
