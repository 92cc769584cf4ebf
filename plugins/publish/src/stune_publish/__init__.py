"""stune-publish: storage providers for ``publishing_config`` (S3, Backblaze B2, Azure Blob, Dropbox).

Registration only; the providers import their SDKs when a run uploads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import stune


@stune.hookimpl
def register_publishers(register: Callable[[Any], None]) -> None:
    from stune_publish.providers import S3, AzureBlob, BackblazeB2, Dropbox

    for provider in (S3, BackblazeB2, AzureBlob, Dropbox):
        register(provider)
