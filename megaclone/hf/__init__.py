"""Hugging Face interop: import Llama / Mistral / Qwen2 / GPT-NeoX / GPT-2 / OPT / OLMo / OLMo-2 / Gemma checkpoints,
export them back.

`families` maps configs (and refuses what megaclone cannot compute), `export_config` maps them back (and refuses
what a family cannot express), `tensors` maps weights both ways,
`files` reads and writes HF directories, `convert` ties them together. Needs only safetensors to convert;
`transformers` is needed only to run the exported model (the `hf` extra).
"""

from megaclone.hf.convert import export_hf_checkpoint, find_hf_import, import_hf_checkpoint
from megaclone.hf.export_config import config_to_hf, infer_family
from megaclone.hf.families import ARCHITECTURES, FAMILIES, UnsupportedModelError, config_from_hf
from megaclone.hf.files import HFCheckpoint, OutputExistsError, write_hf_dir
from megaclone.hf.tensors import GroupedQKV, Interleaved, Part, Rows, assemble, tensor_map

__all__ = ["ARCHITECTURES", "FAMILIES", "GroupedQKV", "HFCheckpoint", "Interleaved", "OutputExistsError", "Part",
           "Rows", "UnsupportedModelError", "assemble", "config_from_hf", "config_to_hf", "export_hf_checkpoint",
           "find_hf_import", "import_hf_checkpoint", "infer_family", "tensor_map", "write_hf_dir"]
