"""Model stage: load a causal LM, add adapters, name its parameter groups. Knows no data.

    load.py      Hugging Face folder or name, GGUF, 4-bit; checks; loading a trained run back
    adapters.py  LoRA/rsLoRA, trained embeddings (float32 masters, tied weights), saving trained tensors
    groups.py    parameter groups and their learning rates
    vocab.py     vocabulary extension: new tokens learned from a corpus, their rows started from their pieces
"""
from cpt.model.adapters import (FUSED_PROJECTIONS, ROW_SPARSE, SPLIT_MASTER, add_adapters, add_token_rows, load_adapter_weights, enable_gradient_checkpointing,
                                load_trainable_state, mark_split_master, save_trained, sparse_gradients,
                                trainable_state, trained_embedding_modules)
from cpt.model.groups import GROUP_ADAPTER, GROUP_EMBEDDINGS, GROUP_NO_DECAY, param_groups
from cpt.model.load import (check_against_model, check_device, load_base_model, load_for_inference, load_model_config,
                            load_tokenizer)

__all__ = ["FUSED_PROJECTIONS", "ROW_SPARSE", "SPLIT_MASTER", "add_adapters", "add_token_rows", "load_adapter_weights", "enable_gradient_checkpointing", "load_trainable_state",
           "mark_split_master", "save_trained", "sparse_gradients", "trainable_state", "trained_embedding_modules",
           "GROUP_ADAPTER", "GROUP_EMBEDDINGS", "GROUP_NO_DECAY", "param_groups", "check_against_model", "check_device",
           "load_base_model", "load_for_inference", "load_model_config", "load_tokenizer"]
