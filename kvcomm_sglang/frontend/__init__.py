"""KVCommEndpoint and AgentGraph for @sgl.function agent programs (DESIGN.md §2). Built by the
frontend issue."""
