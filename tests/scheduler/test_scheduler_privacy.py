"""Sealed content: recipients open it, others cannot, and any change is detected."""

from __future__ import annotations

import base64

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.privacy import (
    MAX_RECIPIENTS,
    NotARecipient,
    SealedContentInvalid,
    is_recipient,
    open_json,
    open_sealed,
    seal,
    seal_json,
    sealed_plaintext_size,
    x25519_private_key,
    x25519_public_key,
)
from events import Identity, InvalidPeerId

SUBMITTER = Identity.generate()
DRIVER = Identity.generate()
OUTSIDER = Identity.generate()


def test_x25519_keys_form_a_pair() -> None:
    private_key = nacl.public.PrivateKey(x25519_private_key(DRIVER))

    assert private_key.public_key.encode() == x25519_public_key(DRIVER.peer_id)
    assert len(x25519_public_key(DRIVER.peer_id)) == 32


@settings(max_examples=30, deadline=None)
@given(plaintext=st.binary(max_size=2_000))
def test_both_recipients_open(plaintext: bytes) -> None:
    sealed = seal(plaintext, [SUBMITTER.peer_id, DRIVER.peer_id])

    assert open_sealed(sealed, SUBMITTER) == plaintext
    assert open_sealed(sealed, DRIVER) == plaintext
    assert sealed_plaintext_size(sealed) == len(plaintext)


def test_outsider_cannot_open() -> None:
    sealed = seal(b"the prompt", [SUBMITTER.peer_id, DRIVER.peer_id])

    with pytest.raises(NotARecipient, match=OUTSIDER.peer_id):
        open_sealed(sealed, OUTSIDER)
    assert is_recipient(sealed, DRIVER.peer_id)
    assert not is_recipient(sealed, OUTSIDER.peer_id)


def test_sealed_text_hides_plaintext() -> None:
    plaintext = b"secret prompt words " * 4

    raw = base64.b64decode(seal(plaintext, [SUBMITTER.peer_id]))

    assert b"secret" not in raw


def test_each_seal_differs() -> None:
    first = seal(b"same", [DRIVER.peer_id])
    second = seal(b"same", [DRIVER.peer_id])

    assert first != second


def _flip(sealed: str, position: int) -> str:
    raw = bytearray(base64.b64decode(sealed))
    raw[position] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_tampered_ciphertext_detected() -> None:
    sealed = seal(b"the prompt", [SUBMITTER.peer_id, DRIVER.peer_id])
    length = len(base64.b64decode(sealed))

    with pytest.raises(SealedContentInvalid, match="ciphertext fails its MAC"):
        open_sealed(_flip(sealed, length - 1), DRIVER)
    with pytest.raises(SealedContentInvalid, match="ciphertext fails its MAC"):
        open_sealed(_flip(sealed, length - 30), SUBMITTER)


def test_tampered_key_slot_detected() -> None:
    sealed = seal(b"the prompt", [SUBMITTER.peer_id, DRIVER.peer_id])
    driver_slot_key = 2 + 88 + 8 + 40  # second slot: past its tag, inside the sealed key

    with pytest.raises(SealedContentInvalid, match="key slot"):
        open_sealed(_flip(sealed, driver_slot_key), DRIVER)
    assert open_sealed(_flip(sealed, driver_slot_key), SUBMITTER) == b"the prompt"


def test_truncated_and_malformed_rejected() -> None:
    sealed = seal(b"abc", [DRIVER.peer_id])
    raw = base64.b64decode(sealed)

    with pytest.raises(SealedContentInvalid, match="truncated"):
        open_sealed(base64.b64encode(raw[:60]).decode(), DRIVER)
    with pytest.raises(SealedContentInvalid, match="version"):
        sealed_plaintext_size(base64.b64encode(b"\x02" + raw[1:]).decode())
    with pytest.raises(SealedContentInvalid, match="base64"):
        sealed_plaintext_size("%%%")
    with pytest.raises(SealedContentInvalid, match="non-empty"):
        sealed_plaintext_size("")


def test_recipient_limits() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        seal(b"x", [])
    many = [Identity.generate().peer_id for _ in range(MAX_RECIPIENTS + 1)]
    with pytest.raises(ValueError, match=f"limit is {MAX_RECIPIENTS}"):
        seal(b"x", many)
    with pytest.raises(InvalidPeerId):
        seal(b"x", ["not-a-peer-id"])


def test_duplicate_recipients_sealed_once() -> None:
    once = seal(b"x", [DRIVER.peer_id])
    twice = seal(b"x", [DRIVER.peer_id, DRIVER.peer_id])

    assert len(twice) == len(once)
    assert open_sealed(twice, DRIVER) == b"x"


def test_json_round_trip() -> None:
    tokens = {"token_ids": [1, 2, 3], "text": "h\u00e9llo"}

    sealed = seal_json(tokens, [SUBMITTER.peer_id, DRIVER.peer_id])

    assert open_json(sealed, DRIVER) == tokens
