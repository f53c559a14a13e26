"""Where a model source's checkpoint lives: a local directory, or a hub name resolved to a snapshot
in the local hub cache by huggingface_hub's own `snapshot_download` (so HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT mean what they mean to every other HF tool).

Only what a scorer reads is fetched: configs, tokenizer files, chat templates, and the weights in
one format (safetensors when the repository has them, else *.bin, which is read weights-only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# a hub model id: "name" or "org/name", each part starting with a letter or digit (no "--" or "..")
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w\-.]*/)?[A-Za-z0-9][\w\-.]*$")
_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory on this machine; `revision` is the hub commit it was resolved to
    (None for a local directory)."""

    path: Path
    revision: str | None = None


def resolve_checkpoint(location: str, revision: str | None = None) -> Checkpoint:
    """A local directory as it is, or a hub name (optionally at a branch, tag or commit) as the
    snapshot directory of the resolved commit, downloaded unless HF_HUB_OFFLINE is set."""
    local = Path(location).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"{location} is a local directory; revision={revision} is for hub names")
        return Checkpoint(local)
    if not _REPO_ID.match(location) or "--" in location or ".." in location:
        raise FileNotFoundError(f"{location}: no such directory, and not a hub name (org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # HF_HUB_OFFLINE passed on explicitly: snapshot_download alone would still list a commit's files online
    offline = constants.HF_HUB_OFFLINE
    try:
        path = Path(snapshot_download(location, revision=revision, allow_patterns=[*_FILES, "*.safetensors"],
                                      local_files_only=offline))  # fmt: skip
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(location, revision=revision, allow_patterns=[*_FILES, "*.bin"],
                                          local_files_only=offline))  # fmt: skip
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        where = f"the hub cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1)" if offline else "the hub"
        raise FileNotFoundError(
            f"{location} (revision {revision or 'main'}): not a local directory, and {where} could not provide it: {err}"
        ) from err
    return Checkpoint(path, path.name)
