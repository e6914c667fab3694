"""labelkit review: the decision log and what it materialises, the app's guards, and the page in a real browser."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from conftest import cli
from labelkit.artefact import Artefact, read_artefact
from labelkit.errors import ConfigError
from labelkit.review import DecisionLog, ReviewSession, create_app, materialise, replay, serve

TOKEN = "t0ken-for-tests"
POST = {"X-Review-Token": TOKEN}


def _ids(n):
    return [f"s{i:03d}" for i in range(n)]


@pytest.fixture
def art():
    # 12 samples, head 0 of K = 3 (4 samples each), head 1 of K = 2; scores fall within each cluster
    labels = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]])
    scores = np.tile(np.array([0.9, 0.8, 0.7, 0.6], np.float32), (2, 3))
    return Artefact.build(_ids(12), labels, [3, 2], scores=scores, method={"name": "test"})


def _log(tmp_path, *decisions):
    log = DecisionLog(tmp_path / "decisions.jsonl")
    for d in decisions:
        log.append(d)
    return log


def test_decisions_replay_in_order_and_undo(art, tmp_path):
    log = _log(tmp_path, {"op": "name", "cluster": 0, "name": "cat"},
               {"op": "status", "cluster": 0, "status": "accepted"},
               {"op": "merge", "clusters": [1, 2]},
               {"op": "split", "cluster": 0, "parts": [["s000", "s001"], ["s002", "s003"]]},
               {"op": "remove", "samples": ["s004"]},
               {"op": "move", "samples": ["s005"], "to": 0},
               {"op": "name", "cluster": 1, "name": "dog"},
               {"op": "example", "sample": "s008", "name": "cat"},
               {"op": "undo", "undo": 7})
    state = replay(art, 0, log.entries())
    assert state.k == 4  # the split's second part took a fresh id
    assert state.labels.tolist() == [0, 0, 3, 3, -1, 0, 1, 1, 0, 1, 1, 1]
    assert state.names == ["cat", None, None, None] and state.status[0] == "accepted"
    # pinned: moved and example samples, and every member of the accepted cluster 0
    assert np.flatnonzero(state.pinned).tolist() == [0, 1, 5, 8]
    version, _ = materialise(art, 0, log)
    assert version.num_samples == 11 and "s004" not in version.sample_ids
    assert version.metadata["parents"] == [art.artefact_id]
    method = version.metadata["method"]
    assert method["name"] == "review" and method["removed"] == 1 and method["decisions"] == 7  # 9 lines, one undo and the one it undid
    assert method["log_sha256"] == log.sha256()
    assert version.heads[0].k == 4 and version.heads[0].names == ("cat", None, None, None)
    assert np.array_equal(version.labels(1), np.delete(art.labels(1), 4))  # the other head is untouched
    assert np.allclose(version.scores(0), np.delete(art.scores(0), 4))


def test_a_reviewed_version_keeps_its_consensus_head_primary(tmp_path):
    labels = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])
    art = Artefact.build(_ids(4), labels, [2, 2], method={"name": "test", "consensus": {"head": 1, "k": 2, "reference": 0, "heads": [0]}})
    version, _ = materialise(art, 1, _log(tmp_path, {"op": "name", "cluster": 0, "name": "x"}))
    assert version.primary_head == 1 and version.heads[1].names == ("x", None)


@pytest.mark.parametrize("decision, message", [
    ({"op": "name", "cluster": 7, "name": "x"}, "cluster 7 is not one of 0..2"),
    ({"op": "merge", "clusters": [1, 1]}, "two or more different clusters"),
    ({"op": "remove", "samples": ["nope"]}, "sample 'nope' is not in the reviewed artefact"),
    ({"op": "split", "cluster": 0, "parts": [["s000"], ["s004"]]}, "outside cluster 0"),
    ({"op": "example", "sample": "s000", "name": "zebra"}, "no cluster is named 'zebra'"),
    ({"op": "status", "cluster": 0, "status": "great"}, "is not one of"),
    ({"op": "undo", "undo": 99}, "no earlier decision 99"),
    ({"op": "rename"}, "unknown op 'rename'"),
    ({"op": "move", "samples": ["s000"]}, "lacks to"),
])
def test_bad_decisions_are_refused_by_name(art, tmp_path, decision, message):
    with pytest.raises(ConfigError, match=message):
        replay(art, 0, _log(tmp_path, decision).entries())


def test_a_line_cut_short_by_a_crash_is_ignored_but_an_edited_one_is_not(art, tmp_path):
    log = _log(tmp_path, {"op": "name", "cluster": 0, "name": "cat"})
    with open(log.path, "a") as f:
        f.write('{"op": "name", "clus')  # the write a crash interrupted, never acknowledged
    assert [e["op"] for e in log.entries()] == ["name"]
    log.path.write_text('{"op": "nam\n' + json.dumps({"seq": 2, "op": "name", "cluster": 0, "name": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1 is not JSON"):
        log.entries()


@pytest.fixture
def session(tmp_path):
    rng = np.random.default_rng(0)
    x = (np.repeat(np.eye(3), 20, axis=0) * 5 + rng.normal(size=(60, 3))).astype(np.float32)
    np.savez(tmp_path / "v.npz", embeddings=x, keys=np.array(_ids(60)))
    labels = np.stack([np.repeat(np.arange(3), 20), np.tile(np.arange(2), 30)])
    Artefact.build(_ids(60), labels, [3, 2], scores=rng.random((2, 60)).astype(np.float32),
                   data={"spec": str(tmp_path / "v.npz")}, method={"name": "test"}).write(tmp_path / "a.parquet")
    return ReviewSession(str(tmp_path / "a.parquet"), tmp_path / "review")


def test_the_app_refuses_requests_without_the_token_and_foreign_posts(session, tmp_path):
    client = create_app(session, TOKEN).test_client()
    assert client.get("/").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    assert client.get("/thumb?id=s000").status_code == 403
    assert client.get(f"/?token={TOKEN}").status_code == 200
    assert client.get(f"/cluster/1?token={TOKEN}").status_code == 200
    assert client.get(f"/cluster/9?token={TOKEN}").status_code == 404
    decision = {"op": "name", "cluster": 0, "name": "a"}
    assert client.post("/api/decide", json=decision).status_code == 403  # no token
    assert client.post(f"/api/decide?token={TOKEN}", json=decision).status_code == 403  # a link is not enough
    assert client.post("/api/decide", data="op=name&cluster=0", headers=POST,
                       content_type="application/x-www-form-urlencoded").status_code == 403  # a plain form
    assert client.post("/api/decide", json=decision,
                       headers={**POST, "Origin": "http://evil.example"}).status_code == 403
    assert session.log.entries() == []
    ok = client.post("/api/decide", json=decision, headers={**POST, "Origin": "http://localhost"})
    assert ok.status_code == 200 and session.log.entries()[0]["name"] == "a"
    bad = client.post("/api/decide", json={"op": "name", "cluster": 1, "name": "a"}, headers=POST)
    assert bad.status_code == 400 and "already named" in bad.json["error"] and len(session.log.entries()) == 1


def test_samples_are_served_by_id_only_and_writes_stay_in_the_review_folder(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), (200 * c, 40 * i, 0)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    (tmp_path / "secret.txt").write_text("not to be served")
    from labelkit.data import resolve

    source = resolve(str(tmp_path / "imgs"))
    Artefact.build(source.ids, [int(i.startswith("c1")) for i in source.ids], 2,
                   data={"spec": str(tmp_path / "imgs")}, method={"name": "test"}).write(tmp_path / "a.parquet")
    before = {p for p in tmp_path.rglob("*")}
    session = ReviewSession(str(tmp_path / "a.parquet"), tmp_path / "review")
    client = create_app(session, TOKEN).test_client()
    png = client.get(f"/thumb?id=c0/1.png&token={TOKEN}")
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "c0/../../secret.txt", "c0/9.png", ""):
        assert client.get("/thumb", query_string={"id": bad, "token": TOKEN}).status_code == 404, bad
    client.post("/api/decide", json={"op": "split", "cluster": 0, "k": 2}, headers=POST)
    client.post("/api/save", json={}, headers=POST)
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p == tmp_path / "review" or (tmp_path / "review") in p.parents for p in written)
    saved = read_artefact(tmp_path / "review" / "reviewed.parquet")
    sizes = np.bincount(saved.labels(0), minlength=3)
    assert saved.heads[0].k == 3 and sizes[1] == 6 and sizes[0] + sizes[2] == 6 and sizes.min() > 0


def test_the_overview_leaves_merged_away_clusters_out(session):
    client = create_app(session, TOKEN).test_client()
    session.decide({"op": "merge", "clusters": [0, 2]})
    page = client.get(f"/?token={TOKEN}").get_data(as_text=True)
    assert 'id="c0"' in page and 'id="c1"' in page and 'id="c2"' not in page
    assert "1 empty (merged-away) clusters not shown" in page


def test_review_command_refuses_a_public_host_and_saves_without_serving(session, tmp_path):
    result = cli("review", tmp_path / "a.parquet", "--host", "0.0.0.0")
    assert result.exit_code == 2 and "--expose" in result.output
    session.decide({"op": "merge", "clusters": [2, 0]})
    result = cli("review", tmp_path / "a.parquet", "--save", "--folder", tmp_path / "review")
    assert result.exit_code == 0, result.output
    saved = read_artefact(tmp_path / "review" / "reviewed.parquet")
    assert np.bincount(saved.labels(0), minlength=3).tolist() == [0, 20, 40]


def test_split_sub_clusters_the_members_and_nearest_uses_the_other_heads(session):
    entry = session.decide({"op": "split", "cluster": 1, "k": 2})
    assert sorted(len(part) for part in entry["parts"]) != [] and sum(map(len, entry["parts"])) == 20
    assert session.state.k == 4 and session.sizes.tolist()[3] == len(entry["parts"][1])
    with pytest.raises(ConfigError, match="2 to"):
        session.decide({"op": "split", "cluster": 0, "k": 99})
    # head 1 mixes every cluster of head 0 alike, so every other cluster is about as near
    assert {c for c, _ in session.nearest(0)} == {1, 2, 3}


# -- in a real browser -------------------------------------------------------------------------------------------


def _chrome():
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and browser):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _then_reload(browser, wait, action) -> None:
    """Do ``action`` (a decision: the page posts it, then reloads) and wait for the reloaded page."""
    browser.execute_script("window.beforeDecision = true")
    action()
    wait.until(lambda b: b.execute_script(
        "return window.beforeDecision === undefined && document.readyState === 'complete'"))


def test_a_review_in_the_browser_names_merges_removes_and_saves(tmp_path):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    assert cli("generate", "--data", "builtin:digits", "--clusters", "10", "--heads", "1", "--epochs", "1",
               "--quiet", "--out", tmp_path / "run").exit_code == 0
    session = ReviewSession(str(tmp_path / "run"), tmp_path / "review")
    server = serve(session, TOKEN, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    browser = _chrome()
    try:
        wait = WebDriverWait(browser, 20, ignored_exceptions=[WebDriverException])
        browser.get(f"{base}/?token={TOKEN}")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#clusters tr")) == 11
        thumbs = browser.find_elements(By.CSS_SELECTOR, "img.t")
        assert thumbs and browser.execute_script("return arguments[0].naturalWidth", thumbs[0]) > 0
        name = browser.find_element(By.CSS_SELECTOR, "#c3 input.name")
        _then_reload(browser, wait, lambda: name.send_keys("three-ish" + Keys.TAB))  # leaving the field commits it
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#c3 input.name").get_attribute("value") == "three-ish")
        for c in (5, 6):
            browser.find_element(By.CSS_SELECTOR, f"#c{c} input[name=pick]").click()
        _then_reload(browser, wait, browser.find_element(By.ID, "merge").click)
        browser.get(f"{base}/cluster/3?token={TOKEN}")
        first = browser.find_element(By.CSS_SELECTOR, "#members input[name=sample]")
        removed = first.get_attribute("value")
        first.click()
        _then_reload(browser, wait, browser.find_element(By.ID, "remove").click)
        assert [e["op"] for e in session.log.entries()] == ["name", "merge", "remove"]
        browser.get(f"{base}/decisions?token={TOKEN}")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#log tr")) == 4, browser.page_source[-2000:]
        browser.find_element(By.ID, "save").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "message"), "saved"))
        (tmp_path / "shots").mkdir()
        browser.save_screenshot(str(tmp_path / "shots" / "decisions.png"))
    finally:
        browser.quit()
        server.shutdown()
    saved = read_artefact(tmp_path / "review" / "reviewed.parquet")
    before = read_artefact(tmp_path / "run")
    assert saved.metadata["parents"] == [before.artefact_id] and saved.primary_head == before.primary_head
    assert saved.num_samples == before.num_samples - 1 and removed not in saved.sample_ids
    assert saved.heads[0].names[3] == "three-ish"
    assert (saved.labels(0) == 6).sum() == 0  # merged into 5
    where = np.searchsorted(before.sample_ids, saved.sample_ids)
    assert ((saved.labels(0) == 5) == np.isin(before.labels(0)[where], [5, 6])).all()


# -- round trips with the tools people label in ------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    from PIL import Image

    for c, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
        (tmp_path / "imgs" / f"k{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (12, 12), colour).save(tmp_path / "imgs" / f"k{c}" / f"{i}.png")
    from labelkit.data import resolve

    ids = resolve(str(tmp_path / "imgs")).ids
    art = Artefact.build(ids, [int(i.startswith("k1")) for i in ids], 2, scores=[[0.9] * 10],
                         data={"spec": str(tmp_path / "imgs")}, method={"name": "test"}, names=[["red", None]])
    art.write(tmp_path / "a.parquet")
    return tmp_path, art


@pytest.mark.parametrize("fmt", ["label-studio", "fiftyone", "folders"])
def test_a_round_trip_with_no_edits_gives_back_the_same_artefact(exported, fmt):
    tmp_path, art = exported
    result = cli("export", tmp_path / "a.parquet", "--format", fmt, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    result = cli("import", tmp_path / "out", "--format", fmt, "--onto", tmp_path / "a.parquet",
                 "--out", tmp_path / "back.parquet")
    assert result.exit_code == 0, result.output
    assert read_artefact(tmp_path / "back.parquet").artefact_id == art.artefact_id
    assert cli("export", tmp_path / "a.parquet", "--format", fmt, "--out", tmp_path / "out").exit_code == 2


def test_folders_round_trip_reads_moves_and_deletions(exported):
    tmp_path, art = exported
    assert cli("export", tmp_path / "a.parquet", "--format", "folders", "--out", tmp_path / "tree").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "tree").iterdir()) == ["cluster-1", "labelkit-export.json", "red"]
    assert (tmp_path / "tree" / "red" / "k0%2F0.png").resolve() == (tmp_path / "imgs" / "k0" / "0.png").resolve()
    (tmp_path / "tree" / "red" / "k0%2F1.png").rename(tmp_path / "tree" / "cluster-1" / "k0%2F1.png")
    (tmp_path / "tree" / "cluster-1" / "k1%2F4.png").unlink()
    result = cli("import", tmp_path / "tree", "--format", "folders", "--onto", tmp_path / "a.parquet",
                 "--out", tmp_path / "back.parquet")
    assert result.exit_code == 0 and "1 moved, 1 removed, 8 as they were" in result.output, result.output
    back = read_artefact(tmp_path / "back.parquet")
    assert back.metadata["parents"] == [art.artefact_id] and back.num_samples == 9
    assert back.labels(0)[list(back.sample_ids).index("k0/1.png")] == 1
    assert (tmp_path / "back.parquet.decisions.jsonl").is_file()
    (tmp_path / "tree" / "purple").mkdir()
    (tmp_path / "tree" / "red" / "k0%2F2.png").rename(tmp_path / "tree" / "purple" / "k0%2F2.png")
    result = cli("import", tmp_path / "tree", "--format", "folders", "--onto", tmp_path / "a.parquet",
                 "--out", tmp_path / "again.parquet")
    assert result.exit_code == 1 and "class 'purple'" in result.output
    other = Artefact.build(_ids(3), [0, 1, 0], 2)
    other.write(tmp_path / "other.parquet")
    result = cli("import", tmp_path / "tree", "--format", "folders", "--onto", tmp_path / "other.parquet")
    assert result.exit_code == 2 and "was exported from artefact" in result.output


def test_label_studio_annotations_override_the_prediction(exported):
    tmp_path, art = exported
    assert cli("export", tmp_path / "a.parquet", "--format", "label-studio", "--out", tmp_path / "ls").exit_code == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    config = (tmp_path / "ls" / "config.xml").read_text()
    assert '<Choice value="red"/>' in config and '<Choice value="cluster-1"/>' in config
    first = tasks[0]
    assert first["data"]["image"] == "/data/local-files/?d=imgs/k0/0.png"
    assert first["predictions"][0]["result"][0]["value"]["choices"] == ["red"]
    assert first["predictions"][0]["score"] == pytest.approx(0.9)

    def annotate(task, choice, when, cancelled=False):
        task.setdefault("annotations", []).append(
            {"id": len(task.get("annotations", [])) + 1, "was_cancelled": cancelled, "updated_at": when,
             "result": [{"from_name": "cluster", "to_name": "image", "type": "choices",
                         "value": {"choices": [choice]}}]})

    annotate(tasks[0], "cluster-1", "2026-12-01T10:00:00Z")
    annotate(tasks[0], "red", "2026-12-01T09:00:00Z")  # older: the newer annotation wins
    annotate(tasks[1], "cluster-1", "2026-12-01T10:00:00Z", cancelled=True)
    annotate(tasks[2], "red", "2026-12-01T10:00:00Z")  # confirms the prediction
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    result = cli("import", tmp_path / "export.json", "--format", "label-studio", "--onto", tmp_path / "a.parquet",
                 "--out", tmp_path / "back.parquet")
    assert result.exit_code == 0 and "1 moved, 0 removed, 1 as they were" in result.output, result.output
    back = read_artefact(tmp_path / "back.parquet")
    changed = np.flatnonzero(back.labels(0) != art.labels(0))
    assert back.sample_ids[changed].tolist() == [first["data"]["sample_id"]]


def test_fiftyone_folder_has_the_documented_layout_and_reads_back_edits(exported):
    tmp_path, art = exported
    assert cli("export", tmp_path / "a.parquet", "--format", "fiftyone", "--copy", "--out", tmp_path / "fo").exit_code == 0
    labels = json.loads((tmp_path / "fo" / "labels.json").read_text())
    assert labels["classes"] == ["red", "cluster-1"]
    assert labels["labels"]["k1/3"] == {"label": 1, "confidence": 0.9}
    assert (tmp_path / "fo" / "data" / "k1" / "3.png").is_file() and not (tmp_path / "fo" / "data" / "k1" / "3.png").is_symlink()
    labels["labels"]["k1/3"] = "red"  # FiftyOne writes class strings where it has no classes list
    del labels["labels"]["k0/4"]
    (tmp_path / "fo" / "labels.json").write_text(json.dumps(labels))
    result = cli("import", tmp_path / "fo", "--format", "fiftyone", "--onto", tmp_path / "a.parquet",
                 "--out", tmp_path / "back.parquet")
    assert result.exit_code == 0 and "1 moved, 1 removed, 8 as they were" in result.output, result.output


# -- decisions steer the next solve ------------------------------------------------------------------------------


def test_a_run_from_a_reviewed_version_keeps_pins_sizes_and_leaves_removed_samples_out(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 2.2
    y = rng.integers(0, 3, 900)
    np.savez(tmp_path / "t.npz", embeddings=(centres[y] + rng.normal(size=(900, 6))).astype(np.float32), labels=y)
    common = ["--data", tmp_path / "t.npz", "--heads", "1", "--epochs", "6", "--quiet"]
    assert cli("generate", *common, "--clusters", "3", "--out", tmp_path / "a").exit_code == 0
    first = read_artefact(tmp_path / "a")
    labels = first.labels(0)
    # a reviewer moves five samples of cluster 0 to cluster 1 against the run, removes three, accepts cluster 2,
    # and splits cluster 1 in two by sample id
    moved = first.sample_ids[labels == 0][:5].tolist()
    removed = first.sample_ids[labels == 2][:3].tolist()
    members = first.sample_ids[labels == 1].tolist()
    log = DecisionLog(tmp_path / "review" / "decisions.jsonl")
    for d in ({"op": "split", "cluster": 1, "parts": [members[::2], members[1::2]]},
              {"op": "move", "samples": moved, "to": 1},
              {"op": "remove", "samples": removed},
              {"op": "status", "cluster": 2, "status": "accepted"}):
        log.append(d)
    reviewed, state = materialise(first, 0, log)
    reviewed.write(tmp_path / "reviewed.parquet")
    assert reviewed.heads[0].k == 4
    result = cli("generate", *common, "--clusters", "4", "--out", tmp_path / "b",
                 "--start-from", tmp_path / "reviewed.parquet")
    assert result.exit_code == 0, result.output
    second = read_artefact(tmp_path / "b")
    assert second.num_samples == 897 and not set(removed) & set(second.sample_ids)
    where = np.searchsorted(second.sample_ids, reviewed.sample_ids)
    after, before = second.labels(0)[where], reviewed.labels(0)
    pinned = np.isin(reviewed.sample_ids, moved) | (before == 2)
    assert (after[pinned] == before[pinned]).all()  # a person's choice outlives every label step
    assert np.allclose(second.scores(0)[where][pinned], 1.0)
    sizes = np.bincount(after, minlength=4)
    assert abs(sizes - np.bincount(before, minlength=4)).max() <= 0.05 * 897  # the reviewed sizes, not 897 / 4
    start = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()
             if '"start"' in line][0]
    assert start["review"] == {"head": 0, "pinned": int(pinned.sum()), "left_out": 3, "steered_heads": [0]}


def test_with_its_run_a_review_splits_on_network_features_and_finds_neighbours_by_prototypes(tmp_path):
    from labelkit.review import run_folder_of

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 4
    y = rng.integers(0, 4, 400)
    np.savez(tmp_path / "t.npz", embeddings=(centres[y] + rng.normal(size=(400, 6))).astype(np.float32))
    assert cli("generate", "--data", tmp_path / "t.npz", "--clusters", "2", "--heads", "1", "--epochs", "4",
               "--quiet", "--out", tmp_path / "run").exit_code == 0
    assert run_folder_of(tmp_path / "run" / "labels.parquet") == (tmp_path / "run").resolve()
    assert run_folder_of(tmp_path / "t.npz") is None
    session = ReviewSession(str(tmp_path / "run"), tmp_path / "review", run=tmp_path / "run")
    assert [c for c, _ in session.nearest(0)] == [1]
    entry = session.decide({"op": "split", "cluster": 0, "k": 2})
    # a K = 2 cluster of four blobs mixes them; its features split it into far purer parts
    ids = read_artefact(tmp_path / "run").sample_ids
    parts = [y[np.searchsorted(ids, part).astype(int)] for part in entry["parts"]]
    whole = np.concatenate(parts)
    purity = sum(np.bincount(p).max() for p in parts) / len(whole)
    assert purity >= 0.9 and purity > np.bincount(whole).max() / len(whole) + 0.3, [np.bincount(p) for p in parts]
