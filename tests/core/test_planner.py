"""Spec T4 (repeated message), T10 (mode decision table), T11 (response re-basing), the
position-only assembly, and the planner -> materialize bridge."""

import pytest
import torch

from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.estimator import GateResult
from kvcomm_sglang.kernels import TensorKVPool, materialize_reference
from kvcomm_sglang.kernels.plan import from_reuse_plan
from kvcomm_sglang.metrics import ReuseStats, relative_error
from kvcomm_sglang.planner import Fallback, ReusePlan
from kvcomm_sglang.rope import rotate

from tests.core.synthetic import D, H, L, ROPE, TEMPLATES, World

AGENTS = ["0", "1", "2", "d"]


def run_request(world, flags=None, force=True):
    """One workflow request; every consumer dense-prefills when its plan falls back."""
    flags = flags or {}
    keys, outcomes = {}, {}
    q = world.content("user_question", 9)
    keys["user_question"] = q.key
    for i, agent in enumerate(AGENTS):
        for ph in TEMPLATES[agent][1]:
            c = world.state.contents[keys[ph]]
            if ph in flags and force:
                c.gate = GateResult(flags[ph], "forced")
        needed = {ph: keys[ph] for ph in TEMPLATES[agent][1]}
        plan = world.state.plan(agent, needed)
        outcomes[agent] = plan
        if isinstance(plan, Fallback):
            world.dense_record(agent, needed, plan.learn)
        if agent != "d":
            keys[f"agent_{agent}_current"] = world.content(f"agent_{agent}_current", 6 + i).key
    return keys, outcomes


def warm(world, n=2):
    for _ in range(n):
        run_request(world)


def test_t10_mode_decision_table():
    world = World()
    warm(world)
    stats = ReuseStats()
    # user question flagged -> every consumer dense
    _, out = run_request(world, {"user_question": True, "agent_0_current": False,
                                 "agent_1_current": False, "agent_2_current": False})
    assert all(isinstance(p, Fallback) for p in out.values())
    # only agent_0_current flagged -> agent 0 reuses, 1, 2 and the decision node dense
    keys, out = run_request(world, {"user_question": False, "agent_0_current": True,
                                    "agent_1_current": False, "agent_2_current": False})
    assert isinstance(out["0"], ReusePlan)
    assert all(isinstance(out[a], Fallback) and out[a].reason.startswith("new_anchor")
               for a in "12d")
    for agent, plan in out.items():
        stats.record_call(agent, 50, 40 if isinstance(plan, ReusePlan) else 0,
                          None if isinstance(plan, ReusePlan) else plan.reason)
    assert stats.agent_reuse_rate == 0.25 and stats.fallbacks["new_anchor"] == 3
    # repeated message: the flagged anchor now holds every consumer's deviation -> reuse
    for agent in "12d":
        needed = {ph: keys[ph] for ph in TEMPLATES[agent][1]}
        assert isinstance(world.state.plan(agent, needed), ReusePlan)


def test_no_anchor_for_consumer_falls_back():
    world = World()
    warm(world)
    q = world.content("user_question", 9)
    q.gate = GateResult(False, "forced")
    pool = world.state.anchors.pool("user_question")
    for anchor in pool.anchors.values():
        anchor.deviations.pop("0")
    plan = world.state.plan("0", {"user_question": q.key})
    assert isinstance(plan, Fallback) and plan.reason == "no_anchor_for_consumer"
    assert plan.learn == ["user_question"]


@pytest.mark.parametrize("faithful", [False, True])
def test_position_only_assembly_places_every_piece(faithful):
    cfg = KVCommConfig.faithful() if faithful else KVCommConfig()
    world = World(cfg)
    keys, _ = run_request(world)
    needed = {ph: keys[ph] for ph in TEMPLATES["2"][1]}
    layout = world.state.layout("2", needed)
    k, v = world.state.assemble("2", needed)
    real_k, real_v = world.dense(layout.token_ids)
    # layer 0 depends only on token and position: re-rotated base is exact there (spec T3)
    assert relative_error(k, real_k, 0) > 1e-3
    assert float((k[0] - real_k[0]).abs().max()) < 1e-5
    assert torch.allclose(v[0], real_v[0])


