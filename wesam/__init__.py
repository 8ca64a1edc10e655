"""wesam: adapt Segment-Anything to new domains with weak labels, export it, and serve it.

Layers, each importing only the ones below it (checked by ``lint-imports``)::

    wesam.cli, wesam.bench      command line and benchmarks
    wesam.service               HTTP + gRPC serving           (folder service/)
    wesam.client                the service's Python client   (beside wesam.service: neither imports
                                the other; it imports only wesam.errors and wesam.version)
    wesam.export                merged weights, ONNX, TensorRT, Triton (folder export/)
    wesam.adapters              LoRA, WeSAM adaptation, adapter artifacts and registry (folder adapters/)
    model core                  wesam.pretrain, wesam.evaluation, wesam.sam, wesam.data,
                                wesam.losses, wesam.errors, wesam.version
"""

from .version import __version__

__all__ = ["__version__"]
