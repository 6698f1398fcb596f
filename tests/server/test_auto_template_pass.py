"""An agent's template pass in auto mode (no server, no SGLang: the internal request is a
stand-in coroutine): concurrent first calls of one agent send it once, other agents' calls
do not wait for it, a failed pass is sent again by the agent's next call."""

import asyncio

import pytest

from kvcomm_sglang.runtime_patch import auto
from kvcomm_sglang.runtime_patch.auto_workflows import AutoCall, AutoWorkflow


def call(agent: str) -> AutoCall:
    return AutoCall({}, 0, agent, ("m1", "agent_0_current"), template_pass=([1, 2], {}))


def run(monkeypatch, sends: list, gate: asyncio.Event | None = None, fail: bool = False):
    async def send(original, manager, ids, params, namespace):
        sends.append(namespace)
        if gate is not None:
            await gate.wait()
        if fail:
            raise RuntimeError("server gone")

    monkeypatch.setattr(auto, "_send", send)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_concurrent_first_calls_of_one_agent_share_one_pass(monkeypatch):
    sends, wf = [], AutoWorkflow("kvcomm:a.b")

    async def main():
        gate = asyncio.Event()
        run(monkeypatch, sends, gate)
        first = [asyncio.ensure_future(auto._template_pass(None, None, wf, call("0")))
                 for _ in range(3)]
        await settle()
        assert len(sends) == 1 and not any(t.done() for t in first)
        gate.set()
        await asyncio.gather(*first)

    asyncio.run(main())
    assert sends == ["kvcomm:a.b"] and wf.templates_sent == {"0"} and not wf.template_sends


def test_another_agents_pass_does_not_wait_and_a_failed_pass_is_sent_again(monkeypatch):
    sends, wf = [], AutoWorkflow("kvcomm:a.b")

    async def main():
        gate = asyncio.Event()
        run(monkeypatch, sends, gate)
        slow = asyncio.ensure_future(auto._template_pass(None, None, wf, call("0")))
        await settle()
        run(monkeypatch, sends)
        await auto._template_pass(None, None, wf, call("1"))       # done while "0" waits
        assert wf.templates_sent == {"1"} and not slow.done()
        gate.set()
        await slow
        run(monkeypatch, sends, fail=True)
        with pytest.raises(RuntimeError):
            await auto._template_pass(None, None, wf, call("2"))

    asyncio.run(main())
    assert "2" not in wf.templates_sent and not wf.template_sends and len(sends) == 3