@pytest.mark.parametrize("faithful", [False, True])
def test_t11_response_rebasing(faithful):
    world = World(KVCommConfig.faithful() if faithful else KVCommConfig())
    ids = [11, 12, 13, 14, 15]                          # G = 5 generated tokens
    prompt = 40
    k, v = world.dense(ids[:-1], start=prompt)          # KV of the G-1 fed-back tokens
    c = world.state.register_response("agent_0_current", ids, k, v, prompt)
    assert c.token_ids == tuple(ids[:-1]) and c.kv.length == 4
    expected = rotate(k, torch.full((4,), -prompt), ROPE) if faithful else \
        rotate(k, -torch.arange(prompt, prompt + 4), ROPE)
    assert torch.allclose(c.kv.k, expected, atol=1e-6)
    with pytest.raises(ValueError, match="generated ids need KV"):
        world.state.register_response("agent_0_current", ids, k[:, :2], v[:, :2], prompt)


def test_t4_repeated_message_weights_and_formula():
    world = World()
    warm(world, 3)
    keys, _ = run_request(world, {"user_question": True})      # creates anchor m for consumers
    needed = {"user_question": keys["user_question"]}
    plan = world.state.plan("0", needed)
    assert isinstance(plan, ReusePlan)
    content, template = plan.pieces
    m = [a.key for a in content.anchors].index(keys["user_question"])
    assert torch.all(template.weights_k.argmax(0) == m)        # prefix weights: peaked on m
    assert float(template.weights_k[m].mean()) > 0.9
    assert float(content.weights_k[m].max()) < 0.99            # placeholder weights stay soft
    # corrected KV equals the formula of spec §4.3, written out independently
    k, v = world.state.assemble("0", needed, plan)
    devs = [a.deviations["0"] for a in template.anchors]
    src = template.source
    dk = sum(w[:, None] * d.template.k for w, d in zip(template.weights_k, devs))
    dk[0] = 0
    start = template.start
    expected = rotate(src.k + dk, torch.arange(start, start + src.length), ROPE)
    assert torch.allclose(k[:, start:], expected, atol=1e-5)
    real_k, real_v = world.dense(plan.layout.token_ids)
    base_k, _ = world.state.assemble("0", needed)
    err = relative_error(k, real_k)
    assert err < 0.5 * relative_error(base_k, real_k)
    tail_err = relative_error(k[:, start:], real_k[:, start:])
    assert tail_err < 0.1 * relative_error(base_k[:, start:], real_k[:, start:])


def reused_plan(seed: int):
    """A warmed world and agent 2's ReusePlan of one more request whose messages all reuse."""
    world = World(seed=seed)
    warm(world, 3)
    keys, out = run_request(world, {"user_question": False, "agent_0_current": False,
                                    "agent_1_current": False, "agent_2_current": False})
    plan = out["2"]
    assert isinstance(plan, ReusePlan)
    return world, keys, plan


