"""Node identity: one Ed25519 key that names the node, signs its events and keys its channels.

Key file: the 32-byte Ed25519 seed, raw, in a file with mode 0600. It is created once,
atomically (written to a temporary file, fsynced, then hard-linked into place so that two
processes starting at once cannot each create a different key). A key file that group or
others can read or write is rejected, because a copied key lets another node sign as this one.

Peer id: the libp2p peer id of the public key, as libp2p computes it for Ed25519 keys. The
protobuf `PublicKey{Type: Ed25519 (1), Data: 32 bytes}` is 36 bytes, short enough that libp2p
inlines it in an identity multihash (code 0x00, length 0x24) instead of hashing it. The 38
bytes are written in base58btc without a multibase prefix, which always starts `12D3KooW`.
Because the key is inlined, the verifying key is decoded from the peer id itself, so an event
author needs no key lookup.

The same key, converted to X25519 with libsodium's Ed25519-to-Curve25519 map, is the node's
CurveZMQ key pair, in the Z85 text form that ZeroMQ socket options expect.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.bindings
import nacl.exceptions

from events.errors import IdentityError, InvalidPeerId, KeyFilePermissionError

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

logger = logging.getLogger(__name__)

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# Identity multihash (code 0x00, length 36) around protobuf PublicKey{Type: 1, Data: 32 bytes}:
# field 1 varint (0x08) = 1 (Ed25519), field 2 bytes (0x12) of length 0x20.
_PEER_ID_PREFIX = b"\x00\x24\x08\x01\x12\x20"
_PEER_ID_BYTES = len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES

_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX = {character: value for value, character in enumerate(_BASE58_ALPHABET)}


def _base58_encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, remainder = divmod(number, 58)
        digits.append(_BASE58_ALPHABET[remainder])
    leading_zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * leading_zeros + "".join(reversed(digits))


def _base58_decode(text: str) -> bytes:
    number = 0
    for character in text:
        value = _BASE58_INDEX.get(character)
        if value is None:
            raise ValueError(f"character {character!r} is not in the base58btc alphabet")
        number = number * 58 + value
    leading_zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\x00" * leading_zeros + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """Return the libp2p peer id (`12D3KooW...`) of a 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidPeerId(f"an Ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return _base58_encode(_PEER_ID_PREFIX + public_key)


@functools.lru_cache(maxsize=65536)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """Decode the 32-byte Ed25519 verifying key embedded in a peer id.

    Raises InvalidPeerId for anything but the identity multihash of an Ed25519 protobuf
    public key that is a valid curve point: RSA or secp256k1 peer ids, hashed (`Qm...`)
    ids, bad base58, wrong lengths. Results are cached, because every event names its
    author and the same few authors repeat.
    """
    if not isinstance(peer_id, str) or not 40 <= len(peer_id) <= 60:
        raise InvalidPeerId(f"peer id {peer_id!r} is not a base58 Ed25519 peer id (12D3KooW...)")
    try:
        raw = _base58_decode(peer_id)
    except ValueError as error:
        raise InvalidPeerId(f"peer id {peer_id!r} is not valid base58btc: {error}") from None
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise InvalidPeerId(
            f"peer id {peer_id!r} is not an identity multihash of an Ed25519 public key; "
            "only Ed25519 peer ids (12D3KooW...) can author events"
        )
    public_key = raw[len(_PEER_ID_PREFIX) :]
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(public_key):
        raise InvalidPeerId(f"peer id {peer_id!r} embeds a key that is not a valid Ed25519 point")
    return public_key


@functools.lru_cache(maxsize=4096)
def curve_public_key_from_peer_id(peer_id: str) -> bytes:
    """Return a peer's CurveZMQ public key (40 bytes of Z85) derived from its peer id."""
    curve_key = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key_from_peer_id(peer_id))
    return _z85_encode(curve_key)


def _z85_encode(key: bytes) -> bytes:
    from zmq.utils import z85  # imported here: pyzmq loads libzmq on import

    encoded: bytes = z85.encode(key)
    return encoded


class Identity:
    """An Ed25519 key pair with its peer id; signs payloads and converts for CurveZMQ and libp2p."""

    __slots__ = ("_seed", "_secret_key", "public_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"an Ed25519 seed has {SEED_BYTES} bytes, got {len(seed)}")
        public_key, secret_key = nacl.bindings.crypto_sign_seed_keypair(seed)
        self._seed = seed
        self._secret_key = secret_key
        self.public_key: bytes = public_key
        self.peer_id: str = peer_id_from_public_key(public_key)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> Identity:
        """Create a new random identity (not stored anywhere)."""
        return cls(os.urandom(SEED_BYTES))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, creating it (mode 0600) if the file does not exist yet."""
        key_path = Path(path)
        if not key_path.exists():
            _create_key_file(key_path)
        return cls.load(key_path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Load an existing key file; reject it if group or others may read or write it."""
        key_path = Path(path)
        try:
            status = key_path.stat()
        except FileNotFoundError:
            raise IdentityError(f"key file {key_path} not found") from None
        if not stat.S_ISREG(status.st_mode):
            raise IdentityError(f"key file {key_path} is not a regular file")
        if status.st_mode & 0o077:
            raise KeyFilePermissionError(
                f"key file {key_path} has mode {stat.S_IMODE(status.st_mode):04o}, so other users "
                f"may read or replace this node's private key; run `chmod 600 {key_path}` "
                "and check that no one else copied it"
            )
        seed = key_path.read_bytes()
        if len(seed) != SEED_BYTES:
            raise IdentityError(
                f"key file {key_path} has {len(seed)} bytes, expected a {SEED_BYTES}-byte Ed25519 seed"
            )
        return cls(seed)

    def sign(self, payload: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of `payload`."""
        signed: bytes = nacl.bindings.crypto_sign(payload, self._secret_key)
        return signed[:SIGNATURE_BYTES]

    @property
    def curve_public_key(self) -> bytes:
        """This node's CurveZMQ public key, 40 bytes of Z85."""
        return _z85_encode(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self.public_key))

    @property
    def curve_secret_key(self) -> bytes:
        """This node's CurveZMQ secret key, 40 bytes of Z85 (the X25519 form of the seed)."""
        return _z85_encode(nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(self._secret_key))

    def to_libp2p_key_pair(self) -> KeyPair:
        """Return a libp2p Ed25519 KeyPair of this key, so the gossip host has the same peer id."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair

        private_key = Ed25519PrivateKey.from_bytes(self._seed)
        return KeyPair(private_key, private_key.get_public_key())


def verify_signature(payload: bytes, signature: bytes, public_key: bytes) -> bool:
    """Return whether `signature` is a valid Ed25519 signature of `payload` by `public_key`."""
    try:
        nacl.bindings.crypto_sign_open(signature + payload, public_key)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, os.urandom(SEED_BYTES))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        # link() fails if the path exists, so a key created concurrently is never replaced.
        os.link(temporary, path)
        logger.info("created node key %s", path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
