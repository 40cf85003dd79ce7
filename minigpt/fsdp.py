"""trainer=fsdp: Lightning's FSDPStrategy, sharding the model per transformer block.

Each `Block` is its own FSDP unit: its parameters, gradients and optimizer moments are split across the processes
and gathered whole only for its own forward and backward, so a model that does not fit one GPU with its AdamW
moments (about 16 bytes a parameter in mixed precision) trains on several.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from minigpt.model import Block


def fsdp_strategy(
    activation_checkpointing: bool = False,
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    cpu_offload: bool = False,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy with one unit per transformer block; with `activation_checkpointing`, each block's
    activations are recomputed in the backward pass instead of kept (about a third more compute, far less memory).

    PyTorch's FSDP needs an accelerator (on a CPU it stops with "FSDP needs a non-CPU accelerator device"), and
    Lightning refuses `accelerator=cpu` for it before that.
    """
    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
    )
