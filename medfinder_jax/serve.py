"""`launch.py serve`: an archive index and its model, loaded once, behind HTTP (FastAPI).

  GET  /api/search?text=...&top_k=K       studies for a sentence
  GET  /api/search?keyword=...&top_k=K    studies for a finding (stated / negated marked)
  POST /api/search?top_k=K                reports for a CT volume: the NIfTI file (.nii or
                                          .nii.gz, detected by its bytes) is the request body
  GET  /api/studies/{id}                  one study's metadata
  GET  /api/thumbnail?study_id=ID         its thumbnail (PNG)
  GET  /api/info                          studies, shards, dtype, ANN
  GET  /                                  the web page (web/index.html)

Every search answer is commands/search.Session.answer's dict, the `launch.py search --json`
output. Safe by default: it binds 127.0.0.1; top_k, query length and upload size are limited
(the upload is counted while it streams in, and refused past the limit); study ids are only
dictionary keys, never parts of a path (an upload goes to a temporary file of our naming);
a bad request is a 4xx with {"error": message}, an unexpected failure a 500 with a generic
message (the traceback goes to the log only). Requests are served concurrently (a thread pool;
the index is read-only and memory-mapped). The log has one line per request: method, path (no
query string: queries hold report text), status and latency.
"""

import dataclasses
import logging
import os
import sys
import tempfile
import time

from data_prep import preprocess
from data_prep import sources
from medfinder_jax import errors
from medfinder_jax import index as index_lib
from medfinder_jax.commands import search as search_command

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
GZIP_MAGIC = b"\x1f\x8b"
log = logging.getLogger("medfinder.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
  max_top_k: int = 100
  max_upload_bytes: int = 256 * 2**20
  max_query_chars: int = 2000


class RequestError(errors.UserError):
  """A request that cannot be answered as sent; `status` is its HTTP status."""

  def __init__(self, message, status=400):
    super().__init__(message)
    self.status = status


def make_app(session, limits=Limits()):
  """The FastAPI app answering for `session` (a commands/search.Session)."""
  from fastapi import FastAPI, Request  # pylint: disable=import-outside-toplevel
  from fastapi.exceptions import RequestValidationError  # pylint: disable=import-outside-toplevel
  from fastapi.responses import FileResponse, JSONResponse, Response  # pylint: disable=import-outside-toplevel
  from starlette.concurrency import run_in_threadpool  # pylint: disable=import-outside-toplevel
  from starlette.exceptions import HTTPException  # pylint: disable=import-outside-toplevel

  app = FastAPI(title="MedFinder", docs_url=None, redoc_url=None, openapi_url=None)
  index = session.index

  @app.middleware("http")
  async def log_latency(request, call_next):
    start = time.perf_counter()
    try:
      response = await call_next(request)
    except Exception:  # pylint: disable=broad-except  (logged, answered without detail)
      log.exception("%s %s failed", request.method, request.url.path)
      response = JSONResponse({"error": "internal error"}, status_code=500)
    log.info("%s %s %d %.1f ms", request.method, request.url.path, response.status_code,
             (time.perf_counter() - start) * 1e3)
    return response

  @app.exception_handler(errors.UserError)
  async def user_error(request, err):
    del request
    return JSONResponse({"error": str(err)}, status_code=getattr(err, "status", 400))

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, err):
    del request
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                         for e in err.errors())
    return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)

  @app.exception_handler(HTTPException)
  async def http_error(request, err):
    del request
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

  @app.get("/")
  def page():
    return FileResponse(WEB_PAGE, media_type="text/html")

  @app.get("/api/info")
  def info():
    method = ({"method": "ann", **{k: session.ann.meta[k] for k in ("kind", "nprobe",
                                                                   "recall_at_10")}}
              if session.ann else {"method": "exact", "note": session.ann_note})
    return {**index_lib.describe(index), "search": method, "limits": dataclasses.asdict(limits)}

  @app.get("/api/search")
  def search_text(text: str = None, keyword: str = None, top_k: str = None, exact: str = None):
    kind, value = search_command.query_kind(text, keyword, None)
    if len(value) > limits.max_query_chars:
      raise RequestError(f"{kind}: {len(value)} characters, over the limit of "
                         f"{limits.max_query_chars}")
    if kind == "keyword":
      search_command._check_keyword(value)  # pylint: disable=protected-access
    k = search_command.checked_top_k(session.config, top_k, limits.max_top_k)
    return session.answer(kind, value, k, exact=_flag(exact))

  @app.post("/api/search")
  async def search_volume(request: Request, top_k: str = None, exact: str = None):
    k = search_command.checked_top_k(session.config, top_k, limits.max_top_k)
    body = await _read_limited(request, limits.max_upload_bytes)
    if not body:
      raise RequestError("empty upload: send a NIfTI volume (.nii or .nii.gz) as the body")
    shown = _shown_name(request.headers.get("x-filename"))

    def answer():   # CPU work off the event loop
      return session.answer("volume", shown, k, exact=_flag(exact),
                            volume=_volume_from_bytes(body, session))
    return await run_in_threadpool(answer)

  @app.get("/api/studies/{study_id:path}")
  def study(study_id: str):
    return index.study(_row(index, study_id))

  @app.get("/api/thumbnail")
  def thumbnail(study_id: str = None):
    if not study_id:
      raise RequestError("thumbnail: pass study_id")
    data = index.thumbnail(_row(index, study_id))
    if not data:
      raise RequestError(f"study {study_id!r} has no thumbnail", status=404)
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "max-age=3600"})

  return app


