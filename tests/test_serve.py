"""`nerd serve`: the page's handlers without a browser (gray, colour, 16-bit, bad files, limits, the iterates and
the residual curve), the command line, and the page itself in a headless chromium (marker `browser`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nerd.cli import main
from nerd.errors import ImageError, NerdError
from nerd.serve import Engine, ServeError, display, frame_caption, handle_scrub, require_gradio

ITERS = 5  # the untrained tiny weights never reach tol in 5 steps: every solve takes exactly 5


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> Engine:
    eng = Engine(str(tiny_weights), device="cpu")
    yield eng
    eng.close()


def _image(path: Path, shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> Path:
    """A smooth picture plus noise, saved as `path` (uint8 or uint16, gray (H, W) or RGB (H, W, 3))."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    ramp = np.add.outer(np.linspace(0.2, 0.6, h), np.linspace(0.0, 0.3, w))
    x = ramp[..., None].repeat(shape[2], 2) * [1.0, 0.8, 0.6][: shape[2]] if len(shape) == 3 else ramp
    top = np.iinfo(dtype).max
    Image.fromarray(np.clip((x + rng.normal(0, 25 / 255, x.shape)) * top, 0, top).astype(dtype)).save(path)
    return path


def test_gray_8bit_frames_are_the_solvers_iterates(engine: Engine, tmp_path: Path) -> None:
    from nerd.denoise import denoise_image
    from nerd.io import read_image, to_pixels

    src = _image(tmp_path / "gray.png", (37, 53))
    out = engine.denoise(src, sigma=25, iters=ITERS)
    assert out.x_hat.shape == (37, 53) and out.depth == 8 and not out.estimated
    # the hook changes nothing: the same result as denoise_image alone
    model, _ = engine.model(str(engine.weights))
    y, _ = read_image(src)
    alone, _ = denoise_image(model, y, 25, solver=model.solver.override(max_iter=ITERS), device="cpu")
    np.testing.assert_array_equal(out.x_hat, alone)
    # one frame and one residual per f-evaluation; the solver returns the lowest-residual iterate
    assert len(out.frames) == out.summary.nfe == ITERS and out.residuals.shape == (ITERS, 1)
    best = int(np.argmin(out.residuals[:, 0]))
    assert out.residuals[best, 0] == pytest.approx(out.summary.rel_residual, rel=1e-5)
    assert np.abs(out.frames[best].astype(int) - to_pixels(out.x_hat, 16)).max() <= 1
    assert np.isnan(out.steps[0]) and (out.steps[1:] > 0).all()
    written = Image.open(out.output)
    assert written.mode == "L" and written.size == (53, 37) and out.output.name == "gray-denoised.png"
    assert "sigma 25.0 (given)" in out.report and "8-bit gray, 53x37" in out.report


def test_colour_with_given_weights_is_r_g_b_each_by_them(engine: Engine, tmp_path: Path) -> None:
    from nerd.denoise import denoise_image
    from nerd.io import read_image

    src = _image(tmp_path / "colour.png", (40, 47, 3))
    out = engine.denoise(src, sigma=25, iters=ITERS)
    model, _ = engine.model(str(engine.weights))
    y, _ = read_image(src, colour=True)
    alone, _ = denoise_image(model, y, 25, solver=model.solver.override(max_iter=ITERS), device="cpu")
    np.testing.assert_array_equal(out.x_hat, alone)
    assert out.frames[0].shape == (40, 47, 3) and out.residuals.shape == (ITERS, 3)
    assert Image.open(out.output).mode == "RGB" and "colour" in out.report
    assert "R" in set(frame_caption(out, 0).split()) or "residual" in frame_caption(out, 0)


