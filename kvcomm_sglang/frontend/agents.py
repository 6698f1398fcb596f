"""Agent / AgentGraph: multi-agent workflows as @sgl.function calls, dense or with KVCOMM.

An agent's user message is built from the topology (the question, then the answers it sees), or
written by hand in ``Agent.instruction`` with placeholders ``{user_question}``,
``{agent_<name>_current}`` (that agent's answer in this round) and ``{agent_<name>_history}``
(its answer in the previous round). Topologies, for agent k of n in each round:

* ``full``: sees the current answers of agents 0..k-1 and the previous round's of k..n-1;
* ``chain``: sees agent k-1's current answer (agent 0: the last agent's previous answer) and
  its own previous answer;
* ``star``: agents[0] is the hub and runs last: it sees every other agent's current answer;
  the others see the hub's previous answer;
* ``debate``: round 1 sees only the question; later rounds see every agent's previous answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sglang as sgl

from kvcomm_sglang.frontend import scope
from kvcomm_sglang.segments import PLACEHOLDER_RE, parse_placeholder

TOPOLOGIES = ("full", "chain", "star", "debate")
NAME_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
NO_ANSWER = "(no answer yet)"


@dataclass(frozen=True)
class Agent:
    name: str                       # letters and digits: it names placeholders agent_<name>_*
    system: str
    instruction: str = "Give your answer briefly."

    def __post_init__(self):
        if not NAME_RE.match(self.name):
            raise ValueError(f"agent name {self.name!r} must be 1-64 letters or digits (it is "
                             "used in placeholders such as {agent_<name>_current})")


@dataclass
class AgentCall:
    agent: str
    round: int
    ttft_s: float
    mode: str                       # "reuse" | "dense"
    reused_tokens: int
    prompt_tokens: int
    fallback_reason: str | None
    text: str = ""


@dataclass
class RunResult:
    question: str
    answers: list[str] = field(default_factory=list)      # each call's text, execution order
    calls: list[AgentCall] = field(default_factory=list)

    @property
    def final_answer(self) -> str:
        return self.answers[-1] if self.answers else ""


@sgl.function
def _agent_program(s, question, system, user, max_tokens):
    s += sgl.system(system)
    s += sgl.user(user)
    s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0))


class AgentGraph:
    def __init__(self, agents, topology: str = "full", rounds: int = 1, max_tokens: int = 64,
                 application: scope.Application | None = None):
        """``application``: the graph's workflows share the server's templates and anchors with
        every other workflow of it (``scope.application()``), so they reuse from the first
        question once it is warm."""
        self.agents = list(agents)
        if not self.agents:
            raise ValueError("an AgentGraph needs at least one Agent")
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}: use one of {', '.join(TOPOLOGIES)}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        names = [a.name for a in self.agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique, got {names}")
        self.topology, self.rounds, self.max_tokens = topology, rounds, max_tokens
        self.application = application
        self._workflows: dict[str, scope.Workflow] = {}
        for agent in self.agents:
            self._check_placeholders(agent)

    # ---- structure ----
    def order(self) -> list[Agent]:
        """Execution order within a round (star: the hub last)."""
        return self.agents[1:] + self.agents[:1] if self.topology == "star" else self.agents

    def visible(self, k: int, round_: int) -> list[tuple[str, str]]:
        """(agent name, "current" | "history") that agents[k] sees in ``round_`` (0-based)."""
        names, n = [a.name for a in self.agents], len(self.agents)
        later = round_ > 0
        if self.topology == "full":
            return [(names[j], "current") for j in range(k)] + \
                ([(names[j], "history") for j in range(k, n)] if later else [])
        if self.topology == "chain":
            seen = [(names[k - 1], "current")] if k > 0 else \
                ([(names[-1], "history")] if later and n > 1 else [])
            return seen + ([(names[k], "history")] if later else [])
        if self.topology == "star":
            if k == 0:
                return [(names[j], "current") for j in range(1, n)]
            return [(names[0], "history")] if later else []
        return [(name, "history") for name in names] if later else []       # debate

    def user_template(self, k: int, round_: int) -> str:
        agent = self.agents[k]
        if PLACEHOLDER_RE.search(agent.instruction):
            return agent.instruction
        parts = [f"Agent {agent.name}, the task is:\n{{user_question}}\n"]
        for name, kind in self.visible(k, round_):
            if kind == "current":
                parts.append(f"\nAgent {name} answered:\n{{agent_{name}_current}}\n")
            elif name == agent.name:
                parts.append(f"\nYour previous answer:\n{{agent_{name}_history}}\n")
            else:
                parts.append(f"\nIn the previous round, agent {name} answered:\n"
                             f"{{agent_{name}_history}}\n")
        return "".join(parts) + "\n" + agent.instruction

    def _check_placeholders(self, agent: Agent) -> None:
        names = [a.name for a in self.agents]
        position = {a.name: i for i, a in enumerate(self.order())}
        for match in PLACEHOLDER_RE.finditer(agent.instruction):
            try:
                family, owner, kind = parse_placeholder(match.group(1))
            except ValueError as exc:
                raise ValueError(f"agent {agent.name!r}: {exc}") from None
            if family == "user_question":
                continue
            if family == "condition":
                raise ValueError(f"agent {agent.name!r}: {{{match.group(1)}}}: AgentGraph fills "
                                 "only user_question and agent_<name>_current|history")
            if owner not in names:
                raise ValueError(f"agent {agent.name!r}: placeholder {{{match.group(1)}}} names "
                                 f"no agent (agents: {names}); rename it or add Agent({owner!r}, ...)")
            if kind == "current" and position[owner] >= position[agent.name]:
                raise ValueError(f"agent {agent.name!r}: {{{match.group(1)}}} is not answered yet "
                                 f"when {agent.name!r} runs; use {{agent_{owner}_history}}")

    # ---- running ----
    def run(self, question: str, endpoint, mode: str = "kvcomm") -> RunResult:
        """All rounds for one question. Runs of one graph and mode share a workflow namespace,
        so templates and anchors warm up over questions (or inside the caller's workflow())."""
        wf = self._workflow(mode)
        result, answers = RunResult(question), {}
        with scope.use(wf):
            for round_ in range(self.rounds):
                previous, answers = answers, {}
                for agent in self.order():
                    k = self.agents.index(agent)
                    user = _fill(self.user_template(k, round_), question, answers, previous)
                    state = _agent_program.run(question=question, system=agent.system, user=user,
                                               max_tokens=self.max_tokens, backend=endpoint)
                    answers[agent.name] = text = state["answer"]
                    result.answers.append(text)
                    result.calls.append(_call(agent.name, round_ + 1, text,
                                              state.get_meta_info("answer")))
        return result

    def _workflow(self, mode: str) -> scope.Workflow:
        active = scope.current_workflow()
        if active is not None:
            if active.mode != mode:
                raise ValueError(f"run(mode={mode!r}) inside a workflow of mode {active.mode!r}")
            return active
        if mode not in scope.MODES:
            raise ValueError(f"mode must be one of {scope.MODES}, got {mode!r}")
        if mode not in self._workflows:
            self._workflows[mode] = scope.Workflow(f"graph-{mode}", mode,
                                                   application=self.application)
        return self._workflows[mode]


def _fill(template: str, question: str, current: dict, previous: dict) -> str:
    def value(match):
        name = match.group(1)
        if name == "user_question":
            return question
        _, owner, kind = parse_placeholder(name)
        return (current if kind == "current" else previous).get(owner, NO_ANSWER)
    return PLACEHOLDER_RE.sub(value, template)


def _call(agent: str, round_: int, text: str, meta: dict | None) -> AgentCall:
    record = (meta or {}).get("kvcomm_call")
    if record is None:
        raise RuntimeError("the endpoint reported no KVCOMM call record; run AgentGraph with a "
                           "KVCommEndpoint")
    return AgentCall(agent, round_, record["ttft_s"], record["mode"], record["reused_tokens"],
                     record["prompt_tokens"], record["fallback_reason"], text)
