"""KVCOMM for SGLang frontend programs (DESIGN.md §2).

``sgl.set_default_backend(KVCommEndpoint(url))`` plus ``with workflow(): ...`` gives an existing
``@sgl.function`` program cross-agent KV reuse; ``AgentGraph`` of ``Agent``s builds multi-agent
workflows (full, chain, star, debate; several rounds) and measures them dense vs KVCOMM.
``workflow(application=application())`` lets many workflows share the server's anchors.
"""

from kvcomm_sglang.frontend.agents import Agent, AgentGraph
from kvcomm_sglang.frontend.endpoint import KVCommEndpoint
from kvcomm_sglang.frontend.scope import (Application, CallRecord, Workflow, application,
                                          current_workflow, use, workflow)

__all__ = ["KVCommEndpoint", "workflow", "use", "current_workflow", "Workflow", "CallRecord",
           "Agent", "AgentGraph", "Application", "application"]
