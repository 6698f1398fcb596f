"""The runtime's host path (benchmarks/host_path.py) on SGLang's CPU pools, paper workload: the
torch calls a reused request makes before its kernel, the cost a GPU host pays per call."""

from argparse import Namespace

from benchmarks import host_path


def test_decide_makes_no_torch_call_and_the_flatten_one_view_per_weight_table():
    args = Namespace(warmup=3, workflows=1, output_tokens=16, top=0, device="cpu", agents=5,
                     prefix_tokens=512, input_tokens=1024,
                     compare_flatten=None, shape="tiny", sort="tottime")
    rows, calls = host_path.run(args)
    assert [r["kind"] for r in rows] == ["reuse"] * 5, rows
    assert sorted(calls) == [1, 2, 3, 4, 5]
    for agent, (decide, flatten) in calls.items():
        # prompt checks and planning are host data only (token ids, numpy slots, cached weights)
        assert decide.names == [], (agent, decide.names)
    # agent k reads k messages (the question, then one more per agent): one more content piece
    # and template piece over one more weight table each time, which costs the flatten one
    # view of that table, however many rows it adds
    dispatched = [calls[agent][1].dispatched for agent in range(1, 6)]
    counts = [len(d) for d in dispatched]
    assert [b - a for a, b in zip(counts, counts[1:])] == [1] * 4, dispatched
    assert counts[0] <= 13, dispatched[0]
