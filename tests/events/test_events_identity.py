"""Identity: key file handling, peer ids checked against libp2p, CurveZMQ keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nacl.bindings
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID
from zmq.utils import z85

from events.errors import IdentityError, InvalidPeerId, KeyFilePermissionError
from events.identity import (
    Identity,
    curve_public_key_from_peer_id,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_key_file_created_with_mode_0600(tmp_path: Path) -> None:
    key_path = tmp_path / "data" / "node.key"
    identity = Identity.load_or_create(key_path)

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(key_path.read_bytes()) == 32
    assert identity.peer_id.startswith("12D3KooW")


def test_key_file_created_once(tmp_path: Path) -> None:
    key_path = tmp_path / "node.key"
    first = Identity.load_or_create(key_path)
    second = Identity.load_or_create(key_path)

    assert first.peer_id == second.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_key_file_readable_by_others_rejected(tmp_path: Path, mode: int) -> None:
    key_path = tmp_path / "node.key"
    Identity.load_or_create(key_path)
    os.chmod(key_path, mode)

    with pytest.raises(KeyFilePermissionError) as error:
        Identity.load_or_create(key_path)
    assert f"chmod 600 {key_path}" in str(error.value)


def test_key_file_wrong_size_rejected(tmp_path: Path) -> None:
    key_path = tmp_path / "node.key"
    key_path.write_bytes(b"short")
    os.chmod(key_path, 0o600)

    with pytest.raises(IdentityError, match="5 bytes"):
        Identity.load(key_path)


def test_peer_id_matches_libp2p_computation() -> None:
    for _ in range(20):
        identity = Identity.generate()
        key_pair = identity.to_libp2p_key_pair()

        assert ID.from_pubkey(key_pair.public_key).to_base58() == identity.peer_id
        assert key_pair.public_key.to_bytes() == identity.public_key


def test_peer_id_of_libp2p_generated_key() -> None:
    key_pair = create_new_key_pair()
    libp2p_id = ID.from_pubkey(key_pair.public_key).to_base58()

    assert peer_id_from_public_key(key_pair.public_key.to_bytes()) == libp2p_id
    assert public_key_from_peer_id(libp2p_id) == key_pair.public_key.to_bytes()


def test_libp2p_key_pair_signs_like_identity() -> None:
    identity = Identity.generate()
    key_pair = identity.to_libp2p_key_pair()

    assert key_pair.private_key.sign(b"payload") == identity.sign(b"payload")


def test_public_key_from_peer_id_round_trip() -> None:
    identity = Identity.generate()

    assert public_key_from_peer_id(identity.peer_id) == identity.public_key


@pytest.mark.parametrize(
    "peer_id",
    [
        "",
        "not a peer id",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # SHA-256 multihash (RSA-era id)
        "12D3KooW0000000000000000000000000000000000000000000",  # '0' is not base58
    ],
)
def test_public_key_from_invalid_peer_id_rejected(peer_id: str) -> None:
    with pytest.raises(InvalidPeerId):
        public_key_from_peer_id(peer_id)


def test_secp256k1_peer_id_rejected() -> None:
    key_pair = create_secp256k1_key_pair()
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()

    with pytest.raises(InvalidPeerId, match="Ed25519"):
        public_key_from_peer_id(peer_id)


def test_peer_id_with_truncated_key_rejected() -> None:
    identity = Identity.generate()

    with pytest.raises(InvalidPeerId):
        public_key_from_peer_id(identity.peer_id[:-2])


def test_signature_verifies_with_key_from_peer_id() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"payload")
    public_key = public_key_from_peer_id(identity.peer_id)

    assert len(signature) == 64
    assert verify_signature(b"payload", signature, public_key)
    assert not verify_signature(b"payloaD", signature, public_key)


def test_curve_keys_form_x25519_pair() -> None:
    identity = Identity.generate()
    public = z85.decode(identity.curve_public_key)
    secret = z85.decode(identity.curve_secret_key)

    assert len(identity.curve_public_key) == 40
    assert nacl.bindings.crypto_scalarmult_base(secret) == public


def test_curve_public_key_from_peer_id_matches_own() -> None:
    identity = Identity.generate()

    assert curve_public_key_from_peer_id(identity.peer_id) == identity.curve_public_key


def test_curve_keys_work_with_curvezmq() -> None:
    import zmq

    server_identity = Identity.generate()
    client_identity = Identity.generate()
    context = zmq.Context()
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    try:
        server.curve_server = True
        server.curve_secretkey = server_identity.curve_secret_key
        server.curve_publickey = server_identity.curve_public_key
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.curve_serverkey = curve_public_key_from_peer_id(server_identity.peer_id)
        client.curve_secretkey = client_identity.curve_secret_key
        client.curve_publickey = client_identity.curve_public_key
        client.connect(f"tcp://127.0.0.1:{port}")
        client.send(b"hello")

        assert server.poll(10_000), "no message arrived over the CurveZMQ channel"
        _routing_id, message = server.recv_multipart()
        assert message == b"hello"
    finally:
        client.close(linger=0)
        server.close(linger=0)
        context.term()
