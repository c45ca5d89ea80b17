"""`launch.py serve`: the HTTP API through FastAPI's test client (each query kind answers what
`launch.py search --json` prints; bad requests get a 4xx with a message), the index growing and
shrinking under it, a live server on 127.0.0.1 under 1,000 mixed requests, and the web page in
headless Chromium. The model is the constructed `aligned` one (tests/model_files.py): a study's
own report finds it at rank 1.
"""

import concurrent.futures
import gzip
import json
import logging
import os
import shutil
import socket
import threading
import time

import nibabel as nib
import numpy as np
import pytest

import launch
from conftest import TINY_CONFIG
from medfinder_jax import index as index_lib
from medfinder_jax import serve
from medfinder_jax.commands import search as search_command
from model_files import run_launch as run

CONFIG = ["--config", TINY_CONFIG, "--config.model.fusion.enabled=false"]


def tiny_config():
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  return make_tiny_config(**{"model.fusion.enabled": False})


@pytest.fixture(scope="module")
def index_dir(aligned, tmp_path_factory):
  """Index of the aligned test split (with thumbnails), built by `launch.py embed`."""
  index = str(tmp_path_factory.mktemp("serve_index") / "index")
  assert launch.main(["embed", "--model_path", aligned.released_path, "--split", "test",
                      "--tfrecord_dir", aligned.dataset_dir, "--index", index, *CONFIG]) == 0
  return index


@pytest.fixture(scope="module")
def session(index_dir):
  return search_command.Session(tiny_config(), index_lib.load_index(index_dir))


@pytest.fixture(scope="module")
def client(session):
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel
  limits = serve.Limits(max_top_k=50, max_upload_bytes=2**20)
  return TestClient(serve.make_app(session, limits), raise_server_exceptions=False)


def cli_search(index, capsys, *query):
  code, out, err = run(["search", "--index", index, *query, "--json", *CONFIG], capsys)
  assert code == 0, err
  return json.loads(out)


def volume_bytes(aligned, row):
  return open(os.path.join(aligned.raw_dir, aligned.source_paths[row]), "rb").read()


# --- Each query kind is what `launch.py search --json` prints ------------------------------------

@pytest.mark.parametrize("kind,value", [("text", None), ("keyword", "atelectasis")])
def test_text_and_keyword_answers_equal_the_search_command(aligned, index_dir, client, capsys,
                                                           kind, value):
  value = value or aligned.reports[3]
  answer = client.get("/api/search", params={kind: value, "top_k": 5})
  assert answer.status_code == 200
  assert answer.json() == cli_search(index_dir, capsys, f"--{kind}", value, "--top_k", "5")
  if kind == "text":
    assert answer.json()["results"][0]["study_id"] == aligned.study_ids[3]


def test_an_uploaded_volume_ranks_reports_as_the_search_command(aligned, index_dir, client,
                                                                capsys):
  path = os.path.join(aligned.raw_dir, aligned.source_paths[2])
  answer = client.post("/api/search?top_k=3", content=volume_bytes(aligned, 2),
                       headers={"X-Filename": "../../etc/" + os.path.basename(path)})
  assert answer.status_code == 200, answer.text
  expected = cli_search(index_dir, capsys, "--volume", path, "--top_k", "3")
  got = answer.json()
  assert got["query"] == {"type": "volume", "value": os.path.basename(path)}   # a name only
  assert got["results"] == expected["results"] and got["ranked"] == "reports"
  assert got["results"][0]["study_id"] == aligned.study_ids[2]


def test_an_uncompressed_nifti_upload_works_too(aligned, client):
  raw = gzip.decompress(volume_bytes(aligned, 5))
  answer = client.post("/api/search", content=raw)
  assert answer.status_code == 200 and answer.json()["results"][0]["study_id"] == (
      aligned.study_ids[5])


def test_results_carry_highlighted_findings_with_negations_marked(client):
  answer = client.get("/api/search", params={"keyword": "atelectasis", "top_k": 8}).json()
  assert answer["findings"] == ["atelectasis"]
  for row in answer["results"]:
    marks = row["highlights"]
    assert all(row["report"][m["start"]:m["end"]].lower().startswith("atelecta") for m in marks)
    assert row["states_finding"] == any(not m["negated"] for m in marks)
  assert any(m["negated"] for row in answer["results"] for m in row["highlights"])
  text = client.get("/api/search", params={"text": "right lower lobe atelectasis and a mass"})
  assert text.json()["findings"] == ["atelectasis", "mass"]


