"""The official `ollama` Python client drives the simulator; its response types must parse every reply."""

from __future__ import annotations

import json
import socket

import httpx
import ollama
import pytest
from helpers import wait_until

from ollama_sim import CATALOG, DEFAULT_MODELS


@pytest.fixture
def node(sim_node):
    return sim_node(vram_gb=24, preload=[("mxbai-embed-large", "cpu")])


@pytest.fixture
def client(node) -> ollama.Client:
    return ollama.Client(host=node.url, timeout=10)


def test_list_reports_every_catalogue_model_with_details_and_capabilities(client):
    listed = client.list()
    names = [m.model for m in listed.models]
    assert sorted(names) == sorted(DEFAULT_MODELS)
    llama = next(m for m in listed.models if m.model == "llama3.1:latest")
    assert llama.size == CATALOG["llama3.1:latest"].file_size
    assert llama.details.family == "llama" and llama.details.quantization_level == "Q4_K_M"
    assert len(llama.digest) == 64
    assert llama.modified_at is not None


def test_ps_lists_preloaded_model_with_canonical_name(client):
    running = client.ps().models
    assert [m.model for m in running] == ["mxbai-embed-large:latest"]
    entry = running[0]
    assert entry.name == "mxbai-embed-large:latest"
    assert entry.size > 0 and entry.size_vram == 0
    assert entry.expires_at is not None and entry.context_length == 512
    assert entry.digest == CATALOG["mxbai-embed-large:latest"].digest


def test_show_gives_sizing_keys_and_capabilities(client):
    shown = client.show("llama3.1")
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 32
    assert shown.modelinfo["llama.attention.head_count_kv"] == 8
    assert shown.details.parameter_size == "8.0B"
    assert client.show("all-minilm").capabilities == ["embedding"]


def test_generate_load_then_unload(client, node):
    loaded = client.generate(model="llama3.1", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.model == "llama3.1"
    assert "llama3.1:latest" in [m.model for m in client.ps().models]
    unloaded = client.generate(model="llama3.1", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_until(lambda: "llama3.1:latest" not in [m.model for m in client.ps().models], timeout=5)
    assert node.counts("llama3.1") == {"loads": 1, "unloads": 1}


def test_forever_keep_alive_parses_in_the_client(client):
    client.generate(model="llama3.2:3b", prompt="", keep_alive=-1)
    (entry,) = [m for m in client.ps().models if m.model == "llama3.2:3b"]
    assert entry.expires_at.year > 2300


def test_streamed_load_is_a_single_object(client):
    parts = list(client.generate(model="llama3.2:3b", prompt="", stream=True))
    assert len(parts) == 1 and parts[0].done_reason == "load"


def test_generate_streamed_and_not_streamed_give_the_same_text(client):
    whole = client.generate(model="llama3.1", prompt="Why is the sky blue?", options={"temperature": 0})
    assert whole.done and whole.done_reason == "stop" and whole.response
    assert whole.eval_count > 0 and whole.total_duration > 0 and whole.context
    parts = list(client.generate(model="llama3.1", prompt="Why is the sky blue?", stream=True))
    assert len(parts) > 2
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response for p in parts) == whole.response


def test_num_predict_stops_with_length(client):
    reply = client.generate(model="llama3.1", prompt="count", options={"num_predict": 3})
    assert reply.done_reason == "length" and reply.eval_count == 3


def test_chat_load_and_answer(client):
    loaded = client.chat(model="llama3.2:3b", messages=[])
    assert loaded.done_reason == "load" and loaded.message.content == ""
    answer = client.chat(model="llama3.2:3b", messages=[{"role": "user", "content": "hello"}])
    assert answer.message.role == "assistant" and answer.message.content
    hello = [{"role": "user", "content": "hello"}]
    streamed = list(client.chat(model="llama3.2:3b", messages=hello, stream=True))
    assert "".join(p.message.content for p in streamed) == answer.message.content
    unloaded = client.chat(model="llama3.2:3b", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"


def test_embed_returns_normalised_vectors(client):
    reply = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(reply.embeddings) == 2 and len(reply.embeddings[0]) == 768
    norm = sum(v * v for v in reply.embeddings[0]) ** 0.5
    assert abs(norm - 1.0) < 1e-6
    assert reply.embeddings[0] != reply.embeddings[1]
    assert client.embed(model="nomic-embed-text", input="a").embeddings[0] == reply.embeddings[0]


def test_embed_dimensions_truncate_and_renormalise(client):
    vector = client.embed(model="mxbai-embed-large", input="a", dimensions=64).embeddings[0]
    assert len(vector) == 64 and abs(sum(v * v for v in vector) - 1.0) < 1e-6


def test_embed_input_longer_than_the_context(client):
    long_text = "word " * 600  # all-minilm's context is 512
    assert len(client.embed(model="all-minilm", input=long_text).embeddings) == 1  # truncated by default
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="all-minilm", input=long_text, truncate=False)
    assert caught.value.status_code == 400
    assert caught.value.error == "the input length exceeds the context length"


def test_embed_empty_input_only_loads(client):
    reply = client.embed(model="all-minilm", input="")
    assert reply.embeddings == []
    assert "all-minilm:latest" in [m.model for m in client.ps().models]


def test_legacy_embeddings_are_not_normalised(client):
    reply = client.embeddings(model="all-minilm", prompt="hello")
    assert len(reply.embedding) == 384
    assert abs(sum(v * v for v in reply.embedding) ** 0.5 - 1.0) > 1e-3


NOT_FOUND_SQ = "model 'nope' not found"
NOT_FOUND_PULL = 'model "nope" not found, try pulling it first'


@pytest.mark.parametrize(
    ("call", "status", "text"),
    [
        (lambda c: c.generate(model="nope", prompt="x"), 404, "model 'nope' not found"),
        (lambda c: c.chat(model="nope", messages=[{"role": "user", "content": "x"}]), 404, NOT_FOUND_SQ),
        (lambda c: c.embed(model="nope", input="x"), 404, NOT_FOUND_PULL),
        (lambda c: c.embeddings(model="nope", prompt="x"), 404, NOT_FOUND_PULL),
        (lambda c: c.show("nope"), 404, "model 'nope:latest' not found"),
        (lambda c: c.generate(model="all-minilm", prompt=""), 400, '"all-minilm" does not support generate'),
        (lambda c: c.chat(model="all-minilm", messages=[]), 400, '"all-minilm" does not support chat'),
    ],
)
def test_errors_reach_the_client_with_ollama_texts(client, call, status, text):
    with pytest.raises(ollama.ResponseError) as caught:
        call(client)
    assert caught.value.status_code == status
    assert caught.value.error == text


def test_read_endpoints_and_transport(node):
    with httpx.Client(base_url=node.url, timeout=5) as http:
        root = http.get("/")
        assert root.text == "Ollama is running" and root.headers["content-type"].startswith("text/plain")
        assert "server" not in root.headers
        assert http.head("/").status_code == 200
        assert http.get("/api/version").json() == {"version": "0.33.0-rc2"}
        missing = http.get("/api/nothing")
        assert (missing.status_code, missing.text) == (404, "404 page not found")
        assert http.get("/api/generate").status_code == 405
        assert http.get("/api/ps").headers["content-type"] == "application/json; charset=utf-8"


def test_load_reply_is_json_and_generation_is_chunked_ndjson(node):
    with httpx.Client(base_url=node.url, timeout=5) as http:
        loaded = http.post("/api/generate", json={"model": "llama3.2:3b", "stream": True})
        assert loaded.headers["content-type"] == "application/json; charset=utf-8"
        assert "transfer-encoding" not in loaded.headers
        streamed = http.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "hi"})
        assert streamed.headers["content-type"] == "application/x-ndjson"
        assert streamed.headers["transfer-encoding"] == "chunked"
        lines = streamed.text.splitlines()
        assert len(lines) > 2 and json.loads(lines[-1])["done"] is True
        last = json.loads(lines[-1])
        assert last["done_reason"] == "stop" and last["context"] and last["eval_count"] == len(lines) - 1