def test_materialize_reference_equals_planner_assembly():
    world, keys, plan = reused_plan(seed=3)
    needed = {ph: keys[ph] for ph in TEMPLATES["2"][1]}
    want_k, want_v = world.state.assemble("2", needed, plan)
    pool = TensorKVPool(L, 4096, H, D)
    slots = {}

    def slots_of(source):
        ident = id(source) if not isinstance(source, tuple) else (id(source[0]), source[1], source[2])
        if ident not in slots:
            if isinstance(source, tuple):
                anchor, consumer, kind = source
                d = anchor.deviations[consumer]
                block = d.content if kind == "content" else d.template
                k, v = block.k, block.v
            else:
                k, v = source.k, source.v
            slots[ident] = pool.alloc(k.shape[1])
            pool.write(slots[ident], k, v)
        return slots[ident]

    n = plan.layout.total_length - plan.layout.prefix_length
    dst = pool.alloc(n)
    for kb in pool.k_buffer:
        kb[dst] = float("nan")
    mplan = from_reuse_plan(plan, dst, slots_of, L, H, D)
    materialize_reference(mplan, pool, ROPE.cos_sin_table(256))
    got_k, got_v = pool.read(dst)
    x0 = plan.layout.prefix_length
    assert torch.allclose(got_k, want_k[:, x0:], atol=1e-5)
    assert torch.allclose(got_v, want_v[:, x0:], atol=1e-5)
    # a row range cutting pieces in the middle (load-back after a partial prefix match, tail
    # recomputed) flattens to exactly those rows of the full plan
    lo, hi = x0 + 3, plan.layout.total_length - 2
    part = from_reuse_plan(plan, dst[lo - x0:hi - x0], slots_of, L, H, D, rows=(lo, hi))
    keep = (mplan.positions >= lo) & (mplan.positions < hi)
    assert part.positions.tolist() == list(range(lo, hi))
    for name in ("dst_slots", "src_slots", "positions", "dev_slots", "token_wk", "token_wv",
                 "group", "channel_wk", "channel_wv"):
        full = getattr(mplan, name)
        want = full if name.startswith("channel") else full[keep]
        assert torch.equal(getattr(part, name), want), name
    with pytest.raises(ValueError, match="dst slots given"):
        from_reuse_plan(plan, dst[:3], slots_of, L, H, D, rows=(lo, hi))
    if torch.cuda.is_available():
        # pinned staging and a non-blocking copy: the same columns, intact after the next plan
        # has reused the staging buffer
        cuda = from_reuse_plan(plan, dst.cuda(), slots_of, L, H, D)
        from_reuse_plan(plan, dst[lo - x0:hi - x0].cuda(), slots_of, L, H, D, rows=(lo, hi))
        for name in ("src_slots", "positions", "dev_slots", "group", "token_wk", "channel_wk"):
            assert torch.equal(getattr(cuda, name).cpu(), getattr(mplan, name)), name


def test_bad_inputs():
    world = World()
    with pytest.raises(ValueError, match="no registered template"):
        world.state.plan("zz", {})
    with pytest.raises(ValueError, match="unknown content"):
        world.state.plan("0", {"user_question": "nope"})
    q = world.content("user_question", 4)
    with pytest.raises(ValueError, match="real KV has"):
        world.state.record("0", {"user_question": q.key}, ["user_question"],
                           torch.randn(L, 3, H, D), torch.randn(L, 3, H, D))
    with pytest.raises(ValueError, match="content ids but"):
        world.state.register_content("user_question", [1, 2], torch.randn(L, 3, H, D),
                                     torch.randn(L, 3, H, D), torch.arange(3))


def test_cached_matches_equal_fresh_distances_and_follow_evictions():
    """Weights come from distances computed once per (content, anchor); they equal the estimator
    on freshly gathered anchors, and an evicted anchor leaves every cache."""
    from kvcomm_sglang.estimator import placeholder_distances, prefix_distances, softmax_weights

    world, keys, plan = reused_plan(seed=5)
    for content_plan, template_plan in zip(plan.pieces[0::2], plan.pieces[1::2]):
        base = content_plan.source
        t = base.length
        heads = torch.stack([a.emb.k[:, :t] for a in content_plan.anchors])
        tails = torch.stack([a.emb.k[:, a.length - t:] for a in content_plan.anchors])
        assert torch.allclose(content_plan.weights_k, softmax_weights(placeholder_distances(base.k, heads)))
        assert torch.allclose(template_plan.weights_k, softmax_weights(prefix_distances(base.k, tails)))
    content = world.state.contents[keys["user_question"]]
    assert content.matches and content.weights
    pool = world.state.anchors.pool("user_question")
    victim = pool.evict_one()
    assert victim not in content.matches
    assert all(victim not in anchor_set for anchor_set in content.weights)


def test_matcher_hook_is_used_for_gate_and_weights():
    from kvcomm_sglang.planner import reference_match

    calls = []

    def matcher(kv, embs):
        calls.append(len(embs))
        return reference_match(kv, embs)

    plain, hooked = World(seed=7), World(seed=7)
    hooked.state.matcher = matcher
    for world in (plain, hooked):
        warm(world, 3)
    assert calls                                   # the gate of every new content used it
    _, a = run_request(plain)
    _, b = run_request(hooked)
    for agent in AGENTS:
        assert type(a[agent]) is type(b[agent])
        if isinstance(a[agent], ReusePlan):
            for pa, pb in zip(a[agent].pieces, b[agent].pieces):
                assert torch.equal(pa.weights_k, pb.weights_k)



