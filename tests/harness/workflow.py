"""A 3-agent fully connected workflow (spec §1.3), its templates, and the question set.

Agent k's prompt is one ChatML chat (system + user + assistant header) whose text holds the
placeholders ``{user_question}`` and ``{agent_X_current}`` for every predecessor X < k. A rendered
template splits into text pieces x_0..x_n around placeholders φ_1..φ_n (spec §1.4); each text piece
is tokenized on its own, so the prompt ids are the concatenation of piece ids with the content ids
spliced in, and token boundaries fall exactly at placeholder boundaries. Every placeholder
follows a newline, so (for these templates and content that starts and ends with a non-space
character) the assembled ids equal the tokenization of the whole text with the content inlined.

The question's base KV (spec §2.2) is computed after a neutral context, the user header plus the
same lead-in the templates put before ``{user_question}``; lead-in and question are tokenized
separately, so dropping the context tokens cuts exactly at the question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from kvcomm_sglang.segments import split_template

Encode = Callable[[str], list]

QUESTION_LEAD_IN = "The task is:\n"  # ends in a newline: piece ids == whole-text ids
USER_HEADER = "<|im_start|>user\n"  # ChatML, as the model's chat template writes it


@dataclass(frozen=True)
class AgentRole:
    name: str
    system: str


AGENTS: tuple[AgentRole, ...] = (
    AgentRole("Solver", "You are a careful problem solver. Work out the task and state the "
                        "final answer in one or two short sentences."),
    AgentRole("Checker", "You are a strict checker. Read the task and the earlier answer, say "
                         "whether it is right, and give the correct final answer briefly."),
    AgentRole("Summarizer", "You are a concise summarizer. Combine the earlier answers into one "
                            "short final answer to the task."),
)


@dataclass(frozen=True)
class AgentTemplate:
    """Agent k's template: text pieces x_0..x_n (ids, each tokenized on its own), phi_1..phi_n."""

    agent: str
    text_ids: tuple[tuple[int, ...], ...]
    placeholders: tuple[str, ...]


@dataclass(frozen=True)
class QuestionBase:
    """Base-KV recipe of a question: run context_ids + content_ids, keep the last len(content)."""

    context_ids: list[int]
    content_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.content_ids

    @property
    def drop(self) -> int:
        return len(self.context_ids)


# The judge (an extra agent after the three, spec-free): shown the Solver's and the Checker's
# answers, it picks one. Judge consistency = the same pick as under dense prefill.
JUDGE = AgentRole("Judge", "You are a fair judge. Two agents answered the task. Decide which "
                           "answer is right and reply with its agent number only.")
JUDGE_READS = (0, 1)
JUDGE_INSTRUCTION = "\nWhich answer is right, Agent 0 or Agent 1? Reply with the number only."


def user_template(k: int) -> str:
    """The user message of agent k, with placeholders for the question and agents 0..k-1."""
    if not 0 <= k < len(AGENTS):
        raise ValueError(f"agent index {k} out of range 0..{len(AGENTS) - 1}")
    return _user_text(range(k), "\nGive your final answer briefly.")


def judge_user_template() -> str:
    """The judge's user message: the question and the answers of agents ``JUDGE_READS``."""
    return _user_text(JUDGE_READS, JUDGE_INSTRUCTION)


def _user_text(reads, instruction: str) -> str:
    parts = [f"{QUESTION_LEAD_IN}{{user_question}}\n"]
    for x in reads:
        parts.append(f"\nAgent {x}, role is {AGENTS[x].name}, output is:\n"
                     f"{{agent_{x}_current}}\n")
    parts.append(instruction)
    return "".join(parts)


def render_template(render_chat: Callable[[str, str], str], k: int) -> str:
    """Agent k's whole prompt template as text: ``render_chat(system, user)``, e.g.
    ``HFModel.render_chat``, must end with the assistant header."""
    return render_chat(AGENTS[k].system, user_template(k))