def test_colour_with_the_shipped_weights_goes_the_way_nerd_denoise_sends_it(tmp_path: Path) -> None:
    """nerd.colour's shipped method: the opponent luminance Y solved (its frames the whole colour image as Y_k
    gives it), the chroma by a guided filter; the result is the library's."""
    from nerd.colour import ColourWeights
    from nerd.denoise import denoise_image
    from nerd.io import read_image, to_pixels

    src = _image(tmp_path / "colour.png", (31, 37, 3))
    engine = Engine(device="cpu")
    try:
        out = engine.denoise(src, sigma=25, iters=3)
    finally:
        engine.close()
    y, _ = read_image(src, colour=True)
    model = engine.model("nerd-s15")[0]
    alone, _ = denoise_image(model, y, 25, solver=model.solver.override(max_iter=3), device="cpu",
                             colour_weights=ColourWeights.shipped(device="cpu"))
    np.testing.assert_array_equal(out.x_hat, alone)
    assert out.names == ["Y"] and out.residuals.shape == (3, 1) and out.frames[0].shape == (31, 37, 3)
    best = int(np.argmin(out.residuals[:, 0]))
    assert np.abs(out.frames[best].astype(int) - to_pixels(out.x_hat, 16)).max() <= 1
    assert "colour opp-guided" in out.report and "Y sigma 14.4 -> nerd-s15" in out.report


def test_16bit_comes_back_16bit_and_sigma_is_estimated(engine: Engine, tmp_path: Path) -> None:
    src = _image(tmp_path / "deep.png", (41, 35), np.uint16)
    assert Image.open(src).mode.startswith("I")
    out = engine.denoise(src, sigma=None, iters=2)
    written = np.asarray(Image.open(out.output))
    assert written.dtype.kind in "iu" and written.max() > 255 and out.depth == 16
    assert out.estimated and 10 < out.sigma < 60 and "(estimated)" in out.report and "16-bit gray" in out.report


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"not an image at all"), "bad.png: not an image file"),
    (lambda p: p.write_bytes(b""), "bad.png: empty file"),
    (lambda p: _rgb16(p), "bad.png: 16-bit PNG with colour"),
])
def test_bad_files_are_one_line_naming_the_file_not_the_upload_folder(engine, tmp_path, make, expected) -> None:
    folder = tmp_path / "upload-folder-of-the-server"
    folder.mkdir()
    path = folder / "bad.png"
    make(path)
    with pytest.raises(NerdError) as err:
        engine.denoise(path, sigma=25, iters=1)
    message = str(err.value)
    assert message.startswith(expected) and "\n" not in message and str(folder) not in message


def _rgb16(path: Path) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): its IHDR says depth 16, colour type 2."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + bytes(6 * 4) for _ in range(3))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_upload_and_pixel_limits(tiny_weights: Path, tmp_path: Path) -> None:
    src = _image(tmp_path / "big.png", (40, 48))
    small = Engine(str(tiny_weights), device="cpu", max_upload_mb=0.0005)
    with pytest.raises(ServeError, match=r"big.png: .* MB, more than this page's upload limit of 0.0005 MB"):
        small.denoise(src, sigma=25)
    few = Engine(str(tiny_weights), device="cpu", max_pixels=100)
    with pytest.raises(ImageError, match="big.png: 48x40 .* --max-pixels"):
        few.denoise(src, sigma=25)
    with pytest.raises(ServeError, match="drop or choose an image"):
        few.denoise(tmp_path / "nothing.png", sigma=25)
    with pytest.raises(NerdError, match="sigma must be in"):
        few.denoise(_image(tmp_path / "tiny.png", (9, 9)), sigma=300)
    for engine in (small, few):
        engine.close()


