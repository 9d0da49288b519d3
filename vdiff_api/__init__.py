"""The vdiff gateway: OpenAI HTTP API in front of ZeroMQ workers. Never imports torch."""

__version__ = "0.1.0"
