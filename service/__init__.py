"""Serving wesam: a BentoML HTTP service and a KServe-v2 gRPC endpoint over SAM + domain adapters.

Layering: ``wesam.service`` imports ``wesam.export``, ``wesam.adapters`` and the model core; only
``wesam.cli`` and ``wesam.bench`` import it. Modules: ``config`` (WESAM_SERVE_* settings),
``errors`` (error kinds and their HTTP statuses), ``codec`` (images in, masks out), ``prompts``
(prompt validation shared by HTTP and gRPC), ``requests`` / ``schemas`` (HTTP bodies), ``messages``
(front <-> runtime), ``cache`` (embedding LRU), ``runtime`` (torch / ONNX Runtime), ``router``
(domain -> adapter version, registry reload, activation), ``engine`` (the pipeline), ``batcher``
(bounded admission queue and model threads: batching, overload refusals), ``host`` (engine + batcher
+ gRPC endpoint of the process that holds the model), ``front`` (HTTP front logic), ``admin``
(adapter admin API), ``grpc_server`` (KServe v2, with its gRPC codes), ``metrics``, ``capture``
(capture of served requests for online self-training),
``service`` (the BentoML classes), ``cli`` (``wesam serve``), ``launch``
(start a server process). See docs/serving.md.
"""
