"""The operator's page (`GET /ui`): its files (shipped, self-contained), how the server serves them,
and the page itself driven in a real headless Chromium against a real `wesam serve` (sam-micro, a
temporary registry with two versions of a domain, an admin token).

The browser test needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without
them it is skipped with that reason. Selenium is given the driver's path, so Selenium Manager never
tries to download one.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from service_support import encode, make_base, make_image, publish_adapter

from wesam.service.config import ServeConfig
from wesam.service.launch import ServerProcess
from wesam.service.webui import ASSET_NAME, UI_DIR

TOKEN = "ui-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else shutil.which("chromedriver")


# -- the files ------------------------------------------------------------------------------------

def test_the_page_references_nothing_outside_the_server() -> None:
    files = sorted(p for p in UI_DIR.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css"}
    for path in files:
        assert ASSET_NAME.match(path.name), f"{path.name} would not be served"
        text = path.read_text()
        assert not re.search(r"https?://", text, re.I), f"{path.name} names an absolute URL"
        assert not re.search(r"""(?:src|href)\s*=\s*["']?//""", text), f"{path.name} names a protocol-relative URL"
        assert not re.search(r"""\bimport\b[^;]*?from\s*["'](?!\./)""", text), f"{path.name} imports a non-relative module"
        # every url() in the stylesheet and every src/href in the page is relative to the page
        for ref in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", text) + re.findall(r"url\(([^)]*)\)", text):
            assert ref == "data:," or not ref.startswith(("/", "data:", "javascript:")), f"{path.name}: {ref}"
    html = (UI_DIR / "index.html").read_text()
    assert 'src="ui/app.js"' in html and 'href="ui/style.css"' in html and "<script>" not in html  # no inline script


def test_the_page_is_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["wesam.service"]
    for path in UI_DIR.iterdir():
        assert any(Path(f"ui/{path.name}").match(p) for p in patterns), f"{path.name} would not be in the wheel"


# -- a real server ----------------------------------------------------------------------------------

@dataclass
class Served:
    server: ServerProcess
    client: httpx.Client
    root: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)  # v1, active
    publish_adapter(base, reg, "polyp", seed=7, activate=False)  # v2
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, admin_token=TOKEN, poll_seconds=1,
                         cache_mb=64)
    server = ServerProcess(config, bentoml_home=root / "bentoml", extra_env={"OMP_NUM_THREADS": "1"})
    try:
        server.start(timeout=300)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield Served(server, client, root)
    finally:
        server.cleanup()


def test_the_server_serves_the_page(served: Served) -> None:
    c = served.client
    page = c.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.text == (UI_DIR / "index.html").read_text()
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, media in (("app.js", "text/javascript"), ("rle.js", "text/javascript"), ("style.css", "text/css")):
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media), (name, r.headers)
        assert r.content == (UI_DIR / name).read_bytes()
    slash = c.get("/ui/")
    assert slash.status_code == 308 and slash.headers["location"] == "../ui"
    for bad in ("/ui/nope.js", "/ui/.hidden.js", "/ui/README", "/ui/webui.py"):
        r = c.get(bad)
        assert r.status_code == 404 and r.json()["status"] == 404, bad  # wesam's JSON error
    assert c.get("/ui/..%2Fwebui.py").status_code == 404  # (refused before it reaches wesam)
    # the JSON the page reads
    versions = c.get("/adapters/polyp/versions").json()
    assert [v["adapter"] for v in versions["versions"]] == ["polyp@v1", "polyp@v2"] and versions["active"] == 1


# -- the page in a browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    f"chromium-driver); found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extras")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-gpu", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


MASK_PIXELS = """
const canvas = document.querySelector(arguments[0] + ' canvas.mask');
if (!canvas.width) return 0;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let n = 0;
for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n += 1;
return n;
"""


