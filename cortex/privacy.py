"""Sealed content: request and token text that only the submitter and the driver can read.

Event logs are replicated to every peer, so the content fields of request events (the
prompt, stop strings, generated token ids and text) are encrypted. Everything else in those
events (ids, sizes, timings) stays in clear for routing and accounting.

Scheme (libsodium through PyNaCl):

1. Draw a random 32-byte key and encrypt the plaintext once with `SecretBox`
   (XSalsa20-Poly1305, random 24-byte nonce, 16-byte MAC).
2. For each recipient, seal that key with `SealedBox` (an ephemeral X25519 key, then
   XSalsa20-Poly1305) to the recipient's X25519 public key. That key is the libsodium
   Ed25519-to-Curve25519 map of the key inside the recipient's peer id, so no key exchange
   is needed. A recipient opens with the X25519 form of its Ed25519 secret key, which is
   also its CurveZMQ secret key.

Sealed text is standard base64 (with padding) of these bytes:

    version          1 byte     SEAL_VERSION (1)
    count            1 byte     number of recipients, 1 to MAX_RECIPIENTS
    count times:
      tag            8 bytes    BLAKE2b-64 of the recipient's X25519 public key
      sealed key     80 bytes   SealedBox(content key): 32 ephemeral key + 32 key + 16 MAC
    nonce            24 bytes   SecretBox nonce
    ciphertext       n + 16     SecretBox(plaintext), n = plaintext bytes

Anyone can compute the tag of a known peer id, so the set of recipients is public: it is
the submitter and the driver, both visible as event authors anyway. The plaintext size is
public too (`sealed_plaintext_size`). Any change to a sealed key or the ciphertext fails a
MAC and raises `SealedContentInvalid`. A signed event also protects its sealed fields
against changes in transit, but the MACs hold for sealed bytes sent over the data plane too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.utils
import orjson

from events.identity import Identity, public_key_from_peer_id

SEAL_VERSION = 1
MAX_RECIPIENTS = 16
TAG_BYTES = 8
SEALED_KEY_BYTES = nacl.bindings.crypto_box_SEALBYTES + nacl.secret.SecretBox.KEY_SIZE  # 48 + 32
NONCE_BYTES = nacl.secret.SecretBox.NONCE_SIZE  # 24
MAC_BYTES = nacl.secret.SecretBox.MACBYTES  # 16
_SLOT_BYTES = TAG_BYTES + SEALED_KEY_BYTES
_TAG_PERSON = b"cortex-seal-tag"


class PrivacyError(Exception):
    """Base class of the errors that sealing and opening content raise."""


class SealedContentInvalid(PrivacyError, ValueError):
    """Sealed text that is malformed or was changed after sealing (a MAC check failed)."""


class NotARecipient(PrivacyError):
    """The content was not sealed to this identity, so it cannot be opened here."""


def x25519_public_key(peer_id: str) -> bytes:
    """Return the raw 32-byte X25519 public key of a peer, derived from its Ed25519 peer id.

    Raises `events.InvalidPeerId` for an id that is not an Ed25519 peer id.
    """
    public_key: bytes = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key_from_peer_id(peer_id))
    return public_key


def x25519_private_key(identity: Identity) -> bytes:
    """Return the raw 32-byte X25519 secret key of an identity (its CurveZMQ secret key)."""
    from zmq.utils import z85  # imported here: pyzmq loads libzmq on import

    private_key: bytes = z85.decode(identity.curve_secret_key)
    return private_key


def recipient_tag(peer_id: str) -> bytes:
    """Return the 8-byte tag that marks a peer's slot in sealed content."""
    return hashlib.blake2b(x25519_public_key(peer_id), digest_size=TAG_BYTES, person=_TAG_PERSON).digest()


def seal(plaintext: bytes, recipients: Sequence[str]) -> str:
    """Encrypt `plaintext` so that each peer id in `recipients` (and nobody else) can open it.

    Repeated recipients are sealed once. Raises ValueError for no recipients or more than
    MAX_RECIPIENTS, and `events.InvalidPeerId` for a recipient that is not an Ed25519 peer id.
    """
    unique = list(dict.fromkeys(recipients))
    if not unique:
        raise ValueError("seal needs at least one recipient peer id, got none")
    if len(unique) > MAX_RECIPIENTS:
        raise ValueError(f"seal got {len(unique)} recipients, the limit is {MAX_RECIPIENTS}; seal to fewer peers")
    content_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    encrypted = nacl.secret.SecretBox(content_key).encrypt(plaintext)  # nonce || ciphertext
    parts = [bytes((SEAL_VERSION, len(unique)))]
    for peer_id in unique:
        sealed_key = nacl.public.SealedBox(nacl.public.PublicKey(x25519_public_key(peer_id))).encrypt(content_key)
        parts.append(recipient_tag(peer_id) + sealed_key)
    parts.append(bytes(encrypted))
    return base64.b64encode(b"".join(parts)).decode("ascii")


