"""`evomerge export --push-to-hub REPO`: upload an export folder as a Hugging Face model repo."""

from __future__ import annotations

from pathlib import Path


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export folder as a Hub model repo (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    from evomerge.merge.io import MARKER

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        ignore_patterns=[MARKER],
        commit_message="Upload merge exported by evomerge",
    )
    return str(getattr(info, "commit_url", info))
