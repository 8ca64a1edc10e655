"""LoRA for SAM's image encoder (and, optionally, its mask decoder): config, adapter layer, injection/merge logic.

A small module rather than PEFT: SAM fuses q, k and v into one ``qkv`` Linear, and the WeSAM
recipe adapts the q and v *slices* of that layer only. PEFT's LoRA wraps whole Linear layers, so
it could only adapt all of qkv (k included). Here each target is an output slice of a Linear,
which expresses q/v-only LoRA exactly and keeps several named adapters resident on one base.
"""

from .config import (
    DECODER_TARGETS,
    DEFAULT_ADAPT_TARGETS,
    ENCODER_QV,
    ENCODER_TARGETS,
    TARGETS,
    LoraConfig,
)
from .layer import LoraLinear
from .merge import merge_and_unload, merged_decoder, plain_state_dict
from .model import (
    active_adapter,
    adapter_names,
    adapter_state,
    add_adapter,
    delete_adapter,
    load_adapter_state,
    lora_layers,
    lora_named_layers,
    merge_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    use_adapter,
)

__all__ = [
    "DECODER_TARGETS",
    "DEFAULT_ADAPT_TARGETS",
    "ENCODER_QV",
    "ENCODER_TARGETS",
    "TARGETS",
    "LoraConfig",
    "LoraLinear",
    "active_adapter",
    "adapter_names",
    "adapter_state",
    "add_adapter",
    "delete_adapter",
    "load_adapter_state",
    "lora_layers",
    "lora_named_layers",
    "merge_adapter",
    "merge_and_unload",
    "merged_decoder",
    "plain_state_dict",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "use_adapter",
]
