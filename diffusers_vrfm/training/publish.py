"""Publishing a trained pipeline folder to the Hugging Face Hub with `create_repo` and `upload_folder`."""

from __future__ import annotations

from huggingface_hub import create_repo, upload_folder

# What never goes to the Hub: training checkpoints, logs, validation images of intermediate steps, temporary files.
UPLOAD_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    ".tmp-*",
    ".tmp-*/**",
    "logs/**",
    "validation/**",
    "*.tmp-*",
]


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Creates (or reuses) the model repository and returns its full id (`user/name`)."""
    return create_repo(repo_id, exist_ok=True, token=token, private=private, repo_type="model").repo_id


def upload_pipeline_folder(
    output_dir: str, repo_id: str, token: str | None = None, commit_message: str = "Upload VRFM pipeline"
):
    """Uploads the pipeline folder: model_index.json, weights, remote-code files, README.md and the sample grid,
    but no checkpoints or logs (see `UPLOAD_IGNORE_PATTERNS`)."""
    return upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
        token=token,
        repo_type="model",
    )
