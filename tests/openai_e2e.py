"""End-to-end check of a running `atrium up --demo` with the official OpenAI
Python SDK. Usage: python3 tests/openai_e2e.py <data-dir>/demo.json

Tenant A uses its key for chat (streamed and not, structured output
through the SDK's `parse` helper, and log-probabilities), the Responses
API (plain and streamed), the Batch API (files and batches, results read
back, invisible to tenant B), completions and embeddings; it can neither list, call nor detect tenant B's deployments; and
a key revoked through the control plane stops working within 2 seconds.
Exits non-zero, with the reason, on the first failure.
"""

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Annotated

import openai
from pydantic import BaseModel, Field


class City(BaseModel):
    """What the SDK's structured-output helper asks the model for."""

    name: Annotated[str, Field(max_length=30)]
    country: Annotated[str, Field(max_length=30)]
    population: int
    capital: bool


def control_plane(demo, method, path, body=None):
    req = urllib.request.Request(
        demo["server_url"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": "Bearer " + demo["admin_token"], "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def tenant_call(demo, key, method, path, body=None):
    """A tenant API call through the gateway: (status, JSON body)."""
    req = urllib.request.Request(
        demo["gateway_url"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": "Bearer " + key, "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def client(demo, key):
    return openai.OpenAI(base_url=demo["gateway_url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def expect_not_found(call, what):
    try:
        call()
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", f"{what}: code {e.code!r}"
        return
    raise AssertionError(f"{what}: tenant B's deployment answered tenant A")


def main():
    demo = json.load(open(sys.argv[1]))
    a, b = demo["tenants"][0], demo["tenants"][1]
    ca = client(demo, a["api_key"])
    question = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]

    # Chat, not streamed: a real answer from the real model.
    raw = ca.chat.completions.with_raw_response.create(model=a["chat_model"], messages=question, temperature=0, max_tokens=30)
    chat = raw.parse()
    answer = chat.choices[0].message.content
    assert "Paris" in answer, answer
    assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0, chat.usage
    assert raw.headers.get("x-atrium-site") == "local", dict(raw.headers)
    assert raw.headers.get("x-atrium-replica", "").startswith(a["chat_model"]), dict(raw.headers)

    # Chat, streamed: the same text, token by token.
    pieces = []
    for chunk in ca.chat.completions.create(model=a["chat_model"], messages=question, temperature=0, max_tokens=30, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == answer, (pieces, answer)
    assert len(pieces) > 3, pieces

    # Structured output through the SDK's own helper: it sends the Pydantic
    # model as a strict json_schema and parses the answer back into it.
    parsed = ca.chat.completions.parse(
        model=a["chat_model"],
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=1,
        max_tokens=200,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City), parsed
    assert parsed.choices[0].finish_reason == "stop", parsed

    # The Responses API: the same answer as chat, plain and streamed.
    resp = ca.responses.create(model=a["chat_model"], instructions="You are a helpful assistant.", input="What is the capital of France?", temperature=0, max_output_tokens=30)
    assert resp.output_text == answer, (resp.output_text, answer)
    assert resp.usage.input_tokens == chat.usage.prompt_tokens, resp.usage
    deltas, final = [], None
    for event in ca.responses.create(model=a["chat_model"], instructions="You are a helpful assistant.", input="What is the capital of France?", temperature=0, max_output_tokens=30, stream=True):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert "".join(deltas) == answer and final is not None and final.output_text == answer, (deltas, final)

    # Log-probabilities: each generated token scored, with alternatives.
    scored = ca.chat.completions.create(model=a["chat_model"], messages=question, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert len(tokens) == scored.usage.completion_tokens, scored
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens), tokens

    # The Batch API: a JSONL file of requests, run at low priority, its
    # results file read back. At temperature 0 a batched answer is the
    # same text as the interactive one.
    lines = [
        {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": a["chat_model"], "messages": question, "temperature": 0, "max_tokens": 30}}
        for i in range(3)
    ]
    upload = ca.files.create(file=("questions.jsonl", "\n".join(json.dumps(l) for l in lines).encode()), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes > 0, upload
    batch = ca.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "e2e"})
    assert batch.status == "validating" and batch.request_counts.total == 3, batch
    deadline = time.time() + 120
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"batch never finished: {batch}"
        time.sleep(0.5)
        batch = ca.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 0), batch
    results = [json.loads(l) for l in ca.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2"], results
    for r in results:
        assert r["response"]["status_code"] == 200, r
        assert r["response"]["body"]["choices"][0]["message"]["content"] == answer, (r, answer)
    assert batch.id in [x.id for x in ca.batches.list()]
    cb = client(demo, b["api_key"])
    for what, call in [("batch", lambda: cb.batches.retrieve(batch.id)), ("file", lambda: cb.files.retrieve(upload.id)),
                       ("results", lambda: cb.files.content(batch.output_file_id))]:
        try:
            call()
            raise AssertionError(f"tenant B read tenant A's {what}")
        except openai.NotFoundError:
            pass
    assert batch.id not in [x.id for x in cb.batches.list()]

    # Completions on a raw prompt.
    completion = ca.completions.create(model=a["chat_model"], prompt="The capital of France is", max_tokens=8, temperature=0)
    assert completion.choices[0].text.strip(), completion
    assert completion.usage.completion_tokens <= 8

    # Embeddings (the SDK asks for base64 and decodes it).
    emb = ca.embeddings.create(model=a["embedding_model"], input=["a cat on a mat", "a kitten on a rug", "stock market report"])
    vectors = [d.embedding for d in emb.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))
    assert abs(dot(vectors[0], vectors[0]) - 1) < 1e-3
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])

    # A vector collection whose text A's own MiniLM deployment embeds, through
    # the gateway: each sentence finds itself first; B cannot reach it.
    coll = "e2e-%d" % int(time.time() * 1000)
    status, made = tenant_call(demo, a["api_key"], "POST", "/v1/collections",
                               {"name": coll, "dimension": 384, "metric": "cosine", "embedding_model": a["embedding_model"]})
    assert status == 200, made
    docs = ["a cat on a mat", "a kitten on a rug", "stock market report", "the central bank raised interest rates"]
    status, wrote = tenant_call(demo, a["api_key"], "POST", f"/v1/collections/{coll}/points",
                                {"points": [{"id": i, "text": t} for i, t in enumerate(docs)]})
    assert status == 200 and wrote["points"] == 4, wrote
    for i, t in enumerate(docs):
        status, found = tenant_call(demo, a["api_key"], "POST", f"/v1/collections/{coll}/points/search", {"text": t, "limit": 2})
        assert status == 200, found
        top = found["result"][0]
        assert top["id"] == i and top["payload"]["text"] == t and top["score"] > 0.99, found
    status, near = tenant_call(demo, a["api_key"], "POST", f"/v1/collections/{coll}/points/search", {"text": "a small cat", "limit": 2})
    assert {h["id"] for h in near["result"]} == {0, 1}, near
    status, _ = tenant_call(demo, b["api_key"], "POST", f"/v1/collections/{coll}/points/search", {"text": "a cat", "limit": 1})
    assert status == 404, status
    # Hostile or careless text: refused before any embedding is made.
    plain = coll + "-plain"
    assert tenant_call(demo, a["api_key"], "POST", "/v1/collections", {"name": plain, "dimension": 384, "metric": "cosine"})[0] == 200
    for path, body in [
        (f"/v1/collections/{coll}/points", {"points": [{"id": 9, "text": "x", "vector": [0.0] * 384}]}),
        (f"/v1/collections/{coll}/points", {"points": [{"id": 9, "text": "x" * 40000}]}),
        (f"/v1/collections/{coll}/points/search", {"text": ""}),
        (f"/v1/collections/{plain}/points/search", {"text": "a cat"}),
    ]:
        status, refused = tenant_call(demo, a["api_key"], "POST", path, body)
        assert status == 400, (path, status, refused)
    embedded_calls = 1 + 4 + 1  # the upsert and each search by text

    # Tenant A sees only its own models, and B's are invisible to it.
    listed = sorted(m.id for m in ca.models.list())
    assert listed == sorted([a["chat_model"], a["embedding_model"]]), listed
    assert ca.models.retrieve(a["chat_model"]).id == a["chat_model"]
    expect_not_found(lambda: ca.models.retrieve(b["chat_model"]), "retrieve")
    expect_not_found(lambda: ca.chat.completions.create(model=b["chat_model"], messages=question, max_tokens=5), "chat")
    expect_not_found(lambda: ca.embeddings.create(model=b["embedding_model"], input="x"), "embeddings")
    expect_not_found(lambda: ca.chat.completions.create(model="no-such-model", messages=question, max_tokens=5), "missing")
    # B's key works for B, so the 404s above were about tenancy, not a broken B.
    assert client(demo, b["api_key"]).embeddings.create(model=b["embedding_model"], input="x").data

    # A revoked key fails within 2 s of the revocation.
    created = control_plane(demo, "POST", "/v1/keys", {"name": "e2e-%d" % int(time.time() * 1000), "tenant": a["name"], "spec": {"scopes": ["inference"]}})
    fresh = client(demo, created["secret"])
    deadline = time.time() + 5
    while True:  # the gateway learns of a new key through the same watch
        try:
            fresh.embeddings.create(model=a["embedding_model"], input="x")
            break
        except openai.AuthenticationError:
            assert time.time() < deadline, "a new key never started working"
            time.sleep(0.05)
    control_plane(demo, "POST", "/v1/keys/%s/revoke" % created["key"]["id"])
    revoked_at = time.time()
    while True:
        try:
            fresh.embeddings.create(model=a["embedding_model"], input="x")
        except openai.AuthenticationError:
            break
        elapsed = time.time() - revoked_at
        assert elapsed < 2, f"revoked key still worked after {elapsed:.2f}s"
        time.sleep(0.02)
    print(f"revoked key refused after {time.time() - revoked_at:.3f}s")

    # Usage was recorded for what tenant A did.
    time.sleep(1.5)
    usage = control_plane(demo, "GET", "/v1/usage?tenant=" + a["name"])
    assert usage["totals"]["requests"] >= 5, usage["totals"]
    # Records are minute aggregates (the tenant did not ask for one per
    # request): count the requests they sum.
    assert sum(u["requests"] for u in usage["items"] if u.get("batch") == batch.id) == 3, usage["items"]
    assert all(u["site"] == "local" and u["tenant"] == a["name"] for u in usage["items"])
    embedded = sum(u["requests"] for u in usage["items"] if u["deployment"] == a["embedding_model"])
    assert embedded >= 1 + embedded_calls, embedded
    print("openai e2e: all checks passed")


if __name__ == "__main__":
    main()
