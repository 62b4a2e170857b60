"""POST /v1/embeddings through a real server and the official SDK: float and base64 give the same vectors, served
vectors against the fp32 graph, token-id inputs, caps refused by index, models kept to their routes, metering."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import openai
import pytest

from fixtures_server import ServerProcess, sdk

pytestmark = pytest.mark.usefixtures("sdk_clients")

TEXTS = ["the man is eating food.", "a girl is carrying a baby", "hello", "the dog runs in the park " * 4]


def _fp32(model_dir: Path, ids: list[list[int]]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "onnx" / "model_fp32.onnx"), so)
    return np.stack([session.run(["sentence_embedding"], {
        "input_ids": np.array([row]), "attention_mask": np.ones((1, len(row)), np.int64),
        "token_type_ids": np.zeros((1, len(row)), np.int64)})[0][0] for row in ids])


@pytest.fixture(scope="module")
def embedding_server(tiny_model_dir: Path, tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fixtures_server import start_server

    tmp = tmp_path_factory.mktemp("embedding-server")
    config = tmp / "cheapest.toml"
    config.write_text('[prices."tiny-minilm"]\nprompt_usd_per_mtok = 2.0\n[serving]\nembedding_max_inputs = 8\n')
    server = start_server(tmp, backend="onnx", extra_env={
        "CHEAPEST_MODELS": f"{tiny_model_dir},{tiny_encoder_dir}", "CHEAPEST_MODEL_THREADS": "1",
        "CHEAPEST_CONFIG": str(config)})
    yield server
    server.stop()


def _key(server: ServerProcess, **body: object) -> tuple[str, str]:
    _, mk = server.create_account()
    return mk, str(server.create_key(mk, **body)["key"])


def test_float_and_base64_give_the_same_vectors_as_the_fp32_graph(embedding_server: ServerProcess,
                                                                   tiny_encoder_dir: Path) -> None:
    import tokenizers

    _, sk = _key(embedding_server)
    c = sdk(embedding_server.v1, sk)
    as_float = c.embeddings.create(model="tiny-minilm", input=TEXTS, encoding_format="float")
    as_base64 = c.embeddings.create(model="tiny-minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    raw = httpx.post(embedding_server.v1 + "/embeddings", headers={"Authorization": f"Bearer {sk}"},
                     json={"model": "tiny-minilm", "input": TEXTS[0], "encoding_format": "base64"}).json()
    assert isinstance(raw["data"][0]["embedding"], str)
    floats = np.array([d.embedding for d in as_float.data], np.float32)
    assert [d.index for d in as_float.data] == list(range(len(TEXTS)))
    np.testing.assert_array_equal(floats, np.array([d.embedding for d in as_base64.data], np.float32))
    tok = tokenizers.Tokenizer.from_file(str(tiny_encoder_dir / "tokenizer.json"))
    ids = [tok.encode(t).ids for t in TEXTS]
    ref = _fp32(tiny_encoder_dir, ids)
    cosine = (floats * ref).sum(1) / np.linalg.norm(floats, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.999, cosine
    assert as_float.model == "tiny-minilm" and as_float.usage.prompt_tokens == sum(map(len, ids))
    assert as_float.usage.total_tokens == as_float.usage.prompt_tokens
    # Token ids (a text's, without special tokens), alone or in lists, give the text's vector.
    plain = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS[:2]]
    by_ids = c.embeddings.create(model="tiny-minilm", input=plain, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in by_ids.data]), floats[:2], atol=1e-5)
    one = c.embeddings.create(model="tiny-minilm", input=plain[0], encoding_format="float", user="u-1")
    np.testing.assert_allclose(one.data[0].embedding, floats[0], atol=1e-5)


def test_bad_inputs_are_refused_by_index_without_echoing_them(embedding_server: ServerProcess) -> None:
    _, sk = _key(embedding_server)
    c = sdk(embedding_server.v1, sk)
    long = "canarytext " * 40  # over the model's 32 tokens per input
    with pytest.raises(openai.BadRequestError) as err:
        c.embeddings.create(model="tiny-minilm", input=["hello", long])
    assert err.value.code == "context_length_exceeded" and "Input 1 has" in err.value.message
    assert "canarytext" not in err.value.message
    for bad, code in ((["a"] * 9, "invalid_value"), ([], "invalid_value"), ([""], "invalid_value"),
                      (["a", [1, 2]], "invalid_value"), ([[]], "invalid_value"), ([[10**9]], "engine_error")):
        r = httpx.post(embedding_server.v1 + "/embeddings", headers={"Authorization": f"Bearer {sk}"},
                       json={"model": "tiny-minilm", "input": bad})
        assert r.status_code in (400, 500) and r.json()["error"]["code"] == code, (bad, r.text)
    with pytest.raises(openai.BadRequestError) as err:
        c.embeddings.create(model="tiny-minilm", input="hello", dimensions=8)
    assert err.value.param == "dimensions"


def test_truncation_when_configured(tiny_encoder_dir: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(backend="onnx", model_dir=tiny_encoder_dir, extra_env={
        "CHEAPEST_EMBEDDING_TRUNCATE": "1", "CHEAPEST_EMBEDDING_MAX_TOKENS": "8", "CHEAPEST_MODEL_THREADS": "1"})
    _, sk = _key(server)
    r = sdk(server.v1, sk).embeddings.create(model="tiny-minilm", input="the dog runs in the park " * 5)
    assert r.usage.prompt_tokens == 8


def test_models_stay_on_their_routes_and_usage_is_metered(embedding_server: ServerProcess) -> None:
    mk, sk = _key(embedding_server)
    c = sdk(embedding_server.v1, sk)
    listed = {m.id: m for m in c.models.list().data}
    assert set(listed) == {"tiny-llama", "tiny-minilm"} and getattr(listed["tiny-minilm"], "context_length") == 32
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny-minilm", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_supported" and "/v1/embeddings" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny-minilm", prompt="hi")
    assert err.value.code == "model_not_supported"
    with pytest.raises(openai.BadRequestError) as err:
        c.embeddings.create(model="tiny-llama", input="hi")
    assert err.value.code == "model_not_supported" and "not an embedding model" in err.value.message
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="nonesuch", input="hi")
    r = c.embeddings.with_raw_response.create(model="tiny-minilm", input=["hello", "the man"])
    assert "x-ratelimit-remaining-tokens" in r.headers
    tokens = r.parse().usage.prompt_tokens
    deadline = time.monotonic() + 10
    while True:
        usage = httpx.get(embedding_server.base_url + "/api/usage", headers={"Authorization": f"Bearer {mk}"}).json()
        rows = [t for t in usage["totals"] if t["model"] == "tiny-minilm"]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(t["requests"], t["prompt_tokens"], t["completion_tokens"], t["cost_micro"]) for t in rows] == \
        [(1, tokens, 0, -(-2 * tokens // 1))]
    # A key limited to the chat model cannot embed.
    _, only_chat = _key(embedding_server, models=["tiny-llama"])
    with pytest.raises(openai.NotFoundError):
        sdk(embedding_server.v1, only_chat).embeddings.create(model="tiny-minilm", input="hi")


def test_tpm_counts_input_tokens(embedding_server: ServerProcess) -> None:
    _, sk = _key(embedding_server, limits={"tpm": 30})
    c = sdk(embedding_server.v1, sk)
    c.embeddings.create(model="tiny-minilm", input=["the man is eating food."] * 3)  # 3 x 8 tokens
    with pytest.raises(openai.RateLimitError):
        c.embeddings.create(model="tiny-minilm", input=["the man is eating food."] * 3)


@pytest.mark.slow
def test_minilm_similarity_order_through_the_server(minilm_dir: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    import tokenizers

    server = server_factory(backend="onnx", model_dir=minilm_dir, extra_env={"CHEAPEST_MODEL_THREADS": "2"})
    _, sk = _key(server)
    pairs = [("A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."),
             ("How do I bake bread?", "What is a recipe for baking bread?", "The stock market fell today."),
             ("The cat sits on the mat.", "A cat is sitting on a rug.", "Quantum computers use qubits.")]
    texts = [t for p in pairs for t in p]
    r = sdk(server.v1, sk).embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    v = np.array([d.embedding for d in r.data], np.float32)
    assert v.shape == (9, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    for i in range(0, 9, 3):
        assert v[i] @ v[i + 1] > v[i] @ v[i + 2] + 0.3  # paraphrases well above unrelated sentences
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    ref = _fp32(minilm_dir, [tok.encode(t).ids for t in texts])
    assert ((v * ref).sum(1) / np.linalg.norm(ref, axis=1)).min() >= 0.999
