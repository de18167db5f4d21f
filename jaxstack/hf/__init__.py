"""Hugging Face checkpoints in and out (safetensors): transformers Llama / Qwen2 / Qwen3,
the LLaDA / Dream diffusion-LLM layouts, VILA's NVILA layout and PEFT LoRA adapters.

model = jaxstack.hf.load_model("path/to/Qwen2.5-0.5B", dtype=jnp.bfloat16, mesh=mesh)
jaxstack.hf.save_model(model, "runs/x/hf", dtype=jnp.bfloat16)
model, dcfg = jaxstack.hf.load_dllm("path/to/LLaDA-8B-Instruct", dtype=jnp.bfloat16)
pipe = jaxstack.hf.load_sana("path/to/Sana_1600M_1024px_diffusers")   # diffusers SanaPipeline
jaxstack.hf.load_peft_adapter(model, "path/to/adapter")   # PEFT LoRA adapter (jaxstack/hf/peft.py)
"""

from jaxstack.hf.dcae import load_dcae, save_dcae
from jaxstack.hf.dllm import load_dllm, save_dllm
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm import KEY_TABLE, load_model, save_model
from jaxstack.hf.llm_config import SUPPORTED_ARCHITECTURES, config_from_hf, config_to_hf
from jaxstack.hf.nvila import load_nvila, save_nvila
from jaxstack.hf.peft import load_peft_adapter, save_merged_model, save_peft_adapter
from jaxstack.hf.sana import load_sana, save_sana
from jaxstack.hf.sana_transformer import load_sana_transformer, save_sana_transformer

__all__ = [
    "KEY_TABLE",
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "config_from_hf",
    "config_to_hf",
    "load_dcae",
    "load_dllm",
    "load_model",
    "load_nvila",
    "load_peft_adapter",
    "load_sana",
    "load_sana_transformer",
    "save_dcae",
    "save_dllm",
    "save_model",
    "save_merged_model",
    "save_nvila",
    "save_peft_adapter",
    "save_sana",
    "save_sana_transformer",
]
