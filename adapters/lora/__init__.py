"""LoRA for SAM's image encoder: config, adapter layer, and injection/merge logic.

A small module rather than PEFT: SAM fuses q, k and v into one ``qkv`` Linear, and the WeSAM
recipe adapts the q and v *slices* of that layer only. PEFT's LoRA wraps whole Linear layers, so
it could only adapt all of qkv (k included). Here each target is an output slice of a Linear,
which expresses q/v-only LoRA exactly and keeps several named adapters resident on one base.
"""

from .config import TARGETS, LoraConfig
from .layer import LoraLinear
from .merge import merge_and_unload, plain_state_dict
from .model import (
    active_adapter,
    adapter_names,
    adapter_state,
    add_adapter,
    delete_adapter,
    load_adapter_state,
    lora_layers,
    merge_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    use_adapter,
)

__all__ = [
    "LoraConfig", "TARGETS", "LoraLinear", "active_adapter", "add_adapter", "adapter_names",
    "delete_adapter", "load_adapter_state", "lora_layers", "merge_adapter", "adapter_state",
    "set_adapter", "trainable_parameters", "unmerge_adapter", "use_adapter", "merge_and_unload",
    "plain_state_dict",
]
