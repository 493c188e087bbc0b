"""The latent explorer (gradio_test.py): the API (both families of endpoints, the 2-D ones as adapters of the code
path) through gradio_client against the model's own decode, bad input, many clients at once, how the page is wired
at every latent width, the command line, and the page in a real browser (Debian's chromium via Playwright) at z 2 and
z 4: every event's effect on every component it sets.

The browser screenshot is written to a temporary folder (or $UI_SCREENSHOT); $UI_CKPT serves a real checkpoint
instead of the test's untrained one (that is how assets/ui.png was made).
"""
from __future__ import annotations

import io
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import gradio_test as ui
from model import load_cvae
from model import CVAE

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = os.environ.get("UI_SCREENSHOT")  # where the browser test saves its screenshot; a temporary folder if unset
CHROMIUM = Path("/usr/bin/chromium")
# Headless as root; the last four stop Chromium from calling home on a machine without a network.
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ENDPOINTS = {"/generate": ["digit", "z0", "z1"], "/style_row": ["z0", "z1"], "/manifold": ["digit", "z0", "z1"],
             "/random_z": ["digit"], "/style_transfer": ["image", "digit"]}


def code_endpoints(latent_dim: int) -> dict[str, list[str]]:
    """The endpoints of the whole code and their parameters, for a latent of this width."""
    code = [f"z{i}" for i in range(latent_dim)]
    return {"/generate_code": ["digit", *code], "/style_row_code": code, "/manifold_code": ["digit", *code],
            "/random_code": ["digit"], "/style_transfer_code": ["image", "digit"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_on_a_free_port(app, tries: int = 5) -> str:
    """ui.launch on a port the OS called free; another process (a second pytest run) may take it first, so retry."""
    for attempt in range(tries):
        try:
            return ui.launch(app, "127.0.0.1", free_port(), block=False)
        except OSError:
            if attempt == tries - 1:
                raise


def save_untrained(path: Path, latent_dim: int = 2, fitted_prior: bool = True) -> Path:
    """An untrained CVAE as a Lightning-style checkpoint; optionally (fitted_prior) a fitted density of narrow,
    well-separated per-digit Gaussians, so a test can tell that the random button samples from it."""
    torch.manual_seed(0)
    model = CVAE(latent_dim=latent_dim)
    if fitted_prior:
        means = torch.tensor([([(d - 4.5) / 2, 1.0 - d / 5] + [0.0] * latent_dim)[:latent_dim] for d in range(10)])
        model.fitted_prior = {"kind": "per-class", "weights": torch.ones(10, 1), "means": means[:, None],
                              "scale_tril": 0.01 * torch.eye(latent_dim).repeat(10, 1, 1, 1)}
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def decoded(model, z: list[list[float]], labels: list[int]) -> np.ndarray:
    """The model's own decode as the uint8 pixels a PNG carries: (N, 28, 28)."""
    with torch.no_grad():
        x = model.eval().decode(torch.tensor(z, dtype=torch.float32), torch.tensor(labels))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy().reshape(-1, 28, 28)


def read_png(path: str) -> np.ndarray:
    assert Path(path).suffix == ".png"
    return np.asarray(Image.open(path))


def same_pixels(got: np.ndarray | None, want: np.ndarray) -> bool:
    """The same picture, but for float rounding at a .5 boundary (one level at most)."""
    return got is not None and got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 1


def assert_same_pixels(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert same_pixels(got, want), np.abs(got.astype(int) - want.astype(int)).max()


def digit_picture(path: Path, dark_on_light: bool = True, size: int = 200) -> Path:
    """A hand-drawn-looking 7 as a PNG, the way a sketchpad or a scan would give it."""
    ink, paper = (0, 255) if dark_on_light else (255, 0)
    image = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(image)
    s = size / 200
    draw.line([(50 * s, 40 * s), (150 * s, 45 * s), (95 * s, 165 * s)], fill=ink, width=int(18 * s), joint="curve")
    image.save(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model, client): the app launched in-process on a free port, and a gradio_client connected to it."""
    from gradio_client import Client

    tmp = tmp_path_factory.mktemp("gradio")
    ckpt = Path(os.environ.get("UI_CKPT") or save_untrained(tmp / "cvae.ckpt"))
    with pytest.MonkeyPatch.context() as mp:
        # gradio_client's telemetry obeys only this variable (its analytics_enabled=False is not enough).
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        model = load_cvae(ckpt)
        app = ui.build_app(model)
        url = launch_on_a_free_port(app)
        client = Client(url, verbose=False, download_files=str(tmp / "downloads"))
        try:
            yield url, model, client
        finally:
            client.close()
            app.close()


def test_named_endpoints_are_listed(served):
    """Both families, as gradio_client sees them; the page's helper events (the drawing's encode, the digit it then
    shows) stay out of the API."""
    _, model, client = served
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {name: [p["parameter_name"] for p in named[name]["parameters"]] for name in named} == \
        {**ENDPOINTS, **code_endpoints(model.hparams.latent_dim)}


@pytest.mark.parametrize("latent_dim", [1, 2, 4])
def test_both_families_are_listed_at_every_width(tmp_path, latent_dim):
    """The 2-D endpoints keep their parameters and answers at every width; the code endpoints take one value per
    dimension and answer one per dimension."""
    model = load_cvae(save_untrained(tmp_path / "cvae.ckpt", latent_dim=latent_dim))
    named = ui.build_app(model, (2, 0) if latent_dim == 4 else None).get_api_info()["named_endpoints"]
    assert {name: [p["parameter_name"] for p in named[name]["parameters"]] for name in named} == \
        {**ENDPOINTS, **code_endpoints(latent_dim)}
    answers = {name: [r["label"] for r in named[name]["returns"]] for name in named}
    assert answers["/random_z"] == (["z0", "z1"] if latent_dim <= 2 else ["z[2]", "z[0]"])
    assert answers["/style_transfer"][0] == answers["/style_transfer_code"][0] == "Same style, all ten digits"
    assert len(answers["/random_code"]) == latent_dim and len(answers["/style_transfer_code"]) == latent_dim + 1


@pytest.mark.parametrize("latent_dim", [1, 2, 4])
def test_every_page_event_runs_on_the_whole_code(tmp_path, latent_dim):
    """How the page is wired, at every width: every slider's change and the digit's redraw the pictures that depend
    on them (the live ones follow the last value of a drag: a missing trigger leaves a stale picture), Random z and
    both encodes set every slider, an encode then shows the digit the user named (only when it worked), and no event
    of the page runs the 2-D endpoints. Components by elem_id, buttons by their text."""
    model = load_cvae(save_untrained(tmp_path / "cvae.ckpt", latent_dim=latent_dim))
    app = ui.build_app(model, (2, 0) if latent_dim == 4 else None)
    code = {1: ["z0"], 2: ["z0", "z1"], 4: ["z1", "z-1", "z0", "z-3"]}[latent_dim]  # the slider of each dimension
    moves = {(slider, "change") for slider in code}
    wiring = {  # handler -> (the events that run it, its inputs, its outputs)
        "generate_code": (moves | {("digit", "change")}, ["digit", *code], ["digit-image"]),
        "style_row_code": (moves, code, ["style-row"]),
        "manifold_code": (moves | {("digit", "change")}, ["digit", *code], ["manifold"]),
        "random_code": ({("random", "click")}, ["digit"], code),
        "style_transfer_code": ({("Encode this picture", "click")}, ["upload", "label"], ["style-row", *code]),
        "style_transfer_sketch_code": ({("Encode my drawing", "click")}, ["sketch", "label"], ["style-row", *code]),
        "generate": (set(), ["digit", "z0", "z1"], ["digit-image"]),
        "style_row": (set(), ["z0", "z1"], ["style-row"]),
        "manifold": (set(), ["digit", "z0", "z1"], ["manifold"]),
        "random_z": (set(), ["digit"], ["z0", "z1"]),
        "style_transfer": (set(), ["upload", "label"], ["style-row", "z0", "z1"]),
    }

    def name(block) -> str:
        return block.elem_id or block.value

    fns = list(app.fns.values())
    handlers = {fn.fn.__name__: fn for fn in fns if fn.fn.__name__ in wiring}
    assert set(handlers) == set(wiring)
    for handler, (triggers, inputs, outputs) in wiring.items():
        fn = handlers[handler]
        assert {(name(app.blocks[i]), event) for i, event in fn.targets} == triggers, handler
        assert ([name(b) for b in fn.inputs], [name(b) for b in fn.outputs]) == (inputs, outputs), handler
        assert getattr(fn.fn, "__wrapped__", fn.fn).__self__.model is model, handler
        assert fn.trigger_mode == ("always_last" if triggers and triggers <= moves | {("digit", "change")} else
                                   "once"), handler
        assert fn.api_visibility == ("private" if handler == "style_transfer_sketch_code" else "public"), handler
    for handler in ("style_transfer_code", "style_transfer_sketch_code"):
        (then,) = [fn for fn in fns if fn.trigger_after == handlers[handler]._id]
        assert then.trigger_only_on_success and then.fn(4) == 4, handler
        assert ([name(b) for b in then.inputs], [name(b) for b in then.outputs]) == (["label"], ["digit"]), handler
    assert len(fns) == len(wiring) + 2  # nothing else runs
    answer = handlers["random_code"].fn(4)  # what the sliders receive: Gradio hands a lone output the whole answer
    assert isinstance(answer, float) if latent_dim == 1 else len(answer) == latent_dim


@pytest.mark.parametrize("digit, z0, z1", [(0, 0.0, 0.0), (7, 1.5, -2.25), (9, -3.0, 3.0)])
def test_generate_is_the_models_decode(served, digit, z0, z1):
    _, model, client = served
    png = read_png(client.predict(digit, z0, z1, api_name="/generate"))
    want = decoded(model, [[z0, z1]], [digit])[0]
    assert png.shape == (28, 28)  # the model's own pixels; the page scales them up
    assert_same_pixels(png, want)


def test_style_row_is_every_label_at_the_same_z(served):
    _, model, client = served
    png = read_png(client.predict(-1.2, 0.7, api_name="/style_row"))
    assert png.shape == (28 * ui.ROW_SCALE, 10 * 28 * ui.ROW_SCALE)
    small = png[::ui.ROW_SCALE, ::ui.ROW_SCALE]
    assert_same_pixels(np.stack(np.split(small, 10, axis=1)), decoded(model, [[-1.2, 0.7]] * 10, list(range(10))))


def test_manifold_has_the_grid_and_a_marker_at_z(served):
    _, model, client = served
    z0, z1 = 1.2, -0.8
    pic = read_png(client.predict(3, z0, z1, api_name="/manifold"))
    side = ui.GRID * 28
    assert pic.shape == (side, side, 3)
    marker = pic[..., 0].astype(int) != pic[..., 1]
    ys, xs = np.nonzero(marker)
    assert marker.sum() > 50
    want_x, want_y = (z0 + ui.Z_RANGE) / (2 * ui.Z_RANGE) * side, (ui.Z_RANGE - z1) / (2 * ui.Z_RANGE) * side
    assert abs(xs.mean() - want_x) < 3 and abs(ys.mean() - want_y) < 3
    # Top-left cell: the smallest z0 and the largest z1 of the grid.
    centre = ui.Z_RANGE * (1 - 1 / ui.GRID)
    assert_same_pixels(pic[:28, :28, 0], decoded(model, [[-centre, centre]], [3])[0])


def test_random_z_samples_the_fitted_density(served):
    """/random_z draws from the checkpoint's fitted density: the mean of many draws for a digit sits on that digit's
    mean, within four standard errors (the test's density is narrow; a real one, with UI_CKPT, is not)."""
    _, model, client = served
    if model.fitted_prior is None:
        pytest.skip("this checkpoint has no fitted density")
    explorer = ui.Explorer(model)
    for digit in (0, 9):
        z0, z1 = client.predict(digit, api_name="/random_z")  # through the API once, then many in-process
        assert abs(z0) <= ui.Z_RANGE and abs(z1) <= ui.Z_RANGE
        draws = torch.tensor([explorer.random_z(digit) for _ in range(400)])
        weights, means = model.fitted_prior["weights"][digit], model.fitted_prior["means"][digit]
        mean = (weights[:, None] * means[:, :2]).sum(0) / weights.sum()
        spread = draws.std(0).clamp(min=0.01)
        assert ((draws.mean(0) - mean).abs() < 4 * spread / 400 ** 0.5 + 0.01).all(), (draws.mean(0), mean)
    assert ui.page_notes(explorer)[0].startswith(f"**Random z** samples from {model.describe_prior()}, so it lands")


def test_to_mnist_frames_a_digit_like_mnist(tmp_path):
    for dark_on_light in (True, False):
        x = ui.to_mnist(Image.open(digit_picture(tmp_path / "seven.png", dark_on_light)))
        assert x.shape == (28, 28) and x.min() >= 0 and x.max() <= 1
        assert x[0].max() == 0 and x[:, 0].max() == 0  # dark ground, ink in the middle
        rows, cols = np.nonzero(x > 0.2)
        assert max(np.ptp(rows), np.ptp(cols)) <= 20
        ys, xs = np.indices(x.shape)
        assert abs((ys * x).sum() / x.sum() - 14) < 1.5 and abs((xs * x).sum() / x.sum() - 14) < 1.5


def test_style_transfer_encodes_the_picture(served, tmp_path):
    _, model, client = served
    from gradio_client import handle_file

    path = digit_picture(tmp_path / "seven.png")
    row, z0, z1 = client.predict(handle_file(path), 7, api_name="/style_transfer")
    x = torch.from_numpy(ui.to_mnist(Image.open(path))).reshape(1, -1)
    with torch.no_grad():
        mean = model.encode(x, torch.tensor([7]))[0][0]
    assert (z0, z1) == (ui.to_slider(mean[0]), ui.to_slider(mean[1]))
    small = read_png(row)[::ui.ROW_SCALE, ::ui.ROW_SCALE]
    assert_same_pixels(np.stack(np.split(small, 10, axis=1)), decoded(model, [[z0, z1]] * 10, list(range(10))))
    # Light ink on dark ground (MNIST's way) lands on the same code.
    _, z0_inv, z1_inv = client.predict(handle_file(digit_picture(tmp_path / "inv.png", False)), 7,
                                       api_name="/style_transfer")
    assert abs(z0_inv - z0) <= 0.02 and abs(z1_inv - z1) <= 0.02


def bad_requests(tmp_path: Path) -> list[tuple[str, tuple, str]]:
    """(endpoint, arguments, a word the error message must contain)."""
    from gradio_client import handle_file

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = tmp_path / "tiny.png"
    Image.new("L", (2, 2), 255).save(tiny)
    blank = tmp_path / "blank.png"
    Image.new("L", (280, 280), 255).save(blank)
    seven = digit_picture(tmp_path / "seven.png")
    digit = "digit must be an integer 0-9, got "  # the UI's own message, not the model's
    return [
        ("/generate", (10, 0.0, 0.0), digit + "10"), ("/generate", (3.5, 0.0, 0.0), digit + "3.5"),
        ("/generate", (-1, 0.0, 0.0), digit + "-1"), ("/generate", ("3", 0.0, 0.0), digit + "'3'"),
        ("/generate", (True, 0.0, 0.0), digit + "True"), ("/generate", (None, 0.0, 0.0), digit + "None"),
        ("/generate", (3, "abc", 0.0), "number"),
        ("/generate", (3, 50.0, 0.0), "50"), ("/generate", (3, 0.0, -1e9), "slider range"),
        ("/style_row", (0.0, [1]), "number"), ("/manifold", (11, 0.0, 0.0), digit + "11"),
        ("/manifold", (False, 0.0, 0.0), digit + "False"), ("/random_z", (12,), digit + "12"),
        ("/random_z", (True,), digit + "True"),
        ("/style_transfer", (handle_file(text), 3), "image"), ("/style_transfer", (handle_file(tiny), 3), "2 x 2"),
        ("/style_transfer", (handle_file(blank), 3), "empty"), ("/style_transfer", (handle_file(seven), 10),
                                                                 digit + "10"),
        ("/generate_code", (3, 0.0, 50.0), "z1 = 50 is outside"), ("/generate_code", (-2, 0.0, 0.0), digit + "-2"),
        ("/style_row_code", ("x", 0.0), "z0 must be a number"), ("/manifold_code", (3.5, 0.0, 0.0), digit + "3.5"),
        ("/random_code", (12,), digit + "12"), ("/style_transfer_code", (handle_file(blank), 3), "empty"),
    ]


def test_bad_input_is_a_visible_error_and_the_next_request_works(served, tmp_path):
    from gradio_client.exceptions import AppError

    _, model, client = served
    for endpoint, args, word in bad_requests(tmp_path):
        with pytest.raises(AppError) as err:
            client.predict(*args, api_name=endpoint)
        assert word in err.value.message, (endpoint, args, err.value.message)
        assert "Traceback" not in err.value.message
    png = read_png(client.predict(4, 0.5, 0.5, api_name="/generate"))
    assert_same_pixels(png, decoded(model, [[0.5, 0.5]], [4])[0])


def test_nan_and_inf_are_refused(served):
    """gradio_client cannot send NaN (its JSON encoder refuses), but a raw HTTP client can."""
    import httpx

    url, _, client = served
    for body in ('{"data": [3, NaN, 0]}', '{"data": [3, 0, Infinity]}', '{"data": [3, -Infinity, 0]}'):
        posted = httpx.post(f"{url}gradio_api/call/generate", content=body,
                            headers={"content-type": "application/json"}, timeout=30)
        event_id = posted.json()["event_id"]
        answer = httpx.get(f"{url}gradio_api/call/generate/{event_id}", timeout=30).text
        assert "event: error" in answer and "must be a finite number" in answer, answer
    assert Path(client.predict(1, 0.0, 0.0, api_name="/generate")).exists()


def test_many_clients_at_once(served, tmp_path):
    """Three clients, 45 requests in flight, a third of them bad: every good one gets its own image."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, model, first = served
    clients = [first] + [Client(url, verbose=False, download_files=str(tmp_path / f"c{i}")) for i in range(2)]
    try:
        jobs = []
        for i in range(45):
            digit, z0 = i % 10, round(-2.5 + i / 12, 2)
            bad = i % 3 == 2
            job = clients[i % 3].submit(11 if bad else digit, z0, -z0, api_name="/generate")
            jobs.append((job, None if bad else (digit, z0)))
        for job, good in jobs:
            if good is None:
                with pytest.raises(AppError):
                    job.result(timeout=120)
            else:
                digit, z0 = good
                png = read_png(job.result(timeout=120))
                assert_same_pixels(png, decoded(model, [[z0, -z0]], [digit])[0])
    finally:
        for client in clients[1:]:
            client.close()


def test_wide_latent_slides_its_two_most_informative_dims_and_its_old_endpoints_fix_the_rest_at_zero(tmp_path,
                                                                                                     data_dir):
    model = load_cvae(save_untrained(tmp_path / "wide.ckpt", latent_dim=5))
    with torch.no_grad():  # posterior means that vary most in z[3], then z[1]
        model.encoder.mean.weight.mul_(torch.tensor([0.1, 10.0, 0.1, 20.0, 0.1])[:, None])
    dims = ui.slider_dims(model, data_dir)
    assert dims == (1, 3)
    explorer = ui.Explorer(model, dims)
    assert explorer.names == ("z[1]", "z[3]")
    assert "the sliders set z[1] and z[3]" in ui.page_notes(explorer)[1]
    assert f"the other 3 have sliders of their own under *{ui.OTHERS_TITLE}*" in ui.page_notes(explorer)[1]
    assert explorer.others == (0, 2, 4)
    assert_same_pixels(explorer.generate(2, 1.0, -1.0), decoded(model, [[0, 1.0, 0, -1.0, 0]], [2])[0])
    # The manifold's top-left cell: the smallest z[1] and the largest z[3] of the slider square.
    centre = (0.5 / ui.GRID * 2 - 1) * ui.Z_RANGE
    assert_same_pixels(explorer.unmarked_manifold(2, torch.zeros(5))[:28, :28],
                       decoded(model, [[0, centre, 0, -centre, 0]], [2])[0])
    # The fitted density of digit 4 is narrow around (-0.25, 0.2, 0, 0, 0): the sliders get its z[1] and z[3].
    assert explorer.random_z(4) == pytest.approx((0.2, 0.0), abs=0.1)
    assert isinstance(ui.build_app(model, dims), ui.gr.Blocks)  # builds (and serves nothing)
    # A 2-D latent needs no data: the sliders are the whole code.
    narrow = load_cvae(save_untrained(tmp_path / "narrow.ckpt"))
    assert ui.slider_dims(narrow, tmp_path / "no-data") is None
    assert ui.Explorer(narrow).names == ("z0", "z1")


@pytest.mark.parametrize("latent_dim, dims", [(1, None), (2, None), (4, (2, 0))])
def test_the_2d_endpoints_are_the_code_path_on_the_main_sliders(tmp_path, latent_dim, dims):
    """Each endpoint of (digit, z0, z1) answers what its code endpoint answers for the code with z0 and z1 in the main
    sliders' dimensions (z[2] and z[0] of the 4-D latent here) and 0 elsewhere, and that is the model's own decode; a
    1-D latent ignores z1 (a bad one is still refused)."""
    model = load_cvae(save_untrained(tmp_path / "cvae.ckpt", latent_dim=latent_dim))
    explorer = ui.Explorer(model, dims)
    z0, z1 = 1.25, -2.5
    code = {1: [z0], 2: [z0, z1], 4: [z1, 0.0, z0, 0.0]}[latent_dim]

    def main(values) -> tuple[float, float]:  # a code's z0 and z1
        return (values[0], 0.0) if latent_dim == 1 else tuple(values) if latent_dim == 2 else (values[2], values[0])

    assert_same_pixels(explorer.generate(6, z0, z1), decoded(model, [code], [6])[0])
    assert np.array_equal(explorer.generate(6, z0, z1), explorer.generate_code(6, *code))
    assert np.array_equal(explorer.style_row(z0, z1), explorer.style_row_code(*code))
    assert np.array_equal(explorer.manifold(6, z0, z1), explorer.manifold_code(6, *code))
    c = ui.Z_RANGE * (1 - 1 / ui.GRID)  # the top-left cell: the smallest z0, the largest z1 (the marker is far)
    corner = {1: [-c], 2: [-c, c], 4: [c, 0.0, -c, 0.0]}[latent_dim]
    assert_same_pixels(explorer.manifold(6, z0, z1)[:28, :28, 0], decoded(model, [corner], [6])[0])
    torch.manual_seed(5)
    whole = explorer.random_code(6)
    torch.manual_seed(5)
    assert explorer.random_z(6) == main(whole) and len(whole) == latent_dim
    path = str(digit_picture(tmp_path / "seven.png"))
    _, *values = explorer.style_transfer_code(path, 7)
    row, *pair = explorer.style_transfer(path, 7)
    assert tuple(pair) == main(values) and np.array_equal(row, explorer.style_row(*pair))
    if latent_dim == 1:
        assert np.array_equal(explorer.generate(6, z0, 2.0), explorer.generate(6, z0, -2.0))
        with pytest.raises(ui.gr.Error, match="z1 = 5 is outside"):
            explorer.generate(6, z0, 5.0)


def test_an_encoded_code_goes_on_the_sliders_clamped_at_both_ends_with_a_warning():
    with pytest.warns(UserWarning) as caught:  # gr.Warning outside a request is a Python warning
        assert ui.on_sliders([4.567, -3.5, 1.234]) == (3.0, -3.0, 1.23)
    assert [str(w.message) for w in caught] == ["Its z = (4.57, -3.50, 1.23) lies outside the sliders' range; shown "
                                                "at the nearest edge (3.00, -3.00, 1.23)."]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ui.on_sliders([2.999, -3.0, 0.004]) == (3.0, -3.0, 0.0)  # inside (rounded to the step): no warning


def test_the_page_builds_with_a_pillow_that_cannot_write_webp(tmp_path, monkeypatch):
    """A Pillow built from source without libwebp (pip's Pillow 9.1 on Python 3.11) has no WebP writer; every image
    the page shows at start, the sketchpad's white page included, is PNG and needs none."""
    Image.init()  # load Pillow's format plugins now, so that none registers WebP again later
    monkeypatch.delitem(Image.SAVE, "WEBP", raising=False)  # (the floor venv's Pillow has none to remove)
    with pytest.raises(KeyError):  # the situation is real: Gradio's default format cannot be written
        Image.new("RGB", (1, 1)).save(tmp_path / "x", format="webp")
    assert isinstance(ui.build_app(load_cvae(save_untrained(tmp_path / "cvae.ckpt"))), ui.gr.Blocks)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        ui.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_missing_or_damaged_checkpoint_says_train_first(tmp_path, capsys):
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    for ckpt in (tmp_path / "missing.ckpt", damaged):
        code, err = run_main(["--ckpt", str(ckpt), "--port", str(free_port())], capsys)
        assert code != 0 and err.count("\n") == 1 and err.count("python train.py") == 1, err


def test_taken_port_is_named(tmp_path, capsys):
    ckpt = save_untrained(tmp_path / "cvae.ckpt", fitted_prior=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run_main(["--ckpt", str(ckpt), "--port", str(port)], capsys)
    assert code != 0 and err.count("\n") == 1 and f"port {port}" in err and "--port" in err, err


def test_host_and_port_defaults_and_environment(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = ui.build_parser().parse_args([])
    assert (args.host, args.port, args.ckpt) == ("127.0.0.1", 7860, Path("cvae.ckpt"))
    help_text = " ".join(ui.build_parser().format_help().split())
    assert "(default: 7860)" in help_text and "(default: 127.0.0.1)" in help_text
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = ui.build_parser().parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7999)


# ----- the code endpoints of a latent wider than 2 ----------------------------------------------------------------------
WIDE_DIMS = (1, 3)  # the z-4 page's main sliders; z[0] and z[2] sit under "The other dimensions of z"


def density_model(path: Path, latent_dim: int = 4):
    """An untrained CVAE whose fitted density is a narrow Gaussian per digit at a point of its own in every dimension
    (digit 9's past both ends of the sliders' range), so a test can tell which slider got which value. Returns
    (model, the density's means)."""
    torch.manual_seed(0)
    model = CVAE(latent_dim=latent_dim)
    means = torch.tensor([[(d - 4.5) / 2, 1.0 - d / 5, 0.3 * d - 1.5, 2.0 - 0.4 * d][:latent_dim] for d in range(10)])
    means[9] = torch.tensor([4.0, -4.5, 5.0, -3.5][:latent_dim])
    model.fitted_prior = {"kind": "per-class", "weights": torch.ones(10, 1), "means": means[:, None],
                          "scale_tril": 0.001 * torch.eye(latent_dim).repeat(10, 1, 1, 1)}
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return load_cvae(path), means


def test_the_code_endpoints_decode_every_dimension(tmp_path):
    model, means = density_model(tmp_path / "wide.ckpt")
    explorer = ui.Explorer(model, WIDE_DIMS)
    code = [0.5, -1.0, 1.5, 2.0]
    assert_same_pixels(explorer.generate_code(3, *code), decoded(model, [code], [3])[0])
    row = explorer.style_row_code(*code)[::ui.ROW_SCALE, ::ui.ROW_SCALE]
    for digit in range(10):
        assert_same_pixels(row[:, digit * 28:(digit + 1) * 28], decoded(model, [code], [digit])[0])
    # The manifold: the main sliders' square, the other dimensions at the code's values.
    centre = (0.5 / ui.GRID * 2 - 1) * ui.Z_RANGE  # the top-left cell: the smallest z[1], the largest z[3]
    shown = explorer.manifold_code(3, *code)  # RGB, the marker at z[1] = -1, z[3] = 2: far from the top-left cell
    assert_same_pixels(shown[:28, :28, 0], decoded(model, [[0.5, centre, 1.5, -centre]], [3])[0])
    assert not np.array_equal(shown, explorer.manifold(3, -1.0, 2.0))  # the other dimensions matter
    assert explorer.random_code(4) == pytest.approx(means[4].tolist(), abs=0.01)
    assert explorer.random_code(9) == (3.0, -3.0, 3.0, -3.0)  # clamped to the sliders' range
    with pytest.raises(ui.gr.Error, match="expected 4 values"):
        explorer.generate_code(3, 0.0, 0.0)
    with pytest.raises(ui.gr.Error, match=r"z\[2\] = 4 is outside"):
        explorer.generate_code(3, 0.0, 0.0, 4.0, 0.0)
    # Encoding gives the whole code: the row is that code's, the values its posterior mean (within the range).
    path = digit_picture(tmp_path / "seven.png")
    row, *values = explorer.style_transfer_code(str(path), 7)
    x = torch.from_numpy(ui.to_mnist(Image.open(path))).reshape(1, -1)
    with torch.no_grad():
        mean = model.encode(x, torch.tensor([7]))[0][0]
    assert values == [ui.to_slider(v) for v in mean.tolist()]
    assert np.array_equal(row, explorer.style_row_code(*values))


# ----- the page in a real browser ----------------------------------------------------------------------------------------
def browser_or_skip() -> str:
    """Debian's chromium and Playwright for Python; missing ones fail the test under CI and skip it elsewhere."""
    problem = None
    if not CHROMIUM.exists():
        problem = f"no browser at {CHROMIUM}: install the Debian package `chromium` (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright for Python is missing: pip install -r requirements-dev.txt"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return str(CHROMIUM)


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium under Playwright, shared by the browser tests of this module."""
    executable = browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def draw_a_seven(page) -> None:
    """Three strokes of the mouse on the sketchpad's canvas: a 7."""
    canvas = page.locator("#sketch canvas").first.bounding_box()
    side = canvas["height"]
    left, top = canvas["x"] + (canvas["width"] - side) / 2, canvas["y"]
    page.mouse.move(left + 0.3 * side, top + 0.2 * side)
    page.mouse.down()
    for fx, fy in ((0.7, 0.22), (0.45, 0.85)):
        page.mouse.move(left + fx * side, top + fy * side, steps=1)
    page.mouse.up()


def test_page_in_a_real_browser(served, chromium, tmp_path):
    """The z-2 page in headless Chromium: the digit is shown large; dragging z0 changes the picture while the button
    is still held (live, no Generate button); an empty drawing gets a message, a drawn 7 moves the sliders. Then save
    a screenshot."""
    from playwright.sync_api import expect

    url, model, _ = served
    screenshot = Path(SCREENSHOT or tmp_path / "ui_screenshot.png")
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url)
        image, row = page.locator("#digit-image img"), page.locator("#style-row img")
        z0, z1 = page.locator("#z0 input[type=number]"), page.locator("#z1 input[type=number]")
        expect(image).to_be_visible(timeout=60_000)
        # The server sends the digit at 28 x 28; the page must show it large, not as a 28 px thumbnail.
        assert image.evaluate("img => img.naturalWidth") == 28
        shown = image.bounding_box()
        assert min(shown["width"], shown["height"]) >= 250, shown
        expect(page.get_by_text("Same style, all ten digits")).to_be_visible()
        expect(page.get_by_text("fitted" if model.fitted_prior is not None else "N(0, I)").first).to_be_visible()

        before, row_before = image.get_attribute("src"), row.get_attribute("src")
        track = page.locator("#z0 input[type=range]").bounding_box()
        y = track["y"] + track["height"] / 2
        page.mouse.move(track["x"] + track["width"] / 2, y)
        page.mouse.down()
        page.mouse.move(track["x"] + track["width"] * 0.8, y, steps=4)
        expect(image).not_to_have_attribute("src", before, timeout=60_000)  # the button is still held
        page.mouse.up()
        expect(row).not_to_have_attribute("src", row_before, timeout=60_000)
        assert float(z0.input_value()) > 0.5

        # An untouched sketchpad gets a message, not a stack trace; a drawn 7 moves the sliders to its code.
        page.locator("#sketch").scroll_into_view_if_needed()
        page.get_by_role("button", name="Encode my drawing").click()
        expect(page.get_by_text("is empty").first).to_be_visible(timeout=60_000)
        draw_a_seven(page)
        dragged = (z0.input_value(), z1.input_value())
        page.get_by_role("button", name="Encode my drawing").click()
        page.wait_for_function(
            "s => document.querySelector('#z0 input[type=number]').value !== s[0]"
            " || document.querySelector('#z1 input[type=number]').value !== s[1]", arg=dragged, timeout=60_000)
        expect(page.locator("#digit input[type=radio]:checked")).to_have_value("7")  # "It is a 7" is shown

        page.locator("body").evaluate("() => window.scrollTo(0, 0)")
        page.wait_for_function("() => [...document.images].every(image => image.complete)")  # all pictures in
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        page.close()
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def fetch_picture(src: str) -> np.ndarray | None:
    """The pixels of a picture the page shows, fetched from its src; None when the page was just replacing it (the old
    file gone, or the new one not yet whole)."""
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(src, timeout=60) as response:
            return np.asarray(Image.open(io.BytesIO(response.read())))
    except (OSError, http.client.HTTPException):  # HTTPError, URLError, IncompleteRead, UnidentifiedImageError
        return None


class BrowserPage:
    """The explorer's page in the browser as a user meets it, beside the Explorer that says what it must show."""

    PICTURES = ("#digit-image", "#style-row", "#manifold")

    def __init__(self, page, explorer: ui.Explorer):
        self.page, self.explorer = page, explorer
        main = dict(zip(explorer.dims, ("#z0", "#z1")))
        self.boxes = [f"{main.get(i, f'#z-{i}')} input[type=number]" for i in range(explorer.latent_dim)]

    def code(self) -> list[float]:
        """The sliders' values in latent order, each within the sliders' range."""
        values = [float(self.page.locator(box).input_value()) for box in self.boxes]
        assert all(-ui.Z_RANGE <= v <= ui.Z_RANGE for v in values), values
        return values

    def digit(self) -> int:
        return int(self.page.locator("#digit input[type=radio]:checked").input_value())

    def pick(self, radio: str, digit: int) -> None:
        from playwright.sync_api import expect

        self.page.locator(f"{radio} label").filter(has_text=str(digit)).click()
        expect(self.page.locator(f"{radio} input[type=radio]:checked")).to_have_value(str(digit), timeout=60_000)

    def set_slider(self, dim: int, value: float) -> None:
        from playwright.sync_api import expect

        box = self.page.locator(self.boxes[dim])
        box.fill(str(value))
        box.press("Enter")
        expect(box).to_have_value(str(value), timeout=60_000)

    def wait_for_code(self, want: list[float], tol: float = 1e-6) -> None:
        """Until every slider shows its value of `want` (within `tol`)."""
        self.page.wait_for_function(
            "([boxes, want, tol]) => boxes.every((box, i) =>"
            " Math.abs(document.querySelector(box).value - want[i]) <= tol)",
            arg=[self.boxes, list(want), tol], timeout=120_000)
        assert self.code() == pytest.approx(want, abs=tol)

    def pictures(self, digit: int, code: list[float]) -> dict[str, np.ndarray]:
        """What the three pictures must be for this digit and code."""
        return dict(zip(self.PICTURES, (self.explorer.generate_code(digit, *code),
                                        self.explorer.style_row_code(*code),
                                        self.explorer.manifold_code(digit, *code))))

    def shows(self, digit: int, code: list[float]) -> None:
        """Each picture becomes the model's for this digit and code: compared each time the page replaces it (the live
        events draw the last change; an event that does not fire leaves the old picture, and the wait runs out)."""
        for selector, want in self.pictures(digit, code).items():
            src, shown = self.picture_shown(f"{selector} img")
            while not same_pixels(shown, want):
                src, shown = self.picture_shown(f"{selector} img", src)

    def picture_shown(self, img: str, old: str | None = None) -> tuple[str, np.ndarray | None]:
        """(src, pixels) of the picture at `img` once it is loaded and its src is not `old` (2 minutes at most); the
        pixels are None when the server could not send them whole, even when asked again and again."""
        src = self.page.wait_for_function(
            "([img, old]) => { const i = document.querySelector(img);"
            " return i && i.complete && i.getAttribute('src') !== old && i.getAttribute('src'); }",
            arg=[img, old], timeout=120_000).json_value()
        for _ in range(50):  # a busy server sometimes ends a response early (IncompleteRead)
            shown = fetch_picture(src)
            if shown is not None:
                break
        return src, shown

    def encode(self, label: int, picture: Path | None = None) -> None:
        """Name the digit `label` and encode `picture` (an upload), or the drawing when there is none."""
        self.pick("#label", label)
        if picture is not None:
            self.page.get_by_role("tab", name="Upload").click()
            self.page.locator("#upload input[type=file]").set_input_files(str(picture))
            self.page.get_by_role("button", name="Encode this picture").click()
        else:
            self.page.get_by_role("tab", name="Draw").click()
            self.page.get_by_role("button", name="Encode my drawing").click()


def on_the_slider(value: float) -> float:
    """Where a slider shows a value: clamped to the range, rounded to the step (0.0, not -0.0)."""
    return min(max(round(value, 2), -ui.Z_RANGE), ui.Z_RANGE) + 0.0


def push_encoder(model) -> torch.Tensor:
    """Shift the model's posterior means by the returned vector (zeros until a test sets it): a test can then send the
    code of any picture past the sliders' range, at either end."""
    push = torch.zeros(model.hparams.latent_dim)
    encode = model.encode

    def pushed(x: torch.Tensor, y: torch.Tensor):
        mean, logvar = encode(x, y)
        return mean + push.to(mean), logvar

    model.encode = pushed
    return push


@pytest.mark.parametrize("latent_dim", [2, 4])
def test_every_page_event_in_a_real_browser(chromium, tmp_path, latent_dim):
    """The page in headless Chromium, at z 2 and z 4. Every event is proven by what the user then sees: each slider's
    change redraws the three pictures (the model's for the code the sliders show) and moves no other slider; the
    digit's redraws them too; Random z sets every slider to the digit's sample, clamped to the range; an encode,
    uploaded or drawn, sets the digit to the label the user named and every slider to the picture's code, clamped at
    both ends of the range with a warning."""
    from playwright.sync_api import expect

    model, means = density_model(tmp_path / "cvae.ckpt", latent_dim)
    push = push_encoder(model)
    dims = WIDE_DIMS if latent_dim == 4 else None
    explorer = ui.Explorer(model, dims)
    app = ui.build_app(model, dims)
    url = launch_on_a_free_port(app)
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(url)
        expect(page.locator("#digit-image img")).to_be_visible(timeout=60_000)
        if explorer.others:
            page.get_by_role("button", name=ui.OTHERS_TITLE).click()
            expect(page.locator("#z-2 input[type=number]")).to_be_visible(timeout=60_000)
        user = BrowserPage(page, explorer)
        user.shows(7, [0.0] * latent_dim)
        check_sliders_and_digit(user)
        check_random_z(user, means)
        check_encodes(user, push, tmp_path)
    finally:
        page.close()
        app.close()


def check_sliders_and_digit(user: BrowserPage) -> None:
    """Each slider in turn, the other dimensions' and the main ones': it alone moves, and every picture follows (each
    one is a different picture for the new code, so a slider whose change redraws nothing fails). Then the digit."""
    want = [0.0] * user.explorer.latent_dim
    for dim in sorted(range(len(want)), key=lambda i: i in user.explorer.dims):  # the other dimensions first
        before = user.pictures(7, want)
        want[dim] = round(1.25 - 0.75 * dim, 2)
        user.set_slider(dim, want[dim])
        assert user.code() == want and user.digit() == 7
        assert all(not np.array_equal(before[s], after) for s, after in user.pictures(7, want).items())
        user.shows(7, want)
    user.pick("#digit", 2)
    assert user.code() == want
    user.shows(2, want)


def check_random_z(user: BrowserPage, means: torch.Tensor) -> None:
    """Random z: every slider at the digit's narrow density, clamped to the range (digit 9's lies past both ends)."""
    for digit in (2, 9):
        user.pick("#digit", digit)
        user.page.get_by_role("button", name="Random z").click()
        user.wait_for_code([on_the_slider(v) for v in means[digit].tolist()], tol=0.02)
        assert user.digit() == digit and (digit != 9 or {abs(v) for v in user.code()} == {ui.Z_RANGE})
        user.shows(digit, user.code())


def check_encodes(user: BrowserPage, push: torch.Tensor, tmp_path: Path) -> None:
    """An upload and a drawing, each inside the range and then pushed past both ends of it: the digit becomes the
    label the user named, every slider the picture's code (clamped, with the warning), and the pictures follow."""
    from playwright.sync_api import expect

    page, explorer = user.page, user.explorer
    picture = digit_picture(tmp_path / "seven.png")
    far = torch.tensor([6.0, -6.0, 0.0, 0.0][:explorer.latent_dim])  # past the top of z[0], the bottom of z[1]
    for label, shift in ((3, 0.0), (8, far)):
        push[:] = shift
        x = explorer.model.observe(torch.from_numpy(ui.to_mnist(Image.open(picture))).reshape(1, -1))
        with torch.no_grad():
            code = explorer.model.encode(x, torch.tensor([label]))[0][0].tolist()
        want = [on_the_slider(v) for v in code]
        assert (want[:2] == [3.0, -3.0]) if label == 8 else max(map(abs, code)) < ui.Z_RANGE  # clamped, or inside
        user.encode(label, picture)
        user.wait_for_code(want)
        expect(page.locator("#digit input[type=radio]:checked")).to_have_value(str(label), timeout=60_000)
        if label == 8:
            edge = ", ".join(f"{v:.2f}" for v in want)
            expect(page.get_by_text(f"shown at the nearest edge ({edge})").first).to_be_visible(timeout=60_000)
        else:
            assert page.get_by_text("lies outside the sliders' range").count() == 0
        user.shows(label, want)
    # The drawing: its code inside the range, then the same drawing pushed past both ends (its other values kept).
    push[:] = 0.0
    page.get_by_role("tab", name="Draw").click()
    draw_a_seven(page)
    user.encode(5)
    expect(page.locator("#digit input[type=radio]:checked")).to_have_value("5", timeout=60_000)
    drawn = user.code()
    user.shows(5, drawn)
    push[:] = far
    user.encode(5)
    want = [on_the_slider(v + s) for v, s in zip(drawn, far.tolist())]
    user.wait_for_code(want)
    edge = ", ".join(f"{v:.2f}" for v in want)
    expect(page.get_by_text(f"shown at the nearest edge ({edge})").first).to_be_visible(timeout=60_000)
    user.shows(5, want)
