"""LoRA fine-tuning of the decoder LLM: adapters on chosen projections, frozen base weights.

    from jaxstack.lora import LoRAConfig, apply_lora, merge_lora, LORA_PARAMS
    apply_lora(model, LoRAConfig(rank=16, alpha=32, targets=("q_proj", "k_proj", "v_proj")))
    state, sh = jaxstack.train.step.init_train_state(model, optimizer, mesh, trainable=LORA_PARAMS)
    plain = merge_lora(model)          # W + alpha/rank * A @ B, for jaxstack.hf.save_model

PEFT's on-disk layout (adapter_config.json + adapter_model.safetensors) is read and written by
`jaxstack/hf/peft.py`; the training job's `lora:` section is in `jaxstack/train/sections.py`.
"""

from jaxstack.lora.adapters import (
    ATTENTION_TARGETS,
    BASE_PARAMS,
    LORA_PARAMS,
    MLP_TARGETS,
    TARGETS,
    LoRAConfig,
    apply_lora,
    check_targets,
    dropout_row_seeds,
    lora_config,
    lora_layers,
    lora_params,
    merge_lora,
    remove_lora,
    set_dropout_seeds,
)
from jaxstack.lora.linear import LoRADropoutSeeds, LoRALinear, peft_a_init

__all__ = [
    "ATTENTION_TARGETS",
    "BASE_PARAMS",
    "LORA_PARAMS",
    "MLP_TARGETS",
    "TARGETS",
    "LoRAConfig",
    "LoRADropoutSeeds",
    "LoRALinear",
    "apply_lora",
    "check_targets",
    "dropout_row_seeds",
    "lora_config",
    "lora_layers",
    "lora_params",
    "merge_lora",
    "peft_a_init",
    "remove_lora",
    "set_dropout_seeds",
]