def test_kept_alive_connections_have_tcp_nodelay(node):
    with httpx.Client(base_url=node.url, timeout=5) as http:
        for _ in range(3):
            assert http.get("/api/ps").status_code == 200
        with node._conn_lock:
            server_sockets = list(node._connections)
        assert len(server_sockets) == 1  # one kept-alive connection served all three
        assert server_sockets[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", b"", 400, "missing request body"),
        ("/api/generate", b'{"model": "llama3.1"', 400, "unexpected EOF"),
        ("/api/generate", b"xyz", 400, "invalid character 'x' looking for beginning of value"),
        (
            "/api/generate",
            b'{"model": "llama3.1", "prompt": 5}',
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string",
        ),
        ("/api/generate", b'{"model": ""}', 404, "model '' not found"),
        ("/api/chat", b'{"model": ""}', 400, "model is required"),
        ("/api/embed", b'{"model": ""}', 404, "model '' not found"),
        ("/api/embeddings", b'{"model": ""}', 400, "model is required"),
        ("/api/show", b"{}", 400, "model is required"),
        ("/api/embed", b'{"model": "all-minilm", "input": 5}', 400, "invalid input type"),
        ("/api/generate", b'{"model": "bad name!"}', 404, "model 'bad name!' not found"),
        ("/api/chat", b'{"model": "bad name!", "messages": []}', 400, "model is required"),
        ("/api/chat", b'{"model": "nope", "keep_alive": 0}', 404, "model 'nope' not found"),
        ("/api/show", b'{"model": "bad name!"}', 400, "invalid model name"),
        ("/api/embed", b'{"model": "nope", "input": 5}', 400, "invalid input type"),
        (
            "/api/chat",
            b'{"model": "llama3.1", "keep_alive": "-1"}',
            400,
            'time: missing unit in duration "-1"',
        ),
    ],
)
def test_request_errors_have_ollama_status_and_text(node, path, body, status, error):
    with httpx.Client(base_url=node.url, timeout=5) as http:
        reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    assert reply.json() == {"error": error}


def test_names_resolve_like_ollama(client):
    assert client.generate(model="LLAMA3.2:3B", prompt="").model == "LLAMA3.2:3B"  # echoed as sent
    assert client.show("library/llama3.1").details.parameter_size == "8.0B"
    assert "llama3.2:3b" in [m.model for m in client.ps().models]  # canonical in ps
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="llama3.2", prompt="")  # only llama3.2:3b is installed, not :latest
    assert caught.value.status_code == 404
