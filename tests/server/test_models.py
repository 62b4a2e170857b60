"""Several models in one server: routing by `model`, per-model readiness and prices, allow-lists, a base model.

Fast tests serve two tiny random-weight ONNX models (a llama with a chat template, a Gemma 3 without one) or
the fixed engine under two names; the slow one serves the real SmolLM2 and Gemma 3 together.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from fixtures_arch import write_arch_gguf
from fixtures_server import ServerProcess, sdk

pytestmark = pytest.mark.usefixtures("sdk_clients")

PRICES = {"tiny-llama": (1.0, 2.0), "tiny-gemma3": (3.0, 5.0)}  # USD per Mtok: prompt, completion


@pytest.fixture(scope="module")
def two_tiny_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """tiny-llama (a chat template) and tiny-gemma3 (a base model: its chat template removed)."""
    from cheapest.convert.converter import convert

    root = tmp_path_factory.mktemp("models")
    llama = root / "tiny-llama"
    shutil.copytree(tiny_model_dir, llama)
    gguf = write_arch_gguf(root / "tiny-gemma3.gguf", "gemma3", n_layer=2, n_head_kv=1, head_dim=64,
                           sliding_window=8)
    gemma = convert(gguf, root / "tiny-gemma3")
    config_path = gemma / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    return [llama, gemma]


def _config(tmp: Path, text: str) -> dict[str, str]:
    path = tmp / "cheapest.toml"
    path.write_text(text)
    return {"CHEAPEST_CONFIG": str(path)}


def _prices_toml() -> str:
    return "".join(f'[prices."{m}"]\nprompt_usd_per_mtok = {p}\ncompletion_usd_per_mtok = {c}\n'
                   for m, (p, c) in PRICES.items())


def _usage(server: ServerProcess, mk: str, requests: int) -> dict[str, dict[str, int]]:
    """Per-model totals once `requests` requests are flushed to the store."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(server.base_url + "/api/usage", headers={"Authorization": f"Bearer {mk}"}, timeout=10)
        totals = {row["model"]: row for row in r.json()["totals"]}
        if sum(row["requests"] for row in totals.values()) >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # A generation is metered while it runs: its last tokens may land one flush (0.2 s) after its request did.
    time.sleep(0.4)
    r = httpx.get(server.base_url + "/api/usage", headers={"Authorization": f"Bearer {mk}"}, timeout=10)
    return {row["model"]: row for row in r.json()["totals"]}