def test_study_metadata_and_thumbnails_are_served_by_id(aligned, client):
  study = client.get(f"/api/studies/{aligned.study_ids[1]}")
  assert study.status_code == 200
  assert study.json() == {"study_id": aligned.study_ids[1], "source_path": aligned.source_paths[1],
                          "report": aligned.reports[1], "has_thumbnail": True}
  png = client.get("/api/thumbnail", params={"study_id": aligned.study_ids[1]})
  assert png.status_code == 200 and png.headers["content-type"] == "image/png"
  assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
  page = client.get("/")
  assert page.status_code == 200 and "<form" in page.text


# --- Bad requests: a 4xx with a message, never a traceback ----------------------------------------

def two_d_volume():
  image = nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4))
  return image.to_bytes()


@pytest.mark.parametrize("request_args,status,message", [
    (("get", "/api/search", {"text": "   "}), 400, "--text: empty query"),
    (("get", "/api/search", {"text": "mass", "top_k": "0"}), 400, "at least 1"),
    (("get", "/api/search", {"text": "mass", "top_k": "100000"}), 400, "over this server's limit"),
    (("get", "/api/search", {"text": "mass", "top_k": "ten"}), 400, "expected a whole number"),
    (("get", "/api/search", {}), 400, "pass exactly one query"),
    (("get", "/api/search", {"text": "mass", "keyword": "mass"}), 400, "exactly one query"),
    (("get", "/api/search", {"text": "x" * 3000}), 400, "over the limit of 2000"),
    (("get", "/api/search", {"keyword": "--"}), 400, "keyword must contain a word"),
    (("post", "/api/search", b"this is not a volume"), 400, "uploaded volume: "),
    (("post", "/api/search", b""), 400, "empty upload"),
    (("post", "/api/search", "2d"), 400, "expected a 3D volume"),
    (("post", "/api/search", b"\x1f\x8b" + b"0" * (2**20 + 10)), 413, "over the limit"),
    (("get", "/api/studies/no-such-study", None), 404, "no study 'no-such-study'"),
    (("get", "/api/studies/..%2F..%2Findex.json", None), 404, "no study '../../index.json'"),
    (("get", "/api/thumbnail", {"study_id": "../shards"}), 404, "no study"),
    (("get", "/api/nothing-here", None), 404, "Not Found"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, request_args, status, message):
  method, url, payload = request_args
  if method == "get":
    answer = client.get(url, params=payload)
  else:
    answer = client.post(url, content=two_d_volume() if payload == "2d" else payload)
  assert answer.status_code == status, answer.text
  assert message in answer.json()["error"] and "Traceback" not in answer.text


def test_the_log_has_each_requests_latency_but_no_report_text(client, caplog):
  with caplog.at_level(logging.INFO, logger="medfinder.serve"):
    client.get("/api/search", params={"text": "secret right upper lobe mass"})
  lines = [r.getMessage() for r in caplog.records if r.name == "medfinder.serve"]
  assert len(lines) == 1 and lines[0].startswith("GET /api/search 200 ") and lines[0].endswith(
      " ms")
  assert "secret" not in caplog.text


# --- The index grows and shrinks; each study once ----------------------------------------------

def test_append_replace_and_remove_keep_each_study_once(aligned, index_dir, tmp_path, capsys):
  index = str(tmp_path / "index")
  shutil.copytree(index_dir, index)
  folder = tmp_path / "volumes"
  folder.mkdir()
  for source in aligned.source_paths[:3]:
    shutil.copy(os.path.join(aligned.raw_dir, source), folder)
  embed = ["embed", "--model_path", aligned.released_path, "--volumes", str(folder), "--index",
           index, f"--config.data.tfrecord_dir={aligned.dataset_dir}", *CONFIG]
  code, _, err = run(embed + ["--append"], capsys)
  assert code == 2 and "3 of the 3 studies to add are already in the index" in err
  code, out, err = run(embed + ["--replace"], capsys)
  assert code == 0 and "added 3 studies to index" in out, err
  loaded = index_lib.load_index(index)
  assert loaded.n == 8 and sorted(loaded.study_ids) == sorted(aligned.study_ids)
  code, out, _ = run(["index", "--index", index, "--remove", aligned.study_ids[0]], capsys)
  assert code == 0 and "removed 1 studies" in out and "7 left" in out
  answer = cli_search(index, capsys, "--text", aligned.reports[0], "--top_k", "50")
  ids = [r["study_id"] for r in answer["results"]]
  assert len(ids) == 7 == len(set(ids)) and aligned.study_ids[0] not in ids
  code, _, err = run(["index", "--index", index, "--remove", "nobody"], capsys)
  assert code == 2 and "not in the index: nobody" in err


# --- A live server -------------------------------------------------------------------------------

def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(session):
  """The app under uvicorn on 127.0.0.1 in a thread; yields its base URL."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(serve.make_app(session, serve.Limits(max_top_k=50)),
                                         host="127.0.0.1", port=port, log_level="warning",
                                         access_log=False))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started and time.time() < deadline:
    time.sleep(0.05)
  assert server.started
  yield f"http://127.0.0.1:{port}"
  server.should_exit = True
  thread.join(10)


def rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_thousand_mixed_requests_in_bounded_memory(aligned, live_server):
  import httpx  # pylint: disable=import-outside-toplevel
  volume = volume_bytes(aligned, 4)
  requests = [("get", "/api/search", {"text": aligned.reports[i % 8][:60 + i % 40]}, 200)
              for i in range(8)]
  requests += [("get", "/api/search", {"keyword": "atelectasis", "top_k": "3"}, 200),
               ("get", "/api/search", {"text": ""}, 400),
               ("get", "/api/search", {"text": "mass", "top_k": "0"}, 400),
               ("get", f"/api/studies/{aligned.study_ids[2]}", None, 200),
               ("get", "/api/studies/nobody", None, 404),
               ("get", "/api/thumbnail", {"study_id": aligned.study_ids[3]}, 200),
               ("post", "/api/search", volume, 200),
               ("post", "/api/search", b"junk", 400)]

  def send(http, i):
    method, url, payload, status = requests[i % len(requests)]
    if method == "get":
      answer = http.get(url, params=payload)
    else:
      answer = http.post(url, content=payload)
    return answer.status_code == status

  with httpx.Client(base_url=live_server, timeout=60) as http:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      assert all(pool.map(lambda i: send(http, i), range(100)))     # warm-up: compiles, caches
      before = rss_mib()
      assert all(pool.map(lambda i: send(http, i), range(1000)))
      grown = rss_mib() - before
    assert grown < 150, f"RSS grew by {grown:.0f} MiB over 1000 requests"
    answer = http.get("/api/search", params={"text": aligned.reports[6]})
    assert answer.status_code == 200 and answer.json()["results"][0]["study_id"] == (
        aligned.study_ids[6])


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")


def test_the_web_page_shows_ranked_results_with_thumbnails(aligned, live_server):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
  playwright = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is a test dependency (requirements-dev)")
  with playwright.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
      page = browser.new_page(viewport={"width": 1000, "height": 900})
      page.goto(live_server + "/")
      page.fill("#query", aligned.reports[1])
      page.click("#go")
      page.wait_for_selector(".result img", timeout=30000)
      page.wait_for_function("[...document.querySelectorAll('.result img')].every("
                             "i => i.complete && i.naturalWidth > 0)", timeout=30000)
      results = page.query_selector_all(".result")
      assert len(results) == 8
      assert aligned.study_ids[1] in results[0].inner_text()
      assert "score" in results[0].inner_text()
      os.makedirs(ARTIFACTS, exist_ok=True)
      page.screenshot(path=os.path.join(ARTIFACTS, "search_page.png"), full_page=True)
    finally:
      browser.close()


def test_search_uses_a_current_ann_index_and_exact_forces_brute_force(aligned, index_dir,
                                                                     tmp_path, capsys):
  index = str(tmp_path / "index")
  shutil.copytree(index_dir, index)
  assert run(["index-ann", "--index", index], capsys)[0] == 0
  approximate = cli_search(index, capsys, "--text", aligned.reports[5])
  exact = cli_search(index, capsys, "--text", aligned.reports[5], "--exact")
  assert approximate["search"]["method"] == "ann" and exact["search"] == {"method": "exact"}
  assert approximate["search"]["recall_at_10"] == 1.0          # 8 studies: every list probed
  ids = lambda answer: [r["study_id"] for r in answer["results"]]  # noqa: E731
  assert ids(approximate) == ids(exact)                        # the same ranking, exact scores
  assert [r["score"] for r in approximate["results"]] == pytest.approx(
      [r["score"] for r in exact["results"]], abs=1e-6)