def open_sealed(sealed: str, identity: Identity) -> bytes:
    """Decrypt sealed text with `identity`'s key and return the plaintext.

    Raises `NotARecipient` if no slot was sealed to this identity, and `SealedContentInvalid`
    if the text is malformed or was changed after sealing.
    """
    raw, count = _parse(sealed)
    tag = recipient_tag(identity.peer_id)
    private_key = nacl.public.PrivateKey(x25519_private_key(identity))
    opener = nacl.public.SealedBox(private_key)
    content_key: bytes | None = None
    tagged = False
    for index in range(count):
        slot = raw[2 + index * _SLOT_BYTES : 2 + (index + 1) * _SLOT_BYTES]
        if slot[:TAG_BYTES] != tag:
            continue
        tagged = True
        try:
            content_key = opener.decrypt(slot[TAG_BYTES:])
            break
        except nacl.exceptions.CryptoError:
            continue
    if content_key is None:
        if tagged:
            raise SealedContentInvalid(
                f"the key slot sealed to {identity.peer_id} fails its MAC: the sealed content was changed"
            )
        raise NotARecipient(f"content sealed to {count} recipient(s) was not sealed to {identity.peer_id}")
    body = raw[2 + count * _SLOT_BYTES :]
    try:
        plaintext: bytes = nacl.secret.SecretBox(content_key).decrypt(body)
    except nacl.exceptions.CryptoError:
        raise SealedContentInvalid("the sealed ciphertext fails its MAC: the sealed content was changed") from None
    return plaintext


def is_recipient(sealed: str, peer_id: str) -> bool:
    """Return whether the content carries a slot tagged for `peer_id` (without decrypting)."""
    raw, count = _parse(sealed)
    tag = recipient_tag(peer_id)
    return any(raw[2 + index * _SLOT_BYTES : 2 + index * _SLOT_BYTES + TAG_BYTES] == tag for index in range(count))


def sealed_plaintext_size(sealed: str) -> int:
    """Return the plaintext size in bytes of sealed text; raise SealedContentInvalid if it is malformed."""
    raw, count = _parse(sealed)
    return len(raw) - 2 - count * _SLOT_BYTES - NONCE_BYTES - MAC_BYTES


def seal_json(value: Any, recipients: Sequence[str]) -> str:
    """Seal a JSON value (serialized by orjson) to `recipients`."""
    return seal(orjson.dumps(value), recipients)


def open_json(sealed: str, identity: Identity) -> Any:
    """Open sealed text that holds JSON and return the decoded value."""
    plaintext = open_sealed(sealed, identity)
    try:
        return orjson.loads(plaintext)
    except orjson.JSONDecodeError as error:
        raise SealedContentInvalid(f"sealed content opened but is not JSON: {error}") from None


def _parse(sealed: str) -> tuple[bytes, int]:
    """Decode sealed text and check its layout; return the raw bytes and the recipient count."""
    if not isinstance(sealed, str) or not sealed:
        raise SealedContentInvalid("sealed content must be non-empty base64 text")
    try:
        raw = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise SealedContentInvalid(f"sealed content of {len(sealed)} characters is not valid base64") from None
    if len(raw) < 2 or raw[0] != SEAL_VERSION:
        found = raw[0] if raw else "nothing"
        raise SealedContentInvalid(f"sealed content has version {found}, expected {SEAL_VERSION}")
    count = raw[1]
    if not 1 <= count <= MAX_RECIPIENTS:
        raise SealedContentInvalid(f"sealed content names {count} recipients, expected 1 to {MAX_RECIPIENTS}")
    minimum = 2 + count * _SLOT_BYTES + NONCE_BYTES + MAC_BYTES
    if len(raw) < minimum:
        raise SealedContentInvalid(
            f"sealed content of {len(raw)} bytes is truncated: {count} recipient(s) need at least {minimum} bytes"
        )
    return raw, count
