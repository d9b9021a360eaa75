"""ttt-hf: long-context models and caches for Hugging Face transformers.

Importing the package registers its models with the Auto* classes and PEFT.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .ttt.cache_ttt import TTTCache
from .ttt.configuration_ttt import TTTConfig
from .ttt.modeling_ttt import TTTForCausalLM, TTTModel, TTTPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(TTTConfig.model_type, TTTConfig, exist_ok=True)
AutoModel.register(TTTConfig, TTTModel, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)
# save_pretrained copies the model code next to the weights (trust_remote_code=True loading).
TTTConfig.register_for_auto_class()
TTTModel.register_for_auto_class("AutoModel")
TTTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# Default LoRA targets, looked up by model_type when LoraConfig has no target_modules.
PEFT_TARGET_MODULES = {TTTConfig.model_type: ["q_proj", "v_proj"]}


def _register_peft_targets() -> None:
    try:
        from peft.utils import constants
    except ImportError:
        return
    for model_type, targets in PEFT_TARGET_MODULES.items():
        constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, targets)


_register_peft_targets()

__all__ = ["TTTCache", "TTTConfig", "TTTForCausalLM", "TTTModel", "TTTPreTrainedModel", "__version__"]
