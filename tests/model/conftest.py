"""Model-level fixtures: the real SmolLM2-135M-Instruct in transformers (fp32, CPU).

Nothing here skips: if the model cannot be converted or loaded, every model test fails with the
reason (the model is a hard requirement of ``-m model``).
"""

from __future__ import annotations

import pytest

from tests.harness import hf_model


@pytest.fixture(scope="session")
def hf() -> hf_model.HFModel:
    try:
        return hf_model.load_model()
    except Exception as exc:  # conversion or load failed: fail loudly, never skip
        pytest.fail(f"the test model could not be prepared: {type(exc).__name__}: {exc}",
                    pytrace=False)
