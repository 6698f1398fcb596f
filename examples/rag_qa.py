"""Retrieval-augmented QA: the retrieved passages are shared content that every agent's prompt
contains; with KVCOMM their KV is computed once (by the first agent's call) and reused by all
agents.
Plain @sgl.function programs: only the backend and the workflow() block are KVCOMM-specific.

    python examples/rag_qa.py --url http://127.0.0.1:30000
"""

import argparse

import sglang as sgl

from kvcomm_sglang.frontend import KVCommEndpoint, workflow

CORPUS = {
    "Paris": "Paris is the capital and largest city of France, on the river Seine.",
    "Mars": "Mars is the fourth planet from the Sun and is called the Red Planet.",
    "Pacific": "The Pacific Ocean is the largest and deepest of Earth's oceans.",
    "Gold": "Gold is a chemical element with the symbol Au and atomic number 79.",
}
QUESTIONS = ["What is the capital of France?", "Which planet is called the Red Planet?",
             "What is the largest ocean?", "What is the chemical symbol for gold?"]


def retrieve(question: str) -> str:
    """A toy retriever: every passage, the best word-overlap first."""
    words = set(question.lower().split())
    ranked = sorted(CORPUS.values(), key=lambda p: -len(words & set(p.lower().split())))
    return "\n".join(ranked)


@sgl.function
def reader(s, question, passages):
    s += sgl.system("You answer strictly from the passages.")
    s += sgl.user("Passages:\n" + passages + "\nQuestion:\n" + question + "\nAnswer briefly.")
    s += sgl.assistant(sgl.gen("answer", max_tokens=24, temperature=0))


@sgl.function
def verifier(s, question, passages, answer):
    s += sgl.system("You verify answers against the passages.")
    s += sgl.user("Passages:\n" + passages + "\nQuestion:\n" + question + "\nProposed answer:\n"
                  + answer + "\nIs it supported? Reply with the corrected short answer.")
    s += sgl.assistant(sgl.gen("verdict", max_tokens=24, temperature=0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    sgl.set_default_backend(KVCommEndpoint(args.url))
    with workflow("rag-qa") as wf:
        for question in QUESTIONS:
            passages = retrieve(question)
            answer = reader.run(question=question, passages=passages)["answer"]
            verdict = verifier.run(question=question, passages=passages, answer=answer)["verdict"]
            print(f"Q: {question}\n   reader: {answer!r}\n   verifier: {verdict!r}")
    for call in wf.calls:
        print(f"agent {call.agent:<4} {call.mode:<5} reused {call.reused_tokens:>3}/"
              f"{call.prompt_tokens:<4} TTFT {call.ttft_s:.3f} s {call.fallback_reason or ''}")


if __name__ == "__main__":
    main()
