"""Schemathesis over the server's OpenAPI schema: requests generated from it (valid, and invalid ones made from it)
to every route get no server error (5xx). The completion routes' bodies are in the schema as the pydantic models
that check them."""

from __future__ import annotations

import pytest

from moerge.serving import ServerConfig, create_app

from helpers import live, two_expert_model

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    model, tok = two_expert_model(tmp)
    app = create_app(model, tok, ServerConfig(batch_window=0.0, max_batch=16))
    with live(app) as url:
        app.state.url = url
        yield app
    model.close()


def test_the_completion_bodies_are_in_the_schema(app):
    paths = app.openapi()["paths"]
    body = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionBody"}
    assert "messages" in app.openapi()["components"]["schemas"]["ChatBody"]["properties"]


def _operations(app) -> list:
    """The operations of the live server's schema (over HTTP: an ASGI client would run the app's lifespan, which
    closes the engine, around every request)."""
    schema = schemathesis.openapi.from_url(f"{app.state.url}/openapi.json")
    return [op.ok() for op in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "broken"])
def test_no_request_the_schema_allows_or_breaks_gets_a_server_error(app, mode):
    """Every route, with requests generated from its schema (schemathesis' strategies, run by hypothesis here: its
    pytest plugin does not load under this pytest): none is answered with a 5xx."""
    operations = _operations(app)
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/experts", "DELETE /v1/experts/{name}"}
    ran: dict[str, int] = {}

    def fuzz(op, name):
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.generate])
        def run(case):
            ran[name] = ran.get(name, 0) + 1
            case.call_and_validate(checks=[not_a_server_error])

        run()

    for op in operations:
        try:
            fuzz(op, f"{op.method.upper()} {op.path}")
        except Unsatisfiable:  # nothing to break: a route whose only input is a free string has no invalid request
            assert mode is GenerationMode.NEGATIVE and not op.body
    for name in ("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/experts"):
        assert ran.get(name, 0) >= 10, ran