def agent_templates(render_chat: Callable[[str, str], str], encode: Encode,
                    judge: bool = False) -> list[AgentTemplate]:
    """The tokenized templates of all agents, in execution order (core ``split_template``);
    ``judge``: the judge last, as agent ``len(AGENTS)``."""
    texts = [render_template(render_chat, k) for k in range(len(AGENTS))]
    if judge:
        texts.append(render_chat(JUDGE.system, judge_user_template()))
    out = []
    for k, text in enumerate(texts):
        pieces, names = split_template(text)
        out.append(AgentTemplate(str(k), tuple(tuple(encode(t)) for t in pieces), tuple(names)))
    return out


def judge_pick(text: str) -> str:
    """The agent the judge picked: "0" or "1" (the first of them named), "none" otherwise."""
    match = re.search(r"(?<![0-9])([01])(?![0-9])", text)
    return match.group(1) if match else "none"


def stand_in_text(name: str) -> str:
    """The official template-pass stand-in for a placeholder (spec §1.4 [QUIRK])."""
    return f"{{'{name}'}} "


def question_base(question: str, encode: Encode) -> QuestionBase:
    """Base recipe of a question (spec §2.2): user header + lead-in, then the question."""
    return QuestionBase(encode(USER_HEADER + QUESTION_LEAD_IN), encode(question))


# (question, expected short answer); fixed order, written for this project.
TASKS: tuple[tuple[str, str], ...] = (
    ("Tom has 3 apples and buys 5 more. How many apples does he have now?", "8"),
    ("A train travels 60 miles per hour for 2 hours. How far does it go?", "120"),
    ("What is the capital of France?", "Paris"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Sara had 12 candies and gave 4 to her friend. How many candies are left?", "8"),
    ("What is 7 times 8?", "56"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
    ("If today is Monday, what day will it be in three days?", "Thursday"),
    ("A box holds 6 eggs. How many eggs are in 4 boxes?", "24"),
    ("What is the boiling point of water in degrees Celsius at sea level?", "100"),
    ("What gas do plants take from the air for photosynthesis?", "carbon dioxide"),
    ("A pencil costs 2 dollars. How much do 7 pencils cost?", "14"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("All cats are animals and Tom is a cat. Is Tom an animal?", "yes"),
    ("There are 20 students and half of them wear glasses. How many wear glasses?", "10"),
    ("How many days are there in a week?", "7"),
    ("What is the chemical symbol for gold?", "Au"),
    ("A rope 15 meters long is cut into 3 equal pieces. How long is each piece?", "5"),
    ("Which is heavier, a kilogram of iron or a kilogram of feathers?", "same"),
    ("What is the square root of 81?", "9"),
    ("Anna is older than Ben, and Ben is older than Carl. Who is the youngest?", "Carl"),
    ("How many legs does a spider have?", "8"),
    ("A shop sells 9 shirts on Monday and 11 on Tuesday. How many shirts is that in total?",
     "20"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32"),
    ("On which continent is Egypt?", "Africa"),
    ("A clock shows 3 o'clock. What time will it show 5 hours later?", "8"),
    ("What is 100 minus 37?", "63"),
    ("What is the main language spoken in Brazil?", "Portuguese"),
    ("A farmer has 4 cows. How many legs do the cows have together?", "16"),
    ("What is the opposite of the word cold?", "hot"),
    ("Lisa reads 10 pages a day. How many pages does she read in 6 days?", "60"),
    ("Which animal is the largest mammal on Earth?", "blue whale"),
    ("You have 2 quarters and 3 dimes. How many cents is that?", "80"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("A bus has 30 seats and 18 are taken. How many seats are free?", "12"),
    ("Is 17 a prime number?", "yes"),
)
QUESTIONS: tuple[str, ...] = tuple(question for question, _ in TASKS)
ANSWERS: tuple[str, ...] = tuple(answer for _, answer in TASKS)
