"""``triform inspect report``: one self-contained HTML page, checked as text (no address outside the
file, every picture embedded, all text escaped) and in headless Chromium (title, every section,
every picture decoded, a screenshot that shows something)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from conftest import cli_error

from triform.cli.inspect import SECTIONS
from triform.cli.main import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TEXT = "KING:\nThe "  # short: patching runs the model once per layer and position


@pytest.fixture(scope="module")
def report_dir(trained_run: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of the trained fixture with every analysis, patching included."""
    out = tmp_path_factory.mktemp("report")
    argv = ["inspect", "report", str(trained_run), "--text", TEXT, "--corrupt", "LORD:\nThe ",
            "--answer", "k", "--wrong", "l", "--data", str(corpus_file), "--probe-tokens", "1000",
            "--out", str(out)]
    assert main(argv) == 0
    return out


def test_the_report_is_one_offline_file_with_every_picture_embedded(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    pictures = sorted(report_dir.glob("*.png"))
    assert {p.name for p in pictures} == {f"{name}.png" for name in
                                          ("anatomy", "embeddings", "lens", "attention", "heads", "patch", "probe")}
    for p in pictures:
        assert base64.b64encode(p.read_bytes()).decode("ascii") in page, p.name
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links)
    assert "http://" not in page and "https://" not in page  # not in any src/href, nor anywhere else
    assert "<script" not in page.lower() and "url(" not in page
    assert page.count("<img ") == len(pictures)
    assert page.count("<section ") == len(SECTIONS) and "did not run" not in page
    assert "<pre class=\"input\">KING:\nThe </pre>" in page


def test_analyses_that_do_not_apply_are_listed_and_text_is_escaped(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    text = '<script>alert("x")</script> & <b>bold</b>'
    assert main(["inspect", "report", "--preset", "gpt2-tiny", "--text", text, "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"report: {tmp_path / 'r' / 'report.html'}"
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert page.count("<img ") == 1 == len(list((tmp_path / "r").glob("*.png")))  # anatomy alone
    assert page.count('class="skipped">did not run: ') == len(SECTIONS) - 1
    assert "neighbours needs a checkpoint (a preset has no trained embeddings)." in page
    assert "1 of 7 analyses ran" in page
    assert "analysis must be one of" in cli_error(capsys, ["inspect", "repor", "--preset", "gpt2-tiny"])


def _chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # no skip: `make test` installs Debian's chromium and chromium-driver, and this test must run
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), "install Chromium: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--user-data-dir={profile}", "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


def test_the_report_in_headless_chromium(report_dir: Path, trained_run: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never look for a driver online
    driver = _chromium(tmp_path / "profile")
    try:
        driver.get((report_dir / "report.html").resolve().as_uri())
        assert driver.title == f"triform inspect report: {trained_run.name}"
        headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
        assert headings == ["Contents", *SECTIONS.values()]
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) == len(list(report_dir.glob("*.png"))) == 7
        assert all(done and w > 0 and h > 0 for done, w, h in images), images
        first = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#probe table tbody td:first-child")]
        assert first == ["embed", "after block 0", "after block 1", "chance (majority class)",
                         "control: shuffled labels, mean over layers"]
        links = driver.find_elements(By.CSS_SELECTOR, "nav a")
        assert [a.get_attribute("href").rsplit("#", 1)[1] for a in links] == list(SECTIONS)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 1000
        grey = im.convert("L")
        low, high = grey.getextrema()
        assert high - low > 100  # dark text on a light page, not one colour
        assert len(grey.getcolors(maxcolors=256) or []) > 20
