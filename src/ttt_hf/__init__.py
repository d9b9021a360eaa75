"""ttt-hf: long-context models and caches for Hugging Face transformers.

Importing the package registers its models with the Auto* classes and PEFT. `CACHE_NAME` is the running
transformers release's name of the cache argument: `cache` from 5.24 on, `past_key_values` before.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .block_state.cache_block_state import BlockStateCache
from .block_state.configuration_block_state import BlockStateConfig
from .block_state.modeling_block_state import LORA_TARGET_MODULES as BLOCK_STATE_LORA_TARGET_MODULES
from .block_state.modeling_block_state import BlockStateForCausalLM, BlockStateModel, BlockStatePreTrainedModel
from .tova.cache_tova import TOVACache
from .ttt.cache_ttt import TTTCache
from .ttt.configuration_ttt import TTTConfig
from .ttt.modeling_ttt import CACHE_NAME, TTTForCausalLM, TTTModel, TTTPreTrainedModel
from .ttt.modeling_ttt import LORA_TARGET_MODULES as TTT_LORA_TARGET_MODULES

__version__ = "0.1.0"

for config_class, base_class, causal_lm_class in (
    (TTTConfig, TTTModel, TTTForCausalLM),
    (BlockStateConfig, BlockStateModel, BlockStateForCausalLM),
):
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, base_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, causal_lm_class, exist_ok=True)
    # save_pretrained copies the model code next to the weights (trust_remote_code=True loading).
    config_class.register_for_auto_class()
    base_class.register_for_auto_class("AutoModel")
    causal_lm_class.register_for_auto_class("AutoModelForCausalLM")

# Default LoRA targets by model_type (the model files register them with PEFT when they load).
PEFT_TARGET_MODULES = {
    TTTConfig.model_type: TTT_LORA_TARGET_MODULES,
    BlockStateConfig.model_type: BLOCK_STATE_LORA_TARGET_MODULES,
}

__all__ = [
    "CACHE_NAME",
    "BlockStateCache",
    "BlockStateConfig",
    "BlockStateForCausalLM",
    "BlockStateModel",
    "BlockStatePreTrainedModel",
    "TOVACache",
    "TTTCache",
    "TTTConfig",
    "TTTForCausalLM",
    "TTTModel",
    "TTTPreTrainedModel",
    "__version__",
]
