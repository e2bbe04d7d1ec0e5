"""Governance: promotion policies, reviewer credentials, the hash-chained audit log and its verification."""
