"""Workflow ids are secrets (no server): every workflow gets its own unguessable namespace, a
name is a label, ``use`` re-enters the same namespace, and the test client builds namespaces
the same way."""

from kvcomm_sglang.frontend import Workflow, use, workflow
from kvcomm_sglang.protocol import validate_namespace
from tests.server import workflow_client


def test_a_workflow_namespace_is_a_fresh_secret_whatever_its_name():
    with workflow("team") as first:
        pass
    with workflow("team") as second:
        pass
    assert validate_namespace(first.namespace)       # the server's rule: it raises otherwise
    assert first.namespace != second.namespace            # a shared label shares nothing
    assert "team" not in first.namespace and first.name == "team"
    assert first.secret not in repr(first)                  # logs of the object keep it
    assert len({Workflow("x").namespace for _ in range(200)}) == 200


def test_use_re_enters_the_same_namespace_and_dense_mode_has_none():
    with workflow() as wf:
        namespace = wf.namespace
    with use(wf) as again:
        assert again is wf and again.namespace == namespace
    with workflow(mode="dense") as dense:
        assert dense.namespace is None


def test_frontend_names_are_importable_from_the_package():
    from kvcomm_sglang.frontend import Agent, AgentGraph

    graph = AgentGraph([Agent("solver", "You solve."), Agent("checker", "You check.")])
    assert [a.name for a in graph.order()] == ["solver", "checker"]


def test_the_test_client_sends_every_request_in_a_fresh_secret_namespace(monkeypatch):
    sent = []
    monkeypatch.setattr(workflow_client, "generate",
                        lambda url, ids, n, hints=None, namespace=None: sent.append(namespace))
    first = workflow_client.Workflow("http://127.0.0.1:9", "e2e")
    second = workflow_client.Workflow("http://127.0.0.1:9", "e2e")
    assert validate_namespace(first.namespace) and first.namespace != second.namespace
    hinted = [ns for ns in sent if ns.startswith("kvcomm:")]
    assert hinted and all(validate_namespace(ns) for ns in hinted)
    assert set(sent) == {first.namespace, first.plain_namespace,
                         second.namespace, second.plain_namespace}


def test_agent_graphs_keep_one_secret_namespace_each():
    from kvcomm_sglang.frontend import Agent, AgentGraph

    graph, other = (AgentGraph([Agent("solver", "You solve.")]) for _ in range(2))
    assert graph._workflow("kvcomm") is graph._workflow("kvcomm")     # warms up over questions
    assert validate_namespace(graph._workflow("kvcomm").namespace)
    assert graph._workflow("kvcomm").namespace != other._workflow("kvcomm").namespace


def test_workflows_of_one_application_name_it_by_its_secret_and_share_template_passes():
    from kvcomm_sglang.frontend import Agent, AgentGraph, application
    from kvcomm_sglang.protocol import split_namespace

    app, other = application("support"), application("support")
    with workflow(application=app) as first:
        pass
    with workflow(application=app) as second:
        pass
    assert validate_namespace(first.namespace) and app.secret not in repr(app)
    assert split_namespace(first.namespace) == (app.secret, first.secret)
    assert split_namespace(second.namespace)[0] == app.secret != other.secret
    assert first.namespace != second.namespace
    shape = (("You solve.", "Answer."), ("user_question",))
    first.missing_templates.add("0")
    assert first.needs_template("0", shape)
    first.sent_template("0")
    second.missing_templates.add("0")
    assert not second.needs_template("0", shape)           # the application has it already
    second.forget("unknown_template", "0")              # the server lost it: send again
    assert second.needs_template("0", shape)
    graph = AgentGraph([Agent("solver", "You solve.")], application=app)
    assert split_namespace(graph._workflow("kvcomm").namespace)[0] == app.secret
    assert split_namespace(first.namespace[:7] + first.secret) == (first.secret, first.secret)