def test_scrubbing_returns_every_iterate_and_the_curves(engine: Engine, tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    from nerd.serve import psnr_table, residual_table, step_table

    out = engine.denoise(_image(tmp_path / "g.png", (37, 31)), sigma=25, iters=ITERS)
    seen = [handle_scrub(k, out) for k in range(ITERS)]
    assert all(img.shape == (37, 31) and img.dtype == np.uint8 for img, _ in seen)
    assert len({img.tobytes() for img, _ in seen}) == ITERS  # each step moves x_hat
    assert "the start, z = 0" in seen[0][1] and f"after {ITERS - 1} solver steps" in seen[-1][1]
    assert handle_scrub(99, out)[1] == seen[-1][1] and handle_scrub(0, None) == (None, "")
    table = residual_table(out)
    assert len(table) == ITERS + 2 and set(table["series"]) == {"gray", "tol 0.001"}
    np.testing.assert_allclose(10 ** table[table.series == "gray"]["log10 residual"].to_numpy(), out.residuals[:, 0],
                               rtol=1e-5)
    assert len(step_table(out)) == ITERS - 1 and psnr_table(out).empty


def test_the_bundled_sample_has_a_psnr_per_iterate(engine: Engine) -> None:
    from nerd.serve import _clean_for, handle_sample

    copy, estimate, sigma = handle_sample(engine)
    assert _clean_for(copy) is not None and not estimate and sigma == 25
    assert _clean_for(Path(__file__)) is None


def test_display_shrinks_for_the_browser() -> None:
    x = np.linspace(0, 1, 3000 * 20, dtype=np.float32).reshape(20, 3000)
    assert display(x).shape == (20, 3000) and display(x, 1000).shape == (7, 1000)
    assert display(np.full((4, 4), 65535, np.uint16)).max() == 255


def test_import_is_cheap_and_gradio_optional(monkeypatch) -> None:
    code = "import sys, nerd, nerd.serve, nerd.cli; assert 'gradio' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(ServeError, match=r"pip install 'nerd\[serve\]'"):
        require_gradio()


def test_cli_refuses_bad_options_in_one_line(capsys, monkeypatch, tiny_weights) -> None:
    for argv, text in ((["--port", "x"], "--port must be an integer"), (["--port", "70000"], "--port must be"),
                       (["--max-upload-mb", "0"], "--max-upload-mb must be a number > 0"),
                       (["--device", "tpu"], "--device must be")):
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["serve", "--weights", str(tiny_weights)]) == 2
    assert "pip install 'nerd[serve]'" in capsys.readouterr().err


def test_handlers_turn_errors_into_messages_on_the_page(engine: Engine, tmp_path: Path) -> None:
    gr = pytest.importorskip("gradio")
    from nerd.serve import build_app, handle_denoise

    bad = tmp_path / "photo.tif"
    bad.write_bytes(b"II*\0garbage")
    with pytest.raises(gr.Error, match="photo.tif: cannot decode image|photo.tif: not an image"):
        handle_denoise(engine, str(bad), True, None, 3)
    with pytest.raises(gr.Error, match="Drop or choose an image file first"):
        handle_denoise(engine, None, True, None, 3)
    ticks: list[float] = []
    outputs = handle_denoise(engine, str(_image(tmp_path / "g.png", (33, 29))), False, 25.0, 3,
                             lambda fraction, text: ticks.append(fraction))
    pair, report, *_, outcome = outputs
    assert pair[0].shape == pair[1].shape == (33, 29) and "3 iterations" in report and len(outcome.frames) == 3
    assert ticks[0] == 0.0 and ticks[-1] == 1.0 and len(ticks) == 4
    own = handle_denoise(engine, str(_image(tmp_path / "g.png", (33, 29))), False, 25.0, 0)[-1]  # 0: the weights'
    assert own.summary.max_iter == engine.budgets()[str(engine.weights)] == 17  # the tiny preset's SolverConfig
    assert build_app(engine) is not None  # builds without launching