def _flag(value):
  return str(value).lower() in ("1", "true", "yes") if value is not None else False


def _row(index, study_id):
  row = index.row_of(study_id)
  if row is None:
    raise RequestError(f"no study {study_id[:200]!r} in the index", status=404)
  return row


def _shown_name(header):
  """The uploaded file's name for the answer's query value (display only, never a path)."""
  name = os.path.basename(str(header or "")).strip()[:200]
  return name or "upload"


async def _read_limited(request, limit):
  """The request body, refused with 413 as soon as it passes `limit` bytes."""
  declared = request.headers.get("content-length")
  if declared and declared.isdigit() and int(declared) > limit:
    raise RequestError(f"upload of {int(declared)} bytes is over the limit of {limit} bytes",
                       status=413)
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise RequestError(f"upload is over the limit of {limit} bytes", status=413)
    chunks.append(chunk)
  return b"".join(chunks)


def _volume_from_bytes(body, session):
  """The record volume of an uploaded NIfTI file (written to a temporary file of ours)."""
  suffix = ".nii.gz" if body[:2] == GZIP_MAGIC else ".nii"
  with tempfile.TemporaryDirectory(prefix="medfinder-upload-") as folder:
    path = os.path.join(folder, "upload" + suffix)
    with open(path, "wb") as f:
      f.write(body)
    try:
      return preprocess.volume_from_file(path, session.preprocessing,
                                         session.config.data.get("max_volume_mib"))
    except sources.BadVolume as err:
      raise RequestError("uploaded volume: " + str(err).replace(f"{path}: ", "")) from None


def serve(config, index_dir, host="127.0.0.1", port=8080, model_path=None, limits=Limits()):
  """Loads the index and model, then serves until interrupted."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                      format="%(asctime)s %(name)s %(message)s")
  index = index_lib.load_index(index_dir)
  session = search_command.Session(config, index, model_path)
  method = f"ANN {session.ann.meta['kind']}" if session.ann else "exact search"
  print(f"serving {index.n} studies of {index_dir} ({method}) at http://{host}:{port}/",
        file=sys.stderr, flush=True)
  uvicorn.run(make_app(session, limits), host=host, port=port, access_log=False,
              log_level="warning")
