"""An application's templates and anchors survive ``snapshot`` -> ``restore`` into a new state
(what ``--kvcomm-anchor-path`` saves): a new workflow of the restored application plans and
assembles exactly what it would have in the old one, in both storage frames; a template whose
ids no longer hash to its key is refused with the deviations learned under it."""

import pytest
import torch

from kvcomm_sglang.application import ApplicationState
from kvcomm_sglang.config import KVCommConfig
from kvcomm_sglang.planner import KVCommState, ReusePlan
from kvcomm_sglang.snapshot import restore, snapshot
from tests.core.synthetic import ROPE, World

CONFIG = {"gamma": 1.0}        # synthetic KV: every content would be ambiguous to the gate


def warm_world(config: KVCommConfig) -> World:
    world = World(config, seed=3)
    for _ in range(3):
        q = world.content("user_question", 9)
        world.dense_record("0", {"user_question": q.key}, ["user_question"])
    return world


def new_workflow(app, world, seed_offset=7000):
    """A workflow of ``app`` with one new question, its base KV computed as ``world`` does."""
    state = KVCommState(app.config, ROPE, "new", app=app)
    ids = world.ids(9, seed_offset)
    k, v = world.dense(ids)
    return state, state.register_content("user_question", ids, k, v, torch.arange(9))


@pytest.mark.parametrize("faithful", [False, True])
def test_a_restored_application_plans_and_assembles_as_the_saved_one(faithful):
    config = KVCommConfig.faithful(**CONFIG) if faithful else KVCommConfig(**CONFIG)
    world = warm_world(config)
    saved = world.state.app
    restored = ApplicationState(config, ROPE, saved.key)
    assert restore(restored, snapshot(saved)) == []
    assert set(restored.templates) == set(saved.templates)
    assert restored.anchors.num_anchors == saved.anchors.num_anchors == 3
    outputs = []
    for app in (saved, restored):
        world.gen.manual_seed(11)                    # the same new question in both
        state, q = new_workflow(app, world)
        plan = state.plan("0", {"user_question": q.key})
        assert isinstance(plan, ReusePlan)
        outputs.append(state.assemble("0", {"user_question": q.key}, plan))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_a_template_whose_ids_do_not_hash_to_its_key_is_refused_with_its_deviations():
    world = warm_world(KVCommConfig(**CONFIG))
    data = snapshot(world.state.app)
    entry = next(t for t in data["templates"] if t["key"] == "0")
    entry["piece_ids"][0][0] += 1                    # its ids no longer hash to its key
    restored = ApplicationState(world.state.config, ROPE, "x")
    refused = restore(restored, data)
    assert any(line.startswith("template 0:") and "not to its key" in line for line in refused)
    assert "0" not in restored.templates and "1" in restored.templates
    assert restored.anchors.num_anchors == 0         # every anchor held only "0"'s deviations
    assert restore(ApplicationState(world.state.config, ROPE, "y"), {"format": 99}) != []


def test_a_pool_saved_with_neutral_question_bases_is_refused():
    """Format 1 pools hold question embeddings computed after a neutral header; this server's
    bases come from the first call that computed them, so mixing both is refused."""
    world = warm_world(KVCommConfig(**CONFIG))
    data = dict(snapshot(world.state.app), format=1)
    restored = ApplicationState(world.state.config, ROPE, "old")
    assert restore(restored, data) == ["snapshot format 1, this server reads 2"]
    assert restored.anchors.num_anchors == 0 and not restored.templates
