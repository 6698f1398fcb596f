"""The real CPU server fixtures of tests/server (``kvcomm_server``, ``vanilla_server``)."""

from tests.server.conftest import kvcomm_server, server_factory, vanilla_server  # noqa: F401
