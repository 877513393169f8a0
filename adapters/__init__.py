"""Expert formats and loaders: LoRA and dense-delta experts, PEFT directories, fine-tune diffs, merges."""

from moerge.adapters.delta import expert_from_diff, low_rank_factors
from moerge.adapters.expert import DeltaWeights, Expert, ExpertMetadata, LoRAWeights, ModuleWeights
from moerge.adapters.merge import list_merge_methods, merge_module, register_merge
from moerge.adapters.peft_loader import load_peft_lora

__all__ = [
    "Expert", "ExpertMetadata", "LoRAWeights", "DeltaWeights", "ModuleWeights",
    "load_peft_lora", "expert_from_diff", "low_rank_factors", "merge_module", "register_merge",
    "list_merge_methods",
]
