"""Every operation of the API's OpenAPI schema, fuzzed with schemathesis: no 5xx, ever.

The real app runs in this process (schemathesis' ASGI transport) on the session's real
Redis and database, authenticated with a real API key. Hypothesis generates bodies, path
and query parameters and headers from the schema, valid ones and invalid ones (wrong
types, huge numbers, odd unicode, missing fields); whatever a client can send must be
answered with a 2xx, 3xx or 4xx, never a server error.

Random ids name nothing, so most calls on ``/{conversation_id}`` or ``/{user_id}`` would
only ever meet a 404: before each operation's test a conversation with messages, a key
moment, a memory block and an archival entry are planted for the key, and about half of
the generated cases address it instead (:func:`flatmap_path_parameters`).
"""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from app.api.main import create_app
from app.core.config import Settings, use_settings
from app.memory import tools
from app.memory.archive import NewEntry
from app.memory.keys import tenant_of
from app.memory.service import get_memory
from app.memory.store import NewMessage
from app.store import db, keys

# Examples per operation: enough to reach every parameter's edge cases, few enough that the
# whole schema (27 operations) runs in well under two minutes on two cores.
MAX_EXAMPLES = 25
# The longest a reply is waited for (``respond.wait``): nothing runs the reply workflow here.
RESPOND_WAIT_S = 0.2

# What the current test planted: path parameter name → the values that name something.
PLANTED: dict[str, list[Any]] = {}

# The schema is the app's own; which app serves the calls is the ``app`` fixture's (each
# call names it), so nothing starts at collection.
schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.hook
def flatmap_path_parameters(
    context: schemathesis.HookContext, path_parameters: dict[str, Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """The generated path parameters, each one that can name a planted thing replaced by
    one half of the time."""
    names = [name for name in path_parameters or {} if name in PLANTED]
    if not names:
        return st.just(path_parameters)
    return st.fixed_dictionaries(
        {n: st.one_of(st.just(path_parameters[n]), st.sampled_from(PLANTED[n])) for n in names}
    ).map(lambda planted: {**path_parameters, **planted})


@schema.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    """A reply's wait capped at RESPOND_WAIT_S: nothing runs the reply workflow here, and
    ``respond.timeout_s`` has no upper bound (a client may hold a request that long)."""
    respond = body.get("respond") if isinstance(body, dict) else None
    if isinstance(respond, dict) and isinstance(respond.get("timeout_s"), int | float):
        respond["timeout_s"] = min(respond["timeout_s"], RESPOND_WAIT_S)
    return body


@pytest.fixture
def fuzz_settings(isolated: Settings) -> Iterator[Settings]:
    """The session's database, a Redis database of its own, no embedding model (nothing
    would answer a query embedding in this process) and short waits."""
    update = {"memory_embed_model": "", "memory_respond_timeout_s": RESPOND_WAIT_S}
    with use_settings(isolated.model_copy(update=update)) as s:
        yield s


@pytest.fixture
def api_key(fuzz_settings: Settings) -> Iterator[str]:
    """A new API key, with a conversation of three messages (the second a key moment), a
    memory block and an archival entry of its user planted for it."""
    with db.session_scope(write=True) as session:
        row, key = keys.create_key(session, "openapi-fuzz", admin=True)
    tenant, mem = tenant_of(row.id), get_memory()
    user = f"fuzz-{uuid.uuid4().hex[:8]}"
    conv = mem.conversations.create(tenant, uuid.uuid4().hex, user, ttl_s=600)
    mem.conversations.append(
        tenant, conv, [NewMessage("user", f"message {i}") for i in (1, 2, 3)], embed=False
    )
    mem.conversations.mark(tenant, conv.id, 2, on=True, note="planted")
    mem.blocks.put(tenant, user, "notes", "planted", source="api")
    learnt = NewEntry("planted", "fact", conv.id, 1, 3)
    mem.archive.add(tenant, user, [learnt])
    PLANTED.update(
        conversation_id=[conv.id],
        seq=[-1, 0, 1, 2, 3, 4],
        user_id=[user],
        name=["notes"],
        entry_id=[learnt.id],
        tool=list(tools.ARGS),
    )
    yield key
    PLANTED.clear()


@pytest.fixture(scope="module")
def app() -> Iterator[FastAPI]:
    """One app for every operation: it reads the settings in force per request. Its
    lifespan runs (on the first call), which freezes the objects alive then; they are
    handed back to the collector afterwards, so later tests see an ordinary process."""
    yield create_app()
    gc.unfreeze()


@schema.parametrize()
@hypothesis_settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_operation_answers_a_server_error(
    case: schemathesis.Case[Any], app: FastAPI, api_key: str
) -> None:
    case.call_and_validate(
        app=app, headers={"Authorization": f"Bearer {api_key}"}, checks=[not_a_server_error]
    )
