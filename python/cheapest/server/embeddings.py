"""POST /v1/embeddings: parse, let the gateway pick the model and cap the inputs, admit (input tokens count
against TPM, budgets and credits like any request), embed, meter once, encode."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from cheapest.api.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from cheapest.engine.types import EngineError
from cheapest.gateway.completions import engine_refusal
from cheapest.gateway.embeddings import embedding_engine, encode_vectors, input_ids
from cheapest.server.cancellation import until_disconnected
from cheapest.server.errors import decode_error, rate_headers
from cheapest.server.request import Request, Response, json_response

if TYPE_CHECKING:
    from cheapest.server.state import WorkerState

_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(EmbeddingRequest)


async def embeddings(state: WorkerState, req: Request) -> Response:
    caller = req.caller
    assert caller is not None
    begun = await state.gateway.begin(caller)  # the request counts before its body is read (see completions)
    body = await req.body(state.settings.serving.max_body_bytes)
    try:
        ereq = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise decode_error(exc) from None
    engine = embedding_engine(state.models, caller, ereq.model)
    req.model = engine.model_id
    inputs = input_ids(engine, ereq, state.settings.serving)
    tokens = sum(len(ids) for ids in inputs)
    admission = await state.gateway.admit(caller, engine.model_id, tokens, 0, begun=begun)
    req.prompt_tokens = tokens
    try:
        vectors = await until_disconnected(engine.embed(inputs), req.watch_disconnect)
    except EngineError as exc:
        raise engine_refusal(exc) from None
    finally:  # however it ended: the input tokens are metered once
        state.gateway.settle(admission)
    data = [Embedding(v, i) for i, v in enumerate(encode_vectors(vectors, ereq.encoding_format))]
    out = EmbeddingList(data, engine.model_id, EmbeddingUsage(tokens, tokens))
    return json_response(_encode(out), rate_headers(admission.rate))
