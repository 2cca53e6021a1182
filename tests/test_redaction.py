"""The redaction hook: deny list by path/site/app, secrets stripped from every text field."""

from __future__ import annotations

import pytest

from palate.adapters.redaction import Redactor, scrub_text

SECRETS = [
    ("key = sk-proj-Abcdefghijklmnopqrstuvwxyz012345", "api_key", "sk-proj-"),
    ("sk-ant-api03-abcdefghijklmnopqrstuvwxyzABCDEF", "api_key", "sk-ant-"),
    ("aws_access_key_id AKIAIOSFODNN7EXAMPLE here", "aws_key", "AKIAIOSFODNN7EXAMPLE"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "github_token", "ghp_"),
    ("Authorization: Bearer abc.DEF-ghi_jkl.mnopqrstuvwxyz", "bearer", "abc.DEF"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY-----",
        "private_key",
        "MIIEow",
    ),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1r (cut off", "private_key", "b3Blbn"),
    ('password = "hunter2"', "password", "hunter2"),
    ("DB_PASSWORD=s3cr3t-Value!", "password", "s3cr3t"),
    ("api_key: 'abcd1234abcd'", "password", "abcd1234"),
    ("xoxb-123456789012-abcdefghij", "slack_token", "xoxb-"),
    (
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "jwt",
        "eyJzdWIi",
    ),
]


@pytest.mark.parametrize(("text", "kind", "leak"), SECRETS)
def test_secrets_are_stripped(text: str, kind: str, leak: str) -> None:
    out, n = scrub_text(text)
    assert n >= 1
    assert leak not in out
    assert f"[REDACTED:{kind}]" in out


@pytest.mark.parametrize(
    "text",
    [
        "password = os.environ['DB_PASSWORD']",
        "token = get_token()",
        "secret = None",
        "def check_password(user, password):",
        "the key to success is sk-ill",
        "Use a bearer token in the Authorization header.",
    ],
)
def test_code_that_only_mentions_secrets_is_kept(text: str) -> None:
    assert scrub_text(text) == (text, 0)


def test_every_text_field_is_scrubbed_and_counted() -> None:
    r = Redactor()
    ev = r.apply(
        {
            "kind": "ranking",
            "prompt": "use sk-live-abcdefghijklmnopqrstuvwx",
            "responses": ["AKIAIOSFODNN7EXAMPLE", "ok"],
        }
    )
    assert ev is not None
    assert "sk-live" not in ev["prompt"] and ev["responses"] == ["[REDACTED:aws_key]", "ok"]
    assert r.redacted == 2
    assert (
        Redactor(strip_secrets=False)
        .apply({"prompt": "sk-live-abcdefghijklmnopqrstuvwx"})["prompt"]
        .startswith("sk-")
    )  # type: ignore[index]


@pytest.mark.parametrize(
    ("subject", "denied"),
    [
        ("/home/u/secret/keys.py", True),
        ("file:///home/u/secret/deep/x.py", True),
        ("/home/u/public/x.py", False),
        ("https://mail.bank.example/inbox", True),
        ("https://example.org/bank.example", False),
        ("app:slack", True),
        ("app:vim", False),
    ],
)
def test_deny_list(subject: str, denied: bool) -> None:
    r = Redactor(("/home/u/secret/*", "*.bank.example", "app:slack"))
    ev = {"kind": "rating", "prompt": "p", "response": "r", "label": 1}
    assert (r.apply(ev, [subject]) is None) == denied


def test_deny_by_context_app_and_home_expansion() -> None:
    import os

    r = Redactor(("app:slack", "~/private/*"))
    assert r.apply({"prompt": "p", "context": {"app": "slack"}}) is None
    assert r.apply({"prompt": "p"}, [os.path.expanduser("~/private/notes.md")]) is None
    assert r.dropped == 2
