"""The FastAPI app over an Engine: the JSON API under /v1, clip-retrieval's /knn-service, the web page at /.

Every error is a JSON body {"detail": "one line naming the field and the fix"}.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from racm3.documents import BadRecord, Document, load_image
from racm3.limits import MAX_GUIDANCE, MAX_SEARCH_K, MAX_SEED, TEMPERATURE_RULE, temperature_ok
from racm3.retrieval.memory import MemoryBusy, MemoryFolderError
from racm3.serving import clip_retrieval
from racm3.serving.api_docs import api_docs_html
from racm3.serving.engine import Engine, RequestTimeout, document_json, document_url, hit_json, png_bytes
from racm3.serving.limits import (
    MAX_ADD,
    MAX_CAPTION_CHARS,
    MAX_DEMOS,
    MAX_ID_CHARS,
    MAX_SAMPLES,
    BodyLimit,
    Limits,
    QueueFull,
)
from racm3.serving.page import PAGE_HTML

MAX_K = 16  # documents per request; the generator's context refuses more than it holds (RACM3.check_request)
PAGE_SIZE_MAX = 200


def _check_temperature(value: float | None) -> float | None:
    if value is not None and not temperature_ok(value):
        raise ValueError(f"must be {TEMPERATURE_RULE}")
    return value


class GenerateImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caption: str = Field(min_length=1, max_length=MAX_CAPTION_CHARS, description="the text to draw")
    k: int = Field(2, ge=0, le=MAX_K, description="documents retrieved into the context (0: none)")
    samples: int = Field(4, ge=1, le=MAX_SAMPLES, description="images sampled; the best by the encoder's score first")
    guidance: float = Field(3.0, ge=0, le=MAX_GUIDANCE, description="classifier-free guidance scale (1: off)")
    temperature: float | None = Field(None, description="0 (greedy) or 0.01-100; default: the model's (sampling.json)")
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    demos: list[str] | None = Field(None, max_length=MAX_DEMOS,
                                    description="ids of memory documents to use as in-context examples (no retrieval)")
    rerank: Literal["source", "caption"] = "source"

    _temperature = field_validator("temperature")(_check_temperature)

    @field_validator("caption")
    @classmethod
    def _caption(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is blank; send the text to draw, e.g. 'flag: France'")
        return value.strip()


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=MAX_CAPTION_CHARS)
    image: str | None = Field(None, description="the query image, base64-encoded file bytes (or a data: URL)")
    k: int = Field(4, ge=1, le=MAX_SEARCH_K)


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    text: str | None = Field(None, max_length=MAX_CAPTION_CHARS)
    image: str | None = Field(None, description="base64-encoded image file bytes (or a data: URL)")
    meta: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=32)


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_ADD)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or "body"


def validation_message(errors) -> str:
    """Pydantic's first error as one line: the field, what is wrong, and where the fields are described."""
    if not errors:
        return "the request is not valid; see /docs for its fields"
    err = errors[0]
    field = _field(err.get("loc", ()))
    if err.get("type") == "missing":
        return f"{field}: required; add it to the request (see /docs)"
    if err.get("type") == "json_invalid":
        return "body: not valid JSON; send a JSON object (Content-Type: application/json)"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list, bytes)) or got is None else \
        f" (got {got[:60]!r})" if isinstance(got, str) else f" (got {got})"
    more = f"; {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
    return f"{field}: {err.get('msg', 'not valid').removeprefix('Value error, ')}{shown}; fix it and retry (see /docs){more}"


def _error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, " ".join(str(message).split()), headers=headers)


