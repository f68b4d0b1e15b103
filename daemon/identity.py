"""The node's persistent libp2p identity: one Ed25519 key in `<home>/identity.key`.

The peer ID derived from this key names the node's dataset, so it must survive
restarts: the key is created once (file mode 0600, owner only) and loaded on
every start. A key file that cannot be read is an error, never silently
replaced: replacing it would fork the node's dataset under a new name.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

IDENTITY_FILENAME = "identity.key"


class IdentityError(Exception):
    """The identity key file exists but is unusable; the user must fix or remove it."""


def identity_path(home: Path) -> Path:
    """Where the identity key of the node with data directory `home` lives."""
    return Path(home) / IDENTITY_FILENAME


def load_or_create_identity(home: Path) -> KeyPair:
    """Return the node's Ed25519 key pair, creating and saving it on first use.

    Raises `IdentityError` when the file exists but is not an Ed25519 libp2p
    key, or is readable by other users (a leaked key lets anyone publish as
    this node).
    """
    path = identity_path(home)
    if not path.exists():
        Path(home).mkdir(parents=True, exist_ok=True)
        key_pair = create_new_key_pair()
        save_identity(key_pair, path)  # writes with mode 0600
        return key_pair
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name != "nt" and mode & 0o077:
        raise IdentityError(
            f"{path} is accessible by other users (mode {mode:o}); "
            f"run `chmod 600 {path}` so only the node's user can read its key"
        )
    try:
        key_pair = load_identity(path)
    except Exception as e:  # protobuf and crypto errors of several types
        raise IdentityError(
            f"{path} is not a libp2p private key ({e}); restore it from a backup, or move it "
            "away to start a new identity (the node's dataset will get a new name)"
        ) from e
    key_type = key_pair.private_key.get_type()
    if key_type != KeyType.Ed25519:
        raise IdentityError(f"{path} holds a {key_type.name} key, not Ed25519")
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 peer ID string of `key_pair`."""
    return ID.from_pubkey(key_pair.public_key).to_base58()
