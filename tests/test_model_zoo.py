"""Pretrained detectors by name: download from a mirror, check, convert, cache; offline says what to do."""

import hashlib
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from ultralytics.utils import ROOT, SETTINGS, YAML

from deim_ultra import DEIM, convert_official
from deim_ultra.nn.tasks import DEIMDetectionModel
from deim_ultra.official_names import official_namer

from helpers import deim_cli, hugging_face_layout, official_weights

COCO_NAMES = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server on 127.0.0.1 serving the folder `tmp_path / "mirror"`; yields (folder, base URL, stop)."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        server.shutdown()
        server.server_close()

    yield folder, f"http://127.0.0.1:{server.server_address[1]}", stop
    if thread.is_alive():
        stop()


@pytest.fixture
def weights_dir(tmp_path):
    """An empty Ultralytics weights directory for the test (restored afterwards)."""
    before = SETTINGS["weights_dir"]
    SETTINGS.update(weights_dir=str(tmp_path / "weights"))
    yield tmp_path / "weights"
    SETTINGS.update(weights_dir=before)


def official_dfine_s(path) -> dict[str, torch.Tensor]:
    """A D-FINE-S checkpoint in the authors' layout (`{"model": state dict}` under their key names), random weights."""
    torch.manual_seed(0)
    model = DEIMDetectionModel("dfine-s.yaml", verbose=False)
    namer = official_namer(model)
    state = {namer(k): v for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return state


def test_a_name_downloads_converts_caches_and_works_offline_afterwards(mirror, weights_dir, monkeypatch):
    folder, url, stop = mirror
    state = official_dfine_s(folder / "dfine_s_obj2coco.pth")
    monkeypatch.setenv("DEIM_WEIGHTS_URL", url)
    image = (np.random.default_rng(0).random((320, 320, 3)) * 255).astype(np.uint8)
    first = DEIM("dfine-s-obj2coco.pt")
    cached = weights_dir / "dfine-s-obj2coco.pt"
    assert cached.is_file() and not (weights_dir / "dfine_s_obj2coco.pth").exists()
    source = torch.load(cached, weights_only=False)["source"]
    served = (folder / "dfine_s_obj2coco.pth").read_bytes()
    assert source == {
        "file": "dfine_s_obj2coco.pth",
        "url": f"{url}/dfine_s_obj2coco.pth",
        "sha256": hashlib.sha256(served).hexdigest(),
    }
    assert first.model.names == COCO_NAMES
    assert isinstance(first.model.model[-1].decoder.layers[0].act, torch.nn.ReLU)  # D-FINE's decoder, not DEIM's

    stop()
    (folder / "dfine_s_obj2coco.pth").unlink()
    second = DEIM("dfine-s-obj2coco.pt")  # from the cache: no server, no file to download
    kwargs = dict(imgsz=320, conf=0.0, max_det=20, verbose=False)
    boxes = second.predict(image, **kwargs)[0].boxes
    reference = convert_official(state, "dfine-s.yaml").predict(image, **kwargs)[0].boxes
    assert len(boxes) == 20 and torch.allclose(boxes.conf, reference.conf, atol=1e-5)
    assert torch.allclose(boxes.xyxy, reference.xyxy, atol=1e-3)


def test_deimv2_by_name_downloads_the_hugging_face_weights(mirror, weights_dir, monkeypatch):
    folder, url, _ = mirror
    state = official_weights("deimv2-n.yaml")
    save_file(hugging_face_layout(state), folder / "DEIMv2_HGNetv2_N_COCO.safetensors")
    monkeypatch.setenv("DEIM_WEIGHTS_URL", url)
    model = DEIM("deimv2-n.pt")
    source = torch.load(weights_dir / "deimv2-n.pt", weights_only=False)["source"]
    assert source["url"] == f"{url}/DEIMv2_HGNetv2_N_COCO.safetensors"
    assert model.model.names == COCO_NAMES
    assert torch.equal(eval_logits(model), eval_logits(convert_official(state, "deimv2-n.yaml")))


def test_deimv2_offline_names_the_hugging_face_file(weights_dir):
    fix = "https://huggingface.co/Intellindust/DEIMv2_HGNetv2_PICO_COCO/resolve/main/model.safetensors"
    with pytest.raises(FileNotFoundError, match=f"offline.*Fix: download {fix} to .*DEIMv2_HGNetv2_PICO_COCO"):
        DEIM("deimv2-pico.pt")


def test_a_hugging_face_folder_put_in_the_weights_dir_is_converted_without_download(weights_dir):
    state = official_weights("deimv2-pico.yaml")
    repository = weights_dir / "DEIMv2_HGNetv2_PICO_COCO"  # what `huggingface-cli download` leaves
    repository.mkdir(parents=True)
    save_file(hugging_face_layout(state), repository / "model.safetensors")
    model = DEIM("deimv2-pico.pt")  # offline (the tests set YOLO_OFFLINE): nothing to download
    assert (weights_dir / "deimv2-pico.pt").is_file()
    assert torch.equal(eval_logits(model), eval_logits(convert_official(state, "deimv2-pico.yaml")))


def test_a_truncated_safetensors_download_is_refused(mirror, weights_dir, monkeypatch):
    folder, url, _ = mirror
    path = folder / "DEIMv2_HGNetv2_ATTO_COCO.safetensors"
    save_file(hugging_face_layout(official_weights("deimv2-n.yaml")), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    monkeypatch.setenv("DEIM_WEIGHTS_URL", url)
    with pytest.raises(ValueError, match="incomplete or corrupt .safetensors"):
        DEIM("deimv2-atto.pt")
    assert not list(weights_dir.glob("*.pt"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>", "is an HTML page"),
        (None, "incomplete or corrupt file"),
    ],
)
def test_a_bad_download_is_refused_and_not_cached(mirror, weights_dir, monkeypatch, content, message):
    folder, url, _ = mirror
    path = folder / "dfine_s_coco.pth"
    if content is None:  # a truncated checkpoint: the first half of a real one
        official_dfine_s(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content * (1 if len(content) > 1000 else 50))  # over the minimum size a download must have
    monkeypatch.setenv("DEIM_WEIGHTS_URL", url)
    with pytest.raises(ValueError, match=message):
        DEIM("dfine-s.pt")
    assert not list(weights_dir.glob("*.pt")) and not list(weights_dir.glob("*.pth"))


def test_offline_cli_names_the_url_and_where_to_put_the_file(tmp_path):
    env = {"YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    result = deim_cli("predict", "model=deim-s.pt", "source=bus.jpg", cwd=tmp_path, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if "deim_dfine_hgnetv2_s_coco_120e.pth" in line]
    assert len(lines) == 1, out
    assert "https://drive.google.com/file/d/1tB8gVJNrfb6dhFvoHJECKOF5VpkthhfC/view" in lines[0]
    assert "weights" in lines[0] and "offline" in lines[0]


IMAGES = torch.rand(1, 3, 640, 640, generator=torch.Generator().manual_seed(0))


def eval_logits(model: DEIM) -> torch.Tensor:
    with torch.no_grad():
        return model.model.eval()(IMAGES)[1][-1]["pred_logits"]


def test_an_official_file_put_in_the_weights_dir_is_converted_without_download(weights_dir):
    weights_dir.mkdir()
    state = official_weights()
    torch.save({"model": state}, weights_dir / "deim_dfine_hgnetv2_n_coco_160e.pth")
    model = DEIM("deim-n.pt")  # offline (the tests set YOLO_OFFLINE): nothing to download
    assert (weights_dir / "deim-n.pt").is_file()
    assert torch.equal(eval_logits(model), eval_logits(convert_official(state, "deim-n.yaml")))


def test_a_bare_name_is_found_in_the_weights_dir_as_ultralytics_finds_it(weights_dir, tmp_path, monkeypatch):
    weights_dir.mkdir()
    DEIM("deim-n.yaml").save(weights_dir / "my_detector.pt")
    monkeypatch.chdir(tmp_path)  # not the current directory
    assert DEIM("my_detector.pt").ckpt_path == str(weights_dir / "my_detector.pt")
    with pytest.raises(FileNotFoundError, match=f"neither as a file, in {weights_dir}, nor among the pretrained"):
        DEIM("other.pt")


def test_an_official_pth_converts_on_the_fly_by_its_shapes(tmp_path, caplog):
    path, state = tmp_path / "my_finetune.pth", official_weights()
    torch.save({"model": state}, path)
    with caplog.at_level("INFO", logger="ultralytics"):
        model = DEIM(path)
    assert "with deim-n.yaml (chosen by tensor shapes" in caplog.text
    assert torch.equal(eval_logits(model), eval_logits(convert_official(state, "deim-n.yaml")))
    assert model.model.names[0] == "person"


def test_an_unknown_missing_checkpoint_lists_the_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="deim-q.pt' not found.*dfine-s-obj2coco.pt"):
        DEIM(tmp_path / "deim-q.pt")


def train_one_epoch(yaml: str, pretrained: str, data, project) -> dict[str, torch.Tensor]:
    """Train `yaml` from `pretrained` for one tiny epoch; return the weights training started from."""
    seen = {}
    model = DEIM(yaml)
    model.add_callback("on_train_start", lambda t: seen.update({k: v.clone() for k, v in t.model.state_dict().items()}))
    kwargs = dict(epochs=1, imgsz=64, batch=4, workers=0, plots=False, val=False, project=str(project))
    model.train(data=str(data), pretrained=pretrained, **kwargs)
    return seen


def test_pretrained_accepts_a_name(weights_dir, tiny_data, tmp_path):
    """`train(pretrained="deim-n.pt")` from a YAML starts from the named weights, as `yolo train pretrained=` does."""
    weights_dir.mkdir()
    state = official_weights()
    torch.save({"model": state}, weights_dir / "deim_dfine_hgnetv2_n_coco_160e.pth")
    seen = train_one_epoch("deim-n.yaml", "deim-n.pt", tiny_data, tmp_path)
    assert torch.equal(seen["model.0.stem1.conv.weight"], state["backbone.stem.stem1.conv.weight"])


def test_an_html_page_put_in_the_weights_dir_by_hand_is_named(weights_dir):
    """What `wget <Drive link>` saves: the user followed the offline message, the file is Drive's HTML page."""
    weights_dir.mkdir()
    (weights_dir / "dfine_n_coco.pth").write_bytes(b"<!DOCTYPE html><html><head><title>Google Drive</title>" * 40)
    with pytest.raises(ValueError, match=r"dfine_n_coco.pth' is an HTML page.*Fix: download https://github.com"):
        DEIM("dfine-n.pt")
    assert not (weights_dir / "dfine-n.pt").exists()


def test_a_mirror_without_the_file_says_so_and_names_the_authors_url(mirror, weights_dir, monkeypatch):
    _, url, _ = mirror
    monkeypatch.setenv("DEIM_WEIGHTS_URL", url)
    with pytest.raises(FileNotFoundError) as error:
        DEIM("dfine-n.pt")
    assert f"download of {url}/dfine_n_coco.pth failed (HTTP 404)" in str(error.value)
    assert "Fix: download https://github.com/Peterande/storage/releases/download/dfinev1.0/dfine_n_coco.pth" in str(
        error.value
    )


def test_cli_convert_without_a_model_chooses_like_deim_does(tmp_path):
    torch.save({"model": official_weights("dfine-n.yaml")}, tmp_path / "dfine_custom.pth")
    result = deim_cli("convert", "weights=dfine_custom.pth", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "with dfine-n.yaml (chosen by tensor shapes" in result.stdout + result.stderr
    model = torch.load(tmp_path / "dfine_custom.pt", weights_only=False)["model"]
    assert isinstance(model.model[-1].decoder.layers[0].act, torch.nn.ReLU)


def test_pretrained_of_another_yaml_warns(weights_dir, tiny_data, tmp_path, caplog):
    weights_dir.mkdir()
    torch.save({"model": official_weights("dfine-n.yaml")}, weights_dir / "dfine_n_coco.pth")
    caplog.set_level("WARNING", logger="ultralytics")
    train_one_epoch("deim-n.yaml", "dfine-n.pt", tiny_data, tmp_path)
    assert "pretrained=dfine-n.pt was trained as dfine-n.yaml, but this model is deim-n.yaml" in caplog.text


def test_an_objects365_head_gets_objects365_names(weights_dir):
    """The authors' Objects365 heads have 366 rows (labels are the dataset's 1-based category ids, row 0 unused)."""
    weights_dir.mkdir()
    torch.save({"model": official_weights("dfine-s.yaml", nc=366)}, weights_dir / "dfine_s_obj365.pth")
    names = DEIM("dfine-s-obj365.pt").model.names
    objects365 = YAML.load(ROOT / "cfg" / "datasets" / "Objects365.yaml")["names"]
    assert len(names) == 366 and names[0] == "unused"
    assert names[1] == objects365[0] == "Person" and names[365] == objects365[364]
