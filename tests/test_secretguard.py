"""The secret guard: a corpus of secret shapes is refused, look-alikes pass."""
from __future__ import annotations

import hashlib
import uuid
from importlib import resources

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from busd.secretguard import bip39_words, find_secret

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _b58(n: int, seed: str, first: str = "") -> str:
    digest = hashlib.sha512(seed.encode()).digest() * 4
    return first + "".join(B58[b % 58] for b in digest)[: n - len(first)]


def _pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


HEX64 = hashlib.sha256(b"not a real key").hexdigest()
WORDS = sorted(bip39_words())

SECRETS = {
    "ed25519 PEM": "here it is:\n" + _pem(ed25519.Ed25519PrivateKey.generate()),
    "EC PEM (SEC1)": ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()).decode(),
    "RSA PEM": rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()).decode(),
    "OpenSSH key header": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
    "PGP key block": "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF...\n",
    "unlabelled 64 hex": f"priv {HEX64} use it",
    "0x 64 hex": f"wallet key 0x{HEX64}",
    "WIF key": "recovered " + _b58(51, "wif", "5"),
    "WIF compressed": _b58(52, "wifc", "K"),
    "xprv": "xprv" + _b58(107, "xprv"),
    "long base58 (solana keypair)": _b58(88, "solana"),
    "AWS access key id": "AKIAIOSFODNN7EXAMPLE",
    "AWS secret": "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "Google API key": "AIza" + "SyA-1234567890abcdefghijklmnopqrstu",
    "GCP service account": '{"type": "service_account", "private_key_id": "abc123"}',
    "GitHub token": "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "GitHub fine-grained": "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
    "GitLab token": "glpat-abcdefghij0123456789",
    "Slack token": "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp",
    "Stripe key": "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
    "OpenAI-style key": "sk-proj-" + "abcdefghijklmnopqrstuvwxyz012345",
    "Anthropic-style key": "sk-ant-" + "api03-abcdefghijklmnopqrstuvwxyz",
    "JWT": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
    "bearer header": "Authorization: Bearer 0123456789abcdefABCDEF.ghij",
    "agent-bus token": "abt_" + "Q" * 43,
    "password assignment": "db password = hunter2hunter2",
    "api_key assignment": 'api_key: "live-9f8e7d6c5b4a"',
    "URL with password": "postgres://admin:s3cr3tpass@db.internal:5432/prod",
    "Azure storage": "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=" + "A" * 86 + "==",
    "seed phrase (12 words)": " ".join(WORDS[i * 97 % 2048] for i in range(12)),
    "seed phrase (24 words, lines)": "\n".join(WORDS[i * 31 % 2048] for i in range(24)),
}

LOOK_ALIKES = {
    "git SHA": "fixed in 9fceb02d0ae598e95dc970b74767f19372d61af8, please pull",
    "short git SHA": "see 9fceb02",
    "UUID": f"task {uuid.uuid4()} is done",
    "several UUIDs": " ".join(str(uuid.uuid4()) for _ in range(4)),
    "handoff line": f"hits.csv: lines=8 sha256={HEX64} at spark:/home/a/hits.csv",
    "sha256sum output": f"{HEX64}  hits.csv".replace(HEX64, "sha256sum " + HEX64),
    "labelled digest": f"digest: {HEX64}",
    "tx hash": f"tx 0x{HEX64} confirmed",
    "hex colour": "use #ff00aa and #0f0 for the chart",
    "prose": "T1 verify done: 4/4 hits are honeypots. Standing down the A100.",
    "prose with common words": "We should abandon the plan and focus on ability and access "
                               "to the new data, then act on it.",
    "eleven seed words": " ".join(WORDS[i * 97 % 2048] for i in range(11)),
    "bitcoin address": "send to 1BoatSLRHtKNngkdXEeobR76b53LETtpyT for the test",
    "IPFS CID": "pinned QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG",
    "base64 image size": "resized to 1024x768, 42 kB",
    "password mention": "the password policy says 12 characters",
    "api key mention": "ask ops for an API key if you need one",
    "URL without password": "see https://example.com/path?q=1 and postgres://db.internal/prod",
    "email": "mail alice@example.com about it",
    "path": "/home/spark/results/run-2026-11-21/hits.csv",
    "numbers": "p50 0.86 ms p99 1.98 ms over 500 messages; 6095 msg/s",
    "40 hex": "a" * 40,
    "32 hex (md5)": hashlib.md5(b"x").hexdigest(),
    "aws docs mention": "AWS regions: us-east-1, eu-west-2",
    "JSON config": '{"channel": "ops", "retries": 3, "timeout_s": 30}',
    "sk- prose": "the task-skill is sk-ill-named",
}


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_secret_shapes_are_refused(name):
    assert find_secret(SECRETS[name]) is not None, name


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_pass(name):
    assert find_secret(LOOK_ALIKES[name]) is None, (name, find_secret(LOOK_ALIKES[name]))


def test_the_corpus_is_big_enough():
    assert len(SECRETS) >= 20 and len(LOOK_ALIKES) >= 20


def test_the_bip39_list_is_the_published_one():
    data = resources.files("busd").joinpath("data/bip39-english.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == \
        "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"
    assert len(bip39_words()) == 2048
