"""Security checks (docs/security.md): permissions, plaintext, key material, peers, floods."""
