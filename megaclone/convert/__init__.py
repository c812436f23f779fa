"""Offline checkpoint conversion: change TP and PP, and optionally HyperClone-widen, in one streaming pass.

`plan` checks everything and lists the target files (`jobs`) before anything is written; `run` writes them
target file by target file, row chunk by row chunk, reading only the source byte ranges each chunk
needs; `writer` streams one safetensors file; `carry` adds the optimizer-state files (`--optimizer carry`).
The CLI is tools/reshard_expand.py.
"""

from megaclone.convert.jobs import ConvertError, FileJob, TensorJob
from megaclone.convert.plan import ConversionPlan, ConvertOptions, free_disk_bytes, plan_conversion
from megaclone.convert.run import (
    ABORT_ENV,
    ConversionAborted,
    ConversionReport,
    FileResult,
    VerificationError,
    convert_checkpoint,
    execute_plan,
    tune_process,
    verify_conversion,
)
from megaclone.convert.writer import StreamingShardWriter, planned_file_bytes, safetensors_header

__all__ = ["ABORT_ENV", "ConversionAborted", "ConversionPlan", "ConversionReport", "ConvertError", "ConvertOptions",
           "FileJob", "FileResult", "StreamingShardWriter", "TensorJob", "VerificationError", "convert_checkpoint",
           "execute_plan", "free_disk_bytes", "plan_conversion", "planned_file_bytes", "safetensors_header",
           "tune_process", "verify_conversion"]