def _wait(driver, what: str, predicate, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as e:  # the element may not be there yet
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    logs = []
    try:
        logs = [entry["message"] for entry in driver.get_log("browser")]
    except Exception:
        pass
    message = driver.execute_script("return document.querySelector('#message').textContent")
    scores = driver.execute_script("return [...document.querySelectorAll('.score')].map(e => e.textContent)")
    pytest.fail(f"timed out waiting for {what} (last: {last!r}); message: {message!r}; scores: {scores}; "
                f"console: {logs}")


def _text(driver, selector: str) -> str:
    return driver.execute_script("return document.querySelector(arguments[0]).textContent", selector)


def test_the_page_compares_base_and_an_adapter_version_and_activates(served: Served, browser,
                                                                     tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(served.server.url + "/ui")
    # the adapters table lists both versions, v1 marked active
    _wait(d, "the adapters table", lambda: len(d.find_elements(By.CSS_SELECTOR, "#adapters tr[data-adapter]")) == 2)
    assert d.find_element(By.CSS_SELECTOR, 'tr[data-adapter="polyp@v1"]').get_attribute("data-active") == "true"
    assert d.find_element(By.CSS_SELECTOR, 'tr[data-adapter="polyp@v2"]').get_attribute("data-active") == "false"
    Select(d.find_element(By.ID, "domain")).select_by_value("polyp")
    Select(d.find_element(By.ID, "version")).select_by_value("2")  # the version that is not active: a preview
    assert "polyp@v2 (preview)" in _text(d, "#panel-adapter .title")

    # an image through the file input
    png = tmp_path / "frame.png"
    png.write_bytes(encode(make_image(120, 160, seed=5)))
    d.find_element(By.ID, "file").send_keys(str(png))
    canvas = _wait(d, "the image on the page", lambda: [c for c in d.find_elements(By.CSS_SELECTOR,
                                                                                   "#panel-base canvas.prompts")
                                                        if c.size["width"] > 0])[0]
    assert d.execute_script("return document.querySelector('#panel-base canvas.image').width") == 160

    # drag a box: both panels draw a mask and show scores
    w, h = canvas.size["width"], canvas.size["height"]
    (ActionChains(d).move_to_element_with_offset(canvas, -w // 4, -h // 4).click_and_hold()
     .move_by_offset(w // 4, h // 4).move_by_offset(w // 4, h // 4).release().perform())
    for panel in ("#panel-base", "#panel-adapter"):
        _wait(d, f"{panel}'s mask", lambda: d.execute_script(MASK_PIXELS, panel) > 0)
        _wait(d, f"{panel}'s scores", lambda: "score " in _text(d, f"{panel} .score"))
    assert _text(d, "#prompt-list").startswith("box")
    assert _text(d, "#panel-base .adapter") == "base" and _text(d, "#panel-adapter .adapter") == "polyp@v2"
    assert re.search(r"score \d\.\d{3} · \d+ ms \(server", _text(d, "#panel-adapter .score"))

    # right click: a negative point, and new answers
    ActionChains(d).move_to_element_with_offset(canvas, w // 3, -h // 3).context_click().perform()
    _wait(d, "the negative point", lambda: "− point" in _text(d, "#prompt-list"))
    _wait(d, "answers to box + point", lambda: all(
        d.execute_script("return document.querySelector(arguments[0]).dataset.state", f"{p} .score") == "ready"
        for p in ("#panel-base", "#panel-adapter")))
    # keyboard: z undoes the point
    canvas.send_keys("z")
    _wait(d, "undo", lambda: "point" not in _text(d, "#prompt-list"))

    # the right-hand panel follows the domain's active version
    Select(d.find_element(By.ID, "version")).select_by_value("active")
    _wait(d, "the active version's answer", lambda: _text(d, "#panel-adapter .adapter") == "polyp@v1")

    # activate v2 from the table with the admin token
    token = d.find_element(By.ID, "token")
    token.send_keys(TOKEN)
    assert d.execute_script("return sessionStorage.getItem('wesam.adminToken')") == TOKEN
    d.find_element(By.CSS_SELECTOR, 'tr[data-adapter="polyp@v2"] button.activate').click()
    _wait(d, "the confirmation", lambda: "polyp now serves polyp@v2" in _text(d, "#message"))
    _wait(d, "v2 marked active", lambda: d.find_element(
        By.CSS_SELECTOR, 'tr[data-adapter="polyp@v2"]').get_attribute("data-active") == "true")
    assert d.find_element(By.CSS_SELECTOR, 'tr[data-adapter="polyp@v1"]').get_attribute("data-active") == "false"
    (row,) = [r for r in served.client.get("/adapters").json()["domains"] if r["domain"] == "polyp"]
    assert row["active"] == 2 and row["serving"] == "polyp@v2"
    # the page asks again: the domain's answers now come from v2 (its v1 embedding was dropped and re-made)
    _wait(d, "the new active version's answer", lambda: _text(d, "#panel-adapter .adapter") == "polyp@v2")
    r = served.client.post("/segment", json={"image": __import__("base64").b64encode(png.read_bytes()).decode(),
                                             "domain": "polyp", "boxes": [[10, 10, 100, 80]]})
    assert r.status_code == 200 and r.json()["adapter"] == "polyp@v2"

    # a wrong token: wesam's error kind is shown
    token.clear()
    token.send_keys("wrong")
    d.find_element(By.CSS_SELECTOR, 'tr[data-adapter="polyp@v1"] button.activate').click()
    _wait(d, "the error", lambda: "forbidden (403)" in _text(d, "#message"))
    assert d.find_element(By.ID, "message").get_attribute("data-kind") == "error"
    # no script error all along (failed API calls are logged by the browser as network errors: expected)
    errors = [e for e in d.get_log("browser") if e.get("level") == "SEVERE" and e.get("source") != "network"]
    assert not errors, errors
