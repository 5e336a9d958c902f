"""Fetch the official checkpoints missing from the app's model folder (run by `make serve`; FETCH=0 skips it).

FastSAM3D and SAM-Med3D-turbo come from their authors' Hugging Face repositories, through huggingface_hub
(which resumes a download that breaks off). Each downloaded file is checked before it gets its official name
in the model folder: its sha256 against the one the Hub publishes for it (the LFS object id), then its keys
and shapes against our network (samlabel.checkpoint). A file that fails either check is deleted and
reported. MedSAM, its point-prompt variant and SAM-Med2D are published on Google Drive only: for them, and
for any file the Hub cannot give (offline, HF_HUB_OFFLINE=1), it says which file to download from where and
where to put it. Files already in the folder are left as they are (check one with samlabel-check-checkpoint).

Exit status: 0, also offline, so that the server starts anyway; 1 when a downloaded file was refused.
The app itself never downloads anything.

    python scripts/fetch_checkpoints.py [--model-dir apps/fastsam3d/model] [--models fastsam3d,sam_med3d]
"""

import argparse
import importlib
import re
import shutil
import sys
from pathlib import Path

from samlabel.checkpoint import CheckpointError, check_state_dict, read_checkpoint, sha256, state_dict_of
from samlabel.registry import ModelSpec, get_spec, registered

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "apps" / "fastsam3d" / "model"
STAGING = ".fetching"  # the model folder's subfolder where a file waits until it is verified
METADATA_TIMEOUT_S = 10
SHA256 = re.compile(r"[0-9a-f]{64}")


class Refused(Exception):
    """A downloaded file that is not the published one, or not the model it should be."""


def say(message: str) -> None:
    print(f"fetch_checkpoints: {message}", flush=True)


def check_command(spec: ModelSpec, dest: Path) -> str:
    return f".venv/bin/samlabel-check-checkpoint {dest} --model {spec.name}"


def instruction(spec: ModelSpec, dest: Path, why: str) -> str:
    """Which file to get from where, and where to put it."""
    if spec.hf_repo:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(spec.hf_repo, spec.hf_filename or spec.checkpoint_file, revision=spec.hf_revision)
    else:
        url = spec.download_page or spec.source
    files = spec.checkpoint_file
    if spec.encoder_checkpoint_file:  # SAM3D: the decoder with its plans, and Meta's encoder beside them
        files = f"{Path(spec.checkpoint_file).name} and {Path(spec.checkpoint_file).name}.pkl"
        return (f"{spec.name}: {why.rstrip('.')}. Download {files} from {url} and put them in {dest.parent}; it also "
                f"needs {spec.encoder_checkpoint_file} (Meta's SAM ViT-B, https://github.com/facebookresearch/segment-anything) "
                f"at {dest.parent.parent / spec.encoder_checkpoint_file} (then check them: {check_command(spec, dest)})")
    return (f"{spec.name}: {why.rstrip('.')}. Download {files} from {url} and put it at {dest} "
            f"(then check it: {check_command(spec, dest)})")


def verify(spec: ModelSpec, path: Path, published_sha256) -> str:
    """The file's sha256, once it equals the published one (when there is one) and the file holds
    every key of spec's network with its shape; else Refused."""
    digest = sha256(path)
    if published_sha256 and digest != published_sha256:
        raise Refused(f"sha256 {digest} is not the published {published_sha256} (corrupted download)")
    try:
        check_state_dict(state_dict_of(read_checkpoint(path), spec, path), spec, path)
    except CheckpointError as error:
        raise Refused(str(error)) from None
    return digest


def fetch_from_hub(spec: ModelSpec, dest: Path) -> str:
    """Download spec's file from its Hugging Face repo into dest's folder, verify it, give it its name.
    Returns a report line; raises Refused, or the library's error when the Hub cannot give the file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    filename = spec.hf_filename or spec.checkpoint_file
    metadata = get_hf_file_metadata(hf_hub_url(spec.hf_repo, filename, revision=spec.hf_revision),
                                    timeout=METADATA_TIMEOUT_S)
    # An LFS file's ETag is its sha256 (the Hub's published checksum); a small git file's is a git hash.
    published = metadata.etag if metadata.etag and SHA256.fullmatch(metadata.etag) else None
    staging = dest.parent / STAGING
    try:
        path = Path(hf_hub_download(spec.hf_repo, filename, revision=metadata.commit_hash or spec.hf_revision,
                                    local_dir=staging, etag_timeout=METADATA_TIMEOUT_S))
        digest = verify(spec, path, published)
        path.replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a refused or partial file goes with it
    checked = "sha256 as published" if published else "no sha256 published for it"
    return (f"{spec.name}: fetched {dest} from {spec.hf_repo} (commit {metadata.commit_hash}); "
            f"sha256 {digest} ({checked}); keys and shapes match {spec.title}")


def is_offline_error(error: Exception) -> bool:
    """The Hub cannot be reached (no network, a dropped connection), as opposed to an answer from it."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(error, HfHubHTTPError):  # an answer (404, 401, 5xx), not a failure to connect
        return False
    kinds = [OfflineModeIsEnabled, LocalEntryNotFoundError]
    for transport in ("httpx2", "httpx"):  # huggingface_hub's HTTP client (httpx2 since 2.x)
        try:
            kinds.append(importlib.import_module(transport).TransportError)
        except (ImportError, AttributeError):
            pass
    return isinstance(error, tuple(kinds))


def fetch(spec: ModelSpec, model_dir: Path) -> bool:
    """Fetch one model's checkpoint if it is missing; False when a downloaded file was refused."""
    dest = model_dir / spec.checkpoint_file
    if dest.is_file():
        say(f"{spec.name}: {dest} is present (not downloaded again)")
        return True
    if not spec.hf_repo:
        say(instruction(spec, dest, "its authors publish it on Google Drive only, which no maintained library "
                                    "fetches reliably"))
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        say(instruction(spec, dest, "huggingface_hub is not installed (pip install -r requirements.txt)"))
        return True
    if constants.HF_HUB_OFFLINE:
        say(instruction(spec, dest, "HF_HUB_OFFLINE is set, so the Hub is not asked"))
        return True
    say(f"{spec.name}: downloading {spec.hf_filename or spec.checkpoint_file} from {spec.hf_repo} ...")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        say(fetch_from_hub(spec, dest))
    except Refused as error:
        say(f"{spec.name}: REFUSED the downloaded file and deleted it: {error}")
        say(instruction(spec, dest, "the download was refused"))
        return False
    except Exception as error:  # noqa: BLE001 - any failure to get the file: say so, never stop the server's start
        why = "the Hub cannot be reached (offline?)" if is_offline_error(error) else "it could not be fetched"
        detail = (str(error).splitlines() or [""])[0]
        say(instruction(spec, dest, f"{why}: {type(error).__name__}: {detail}"))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="the app's model folder")
    parser.add_argument("--models", help="comma-separated model names (default: every registered model)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else list(registered())
    try:
        specs = [get_spec(name) for name in names]
    except KeyError as error:
        parser.error(error.args[0])
    results = [fetch(spec, args.model_dir) for spec in specs]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
