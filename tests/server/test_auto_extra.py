"""The hidden token on SGLang's output dicts as TokenizerManager yields them (no server): the
client's view of a ``limit + 1`` request is SGLang's for ``limit``."""

from types import SimpleNamespace

from kvcomm_sglang.runtime_patch.auto_extra import HiddenToken, ask_one_more

LETTERS = "abcdefghij"


def decode(ids):
    return "".join(LETTERS[i] for i in ids)


def out(ids, finish=None, text=None):
    meta = {"finish_reason": finish, "completion_tokens": len(ids),
            "output_token_logprobs": [(-0.5, i, None) for i in ids],
            "output_token_logprobs_length": len(ids)}
    return {"text": decode(ids) if text is None else text, "output_ids": list(ids),
            "meta_info": meta}


def test_cumulative_outputs_lose_the_extra_token_and_finish_at_length():
    hidden = HiddenToken(3, decode, incremental=False)
    assert hidden.hide(out([0, 1]))["text"] == "ab"
    last = hidden.hide(out([0, 1, 2, 3], {"type": "length", "length": 4}))
    assert last["text"] == "abc" and last["output_ids"] == [0, 1, 2]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    assert last["meta_info"]["completion_tokens"] == 3
    assert len(last["meta_info"]["output_token_logprobs"]) == 3
    assert last["meta_info"]["output_token_logprobs_length"] == 3
    assert hidden.cut()


def test_incremental_chunks_lose_the_extra_token():
    hidden = HiddenToken(3, decode, incremental=True)
    first = hidden.hide(out([0, 1]))
    last = hidden.hide({**out([2, 3], {"type": "stop", "matched": 3}), "text": "cd"})
    assert first["text"] + last["text"] == "abc" and last["output_ids"] == [2]
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    assert last["meta_info"]["output_token_logprobs"] == [(-0.5, 2, None)]


def test_a_stop_at_the_limit_is_length_as_sglang_checks_the_length_first():
    hidden = HiddenToken(3, decode, incremental=False)
    last = hidden.hide(out([0, 1, 2], {"type": "stop", "matched": "c"}, text="ab"))
    assert last["text"] == "abc" and last["meta_info"]["finish_reason"]["type"] == "length"
    assert not hidden.cut()


def test_an_early_stop_and_an_abort_pass_untouched():
    hidden = HiddenToken(5, decode, incremental=False)
    early = out([0, 1], {"type": "stop", "matched": 9}, text="ab")
    assert hidden.hide(early) == early and not hidden.cut()
    abort = out([0, 1, 2, 3, 4], {"type": "abort", "message": "x"})
    assert hidden.hide(abort)["meta_info"]["finish_reason"]["type"] == "abort"


def test_one_more_is_asked_only_where_the_context_has_room():
    manager = SimpleNamespace(context_len=10, tokenizer=None, num_reserved_tokens=0)
    obj = SimpleNamespace(input_ids=[1] * 5, sampling_params={"max_new_tokens": 4})
    assert ask_one_more(obj, manager, False).limit == 4
    assert obj.sampling_params["max_new_tokens"] == 5
    full = SimpleNamespace(input_ids=[1] * 6, sampling_params={"max_new_tokens": 4})
    assert ask_one_more(full, manager, False) is None
    assert full.sampling_params["max_new_tokens"] == 4
    none = SimpleNamespace(input_ids=[1], sampling_params={"max_new_tokens": None})
    assert ask_one_more(none, manager, False) is None


def test_a_request_for_hidden_states_or_routed_experts_keeps_its_limit():
    """Those per-token outputs are not trimmed by ``hide``: no extra token is asked for."""
    manager = SimpleNamespace(context_len=100, tokenizer=None, num_reserved_tokens=0)
    for flag in ("return_hidden_states", "return_routed_experts"):
        obj = SimpleNamespace(input_ids=[1] * 5, sampling_params={"max_new_tokens": 4},
                              **{flag: True})
        assert ask_one_more(obj, manager, False) is None
        assert obj.sampling_params["max_new_tokens"] == 4
