"""Several processes from the config: how many and where (``st-train`` relaunches itself through
``accelerate launch``), and how the model is sharded (FSDP) or handed to DeepSpeed.

Mechanisms: :mod:`stune.launch` (relaunch) and :mod:`stune.sharding` (FSDP, DeepSpeed).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import field_validator, model_validator

from stune.options import Field, Options, json_list


class DistributedOptions(Options):
    num_processes: int = Field(
        1,
        ge=1,
        description="Training processes in all (one per GPU); above 1 st-train relaunches itself with accelerate.",
    )
    num_machines: int = Field(1, ge=1, description="Machines taking part (multi-node training).")
    machine_rank: int = Field(0, ge=0, description="This machine's rank among num_machines.")
    main_process_ip: str | None = Field(None, description="Address of the rank-0 machine (multi-node).")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Port of the rank-0 process.")
    accelerate_config: str | None = Field(
        None, description="An accelerate config file (YAML/JSON) handed to `accelerate launch --config_file`."
    )
    accelerate_extra_args: str | None = Field(
        None, description="More `accelerate launch` arguments, as one string (e.g. `--gpu_ids 0,1`)."
    )
    fsdp_enable: bool = Field(False, description="Shard the transformer across the processes with FSDP.")
    fsdp_version: int = Field(2, ge=1, le=2, description="FSDP 2 (torch fully_shard, preferred) or 1 (CUDA only).")
    fsdp_reshard_after_forward: bool = Field(
        True, description="Free the gathered weights after each block's forward (less memory, one more gather)."
    )
    fsdp_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = Field(
        "SHARDED_STATE_DICT",
        description="How checkpoints keep the optimizer state: gathered on rank 0, or one shard per process "
        "(torch.distributed.checkpoint). Adapters are always saved whole.",
    )
    fsdp_cpu_ram_efficient_loading: bool = Field(
        False, description="Only rank 0 keeps the loaded weights; the others receive their shards from it."
    )
    fsdp_auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = Field(
        "TRANSFORMER_BASED_WRAP", description="Which modules are sharded units: transformer blocks, big modules, none."
    )
    fsdp_transformer_layer_cls_to_wrap: list[str] | None = Field(
        None, description="Block classes sharded as units; default: the family's block classes (its token layout)."
    )
    fsdp_min_num_params: int = Field(
        100_000_000, ge=1, description="SIZE_BASED_WRAP: modules with at least this many parameters are units."
    )
    fsdp_activation_checkpointing: bool = Field(
        False, description="Recompute each sharded block in backward (replaces gradient_checkpointing)."
    )
    fsdp_cpu_offload: bool = Field(False, description="Keep the parameter shards on the CPU (CUDA only).")
    fsdp_limit_all_gathers: bool = Field(True, description="FSDP 1: rate-limit all-gathers (less memory).")
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed config: a JSON file path, or the JSON object itself (needs deepspeed, CUDA)."
    )

    @field_validator("fsdp_transformer_layer_cls_to_wrap", mode="before")
    @classmethod
    def _wrap_list(cls, value: Any) -> Any:
        return json_list(value)

    @field_validator("deepspeed_config", mode="before")
    @classmethod
    def _deepspeed_json(cls, value: Any) -> Any:
        return json.dumps(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _distributed_combinations(self) -> DistributedOptions:
        if self.fsdp_enable and self.deepspeed_config:
            raise ValueError("`fsdp_enable` and deepspeed_config are two ways to shard; keep one of them")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"`machine_rank` {self.machine_rank} must be below num_machines ({self.num_machines})")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("`num_machines` above 1 needs main_process_ip (the address of machine 0)")
        return self

    @property
    def deepspeed_settings(self) -> dict[str, Any] | None:
        """The DeepSpeed config as a dict (read from its file when a path was given)."""
        if not self.deepspeed_config:
            return None
        text = self.deepspeed_config.strip()
        if text.startswith("{"):
            data: Any = json.loads(text)
        else:
            from stune.jsonfile import read_json

            data = read_json(text, "DeepSpeed config (deepspeed_config)")
        if not isinstance(data, dict):
            raise ValueError("deepspeed_config must be a JSON object")
        return data
