"""End-to-end tests against real SGLang 0.5.17 servers on CPU, plus the launcher and the pinned
SGLang API contract (the fixtures are in conftest.py)."""
