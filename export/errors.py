"""The export layer's error type and defaults, free of heavy imports (the CLI parser uses them)."""


from wesam.errors import WesamError


class ExportError(WesamError, RuntimeError):
    """An export could not be made or an export directory is invalid (the CLI exits 2)."""

    kind = "export"


DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17; TensorRT 10 and ORT >= 1.14 support it
DEFAULT_MIN_IOU = 0.99
