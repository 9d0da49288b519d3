"""Shared pieces of both tiers: wire protocol, transport, configuration, logging."""
