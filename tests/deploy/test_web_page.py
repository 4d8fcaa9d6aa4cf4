"""The web page of ``raml serve`` in a real headless Chromium (selenium + the system's chromedriver).

Upload a query through the page's file input, wait for the top-k thumbnails, check that they show the database
images with their scores and that the page fits a phone-sized screen, and save a screenshot in the test's temp
folder. Skipped, with the reason, where selenium, Chromium or chromedriver is not installed (``.ci/run`` installs
them); where they are installed but the browser fails to start, the test FAILS (a broken CI image must not pass as
a skip); ``test_a_browser_that_fails_to_start_fails_the_test`` checks that with a driver that exits at once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("faiss")

from raml.data.synth import generate_synthetic_dataset  # noqa: E402
from raml.deploy import collect_images, index_images, load_index  # noqa: E402
from raml.deploy.service import SearchService, ServiceLimits, TorchQueryEmbedder  # noqa: E402
from raml.deploy.service.app import create_app  # noqa: E402
from raml.deploy.service.background import BackgroundServer  # noqa: E402
from raml.models import build_network  # noqa: E402

PHONE = (390, 844)  # CSS pixels of a common phone screen
WAIT_S = 30.0


def _browser_paths() -> tuple[str, str]:
    """The Chromium binary and its WebDriver, or a skip naming what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in raml[dev])")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
    )
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None)
        pytest.skip(f"no headless browser: {missing} not found (apt-get install chromium chromium-driver)")
    return browser, driver


def _start_chromium(browser: str, driver: str, *flags: str):
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    common = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run")
    for flag in (*common, *flags):
        options.add_argument(flag)
    options.add_argument(f"--window-size={PHONE[0]},{PHONE[1]}")
    # a phone's viewport (desktop windows have a minimum width above a phone's)
    metrics = {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 1.0}
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": metrics})
    try:
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as error:
        # Chromium and its driver are installed (or a skip would have come earlier): a browser that then fails
        # to start is a broken CI image, which must fail the run, not hide the page's test behind a skip.
        pytest.fail(
            f"chromium {browser} and chromedriver {driver} are installed but the browser failed to start: {error.msg}"
        )


def _indexed_service(folder: Path, limits: ServiceLimits) -> tuple[SearchService, list[str]]:
    """A service over a 12-image synthetic index in ``folder`` (a random 16-d ResNet-18 at 32 px) and the images."""
    generate_synthetic_dataset(folder / "synth", num_classes=4, images_per_class=3, image_size=48)
    paths = collect_images(folder / "synth" / "images")
    torch.manual_seed(0)
    network = build_network("resnet18", whitening=16, pretrained=False).eval()
    index_images(network, paths, 32, folder / "index", "0" * 64)
    return SearchService(TorchQueryEmbedder(network, torch.device("cpu"), 32), folder / "index", limits), paths


