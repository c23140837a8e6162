"""sam3lora-demo end to end in headless Chromium: pick an example, prompt, segment, see overlays and the table.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); selenium drives
``/usr/bin/chromedriver`` itself (selenium-manager never downloads anything). The page is served in-process on a
free port of 127.0.0.1 with no share link and no telemetry; Chromium resolves no other host. The final screenshot
is saved under the test's tmp dir and copied to ``logs/test-artifacts/demo.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager, should it ever run, downloads nothing
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "logs" / "test-artifacts"
TIMEOUT = 120  # seconds for a prediction to show up

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver; "
               ".ci/run installs them)",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
pytest.importorskip("gradio", reason="gradio is the demo extra (in the dev extra)")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    """The demo (tiny base + a random adapter ``tuned``, threshold 0 so instances always show) on 127.0.0.1."""
    from test_demo import save_random_adapter

    from sam3lora.demo.examples import synthetic_examples
    from sam3lora.demo.page import build_app, launch
    from sam3lora.demo.service import DemoService
    from sam3lora.inference import Sam3LoRAPredictor

    root = tmp_path_factory.mktemp("demo_browser")
    adapter = save_random_adapter(root / "tuned")
    predictor = Sam3LoRAPredictor.from_pretrained("tiny", {"tuned": adapter}, merge=False)
    app = build_app(DemoService(predictor, out_root=root / "out"), synthetic_examples(root / "examples", count=2),
                    threshold=0.0)
    url = launch(app, "127.0.0.1", free_port(), block=False, quiet=True)
    assert url.startswith("http://127.0.0.1:")
    yield url
    app.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1100",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no host but this one
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_example(driver, url: str, row: int = 0) -> WebDriverWait:
    """Load the page and click example ``row``; returns a waiter (up to TIMEOUT s)."""
    driver.get(url)
    wait = WebDriverWait(driver, TIMEOUT)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#examples [data-testid='dataset-cell-{row}-0']")).click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    time.sleep(1.0)  # let the image.change event (it clears boxes) finish before drawing any
    return wait


def type_into(driver, css: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if text:
        box.send_keys(text)


def toasts(driver) -> str:
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body"))


def test_segment_an_example_in_chromium(server, browser, tmp_path):
    wait = open_example(browser, server)
    type_into(browser, "#prompts textarea", "red circle, blue square")
    # draw an exemplar box: two clicks on opposite corners of the picture
    picture = browser.find_element(By.CSS_SELECTOR, "#image img")
    ActionChains(browser).move_to_element_with_offset(picture, -40, -40).click().perform()
    wait.until(lambda d: "opposite corner" in d.find_element(By.ID, "box-hint").text)
    ActionChains(browser).move_to_element_with_offset(picture, 30, 30).click().perform()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute("value"))
    assert re.fullmatch(r"\d+,\d+,\d+,\d+", browser.find_element(By.CSS_SELECTOR, "#boxes textarea")
                        .get_attribute("value"))
    start = time.monotonic()
    browser.find_element(By.ID, "run").click()
    # one overlay per model (captioned with it), and an instance table (virtual: only visible rows are in the DOM)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) >= 2 or toasts(d))
    assert not toasts(browser), f"the page shows an error: {toasts(browser)}"
    wait.until(lambda d: "red circle" in d.find_element(By.ID, "instances").text)
    seconds = time.monotonic() - start
    captions = browser.find_element(By.ID, "overlays").text
    assert "base: " in captions and "tuned: " in captions
    overlays = browser.find_elements(By.CSS_SELECTOR, "#overlays img")
    assert all(img.get_attribute("naturalWidth") not in (None, "0") for img in overlays[:2])
    table = browser.find_element(By.ID, "instances")
    assert "base" in table.text and "score" in table.text
    rows = int(table.find_element(By.CSS_SELECTOR, "[role=grid]").get_attribute("aria-rowcount"))
    assert rows > 1, "the instance table has no rows"
    wait.until(lambda d: "predictions" in d.find_element(By.ID, "downloads").text)
    shot = tmp_path / "demo.png"
    assert browser.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "demo.png")
    print(f"\nscreenshot: {ARTIFACTS / 'demo.png'} (and {shot}); {rows - 1} instance rows in {seconds:.1f} s")


def test_errors_show_in_the_page(server, browser, tmp_path):
    wait = open_example(browser, server, row=1)
    type_into(browser, "#prompts textarea", "")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: "no prompt" in toasts(d))
    assert "Traceback" not in browser.page_source
    # an upload that is not an image is refused by name
    browser.find_element(By.CSS_SELECTOR, "#image button[aria-label='Remove Image']").click()
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(fake))
    wait.until(lambda d: "notes.png: not an image" in toasts(d))