def create_app(model, memory_path: str | Path, *, token: str | None = None, limits: Limits | None = None,
               cors_origins: tuple[str, ...] | list[str] = (), index_name: str | None = None) -> FastAPI:
    """The app serving `model` over the memory folder `memory_path` (opened once per worker thread).

    token: writes need `Authorization: Bearer TOKEN`; None: writes are refused (403). cors_origins: none by default.
    index_name: the name /indices-list and /knn-service use (default: the memory folder's name).
    """
    engine = Engine(model, memory_path, limits, token)
    index = index_name or engine.memory_path.name

    @asynccontextmanager
    async def lifespan(_app):
        yield
        engine.close()

    app = FastAPI(title="racm3 serve", version="1", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Retrieval-augmented generation of images from captions and captions from images, "
                              "over a memory of image-text documents; clip-retrieval's /knn-service.")
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_upload_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    async def run(pool: str, fn, *args):
        """A job in a pool, its failures as HTTP errors (the job raises HTTPException for its own)."""
        try:
            return await (engine.generate if pool == "generation" else engine.read)(fn, *args)
        except QueueFull as exc:
            raise _error(503, f"{exc}: the server runs {engine.limits.generation_workers if pool == 'generation' else engine.limits.read_workers} "
                              f"{pool}(s) at a time", {"Retry-After": str(exc.retry_after)}) from None
        except RequestTimeout as exc:
            raise _error(504, str(exc)) from None
        except MemoryBusy as exc:
            raise _error(503, exc, {"Retry-After": "5"}) from None
        except MemoryFolderError as exc:
            raise _error(500, exc) from None

    def require_write(authorization: str | None = Header(None)) -> None:
        if engine.token is None:
            raise _error(403, "this server was started without --token, so its memory is read-only; restart it "
                              "with `racm3 serve --token TOKEN` to add and remove documents")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), engine.token.encode()):
            raise _error(401, "writes need the header `Authorization: Bearer TOKEN`, with the token racm3 serve "
                              "was started with" + (" (the token sent is not it)" if authorization else ""),
                         {"WWW-Authenticate": "Bearer"})

    def get_documents(memory, ids: list[str], field: str) -> list[Document]:
        try:
            return memory.get(ids)
        except KeyError as exc:
            raise _error(404 if field == "id" else 400, f"{field}: {exc.args[0]}; GET /v1/documents lists the ids")

    def check_context(k: int, caption: str | None = None) -> None:
        try:
            engine.model.check_request(k, caption)
        except ValueError as exc:
            raise _error(400, f"{'caption' if 'caption' in str(exc) else 'k'}: {exc}") from None

    async def decode_image(data: str | bytes, field: str):
        try:
            if isinstance(data, str):
                return await asyncio.to_thread(clip_retrieval.decode_base64_image, data, field)
            return await asyncio.to_thread(load_image, data, name=field)
        except (BadRecord, clip_retrieval.KnnError) as exc:
            raise _error(400, exc) from None

    # --- pages -----------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE_HTML)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(api_docs_html(app.title))

    @app.get("/healthz", tags=["server"])
    async def healthz():
        return {"status": "ok", "generation": engine.generations.state(), "read": engine.reads.state(),
                "sampling": engine.model.sampling}  # the temperatures a request without one gets

    # --- generation -------------------------------------------------------------------------------------
    def outputs_json(out, kind: str) -> dict:
        body = {"sources": [hit_json(h) for h in out.sources], "scores": [round(s, 4) for s in out.scores],
                "seconds": round(out.seconds, 3)}
        if kind == "image":
            names = [engine.outputs.put(png_bytes(im)) for im in out.samples]
            body["image"] = "data:image/png;base64," + base64.b64encode(engine.outputs.get(names[0])).decode()
            body["image_url"] = f"/v1/outputs/{names[0]}.png"
            body["samples"] = [{"image_url": f"/v1/outputs/{n}.png", "score": round(s, 4)}
                               for n, s in zip(names, out.scores)]
        else:
            body["text"] = out.text
            body["samples"] = [{"text": t, "score": round(s, 4)} for t, s in zip(out.samples, out.scores)]
        return body

    @app.post("/v1/generate/image", tags=["generate"])
    async def generate_image(req: GenerateImageRequest):
        """Caption -> retrieve k documents (or use `demos`) -> the best of `samples` images, with its sources."""
        check_context(len(req.demos) if req.demos else req.k, req.caption)

        def job(memory):
            demos = get_documents(memory, req.demos, "demos") if req.demos else None
            out = engine.model.generate_image(req.caption, memory=memory, k=req.k, num_samples=req.samples,
                                              guidance=req.guidance, temperature=req.temperature, top_p=req.top_p,
                                              seed=req.seed, demos=demos, rerank=req.rerank)
            return {"caption": req.caption, **outputs_json(out, "image")}

        return await run("generation", job)

    @app.post("/v1/generate/text", tags=["generate"])
    async def generate_text(image: UploadFile = File(..., description="the image to caption (PNG, JPEG, ...)"),
                            k: int = Form(2, ge=0, le=MAX_K), samples: int = Form(4, ge=1, le=MAX_SAMPLES),
                            guidance: float = Form(1.0, ge=0, le=MAX_GUIDANCE),
                            temperature: float | None = Form(None, description="default: the model's (sampling.json)"),
                            top_p: float = Form(0.9, gt=0, le=1), seed: int = Form(0, ge=0, le=MAX_SEED),
                            max_new_tokens: int = Form(32, ge=1, le=64),
                            demos: list[str] = Form([], description="memory document ids: in-context examples")):
        """Image (multipart upload) -> retrieve k documents (or use `demos`) -> the best of `samples` captions."""
        try:
            _check_temperature(temperature)
        except ValueError as exc:
            raise _error(422, f"temperature: {exc} (got {temperature}); fix it and retry") from None
        if len(demos) > MAX_DEMOS:
            raise _error(422, f"demos: at most {MAX_DEMOS} demonstrations, got {len(demos)}")
        check_context(len(demos) if demos else k)
        picture = await decode_image(await image.read(), "image")

        def job(memory):
            docs = get_documents(memory, demos, "demos") if demos else None
            out = engine.model.generate_text(picture, memory=memory, k=k, num_samples=samples, guidance=guidance,
                                             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                             seed=seed, demos=docs)
            return outputs_json(out, "text")

        return await run("generation", job)

    @app.get("/v1/outputs/{name}.png", tags=["generate"], response_class=Response)
    async def output(name: str):
        png = engine.outputs.get(name)
        if png is None:
            raise _error(404, f"no output {name!r}: the server keeps the last {engine.outputs.size} generated "
                              f"images in RAM; generate it again")
        return Response(png, media_type="image/png")

    # --- retrieval and documents ----------------------------------------------------------------------
    @app.post("/v1/retrieve", tags=["memory"])
    async def retrieve(req: RetrieveRequest):
        """Text or image -> the k documents a generation would retrieve (the paper's rules), best first."""
        if (req.text is None) == (req.image is None) or (req.text is not None and not req.text.strip()):
            raise _error(422, "give exactly one of text (non-empty) or image (base64)")
        query = req.text.strip() if req.text is not None else await decode_image(req.image, "image")
        hits = await run("read", lambda memory: engine.model.retrieve(query, memory, req.k))
        return {"hits": [hit_json(h) for h in hits]}

    @app.get("/v1/documents", tags=["memory"])
    async def list_documents(offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=PAGE_SIZE_MAX)):
        """A page of the memory's documents, in the order they were added."""
        def job(memory):
            ids = memory.ids()
            return {"count": len(ids), "offset": offset,
                    "documents": [document_json(d) for d in memory.get(ids[offset:offset + limit])]}

        return await run("read", job)

    @app.get("/v1/documents/{doc_id:path}/image", tags=["memory"], response_class=Response)
    async def document_image(doc_id: str, index: int = Query(0, ge=0)):
        doc = (await run("read", lambda memory: get_documents(memory, [doc_id], "id")))[0]
        if index >= len(doc.images):
            raise _error(404, f"document {doc_id!r} has {len(doc.images)} image(s), no image {index}")
        return Response(png_bytes(doc.images[index]), media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/documents/{doc_id:path}", tags=["memory"])
    async def document(doc_id: str):
        doc = (await run("read", lambda memory: get_documents(memory, [doc_id], "id")))[0]
        segments, n = [], 0
        for seg in doc.segments:
            if isinstance(seg, str):
                segments.append({"text": seg})
            else:
                segments.append({"image_url": f"{document_url(doc.id)}/image?index={n}"})
                n += 1
        return {**document_json(doc), "segments": segments, "meta": doc.meta}

    # --- the memory -------------------------------------------------------------------------------------
    @app.get("/v1/memory", tags=["memory"])
    async def memory_info():
        info = await run("read", lambda memory: {**memory.info(), "generation": memory.generation})
        return {**info, "index_name": index, "writes": "token" if engine.token else "off",
                "limits": {"max_upload_bytes": engine.limits.max_upload_bytes, "max_samples": MAX_SAMPLES,
                           "max_k": MAX_K, "generation_workers": engine.limits.generation_workers,
                           "generation_queue": engine.limits.generation_queue, "timeout_s": engine.limits.timeout_s}}

    async def documents_in(request: Request) -> list[DocumentIn | tuple]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            data = await upload.read() if hasattr(upload, "read") else None
            try:
                doc = DocumentIn(id=form.get("id") or "", text=form.get("text") or None)
            except ValidationError as exc:
                raise _error(422, validation_message(exc.errors())) from None
            return [(doc, data)]
        try:
            body = await request.json()
        except ValueError:
            raise _error(422, "body: not valid JSON; send a JSON document or {\"documents\": [...]}, or a "
                              "multipart form with id, text and image") from None
        try:
            parsed = DocumentsIn.model_validate(body) if isinstance(body, dict) and "documents" in body \
                else DocumentsIn(documents=[DocumentIn.model_validate(body)])
        except ValidationError as exc:
            raise _error(422, validation_message(exc.errors())) from None
        return list(parsed.documents)

    @app.post("/v1/memory/documents", tags=["memory"], status_code=201, dependencies=[Depends(require_write)])
    async def add_documents(request: Request):
        """Add documents (JSON: one {id, text, image: base64, meta} or {"documents": [...]}; or a multipart form
        with id, text and an image file). Needs the token; the memory embeds and stores them in one write."""
        docs, items = [], await documents_in(request)
        for i, item in enumerate(items):
            doc_in, data = item if isinstance(item, tuple) else (item, item.image)
            where = f"documents.{i}." if len(items) > 1 else ""
            text = doc_in.text.strip() if doc_in.text and doc_in.text.strip() else None
            picture = await decode_image(data, f"{where}image") if data else None
            if text is None and picture is None:
                raise _error(422, f"{where}text, {where}image: a document needs a caption, an image or both")
            try:
                docs.append(Document(doc_in.id, tuple(s for s in (picture, text) if s is not None),
                                     {"source": "racm3 serve", **doc_in.meta}))
            except BadRecord as exc:
                raise _error(422, f"{where}id: {exc}") from None

        def job(memory):
            try:
                memory.add_documents(docs, engine.model.encoder)
            except (KeyError, ValueError) as exc:
                message = exc.args[0] if exc.args else str(exc)
                raise _error(409 if isinstance(exc, KeyError) else 422, message) from None
            return {"added": [d.id for d in docs], "count": len(memory)}

        return await run("read", job)

    @app.delete("/v1/memory/documents/{doc_id:path}", tags=["memory"], dependencies=[Depends(require_write)])
    async def remove_document(doc_id: str):
        """Remove a document: no search or generation retrieves it again. Needs the token."""
        def job(memory):
            try:
                memory.remove([doc_id])
            except KeyError as exc:
                raise _error(404, f"id: {exc.args[0]}; GET /v1/documents lists the ids") from None
            return {"removed": doc_id, "count": len(memory)}

        return await run("read", job)

    # --- clip-retrieval ----------------------------------------------------------------------------------
    @app.get("/indices-list", tags=["clip-retrieval"])
    async def indices_list():
        return [index]

    @app.post("/knn-service", tags=["clip-retrieval"],
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": clip_retrieval.KnnRequest.model_json_schema()}}}})
    async def knn_service(request: Request):
        """clip-retrieval's knn-service: [{id, similarity, caption, url}], best first (ClipClient speaks it).

        The body is read as JSON whatever its Content-Type (ClipClient sends none, and clip-retrieval's back end
        reads it as JSON regardless)."""
        try:
            req = clip_retrieval.KnnRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _error(422, validation_message(exc.errors())) from None
        if req.indice_name not in (None, index):
            raise _error(400, f"indice_name: no index {req.indice_name!r} here; this server has [{index!r}] "
                              f"(GET /indices-list)")
        base = str(request.base_url).rstrip("/")

        def job(memory):
            try:
                return clip_retrieval.knn(memory, engine.model.encoder, req, lambda i: f"{base}{document_url(i)}/image")
            except clip_retrieval.KnnError as exc:
                raise _error(400, exc) from None

        return await run("read", job)

    return app


def load_app(model_dir: str | Path | None = None, memory_dir: str | Path | None = None, *, device: str = "auto",
             log=None, **options) -> FastAPI:
    """The app over a model folder (default: the shipped emoji-small) and a memory (default: the emoji memory,
    built into the racm3 cache on first use); options as create_app's."""
    from racm3.embedded import ensure_emoji_memory
    from racm3.pipeline import RACM3

    model = RACM3.from_pretrained(model_dir, device=device)
    path = Path(memory_dir) if memory_dir is not None else ensure_emoji_memory(model.encoder, log=log)
    return create_app(model, path, **options)


