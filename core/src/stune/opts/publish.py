"""Publishing: the model card written into output_dir and the optional Hugging Face Hub upload."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator, model_validator

from stune.options import Field, Options


class PublishOptions(Options):
    push_to_hub: bool = Field(False, description="Upload output_dir to the Hugging Face Hub at the end of training.")
    hub_model_id: str | None = Field(
        None, description="Hub repository to upload to (user/name); created when missing. Needs push_to_hub."
    )
    push_checkpoints_to_hub: bool = Field(
        False,
        description="With push_to_hub, upload each checkpoint-<step>/ folder to the repository as soon as it is "
        "saved (a failed upload is logged and retried at the end, never stops training).",
    )
    push_to_hub_background: bool = Field(
        False,
        description="Upload the checkpoints (push_checkpoints_to_hub) while training goes on, instead of "
        "waiting for each upload; the final upload is always waited for.",
    )
    model_card_private: bool = Field(True, description="Create the Hub repository as private.")
    model_card_safe_for_work: bool = Field(
        False, description="Declare the validation images safe for work (otherwise tagged not-for-all-audiences)."
    )
    model_card_note: str | None = Field(None, description="A note placed at the top of the model card.")
    modelspec_comment: str | None = Field(
        None,
        description="Text written as `modelspec.comment` into the safetensors metadata of every saved adapter "
        "file (checkpoints and the final export); {current_step}, {model_family} and {env:NAME} are filled in.",
    )
    post_upload_script: str | None = Field(
        None,
        description="Command run (no shell, in the background) after each upload (the Hub, then every "
        "publishing_config provider); {huggingface_path}, {remote_checkpoint_path} (the repository or "
        "folder URI), {output_dir}, {model_family} … are filled in.",
    )
    publishing_config: str | dict[str, Any] | list[dict[str, Any]] | None = Field(
        None,
        description="Upload output_dir at the end of training to storage providers besides the Hub: a JSON "
        'file or an object/list of {"provider": s3|backblaze_b2|azure_blob|dropbox, "base_path", '
        '"include_checkpoints", and the provider\'s keys} (stune-publish; docs/tracking.md).',
    )

    @field_validator("publishing_config")
    @classmethod
    def _publishing_config(cls, value: Any) -> Any:
        from stune.publishing import read_entries

        read_entries(value)  # the shape; providers and their keys are checked with the plugins loaded
        return value

    @model_validator(mode="after")
    def _hub_repo(self) -> PublishOptions:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("`push_to_hub` needs `hub_model_id` (the Hub repository, user/name); set it")
        if self.hub_model_id is not None and self.hub_model_id.count("/") > 1:
            raise ValueError(f"`hub_model_id` {self.hub_model_id!r} is not a repository id of the form user/name")
        return self
