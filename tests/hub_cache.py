"""A local folder laid out in a Hugging Face cache exactly as `snapshot_download` leaves a download, so that tests can
resolve hub ids offline: blobs named as the Hub names them, snapshots/<commit>/ of relative symlinks to them (sub-folders
too), and refs/<branch> holding the commit id."""

import hashlib
from fnmatch import fnmatch
from pathlib import Path

LFS = (".bin", ".safetensors", ".model")  # stored by the Hub in LFS: the blob is named by its sha256


def blob_name(name, data):
    if name.endswith(LFS):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's id of a plain file


def add_to_hub_cache(cache, repo_id, folder, commit, branch="main", patterns=None):
    """Put `folder`'s files (all of them, or those whose relative path matches one of `patterns`, as
    snapshot_download's allow_patterns) into `cache` as the snapshot `commit` of `repo_id`; `branch` (refs/<branch>)
    then names that commit, branch=None leaves the refs alone (a commit reached only by its id). Returns the
    snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        if patterns is not None and not any(fnmatch(relative.as_posix(), pattern) for pattern in patterns):
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / blob_name(file.name, data)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(relative.parts) + 1), "blobs", blob.name))
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)  # no newline: huggingface_hub reads it back as it is
    return snapshot
