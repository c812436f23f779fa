"""The GPT model: TP-aware layers, the DeepSpeed pipeline form and the single-process reference."""

from megaclone.model.gpt import GPT, TransformerBlock
from megaclone.model.init import init_params, init_value, load_global_params
from megaclone.model.pipeline import (
    block_modules,
    build_pipeline_module,
    global_named_parameters,
    pipeline_to_global_name,
)
from megaclone.model.reference import ReferenceGPT

__all__ = ["GPT", "ReferenceGPT", "TransformerBlock", "block_modules", "build_pipeline_module",
           "global_named_parameters", "init_params", "init_value", "load_global_params", "pipeline_to_global_name"]
