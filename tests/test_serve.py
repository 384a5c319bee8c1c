"""`krea2 serve` on a free loopback port: every endpoint, batching, the queue bound, bad fields, oversized bodies,
timeouts and client disconnects, with the shipped world checkpoint."""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from test_parallel import free_port

from krea2.pipeline import load_pipeline, to_pil
from krea2.serve import ServeConfig, create_app


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("world")


class Gated:
    """The pipeline with a gate in front of generate: tests hold the worker to fill the queue deterministically."""

    def __init__(self, pipe):
        self.pipe, self.gate, self.calls = pipe, threading.Event(), []
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, *args, **kwargs):
        self.calls.append(len(prompts))
        assert self.gate.wait(timeout=60)
        return self.pipe.generate(prompts, *args, **kwargs)


@contextmanager
def server(pipe, **kw):
    import uvicorn

    port = free_port()
    asgi, app = create_app(ServeConfig(port=port, **kw), pipe=pipe)
    srv = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def decode(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def post(url, body, timeout=60, **kw):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout, **kw)


def wait_for(cond, timeout=30):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def metric(url, name) -> float:
    """A sample's value from /metrics by its exact name with labels, e.g. 'krea2_requests_total{code="200"}'."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


def test_generation_equals_krea2_generate_and_every_endpoint_answers(pipe):
    with server(pipe) as (url, _):
        r = post(url, {"prompt": "a red circle", "n": 2, "seed": 5, "response_format": "b64_json"})
        assert r.status_code == 200
        out = r.json()
        assert [d["seed"] for d in out["data"]] == [5, 6]
        k = out["krea2"]
        assert k["size"] == "32x32" and k["steps"] == 20 and k["prompt"] == "a red circle"
        ref = [np.asarray(im) for im in to_pil(pipe.generate(["a red circle"] * 2, seed=5))]
        for item, want in zip(out["data"], ref, strict=True):
            assert np.array_equal(decode(item), want)  # bit for bit: the same batch as `krea2 generate --seed 5`

        h = httpx.get(f"{url}/healthz").json()
        assert h["status"] == "ok" and h["queue_depth"] == 0 and h["checkpoint"] == "world"
        m = httpx.get(f"{url}/metrics")
        assert m.headers["content-type"].startswith("text/plain")
        assert metric(url, 'krea2_requests_total{code="200"}') == 1.0 and metric(url, "krea2_images_total") == 2.0
        assert "krea2_request_latency_seconds_bucket" in m.text and "krea2_queue_depth" in m.text
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<textarea" in page.text and "/v1/images/generations" in page.text

        r = post(url, {"prompt": "a blue square", "size": "40x40", "steps": 4, "guidance": 0, "seed": 1})
        assert r.json()["krea2"]["size"] == "40x40" and decode(r.json()["data"][0]).shape == (40, 40, 3)
        r = post(url, {"prompt": "a blue square", "preset": "turbo"})
        assert r.json()["krea2"]["steps"] == 8 and r.json()["krea2"]["guidance"] == 0.0


@pytest.mark.parametrize("body,param", [
    ({"n": 1}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "a", "n": 0}, "n"),
    ({"prompt": "a", "n": 99}, "n"),
    ({"prompt": "a", "n": "2"}, "n"),
    ({"prompt": "a", "size": "big"}, "size"),
    ({"prompt": "a", "size": "100000x32"}, "size"),
    ({"prompt": "a", "size": "2048x2048"}, "size"),  # over --max-pixels
    ({"prompt": "a", "steps": 0}, "steps"),
    ({"prompt": "a", "steps": 5000}, "steps"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "response_format": "url"}, "response_format"),
    ({"prompt": "a", "preset": "fast"}, "preset"),
    ({"prompt": "a", "guidance": "nan"}, "guidance"),
    ({"prompt": "a", "mu": "2"}, "mu"),
    ({"prompt": "a", "colour": "red"}, "colour"),
])
def test_bad_fields_are_400_errors_naming_the_field(pipe, body, param):
    with server(pipe, max_n=4) as (url, _):
        r = post(url, body)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_non_json_and_oversized_bodies(pipe):
    with server(pipe, max_body_bytes=2000) as (url, _):
        r = httpx.post(f"{url}/v1/images/generations", content=b"{not json", timeout=30)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/images/generations", json=[1, 2], timeout=30)
        assert r.status_code == 400
        r = httpx.post(f"{url}/v1/images/generations", content=b'{"prompt": "a", "guidance": 1e400}', timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"  # 1e400 parses as inf
        r = post(url, {"prompt": "a" * 5000})  # Content-Length over the limit
        assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted while it streams
            for _ in range(10):
                yield b"x" * 500

        r = httpx.post(f"{url}/v1/images/generations", content=chunks(), timeout=30)
        assert r.status_code == 413
        assert metric(url, 'krea2_requests_total{code="413"}') == 2.0
        r = httpx.get(f"{url}/v1/nothing-here")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = httpx.get(f"{url}/v1/images/generations")
        assert r.status_code == 405 and r.json()["error"]["message"]
        assert post(url, {"prompt": "a red circle", "steps": 2}).status_code == 200  # still serving


def test_requests_of_one_shape_share_a_batch_with_their_own_seeds(pipe):
    gated = Gated(pipe)
    gated.gate.clear()
    with server(gated, max_batch=8) as (url, _):
        results = {}

        def run(i, body):
            results[i] = post(url, body)

        first = threading.Thread(target=run, args=(0, {"prompt": "a green triangle", "seed": 0, "steps": 4}))
        first.start()
        wait_for(lambda: len(gated.calls) == 1)  # the worker holds the first request
        threads = [threading.Thread(target=run, args=(i, {"prompt": p, "seed": 10 * i, "steps": 4}))
                   for i, p in [(1, "a red circle"), (2, "a blue square"), (3, "two orange triangles")]]
        threads.append(threading.Thread(target=run, args=(4, {"prompt": "a red circle", "seed": 7, "steps": 6})))
        for t in threads:
            t.start()
        wait_for(lambda: httpx.get(f"{url}/healthz").json()["queue_depth"] == 4)
        gated.gate.set()
        for t in [first, *threads]:
            t.join()
        assert gated.calls == [1, 3, 1]  # the three 4-step requests together, the 6-step one alone
        assert all(r.status_code == 200 for r in results.values())
        for i, p in [(1, "a red circle"), (2, "a blue square"), (3, "two orange triangles")]:
            alone = np.asarray(to_pil(pipe.generate([p], pipe.sampling_config(steps=4), seed=10 * i))[0])
            got = decode(results[i].json()["data"][0])
            assert np.abs(got.astype(int) - alone.astype(int)).max() <= 1  # batch vs alone: float rounding only


def test_a_full_queue_answers_429_and_no_accepted_request_is_lost(pipe):
    gated = Gated(pipe)
    gated.gate.clear()
    with server(gated, max_queue=2, max_batch=1) as (url, _):
        codes, threads = [], []

        def run(seed):
            r = post(url, {"prompt": "a red circle", "seed": seed, "steps": 2})
            codes.append((seed, r.status_code, r.headers.get("retry-after")))

        threads.append(threading.Thread(target=run, args=(0,)))
        threads[0].start()
        wait_for(lambda: len(gated.calls) == 1)
        for s in (1, 2):
            threads.append(threading.Thread(target=run, args=(s,)))
            threads[-1].start()
        wait_for(lambda: httpx.get(f"{url}/healthz").json()["queue_depth"] == 2)
        r = post(url, {"prompt": "a red circle", "seed": 3, "steps": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        gated.gate.set()
        for t in threads:
            t.join()
        assert sorted(c[:2] for c in codes) == [(0, 200), (1, 200), (2, 200)]
        assert metric(url, 'krea2_requests_total{code="429"}') == 1.0


@contextmanager
def held(pipe, **kw):
    """A server whose worker holds a first request at the gate; the gate opens when the block ends."""
    gated = Gated(pipe)
    gated.gate.clear()
    with server(gated, max_batch=1, **kw) as (url, _):
        holder = threading.Thread(target=lambda: post(url, {"prompt": "a red circle", "steps": 2}))
        holder.start()
        wait_for(lambda: len(gated.calls) == 1)
        try:
            yield url, gated
        finally:
            gated.gate.set()
            holder.join()


def test_timeouts_and_client_disconnects_drop_the_request(pipe):
    with held(pipe, timeout_s=1.0) as (url, _):
        r = post(url, {"prompt": "a blue square", "steps": 2})  # waits behind the held one: 504 after 1 s
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert httpx.get(f"{url}/healthz").json()["queue_depth"] == 0  # dropped, not sampled later

    with held(pipe, timeout_s=60) as (url, gated):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            post(url, {"prompt": "a blue square", "steps": 2}, timeout=0.5)
        wait_for(lambda: metric(url, 'krea2_requests_total{code="499"}') == 1.0)
        assert httpx.get(f"{url}/healthz").json()["queue_depth"] == 0
        gated.gate.set()
        wait_for(lambda: metric(url, "krea2_images_total") == 1.0)
        assert post(url, {"prompt": "a green triangle", "steps": 2}).status_code == 200
        assert gated.calls == [1, 1]  # the abandoned request was never sampled


def test_serve_usage_errors_are_one_line(cli_error):
    from krea2.serve import listen

    code, err = cli_error("serve", "--max-queue", "0")
    assert code == 2 and "--max-queue must be >= 1, got 0" in err and "Traceback" not in err
    busy = listen("127.0.0.1", 0)  # port 0: a free port, reported by the socket
    port = busy.getsockname()[1]
    assert port > 0
    try:  # a port in use (or an unknown host) is one line before anything is loaded, not uvicorn's exit 3
        code, err = cli_error("serve", "--port", port)
        assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    finally:
        busy.close()
    code, err = cli_error("serve", "--host", "nosuchhost.invalid")
    assert code == 2 and "cannot listen on nosuchhost.invalid" in err
    code, err = cli_error("serve", "--timeout", "-1")
    assert code != 0 and "--timeout" in err and "Traceback" not in err


def test_style_references_in_requests(pipe, tmp_path):
    import json

    from safetensors.torch import save_file

    from krea2.data import world
    from krea2.style import StyleEncoder

    folder = tmp_path / "style"
    folder.mkdir()
    torch.manual_seed(0)
    cfg = {"features": pipe.model.cfg.features, "tokens": 2, "patch": 4, "width": 32, "heads": 4, "side": 32}
    enc = StyleEncoder(cfg["features"], cfg["tokens"], cfg["patch"], cfg["width"], cfg["heads"], cfg["side"])
    save_file(enc.state_dict(), folder / "style_encoder.safetensors")
    (folder / "style.json").write_text(json.dumps(cfg))
    buf = io.BytesIO()
    Image.fromarray(world.render(world.sample_scene(np.random.default_rng(0), styles=["striped"]), 32, 0)).save(
        buf, format="PNG")
    ref = base64.b64encode(buf.getvalue()).decode()
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), "white").save(buf, format="PNG")  # ~50 KB of PNG, 16.8 MP
    big = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "a red circle", "seed": 4, "steps": 4}
    with server(pipe, style_encoder=str(folder), max_body_bytes=1 << 20) as (url, _):
        plain = decode(post(url, body).json()["data"][0])
        styled = post(url, {**body, "style_refs": [{"b64_json": ref, "weight": 1.0}], "style_strength": 1.0})
        assert styled.status_code == 200 and not np.array_equal(decode(styled.json()["data"][0]), plain)
        zero = post(url, {**body, "style_refs": [{"b64_json": ref}], "style_strength": 0})
        assert np.array_equal(decode(zero.json()["data"][0]), plain)  # strength 0: the base model exactly
        for bad, param in [({"style_refs": [{"b64_json": "!!!"}]}, "style_refs"),
                           ({"style_refs": [{"b64_json": base64.b64encode(b"not an image").decode()}]}, "style_refs"),
                           ({"style_refs": [{"b64_json": ref}], "style_strength": 2}, "style_strength"),
                           ({"style_refs": [{"b64_json": ref, "weight": 0}]}, "style_refs"),
                           ({"style_refs": []}, "style_refs"),
                           ({"style_refs": [{"b64_json": big}]}, "style_refs")]:  # small bytes, too many pixels
            r = post(url, {**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    with server(pipe) as (url, _):  # no encoder: the field is refused by name
        r = post(url, {**body, "style_refs": [{"b64_json": ref}]})
        assert r.status_code == 400 and "--style-encoder" in r.json()["error"]["message"]


def test_loras_are_switched_on_per_request_and_off_exactly(pipe, tmp_path):
    from krea2.models.lora import save_lora

    torch.manual_seed(0)
    d = pipe.model.cfg.features
    save_lora(tmp_path / "zorb.safetensors", {"blocks.0.attn.wq.lora_A.weight": torch.randn(4, d) * 0.3,
                                             "blocks.0.attn.wq.lora_B.weight": torch.randn(d, 4) * 0.3}, 4.0)
    body = {"prompt": "a red circle", "seed": 2, "steps": 4}
    try:
        with server(pipe, loras=(f"zorb={tmp_path / 'zorb.safetensors'}",)) as (url, _):
            assert httpx.get(f"{url}/healthz").json()["loras"] == ["zorb"]
            plain = decode(post(url, body).json()["data"][0])
            on = post(url, {**body, "lora": [{"name": "zorb", "scale": 1.0}]})
            assert on.status_code == 200 and on.json()["krea2"]["lora"] == {"zorb": 1.0}
            assert not np.array_equal(decode(on.json()["data"][0]), plain)
            assert np.array_equal(decode(post(url, body).json()["data"][0]), plain)  # off again, exactly
            for bad in ([{"name": "nope"}], [{"name": "zorb", "scale": 9}], [{"name": "zorb"}, {"name": "zorb"}]):
                r = post(url, {**body, "lora": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text
    finally:
        pipe.unload_lora()  # the module's shared pipeline, as the other tests expect it