def test_two_onnx_models_routed_by_model_with_their_own_prices(
        two_tiny_models: list[Path], server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = _config(tmp_path, _prices_toml())
    env.update({"CHEAPEST_MODELS": ",".join(str(p) for p in two_tiny_models), "CHEAPEST_MODEL_THREADS": "1"})
    server = server_factory(backend="onnx", extra_env=env)
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    c = sdk(server.v1, sk)

    listed = {m.id: m for m in c.models.list().data}
    assert set(listed) == {"tiny-llama", "tiny-gemma3"}
    assert {m: getattr(listed[m], "context_length") for m in listed} == {"tiny-llama": 256, "tiny-gemma3": 128}
    assert getattr(c.models.retrieve("tiny-gemma3"), "context_length") == 128

    chat = c.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                     max_tokens=5, temperature=0)
    text = c.completions.create(model="tiny-gemma3", prompt="hello there", max_tokens=5, temperature=0)
    assert (chat.model, text.model) == ("tiny-llama", "tiny-gemma3")
    assert chat.usage is not None and text.usage is not None
    streamed = c.completions.create(model="tiny-gemma3", prompt="hello there", max_tokens=5, temperature=0,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == text.choices[0].text

    # A base model refuses chat with a 400 that says why; nothing is charged for it.
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny-gemma3", messages=[{"role": "user", "content": "hello"}])
    assert err.value.code == "model_has_no_chat_template" and "/v1/completions" in err.value.message

    # Each model is metered at its own price.
    totals = _usage(server, mk, 3)
    for model, usages in (("tiny-llama", [chat.usage]), ("tiny-gemma3", [text.usage, text.usage])):
        prompt = sum(u.prompt_tokens for u in usages)
        completion = sum(u.completion_tokens for u in usages)
        p, cost = PRICES[model]
        row = totals[model]
        assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (len(usages), prompt, completion)
        assert row["cost_micro"] == -(-(round(p * 1e6) * prompt + round(cost * 1e6) * completion) // 10**6)

    # /readyz: both ready, each with its provider, context length and resident memory.
    ready = httpx.get(server.base_url + "/readyz").json()
    assert ready["status"] == "ready"
    models = {m["id"]: m for m in ready["models"]}
    assert set(models) == {"tiny-llama", "tiny-gemma3"}
    assert all(m["status"] == "ready" and m["provider"] == "CPUExecutionProvider" and m["resident_bytes"] > 0
               for m in models.values())

    # A key limited to one model sees and reaches only that one.
    only = str(server.create_key(mk, models=["tiny-gemma3"])["key"])
    limited = sdk(server.v1, only)
    assert [m.id for m in limited.models.list().data] == ["tiny-gemma3"]
    with pytest.raises(openai.NotFoundError):
        limited.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve("tiny-llama")
    assert limited.completions.create(model="tiny-gemma3", prompt="hi", max_tokens=2).model == "tiny-gemma3"


def test_operator_chat_template_for_a_base_model(two_tiny_models: list[Path]) -> None:
    import asyncio

    from cheapest.engine.onnx_engine import load_engine

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    plain = load_engine(two_tiny_models[1], threads=1)
    configured = load_engine(two_tiny_models[1], threads=1, chat_templates={"tiny-gemma3": template})
    try:
        assert plain.has_chat_template is False and configured.has_chat_template is True
        assert configured.render_chat([("user", "hi")]) == "user: hi\nassistant:"
    finally:
        asyncio.run(plain.close())
        asyncio.run(configured.close())


def _readyz(server: ServerProcess, query: str = "") -> httpx.Response:
    return httpx.get(server.base_url + "/readyz" + query, timeout=5)


def test_a_model_still_loading_is_a_503_with_retry_after_while_the_other_serves(
        server_factory) -> None:  # type: ignore[no-untyped-def]
    env = {"CHEAPEST_MODELS": "fast-model,slow-model", "CHEAPEST_MODEL_OPTION_SLOW_MODEL": "slow-model",
           "CHEAPEST_MODEL_OPTION_LOAD_DELAY": "3"}
    server = server_factory(extra_env=env, ready_path="/readyz?model=fast-model")
    loading = _readyz(server)
    assert loading.status_code == 503
    body = loading.json()
    assert body["status"] == "loading"
    assert {m["id"]: m["status"] for m in body["models"]} == {"fast-model": "ready", "slow-model": "loading"}
    assert _readyz(server, "?model=fast-model").status_code == 200
    assert _readyz(server, "?model=slow-model").status_code == 503
    assert _readyz(server, "?model=nonesuch").status_code == 404

    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    c = sdk(server.v1, sk)
    assert c.completions.create(model="fast-model", prompt="hi").model == "fast-model"
    assert [m.id for m in c.models.list().data] == ["fast-model"]  # what can be called now
    r = httpx.post(server.v1 + "/completions", json={"model": "slow-model", "prompt": "hi"},
                   headers={"Authorization": f"Bearer {sk}"})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "model_loading" and "slow-model" in r.json()["error"]["message"]

    deadline = time.monotonic() + 30
    while _readyz(server).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert c.completions.create(model="slow-model", prompt="hi").model == "slow-model"
    assert {m.id for m in c.models.list().data} == {"fast-model", "slow-model"}


@pytest.mark.slow
def test_smollm2_and_gemma3_answer_on_one_server(smollm2_dir: Path, gemma3_dir: Path,
                                                  server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(backend="onnx", extra_env={"CHEAPEST_MODELS": f"{smollm2_dir},{gemma3_dir}",
                                                       "CHEAPEST_MODEL_THREADS": "2"}, ready_timeout=300)
    _, mk = server.create_account()
    c = sdk(server.v1, str(server.create_key(mk)["key"]))
    assert {m.id for m in c.models.list().data} == {"SmolLM2-135M-Instruct", "gemma-3-270m"}
    chat = c.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=32,
                                     messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content == "The capital of France is Paris."
    text = c.completions.create(model="gemma-3-270m", prompt="The capital of France is", temperature=0,
                                max_tokens=10)
    assert text.choices[0].text.startswith(" the capital of the country of France.")
    assert text.usage is not None and text.usage.prompt_tokens == 6  # <bos> The capital of France is
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_has_no_chat_template"
    ready = {m["id"]: m for m in _readyz(server).json()["models"]}
    assert all(m["resident_bytes"] > 0 for m in ready.values())
