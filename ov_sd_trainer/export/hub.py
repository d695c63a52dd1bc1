"""Upload of an exported OpenVINO pipeline folder to the Hugging Face Hub (`huggingface_hub`): `ov-sd push`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..pipeline_folder import UNET_XML, check_openvino_folder

# Never uploaded: torch training state that can sit next to an export by accident.
EXCLUDE = ["*.pt", "*.pth", "*.safetensors", "checkpoint-*/**", "student/**", ".*"]


def upload_plan(folder: str | Path) -> list[str]:
    """The files `push_to_hub` uploads, relative to the folder (sorted)."""
    import fnmatch

    folder = Path(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in EXCLUDE))


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False, api=None,
                commit_message: str = "Upload OpenVINO int8 pipeline (ov-sd-trainer)") -> str:  # fmt: skip
    """Create the repo (if needed) and upload the OpenVINO folder. Returns the repo URL.

    `api` defaults to `huggingface_hub.HfApi`; tests pass a recording stand-in."""
    folder = Path(folder)
    if not (folder / UNET_XML).is_file() or not (folder / "model_index.json").is_file():
        raise UserError(f"{str(folder)!r} is not an exported OpenVINO pipeline; run `ov-sd export` first")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise UserError(f"repo id {repo_id!r} must look like user/name")
    if api is None:
        import huggingface_hub

        token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
        api = huggingface_hub.HfApi(token=token)
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`; nothing was uploaded")
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message,
            ignore_patterns=EXCLUDE,
        )
    except Exception as e:  # offline, 401, 403: the local folder stays as it is
        raise UserError(
            f"upload to {repo_id!r} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the folder {str(folder)!r} is unchanged, retry with `ov-sd push`"
        ) from None
    return str(url)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the exported OpenVINO folder")
    p.add_argument("--repo-id", required=True, help="user/name")
    p.add_argument("--token", default=None, help="default: $HF_TOKEN or the stored login")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded")


def main(args) -> int:
    check_openvino_folder(args.model, "--model")  # else a missing folder is an empty plan and exit 0
    files = upload_plan(args.model)
    if args.dry_run:
        print("\n".join(files))
        return 0
    url = push_to_hub(args.model, args.repo_id, token=args.token, private=args.private)
    print(f"uploaded {len(files)} files to {url}")
    return 0
