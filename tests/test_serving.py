"""racm3 serve: the JSON API, the clip-retrieval protocol and the limits, over the tiny model and the shapes memory."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import shutil
import socket
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient
from generator_fixtures import draw

TOKEN = "test-token"


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from racm3.pipeline import RACM3

    return RACM3.from_pretrained(tiny_model_dir[0], device="cpu")


@pytest.fixture()
def memory_copy(tiny_model_dir, tmp_path):
    """A copy of the shapes memory this test may change."""
    path = tmp_path / "memory"
    shutil.copytree(tiny_model_dir[1], path)
    return path


def make_client(model, memory_dir, **options):
    from racm3.serving.app import create_app

    return TestClient(create_app(model, memory_dir, **options))


@pytest.fixture(scope="module")
def client(model, tiny_model_dir):
    with make_client(model, tiny_model_dir[1]) as c:  # read-only: started without a token
        yield c


@pytest.fixture()
def writer(model, memory_copy):
    with make_client(model, memory_copy, token=TOKEN) as c:
        yield c


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def memory_ids(client) -> set[str]:
    body = client.get("/v1/documents", params={"limit": 200}).json()
    assert body["count"] == len(body["documents"])
    return {d["id"] for d in body["documents"]}


def retrieved(client, text: str, k: int = 8) -> list[str]:
    r = client.post("/v1/retrieve", json={"text": text, "k": k})
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["hits"]]


# --- the page and the server ---------------------------------------------------------------------


def test_page_and_docs_load_nothing_from_elsewhere(client):
    for path in ("/", "/docs"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", r.text), path
        assert "<link" not in r.text and "<script src" not in r.text
    page = client.get("/").text
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate/image", "/v1/generate/text", "/v1/retrieve", "/knn-service", "/indices-list",
            "/v1/memory/documents", "/healthz"} <= set(spec["paths"])


def test_health_and_memory_info(client, tiny_model_dir):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["generation"] == {"pending": 0, "workers": 1, "capacity": 5}
    assert health["sampling"] == {"image_temperature": 1.0, "text_temperature": 0.7}  # no sampling.json there
    info = client.get("/v1/memory").json()
    assert info["count"] == 48 and info["writes"] == "off" and info["index_name"] == tiny_model_dir[1].name


def test_no_cors_unless_asked(model, tiny_model_dir):
    headers = {"Origin": "http://example.test"}
    with make_client(model, tiny_model_dir[1]) as c:
        assert "access-control-allow-origin" not in c.get("/v1/memory", headers=headers).headers
    with make_client(model, tiny_model_dir[1], cors_origins=["http://example.test"]) as c:
        assert c.get("/v1/memory", headers=headers).headers["access-control-allow-origin"] == "http://example.test"


# --- generation ------------------------------------------------------------------------------------


def test_generate_image_returns_a_png_and_memory_sources(client):
    r = client.post("/v1/generate/image", json={"caption": "red circle", "k": 2, "samples": 2, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    head, data = body["image"].split(",", 1)
    assert head == "data:image/png;base64"
    image = decode_png(base64.b64decode(data))
    assert image.size[0] == image.size[1] >= 16
    assert client.get(body["image_url"]).content == base64.b64decode(data)  # the best sample, also by URL
    assert len(body["samples"]) == 2 and len(body["scores"]) == 2 and body["scores"] == sorted(body["scores"])[::-1]
    assert 1 <= len(body["sources"]) <= 2
    ids = memory_ids(client)
    for source in body["sources"]:
        assert source["id"] in ids and isinstance(source["score"], float)
        doc = client.get(f"/v1/documents/{source['id']}").json()
        assert doc["text"] == source["text"]
        assert decode_png(client.get(source["image_url"]).content).size == (16, 16)
    # the same request and seed draw the same image
    again = client.post("/v1/generate/image", json={"caption": "red circle", "k": 2, "samples": 2, "seed": 3}).json()
    assert again["image"] == body["image"]


def test_generate_with_demonstrations_uses_exactly_them(client):
    demos = ["filled-blue-square", "outline-red-bar"]
    body = client.post("/v1/generate/image", json={"caption": "blue square", "samples": 1, "demos": demos}).json()
    assert [s["id"] for s in body["sources"]] == demos and all(s["score"] is None for s in body["sources"])
    r = client.post("/v1/generate/image", json={"caption": "blue square", "demos": ["no-such-doc"]})
    assert r.status_code == 400 and "demos" in r.json()["detail"] and "no-such-doc" in r.json()["detail"]


def test_generate_text_from_an_upload(client):
    files = {"image": ("shape.png", png(draw("green", "triangle", "filled")), "image/png")}
    r = client.post("/v1/generate/text", files=files, data={"k": "2", "samples": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str) and body["text"].strip() and body["text"] == body["samples"][0]["text"]
    assert len(body["samples"]) == 2 and {s["id"] for s in body["sources"]} <= memory_ids(client)
    demo = client.post("/v1/generate/text", files=files, data={"samples": "1", "demos": ["filled-green-triangle"]})
    assert [s["id"] for s in demo.json()["sources"]] == ["filled-green-triangle"]


def test_generation_options_are_refused_with_the_field_named(client):
    cases = [({"caption": "red circle", "samples": 0}, 422, "samples"),
             ({"caption": "red circle", "sample": 2}, 422, "sample"),  # a typo is not silently ignored
             ({"caption": "   "}, 422, "caption"),
             ({"k": 1}, 422, "caption: required"),
             ({"caption": "red circle", "temperature": 0.001}, 422, "temperature"),
             ({"caption": "red circle", "guidance": -1}, 422, "guidance"),
             ({"caption": "red circle", "k": 17}, 422, "k"),
             ({"caption": "zq" * 450}, 400, "caption: the caption is")]  # more than the tiny generator's context
    for body, status, named in cases:
        r = client.post("/v1/generate/image", json=body)
        assert r.status_code == status, (body, r.text)
        assert named in r.json()["detail"] and "\n" not in r.json()["detail"], (body, r.json())
    r = client.post("/v1/generate/image", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["detail"]
    r = client.post("/v1/generate/text", data={"k": "2"})
    assert r.status_code == 422 and r.json()["detail"].startswith("image: required")


# --- retrieval and documents -------------------------------------------------------------------------


def test_retrieve_by_text_and_by_image(client):
    hits = client.post("/v1/retrieve", json={"text": "red circle", "k": 4}).json()["hits"]
    assert len(hits) == 4 and [h["rank"] for h in hits] == [0, 1, 2, 3]
    assert {h["id"] for h in hits} <= memory_ids(client)
    image = base64.b64encode(png(draw("blue", "bar", "outline"))).decode()
    hits = client.post("/v1/retrieve", json={"image": image, "k": 3}).json()["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    for body, named in [({"k": 2}, "exactly one"), ({"text": "x", "image": image}, "exactly one"),
                        ({"text": "red", "k": 0}, "k"), ({"image": "@@@"}, "base64")]:
        r = client.post("/v1/retrieve", json=body)
        assert r.status_code in (400, 422) and named in r.json()["detail"], (body, r.text)


def test_documents_browse_read_and_unknown(client):
    page = client.get("/v1/documents", params={"offset": 40, "limit": 24}).json()
    assert page["count"] == 48 and len(page["documents"]) == 8
    doc = client.get("/v1/documents/filled-red-circle").json()
    assert doc["text"] == "red circle" and doc["meta"]["style"] == "filled"
    assert [list(s) for s in doc["segments"]] == [["image_url"], ["text"]]
    assert decode_png(client.get(doc["segments"][0]["image_url"]).content).getpixel((8, 8)) == (220, 30, 30)
    r = client.get("/v1/documents/no-such-doc")
    assert r.status_code == 404 and "no-such-doc" in r.json()["detail"]
    assert client.get("/v1/documents/filled-red-circle/image", params={"index": 1}).status_code == 404
    assert client.get("/v1/outputs/0123.png").status_code == 404


# --- writes ---------------------------------------------------------------------------------------------


def test_writes_refused_without_a_configured_token(client):
    r = client.post("/v1/memory/documents", json={"id": "x", "text": "x"}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 403 and "--token" in r.json()["detail"]
    assert client.delete("/v1/memory/documents/filled-red-circle").status_code == 403
    assert "filled-red-circle" in memory_ids(client)


def test_writes_need_the_token(writer):
    doc = {"id": "new-doc", "text": "yellow star"}
    r = writer.post("/v1/memory/documents", json=doc)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.json()["detail"]
    r = writer.post("/v1/memory/documents", json=doc, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "not it" in r.json()["detail"]
    assert writer.delete("/v1/memory/documents/filled-red-circle", headers={"Authorization": TOKEN}).status_code == 401
    assert "new-doc" not in memory_ids(writer) and "filled-red-circle" in memory_ids(writer)


def test_add_retrieve_remove_never_retrieved_again(writer):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    caption = "a zebra crossing at night with a lantern"
    image = base64.b64encode(png(Image.new("RGB", (16, 16), (250, 240, 10)))).decode()
    assert "zebra-1" not in retrieved(writer, caption)
    r = writer.post("/v1/memory/documents", json={"id": "zebra-1", "text": caption, "image": image,
                                                  "meta": {"license": "CC0"}}, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json() == {"added": ["zebra-1"], "count": 49}
    assert retrieved(writer, caption)[0] == "zebra-1"  # the next search sees the write
    knn = writer.post("/knn-service", content=json.dumps({"text": caption, "modality": "image", "num_images": 3}))
    assert knn.json()[0]["id"] == "zebra-1" and knn.json()[0]["caption"] == caption
    doc = writer.get("/v1/documents/zebra-1").json()
    assert doc["meta"] == {"source": "racm3 serve", "license": "CC0"}
    assert decode_png(writer.get(doc["image_url"]).content).getpixel((0, 0)) == (250, 240, 10)
    body = writer.post("/v1/generate/image", json={"caption": caption, "k": 1, "samples": 1}).json()
    assert [s["id"] for s in body["sources"]] == ["zebra-1"]
    # the same id again is refused, naming it
    r = writer.post("/v1/memory/documents", json={"id": "zebra-1", "text": "other"}, headers=auth)
    assert r.status_code == 409 and "zebra-1" in r.json()["detail"]
    # multipart, as the web page sends it; several documents in one JSON request
    files = {"image": ("s.png", png(draw("black", "square", "filled")), "image/png")}
    r = writer.post("/v1/memory/documents", data={"id": "form-doc", "text": "black box"}, files=files, headers=auth)
    assert r.status_code == 201 and writer.get("/v1/documents/form-doc").json()["text"] == "black box"
    r = writer.post("/v1/memory/documents", json={"documents": [{"id": "a1", "text": "first"},
                                                                {"id": "a2", "text": "second"}]}, headers=auth)
    assert r.json() == {"added": ["a1", "a2"], "count": 52}
    # removed: never retrieved again, by the API, the knn-service or a generation
    r = writer.delete("/v1/memory/documents/zebra-1", headers=auth)
    assert r.status_code == 200 and r.json() == {"removed": "zebra-1", "count": 51}
    assert "zebra-1" not in retrieved(writer, caption, k=60)
    knn = writer.post("/knn-service", content=json.dumps({"text": caption, "num_images": 60, "deduplicate": False}))
    assert "zebra-1" not in {h["id"] for h in knn.json()}
    body = writer.post("/v1/generate/image", json={"caption": caption, "k": 2, "samples": 1}).json()
    assert "zebra-1" not in {s["id"] for s in body["sources"]}
    assert writer.get("/v1/documents/zebra-1").status_code == 404
    r = writer.delete("/v1/memory/documents/zebra-1", headers=auth)
    assert r.status_code == 404 and "zebra-1" in r.json()["detail"]


def test_bad_documents_are_refused(writer):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body, status, named in [({"id": "x"}, 422, "a caption, an image or both"),
                                ({"text": "x"}, 422, "id: required"),
                                ({"id": "x", "image": base64.b64encode(b"not an image").decode()}, 400,
                                 "not a readable image"),
                                ({"documents": [{"id": "d", "text": "t"}, {"id": "d", "text": "u"}]}, 422, "repeat"),
                                ({"id": "x", "text": "t", "colour": 1}, 422, "colour")]:
        r = writer.post("/v1/memory/documents", json=body, headers=auth)
        assert r.status_code == status and named in r.json()["detail"], (body, r.text)
    assert writer.get("/v1/memory").json()["count"] == 48


# --- limits ---------------------------------------------------------------------------------------------


def test_upload_limits(model, tiny_model_dir, client):
    from racm3.serving.limits import Limits

    with make_client(model, tiny_model_dir[1], limits=Limits(max_upload_bytes=20_000)) as small:
        big = png(Image.effect_noise((128, 128), 64).convert("RGB"))
        assert len(big) > 20_000
        r = small.post("/v1/generate/text", files={"image": ("big.png", big, "image/png")})
        assert r.status_code == 413 and "20,000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while the body streams in
            for _ in range(10):
                yield b"x" * 4096

        r = small.post("/v1/retrieve", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    r = client.post("/v1/generate/text", files={"image": ("a.txt", b"hello, not an image", "text/plain")})
    assert r.status_code == 400 and "image: not a readable image" in r.json()["detail"]
    huge = png(Image.new("1", (5000, 4000)))  # a small file of 20M pixels: over the 4096 x 4096 pixel limit
    r = client.post("/v1/generate/text", files={"image": ("huge.png", huge, "image/png")})
    assert r.status_code == 400 and "5000x4000" in r.json()["detail"] and "limit" in r.json()["detail"]


def test_full_queue_503_and_timeout_504(model, tiny_model_dir):
    from racm3.serving.limits import Limits

    limits = Limits(generation_workers=1, generation_queue=1, timeout_s=0.5)
    with make_client(model, tiny_model_dir[1], limits=limits) as c:
        engine = c.app.state.engine
        release = threading.Event()
        ran = []
        engine.generations.submit(release.wait)  # the one worker is busy
        try:
            t0 = time.perf_counter()
            r = c.post("/v1/generate/image", json={"caption": "red circle", "samples": 1})  # queued, then too late
            assert r.status_code == 504 and "timeout" in r.json()["detail"]
            assert time.perf_counter() - t0 < 5
            engine.generations.submit(lambda: ran.append(1))  # fills the one queue place
            r = c.post("/v1/generate/image", json={"caption": "red circle", "samples": 1})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
            assert c.post("/v1/retrieve", json={"text": "red circle"}).status_code == 200  # searches still answer
        finally:
            release.set()
        for _ in range(100):
            if engine.generations.state()["pending"] == 0:
                break
            time.sleep(0.05)
        assert engine.generations.state()["pending"] == 0 and ran == [1]  # the timed-out job never ran
        assert c.post("/v1/generate/image", json={"caption": "red circle", "samples": 1}).status_code == 200


# --- clip-retrieval ---------------------------------------------------------------------------------------


def clip_client_request(text=None, image=None, embedding_input=None, indice_name="shapes-memory", num_images=5,
                        deduplicate=True) -> bytes:
    """The body ClipClient.query sends (clip_retrieval/clip_client.py 2.45), as requests.post(data=...): no
    Content-Type header."""
    return json.dumps({"text": text, "image": image, "image_url": None, "embedding_input": embedding_input,
                       "deduplicate": deduplicate, "use_safety_model": True, "use_violence_detector": True,
                       "indice_name": indice_name, "use_mclip": False, "aesthetic_score": 9,
                       "aesthetic_weight": 0.5, "modality": "image", "num_images": num_images,
                       "num_result_ids": num_images}).encode()


def test_knn_service_answers_clip_clients_request(client, model, tiny_model_dir):
    assert client.get("/indices-list").json() == ["shapes-memory"]
    r = client.post("/knn-service", content=clip_client_request(text="red circle"))
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == 5 and all(set(h) == {"id", "similarity", "caption", "url"} for h in hits)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)
    assert hits[0]["url"].startswith("http://testserver/v1/documents/")
    assert decode_png(client.get(hits[0]["url"]).content).size == (16, 16)
    # an embedding: a stored document's own vector finds it first
    from racm3.retrieval.memory import Memory

    with Memory.open(tiny_model_dir[1]) as memory:
        vector = memory.vectors(["outline-blue-bar"])[0].tolist()
    hits = client.post("/knn-service", content=clip_client_request(embedding_input=vector)).json()
    assert hits[0]["id"] == "outline-blue-bar" and hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    image = base64.b64encode(png(draw("red", "circle", "filled"))).decode()
    assert len(client.post("/knn-service", content=clip_client_request(image=image)).json()) == 5
    all_hits = client.post("/knn-service", content=clip_client_request(text="red", num_images=48,
                                                                         deduplicate=False)).json()
    deduped = client.post("/knn-service", content=clip_client_request(text="red", num_images=48)).json()
    assert len(all_hits) == 48 and len(deduped) <= 48 and {h["id"] for h in deduped} <= {h["id"] for h in all_hits}
    for body, named in [(clip_client_request(text="x", indice_name="laion5B"), "indice_name"),
                        (clip_client_request(), "give one of"),
                        (clip_client_request(embedding_input=[0.1, 0.2]), "embedding_input"),
                        (json.dumps({"image_url": "http://example.test/a.png"}).encode(), "never downloads"),
                        (json.dumps({"text": "x", "num_images": 0}).encode(), "num_images")]:
        r = client.post("/knn-service", content=body)
        assert r.status_code in (400, 422) and named in r.json()["detail"], (body, r.text)


def _clip_client_module():
    """clip-retrieval's own clip_client.py, loaded alone (the package's __init__ imports its heavy back end)."""
    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval is not installed: pip install clip-retrieval --no-deps (its client needs only "
                    "requests)")
    pytest.importorskip("requests")
    path = next(iter(spec.submodule_search_locations)) + "/clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_client_alone", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_retrievals_client_against_a_real_server(model, tiny_model_dir, tmp_path):
    import uvicorn

    from racm3.serving.app import create_app

    clip_client = _clip_client_module()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, tiny_model_dir[1], index_name="shapes"),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.02)
        client = clip_client.ClipClient(url=f"http://127.0.0.1:{port}/knn-service", indice_name="shapes",
                                        num_images=3)
        hits = client.query(text="green triangle")
        assert len(hits) == 3 and all(isinstance(h["caption"], str) and h["url"].endswith("/image") for h in hits)
        path = tmp_path / "q.png"
        draw("green", "triangle", "outline").save(path)
        by_image = client.query(image=str(path))
        assert len(by_image) == 3 and by_image[0]["similarity"] >= by_image[-1]["similarity"]
        import requests

        assert requests.get(hits[0]["url"], timeout=10).content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --- the command -----------------------------------------------------------------------------------------


def test_serve_command_refuses_bad_options_in_one_line():
    from typer.testing import CliRunner

    from racm3.cli import app

    busy = socket.create_server(("127.0.0.1", 0))
    try:
        for args, named in [(["--port", "70000"], "--port"), (["--workers", "0"], "--workers"),
                            (["--queue", "-1"], "--queue"), (["--timeout", "0"], "--timeout"),
                            (["--max-upload-mb", "0"], "--max-upload-mb"), (["--token", " "], "--token"),
                            (["--port", str(busy.getsockname()[1])], "cannot listen")]:
            result = CliRunner().invoke(app, ["serve", *args])
            assert result.exit_code == 1, (args, result.output)
            lines = result.output.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], (args, result.output)
    finally:
        busy.close()
