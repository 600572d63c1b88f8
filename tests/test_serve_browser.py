"""`cli.py serve` on a roco-rad run, driven by a real headless browser: type a query, see the
thumbnails, click one and get its neighbours and captions; and the explanation maps pass their
masking test on real roco-rad images. Skipped, saying why, only where no browser can be installed."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medembed.adapt.run import load_adapter_run
from medembed.cache.reader import load_split
from medembed.cache.schema import split_file
from medembed.extract.imaging import open_image
from medembed.model.runs import run_backbone
from medembed.serve.explain import explain, masked_score
from medembed.serve.page import create_app
from medembed.serve.search import Searcher, SearchOptions

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
PER_PAGE = SearchOptions().k  # hits on one page: the default k /api/info reports


@pytest.fixture(scope="module")
def roco_run(roco_linear_run) -> Path:
    """The session's linear-head run on the real roco-rad cache (tests/conftest.py)."""
    return roco_linear_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(roco_run):
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Searcher(roco_run)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser: Debian's chromium and chromium-driver are not installed (.ci/run installs "
                    "them where apt-get is allowed)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_browser_types_a_query_sees_thumbnails_and_opens_neighbours(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server)
        wait.until(ec.text_to_be_present_in_element((By.ID, "about"), "roco-rad"))
        assert "pool 4639 images" in driver.find_element(By.ID, "about").text
        driver.find_element(By.ID, "query").send_keys("chest x-ray showing a pneumothorax")
        driver.find_element(By.ID, "search-button").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit img")) == PER_PAGE)
        wait.until(lambda d: all(img.get_property("naturalWidth") > 0 for img in d.find_elements(By.CSS_SELECTOR, ".hit img")))
        assert "exact scan over 4639 images" in driver.find_element(By.ID, "status").text
        first = driver.find_elements(By.CSS_SELECTOR, ".hit")[1]
        key = first.get_attribute("data-key")
        first.click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), f"images like {key}"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "captions"), f"Captions for {key}"))
        hits = driver.find_elements(By.CSS_SELECTOR, ".hit")
        assert hits[0].get_attribute("data-key") == key  # an image is its own nearest neighbour
        assert len(driver.find_elements(By.CSS_SELECTOR, "#captions li")) == 5
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        driver.quit()


@pytest.mark.slow
def test_browser_pages_and_filters_an_uploaded_image_query(server, roco_run, tmp_path):
    """After an upload, next and the split filter re-run the image query (the page re-posts the file)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    test = load_split(load_adapter_run(roco_run).features_dir / split_file("test"))
    query = tmp_path / "query.png"
    open_image(test.image_path(0)).save(query)
    driver = browser()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(server)
        wait.until(ec.text_to_be_present_in_element((By.ID, "about"), "roco-rad"))

        def shown() -> tuple[list[str], list[str]]:
            hits = driver.find_elements(By.CSS_SELECTOR, ".hit")
            return ([h.get_attribute("data-key") for h in hits],
                    [h.find_element(By.CSS_SELECTOR, ".split").text for h in hits])

        file_input = driver.find_element(By.ID, "file")
        driver.execute_script("arguments[0].hidden = false", file_input)
        file_input.send_keys(str(query))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "images like query.png"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "captions"), "Captions for query.png"))
        first, _ = shown()
        assert len(first) == PER_PAGE
        driver.find_element(By.ID, "next").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "page-label"), "page 2"))
        second, _ = shown()
        assert len(second) == PER_PAGE and not set(first) & set(second)
        assert "images like query.png" in driver.find_element(By.ID, "status").text
        Select(driver.find_element(By.ID, "split")).select_by_value("test")
        wait.until(ec.text_to_be_present_in_element((By.ID, "page-label"), "page 1"))
        wait.until(lambda d: set(shown()[1]) == {"[test]"})
        assert len(shown()[0]) == PER_PAGE and "images like query.png" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


@pytest.mark.slow
def test_explanation_maps_point_at_what_the_score_rests_on(roco_run):
    """Deterministic, the image's shape, and blanking the hottest cells lowers the score more than
    blanking random cells of the same number, over real roco-rad test images."""
    run = load_adapter_run(roco_run)
    backbone = run_backbone(run)
    test = load_split(run.features_dir / split_file("test"))
    rng = np.random.default_rng(0)
    hot, rand = [], []
    for i in range(8):
        image = open_image(test.image_path(i))
        query = run.embed_texts(test.caption_features[i : i + 1])
        e = explain(run, backbone, image, query)
        assert e.heat.shape == (224, 224) == e.view.size[::-1] and 0 <= e.heat.min() and e.heat.max() == 1
        if i == 0:
            assert np.array_equal(e.heat, explain(run, backbone, image, query).heat)
        cells = torch.nn.functional.avg_pool2d(torch.from_numpy(e.heat)[None, None], 32)[0, 0].flatten()
        hottest = [(int(j) // 7, int(j) % 7) for j in torch.argsort(cells, descending=True)[:5]]
        hot.append(e.score - masked_score(run, backbone, image, query, hottest))
        rand.append(np.mean([e.score - masked_score(run, backbone, image, query,
                                                    [(int(j) // 7, int(j) % 7) for j in rng.permutation(49)[:5]])
                             for _ in range(4)]))
    assert np.mean(hot) > np.mean(rand) + 0.01, (hot, rand)