# ----------------------------------------------------------------------------------------------- the real page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """`nerd serve` in its own process on a free localhost port (its server threads apart from pytest's), its URL;
    stopped with SIGTERM, as a service manager would."""
    from urllib.request import urlopen

    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "nerd", "serve", "--port", str(port), "--weights",
                                   str(tiny_weights), "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"nerd serve exited with {server.returncode}: {log.read_text()[-2000:]}")
        with urlopen(url, timeout=5) as response:
            return response.status == 200

    try:
        _wait(up, 120, what="nerd serve to answer", errors=(OSError,))
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def browser(tmp_path: Path):
    """A headless chromium driven by Debian's chromedriver, downloading into tmp_path/downloads."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from tests.conftest import find_chromium

    binary, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(arg)
    (tmp_path / "downloads").mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


def _wait(condition, seconds: float = 60, what: str = "the page", errors: tuple[type, ...] = (Exception,)) -> object:
    """condition()'s first truthy value within `seconds`, `errors` counting as not yet."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            found = condition()
        except errors:  # an element not there yet, or replaced while read; a server not up yet
            found = None
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


def _uploaded(browser) -> None:
    """Wait until the upload box links the file on the server (the upload finished: a click before that is
    refused by the page)."""
    from selenium.webdriver.common.by import By

    _wait(lambda: [a for a in browser.find_elements(By.CSS_SELECTOR, "#upload a")
                   if "file=" in (a.get_attribute("href") or "")], what="the upload to finish")


def _page_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(browser.find_element(By.TAG_NAME, "body").text.split())


def _click(browser, elem_id: str) -> None:
    """Click the element of that id once it is shown and nothing lies over it (the page moves while it renders)."""
    from selenium.webdriver.common.by import By

    def click() -> bool:
        element = browser.find_element(By.ID, elem_id)
        if not element.is_displayed():
            return False
        element.click()
        return True

    _wait(click, 30, what=f"#{elem_id} to take a click")


@pytest.mark.browser
def test_the_page_denoises_an_upload_in_a_real_browser(page: str, browser, tmp_path: Path) -> None:
    from urllib.request import urlopen

    from selenium.webdriver.common.by import By

    src = _image(tmp_path / "noisy.png", (37, 45), seed=3)
    browser.get(page)
    upload = _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]"), what="the upload")
    upload.send_keys(str(src))
    _uploaded(browser)
    _click(browser, "denoise")
    try:
        report = _wait(lambda: "iterations" in (t := browser.find_element(By.ID, "report").text) and t, 120,
                       what="the report")
    except AssertionError as err:
        raise AssertionError(f"{err}; the page says: {_page_text(browser)[:1500]}") from None
    assert "sigma" in report and "45x37" in report
    sources = _wait(lambda: [i.get_attribute("src") for i in browser.find_elements(By.CSS_SELECTOR, "#compare img")
                             if i.get_attribute("src")][:2], what="the compare slider's images")
    noisy, denoised = (np.asarray(Image.open(urlopen(url)).convert("L"), dtype=float) for url in sources)
    assert noisy.shape == denoised.shape == (37, 45)
    np.testing.assert_array_equal(noisy, np.asarray(Image.open(src)))
    assert np.abs(denoised - noisy).mean() > 1  # the denoised image came back, and it is not the input
    _click(browser, "download")
    downloaded = _wait(lambda: [p for p in (tmp_path / "downloads").glob("*.png")], what="the download")[0]
    result = np.asarray(Image.open(downloaded))
    assert downloaded.name == "noisy-denoised.png" and result.shape == (37, 45)
    assert np.abs(result.astype(float) - denoised).max() <= 1
    assert browser.save_screenshot(str(tmp_path / "page.png")) and Image.open(tmp_path / "page.png").size[0] > 0


@pytest.mark.browser
def test_the_page_shows_a_bad_file_in_one_line(page: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is no image")
    browser.get(page)
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]"), what="the upload").send_keys(
        str(bad))
    _uploaded(browser)
    _click(browser, "denoise")
    _wait(lambda: "broken.png: not an image file" in browser.find_element(By.TAG_NAME, "body").text,
          what="the error message")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
