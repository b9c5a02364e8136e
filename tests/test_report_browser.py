"""Issue 18 (2, 3): report.html cannot run script or pull in files. Run names (and tags, config
values, sweep names) are chosen by whoever can log to a shared project and reach the markdown the
studies write; the report is loaded here in a real headless browser (Debian's chromium, driven by
selenium over chromedriver), which records every network request and every call of a script sink.

Skipped when chromium is missing, unless HARNESS_REQUIRE_BROWSER=1 (set by .ci/run)."""

import base64
import json
import os
import shutil

import pytest

from analysis import report
from analysis.study import Section

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REQUIRED = os.environ.get("HARNESS_REQUIRE_BROWSER") == "1"

# The payloads, as run names would reach a study's markdown (a list of runs, a heading),
# plus a file: and a data: link and an image path that climbs out of the output directory.
PAYLOADS = [
    '![x" onerror="alert(document.domain)" y="](nonexist.png)',
    "[t](javascript:alert(1))",
    "b ![leak](/etc/hostname)",
    "[f](file:///etc/hostname)",
    "[d](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "c ![up](../../outside.png)",
]

# Before the page's own content runs: count every call of a script sink (a payload that runs calls one).
PROBE = """
window.__calls = [];
for (const name of ['alert', 'confirm', 'prompt', 'fetch', 'open']) {
  const orig = window[name];
  window[name] = function (...a) { window.__calls.push(name + '(' + a.map(String).join(',') + ')');
                                   return name === 'fetch' ? orig.apply(this, a) : undefined; };
}
const xo = XMLHttpRequest.prototype.open;
XMLHttpRequest.prototype.open = function (...a) { window.__calls.push('xhr(' + a[1] + ')'); return xo.apply(this, a); };
"""


def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        if REQUIRED:
            pytest.fail(
                f"HARNESS_REQUIRE_BROWSER=1 but {CHROMIUM} or {DRIVER} is missing "
                "(apt-get install chromium chromium-driver)"
            )
        pytest.skip("no chromium (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
    ):  # the most permissive file:// setting: what a leak needs
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def write_report(tmp_path) -> str:
    """A report over one study whose markdown holds the payloads where run names go; the study
    wrote one real PNG. Through report.combine and report.to_html, as report.build does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "out"
    study = out / "grokking"
    study.mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(study / "curves.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "outside.png")  # a PNG outside the output directory
    plt.close(fig)
    runs = "\n".join(f"- run {p}: grokked at step 100" for p in PAYLOADS)
    heads = "\n\n".join(f"### {p}\n\ntext" for p in PAYLOADS)
    md = f"## Grokking\n\n{runs}\n\n{heads}\n\n| run | step |\n|---|---|\n| {PAYLOADS[0]} | 1 |\n\n![curves.png](curves.png)\n"
    sec = Section(study="grokking", title="Grokking", markdown=md, out=str(study), plots=[str(study / "curves.png")])
    combined = report.combine([sec], [], "src `x`", "sweep1", str(out), {"modular_addition": 1})
    (out / "report.html").write_text(report.to_html(combined, str(out), images=sec.plots))
    return str(out)


def load_and_record(driver, out: str) -> dict:
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PROBE})
    driver.get("file://" + os.path.join(out, "report.html"))
    driver.execute_script("return document.readyState")
    # Follow every javascript: link the page offers (a reader's click).
    for href in driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)"):
        if href.lower().startswith("javascript:"):
            driver.execute_script(
                "[...document.querySelectorAll('a[href]')].find(a => a.href === arguments[0]).click()", href
            )
    calls = driver.execute_script("return window.__calls")
    hrefs = driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))")
    srcs = driver.execute_script("return [...document.querySelectorAll('img')].map(i => i.getAttribute('src'))")
    handlers = driver.execute_script(
        "return [...document.querySelectorAll('*')].flatMap(e => [...e.attributes].map(a => a.name))"
        ".filter(n => n.startsWith('on'))"
    )
    requests = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requests.append(msg["params"]["request"]["url"])
    root = "file://" + out + "/"
    outside = [u for u in requests if not (u.startswith(root) or u.startswith("data:image/png;base64,"))]
    return {
        "calls": calls,
        "hrefs": hrefs,
        "srcs": srcs,
        "handlers": handlers,
        "requests": requests,
        "outside": outside,
    }


def test_the_report_runs_no_script_and_loads_nothing_outside_its_directory(tmp_path):
    driver = browser()
    try:
        out = write_report(tmp_path)
        seen = load_and_record(driver, out)
    finally:
        driver.quit()
    page = open(os.path.join(out, "report.html")).read()
    png = open(os.path.join(out, "grokking", "curves.png"), "rb").read()
    own = "data:image/png;base64," + base64.b64encode(png).decode()
    foreign = [s for s in seen["srcs"] if s.startswith("data:") and s != own]
    print(
        f"browser: {len(seen['requests'])} requests ({len(seen['outside'])} outside the output directory: "
        f"{[u[:60] for u in seen['outside']]}), script calls {seen['calls']}, event-handler attributes "
        f"{seen['handlers']}, links {seen['hrefs']}, images {len(seen['srcs'])} ({len(foreign)} embedded from files the "
        f"report did not write: {[base64.b64decode(s.split(',', 1)[1])[:20] for s in foreign]})"
    )
    assert seen["calls"] == [] and seen["handlers"] == []
    assert seen["outside"] == []
    assert all(h.startswith(("http://", "https://", "#")) or h.endswith(".svg") for h in seen["hrefs"]), seen["hrefs"]
    # The one image is the study's PNG, embedded; nothing else was embedded.
    assert seen["srcs"] == [own] and foreign == []
    hostname = open("/etc/hostname", "rb").read()
    outside = open(tmp_path / "outside.png", "rb").read()
    for data in (hostname, outside):
        assert f"base64,{base64.b64encode(data).decode()}" not in page
    assert "Content-Security-Policy" in page
    # The payloads are still there, as text.
    assert "onerror=&quot;alert(document.domain)&quot;" in page and "javascript:alert(1)" in page


def test_browser_is_required_where_ci_says_so(monkeypatch):
    """.ci/run installs chromium and sets HARNESS_REQUIRE_BROWSER=1, so the test above cannot skip there."""
    ci = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
    assert "HARNESS_REQUIRE_BROWSER=1" in ci and "chromium-driver" in ci
    if REQUIRED:
        assert shutil.which("chromium") and shutil.which("chromedriver")
