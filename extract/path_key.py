"""The secret key that turns an image's path into an id that identifies no one.

Archive exports name folders by patient (`Doe_Jane/img000.dcm`), MIMIC-CXR's paths hold subject and
study numbers. Such a dataset's records are identified by an HMAC-SHA256 of the image's path below
the data folder, and caches, indexes, exports and the page keep only that id (see
`imaging.locations`: the path is found again by hashing the folder's paths with the same key). A
plain hash would not do: "Doe_Jane/img000.dcm" is found again by hashing guessed names.

The key is 32 random bytes made once per user, in `$XDG_CONFIG_HOME/medembed/path-key` (else
`~/.config/medembed/path-key`), readable by its owner only; `MEDEMBED_PATH_KEY_FILE` names another
file (tests; or the key copied from the machine that extracted a cache, to serve it elsewhere). It
never enters a cache, export or page: they record only its id, a hash of it that says which key made
their ids without revealing it.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from medembed.common.errors import MedembedError

KEY_ENV = "MEDEMBED_PATH_KEY_FILE"
KEY_BYTES = 32
ID_HEX = 16  # hex digits of an image id (64 bits: no collision expected below billions of images)


class PathKeyError(MedembedError, ValueError):
    """No usable key, or a cache made with another key; the message says which file to fix."""


def key_file() -> Path:
    """Where the key is: `$MEDEMBED_PATH_KEY_FILE`, else the user's config folder."""
    named = os.environ.get(KEY_ENV)
    if named:
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "medembed" / "path-key"


@dataclass(frozen=True)
class PathKey:
    secret: bytes
    path: Path

    @property
    def key_id(self) -> str:
        """8 hex digits naming the key (not revealing it): recorded beside the ids it made."""
        return hmac.new(self.secret, b"medembed path key id", hashlib.sha256).hexdigest()[:8]

    def image_id(self, relative: str) -> str:
        """The id of the image at `relative` (its path below the data folder, "/"-separated; a
        container member as "ARCHIVE::member")."""
        return hmac.digest(self.secret, relative.encode(), "sha256").hex()[:ID_HEX]


def load_path_key(create: bool = False) -> PathKey:
    """The user's key; made (once, owner-only) when there is none and `create`, else PathKeyError.
    The file is read again only when it changed (every private location resolved asks for the key:
    each image of a page, each fine-tuning item)."""
    path = key_file()
    if not path.exists():
        if not create:
            raise PathKeyError(f"{path}: no path key; the cache's ids were made with a key from another machine: copy "
                               f"that key file here or point {KEY_ENV} at it")
        try:
            _create(path)
        except OSError as e:  # a read-only home, say: the key's folder is to blame, not the data
            raise PathKeyError(f"{path}: cannot make the path key there ({e.strerror or e}); point {KEY_ENV} at a "
                               "writable file (or an existing key), or pass --readable-paths when the paths name no "
                               "one") from None
    return _LOADED.get(path)


def _read(path: Path) -> PathKey:
    try:
        text = path.read_text().strip()
        secret = bytes.fromhex(text)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PathKeyError(f"{path}: unreadable path key ({e}); it must hold {2 * KEY_BYTES} hex digits") from None
    if len(secret) < 16:
        raise PathKeyError(f"{path}: a path key of {len(secret)} bytes is too short (want {KEY_BYTES})")
    return PathKey(secret, path)


class _LoadedKeys:
    """Keys read, by file and the file's state (mtime, size, inode): a rewritten or replaced key file
    is read again, an unchanged one never."""

    def __init__(self) -> None:
        self._keys: dict[Path, tuple[tuple[int, int, int], PathKey]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> PathKey:
        try:
            st = path.stat()
        except OSError as e:
            raise PathKeyError(f"{path}: unreadable path key ({e.strerror or e})") from None
        state = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            known = self._keys.get(path)
            if known is not None and known[0] == state:
                return known[1]
        key = _read(path)
        with self._lock:
            self._keys[path] = (state, key)
        return key


_LOADED = _LoadedKeys()


def _create(path: Path) -> None:
    """Write a new key without a window where another process could read half of it or replace it:
    written owner-only under a private name, then linked into place (a key another process linked
    first wins, and both use it)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links
            if not path.exists():
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_key_id(key: PathKey, wanted: str, where: str) -> None:
    """PathKeyError when the ids at `where` were made with another key than `key`."""
    if key.key_id != wanted:
        raise PathKeyError(f"{where}: image ids made with path key {wanted}, but {key.path} is key {key.key_id}: "
                           f"point {KEY_ENV} at the key file of the machine that extracted it")