def _open_page(chromium, url: str):
    """Load the page at ``url`` and wait until it shows the index's 12 images; the page's ``WebDriverWait``."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.set_page_load_timeout(WAIT_S)
    chromium.get(url)
    wait = WebDriverWait(chromium, WAIT_S)
    wait.until(lambda d: "12 images" in d.find_element(By.ID, "served").text)
    return wait


def test_the_page_shows_the_top_k_thumbnails_of_an_uploaded_query(tmp_path):
    from selenium.webdriver.common.by import By

    browser, driver_path = _browser_paths()
    service, paths = _indexed_service(tmp_path, ServiceLimits())
    k = 6
    with BackgroundServer(create_app(service)) as server:
        chromium = _start_chromium(browser, driver_path)
        try:
            wait = _open_page(chromium, server.url + "/")
            k_box = chromium.find_element(By.ID, "k")
            k_box.clear()
            k_box.send_keys(str(k))
            chromium.find_element(By.ID, "file").send_keys(str(Path(paths[4]).resolve()))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.hit")) == k)
            loaded = (
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            wait.until(lambda d: d.execute_script(loaded))
            status = chromium.find_element(By.ID, "status").text
            captions = [e.text for e in chromium.find_elements(By.CSS_SELECTOR, "#results .caption")]
            sources = [e.get_attribute("src") for e in chromium.find_elements(By.CSS_SELECTOR, "#results img")]
            width = chromium.execute_script("return window.innerWidth")
            overflow = chromium.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
            shot = tmp_path / "web_page.png"
            assert chromium.save_screenshot(str(shot))
        finally:
            chromium.quit()
    index = load_index(tmp_path / "index")
    assert status.startswith(f"Top {k} in ") and "ms" in status
    ids = [int(src.rsplit("/", 1)[1]) for src in sources]
    assert len(set(ids)) == k and all(0 <= i < len(index) for i in ids)
    shown = [os.path.relpath(index.paths[i], tmp_path / "synth" / "images") for i in ids]  # no absolute path
    assert all(path in caption and str(tmp_path) not in caption for path, caption in zip(shown, captions))
    assert captions[0].startswith("#1 ")
    assert width == PHONE[0] and overflow <= 0  # no horizontal scrolling at phone width
    assert shot.stat().st_size > 1000


def test_the_page_asks_for_no_more_than_max_k(tmp_path):
    """Before, the page's k box said 10 whatever the service's --max-k, so that every search of a service with
    --max-k under 10 was refused (400) until the user lowered it; now it takes its bound from /health."""
    from selenium.webdriver.common.by import By

    browser, driver_path = _browser_paths()
    service, paths = _indexed_service(tmp_path, ServiceLimits(max_k=5))
    with BackgroundServer(create_app(service)) as server:
        chromium = _start_chromium(browser, driver_path)
        try:
            wait = _open_page(chromium, server.url + "/")
            k_box = chromium.find_element(By.ID, "k")
            k_value, k_max = k_box.get_attribute("value"), k_box.get_attribute("max")
            chromium.find_element(By.ID, "file").send_keys(str(Path(paths[4]).resolve()))
            wait.until(lambda d: d.find_element(By.ID, "status").text not in ("", "Searching..."))
            status = chromium.find_element(By.ID, "status").text
            hits = len(chromium.find_elements(By.CSS_SELECTOR, "#results li.hit"))
        finally:
            chromium.quit()
    assert (k_value, k_max) == ("5", "5")
    assert status.startswith("Top 5 in ") and hits == 5, status


class _BadGateway:
    """The service's application, except that ``POST /search`` gets a proxy's HTML 502 while ``broken``."""

    def __init__(self, app) -> None:
        self.app = app
        self.broken = False

    async def __call__(self, scope, receive, send) -> None:
        if self.broken and scope["type"] == "http" and scope["path"] == "/search":
            from starlette.responses import HTMLResponse

            page = "<html><body><h1>502 Bad Gateway</h1></body></html>"
            await HTMLResponse(page, status_code=502)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def test_a_failed_search_leaves_no_results_of_the_previous_query(tmp_path):
    """Before, a search answered by a proxy's HTML 502 or lost to a network failure left the previous query's
    thumbnails on screen under an error (the page read the body as JSON before it looked at the status)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _browser_paths()
    service, paths = _indexed_service(tmp_path, ServiceLimits(max_k=4))
    app = _BadGateway(create_app(service))
    chromium = _start_chromium(browser, driver_path)
    try:
        chromium.set_page_load_timeout(WAIT_S)
        wait = WebDriverWait(chromium, WAIT_S)
        status = lambda: chromium.find_element(By.ID, "status").text  # noqa: E731
        hits = lambda: len(chromium.find_elements(By.CSS_SELECTOR, "#results li.hit"))  # noqa: E731

        def upload(path: str) -> str:
            chromium.find_element(By.ID, "file").send_keys(str(Path(path).resolve()))
            wait.until(lambda d: status() not in ("", "Searching..."))
            return status()

        with BackgroundServer(app) as server:
            chromium.get(server.url + "/")
            wait.until(lambda d: "12 images" in d.find_element(By.ID, "served").text)
            assert upload(paths[1]).startswith("Top 4 in ") and hits() == 4
            app.broken = True
            refused = upload(paths[2])
            assert refused.startswith("Refused (502): Bad Gateway, not an answer of the search service"), refused
            assert hits() == 0
            app.broken = False
            assert upload(paths[3]).startswith("Top 4 in ") and hits() == 4
        failed = upload(paths[5])  # the server is gone: a network failure
        assert failed.startswith("The request failed: ") and hits() == 0, failed
    finally:
        chromium.quit()


def test_a_page_of_a_rebound_name_reads_nothing(tmp_path):
    """DNS rebinding, simulated: the browser resolves attacker.test to 127.0.0.1 (as a rebinding DNS server would
    once the attacker's page is loaded). Before, the page's scripts read /health and ran searches; now every
    request names Host attacker.test and gets 421."""
    browser, driver_path = _browser_paths()
    service, paths = _indexed_service(tmp_path, ServiceLimits())
    read = """const done = arguments[0];
      Promise.all(["health", "image/0", "search"].map((path) =>
        fetch(path, path === "search" ? {method: "POST", body: new FormData()} : {}).then((r) => r.status)))
        .then(done, (e) => done(String(e)));"""
    with BackgroundServer(create_app(service)) as server:
        chromium = _start_chromium(browser, driver_path, "--host-resolver-rules=MAP attacker.test 127.0.0.1")
        try:
            chromium.set_page_load_timeout(WAIT_S)
            chromium.set_script_timeout(WAIT_S)
            chromium.get(f"http://attacker.test:{server.port}/")
            page = chromium.page_source
            statuses = chromium.execute_async_script(read)
            chromium.get(server.url + "/")  # the same browser on the service's own name: served
            own = chromium.execute_async_script(read.replace('"search"].map', '"image/0"].map'))
        finally:
            chromium.quit()
    assert "is not a name this service answers to" in page and "raml search" not in page
    assert statuses == [421, 421, 421]
    assert own == [200, 200, 200]


def test_a_browser_that_fails_to_start_fails_the_test(tmp_path):
    pytest.importorskip("selenium")
    # a "chromedriver" that exits at once, as a driver mismatched with its browser or missing a library does
    fake_driver = tmp_path / "chromedriver"
    fake_driver.write_text("#!/bin/sh\necho 'fake chromedriver: cannot start' >&2\nexit 1\n")
    fake_driver.chmod(0o755)
    fake_browser = tmp_path / "chromium"
    fake_browser.write_text("#!/bin/sh\nexit 1\n")
    fake_browser.chmod(0o755)
    with pytest.raises(BaseException) as outcome:  # BaseException: a skip (pytest's Skipped) is caught too
        _start_chromium(str(fake_browser), str(fake_driver))
    assert outcome.type is pytest.fail.Exception, f"{outcome.type.__name__}: {outcome.value}"  # not a skip
    assert "installed but the browser failed to start" in str(outcome.value)
