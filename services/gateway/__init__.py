"""The gateway: kvmesh's OpenAI-compatible HTTP ingress (see README.md)."""
