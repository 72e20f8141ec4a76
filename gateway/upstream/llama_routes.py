"""llama-server's own routes beside /v1 (its native API) that the gateway serves, with the
scope each needs; any other path stays unknown (404), the ones that change state included.

    POST /completion, /completions, /infill,    inference  a backend slot; validated, limited
         /embedding, /embeddings, /rerank,                 and metered as their /v1 kin
         /reranking
    POST /tokenize, /detokenize, /apply-template inference  no slot: llama-server answers them
                                                            in its HTTP threads; not metered
    GET  /props                                  inference  no slot
    GET  /slots                                  admin      no slot; each slot's prompt and
                                                            settings: other clients' prompts

Not served: POST /props (changes the server's global settings), POST /slots/{id}?action=
(saves, restores or erases a slot's cache: files on the server), /lora-adapters (its POST
changes the adapters' scales for every client; its GET lists their paths), /models/load and
/models/unload (the router's own: /admin/models is ours), /metrics and /health (the gateway
has its own). docs/api.md lists them; a test pins the table.

In multi-model mode llama-server's router picks the model by the body's `model` (POST) or
the query's `model` (GET) and refuses a request naming none; the gateway names the model
the request resolves to there (``name_in_query`` for the GETs, the proxy for bodies).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, urlencode

from gateway.edge.call import Call
from gateway.exchange import Exchange
from gateway.policy import validation
from gateway.state import AppState
from keys.model import SCOPE_ADMIN, SCOPE_INFERENCE

# GET routes about one model, answered without a slot: path → scope
READS: Final[dict[str, str]] = {"/props": SCOPE_INFERENCE, "/slots": SCOPE_ADMIN}


def table() -> list[tuple[tuple[str, ...], str, str]]:
    """(methods, path, scope) of each native route the gateway serves, for its route table."""
    posts: list[tuple[tuple[str, ...], str, str]] = [
        (("POST",), path, SCOPE_INFERENCE) for path in sorted(validation.NATIVE)]
    return posts + [(("GET",), path, scope) for path, scope in READS.items()]


def name_in_query(call: Call, state: AppState, ex: Exchange) -> None:
    """GET /props or /slots: the model ``?model=`` names (the default when none) must be a
    model served (404) and, by the caller, one the key may use; a router is asked for it by
    the name it resolved to."""
    query = parse_qsl(call.query, keep_blank_values=True)
    named = next((value for name, value in query if name == "model"), None)
    model = state.models.require(named)
    if model != "-":
        ex.model = model
    if state.models.renames(named, model):
        # the query as forwarded (call.path_qs); the model last, once
        call.query = urlencode([(k, v) for k, v in query if k != "model"] + [("model", model)])