def test_weights_are_ready_before_the_plan():
    """A captured content's weights for every consumer's anchor set are computed at capture
    (and after anchors change), so planning a request runs no stack and no softmax; they are
    the estimator's weights on the anchors the plan uses."""
    from kvcomm_sglang.estimator import placeholder_distances, softmax_weights
    from tests.torch_calls import TorchCalls

    world = World(seed=11)
    warm(world, 3)
    keys, planned = {"user_question": world.content("user_question", 9).key}, 0
    for i, agent in enumerate(AGENTS):
        needed = {ph: keys[ph] for ph in TEMPLATES[agent][1]}
        for key in needed.values():
            world.state.contents[key].gate = GateResult(False, "forced")
        with TorchCalls() as calls:
            plan = world.state.plan(agent, needed)
        if isinstance(plan, ReusePlan):
            planned += 1
            assert not {"softmax", "stack"} & set(calls.names), (agent, calls.names)
            for piece in plan.pieces[0::2]:
                t = piece.source.length
                heads = torch.stack([a.emb.k[:, :t] for a in piece.anchors])
                want = softmax_weights(placeholder_distances(piece.source.k, heads))
                assert torch.allclose(piece.weights_k, want)
        if agent != "d":
            keys[f"agent_{agent}_current"] = world.content(f"agent_{agent}_current", 6 + i).key
    assert planned >= 3


def test_match_cache_budget_drops_least_recent_caches_and_plans_stay_the_same():
    """Distances and weights live outside the KV pool: their bytes are accounted over all
    contents and bounded, least recently used first; a content that lost its caches gets the
    same weights again when a plan needs them."""
    reuse_all = {"user_question": False, "agent_0_current": False, "agent_1_current": False,
                 "agent_2_current": False}
    free = World(seed=13)
    warm(free, 3)
    _, want = run_request(free, reuse_all)
    largest = max(c.cache_nbytes for c in free.state.contents.values())
    assert free.state.cache.dropped == 0 and largest > 0

    budget = 2 * largest
    tight = World(KVCommConfig(match_cache_bytes=budget), seed=13)
    warm(tight, 3)
    keys, got = run_request(tight, reuse_all)
    cache = tight.state.cache
    assert cache.dropped > 0
    assert cache.used == sum(c.cache_nbytes for c in tight.state.contents.values())
    assert cache.used <= budget + largest
    for agent in AGENTS:
        assert type(got[agent]) is type(want[agent]), agent
        if isinstance(want[agent], ReusePlan):
            for a, b in zip(got[agent].pieces, want[agent].pieces):
                assert torch.allclose(a.weights_k, b.weights_k), agent
                assert torch.allclose(a.weights_v, b.weights_v), agent
    content = tight.state.contents[keys["user_question"]]
    before = cache.used
    tight.state.drop_content(content.key)
    assert cache.used == before - content.cache_nbytes
    tight.state.release_caches()
    assert cache.used == 0 and not cache.entries


def test_match_cache_evicts_least_recently_used_first():
    from kvcomm_sglang.planner import Content, MatchCache

    cache = MatchCache(budget_bytes=250)
    a, b, c = (Content(k, "user_question", (1,), None) for k in "abc")
    for content in (a, b):
        content.cache_nbytes = 100
        cache.update(content)
    cache.update(a)                                  # a used again: b is now the oldest
    b.cache_nbytes = 90
    cache.update(b, used=False)                      # b shrank (an anchor went): still oldest
    assert list(cache.entries) == [id(b), id(a)] and cache.used == 190
    c.cache_nbytes = 100
    cache.update(c)                                  # 290 > 250: b loses its caches
    assert list(cache.entries) == [id(a), id(c)] and cache.used == 200
    assert b.cache_nbytes == 0 and b.matches == {} and cache.dropped == 1
    c.cache_nbytes = 400
    cache.update(c)                                  # alone over budget: only a goes
    assert list(cache.entries) == [id(c)] and cache.used == 400
