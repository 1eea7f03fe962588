"""Pretrained networks from local files, offline; named errors when neither a file nor the network works.

Every test here runs with the network cut (sockets refuse to connect, the Hugging Face hub is offline, the
torch hub cache is an empty temporary folder), so nothing can be fetched even by accident.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torchvision

import models.lpips as lpips_mod
from models.foundation import FoundationModel
from models.lpips import LPIPS
from models.weights import PretrainedWeightsError, export_weights, read_state_dict

SMALL_DINO = "vit_small_patch14_dinov2"


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network disabled in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision VGG16 state_dict with random weights, in torchvision's own key layout."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vgg16.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "heads.pth"
    torch.save(
        {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
        path,
    )
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_foundation_loads_from_file(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    random = FoundationModel(timm_name=SMALL_DINO, pretrained=False)
    path = tmp_path / f"dino{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(random.model.state_dict(), str(path))
    else:
        torch.save(random.model.state_dict(), path)
    loaded = FoundationModel(timm_name=SMALL_DINO, weights=path)
    for k, v in random.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    f = loaded(x)
    assert f.shape == (2, 384, 16, 16)  # 256 → resize 224 → 16×16 patches of 14
    torch.testing.assert_close(f, random(x))
    assert not f.requires_grad and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training


def test_foundation_reference_path_matches_timm(tmp_path: Path) -> None:
    """Features = forward_features(bilinear 224 resize of the [-1, 1] image)[:, 1:] as a map (§1.2)."""
    torch.manual_seed(0)
    m = FoundationModel(timm_name=SMALL_DINO, pretrained=False)
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    tokens = m.model.forward_features(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear"))
    expected = tokens[:, 1:].reshape(1, 16, 16, 384).permute(0, 3, 1, 2)
    torch.testing.assert_close(m(x), expected)
    normed = FoundationModel(timm_name=SMALL_DINO, pretrained=False, imagenet_norm=True)
    normed.load_state_dict(m.state_dict())
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(normed(x), m(((x + 1) / 2 - mean) / std))
    # MAE path: no resize, 256 input, patch 16 → 16×16 (a small ViT stands in for ViT-L/16)
    mae = FoundationModel("mae", timm_name="vit_small_patch16_224", pretrained=False)
    assert mae.resize == 0 and mae(x).shape == (1, 384, 16, 16)


def test_lpips_loads_from_files(vgg_file: Path, heads_file: Path) -> None:
    m = LPIPS(vgg_weights=vgg_file, heads_weights=heads_file)
    tv = torch.load(vgg_file, weights_only=True)
    sd = m.state_dict()
    assert torch.equal(sd["net.slice1.0.weight"], tv["features.0.weight"])
    assert torch.equal(sd["net.slice3.14.bias"], tv["features.14.bias"])
    assert torch.equal(sd["net.slice5.28.weight"], tv["features.28.weight"])
    assert torch.equal(
        sd["lin4.model.1.weight"], torch.load(heads_file, weights_only=True)["lin4.model.1.weight"]
    )
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    d = m(x, x.flip(0))
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert m(x, x).abs().max().item() == 0.0
    assert not any(p.requires_grad for p in m.parameters())


def test_lpips_matches_lpips_package(vgg_file: Path, heads_file: Path) -> None:
    import lpips  # a dependency of ldit (its heads file is read): a missing package is a failure, not a skip

    ours = LPIPS(vgg_weights=vgg_file, heads_weights=heads_file)
    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=False)
    for i in range(5):  # the package keeps its heads twice (lin{i} and lins.{i})
        assert torch.equal(ref.lins[i].model[1].weight, ours.state_dict()[f"lin{i}.model.1.weight"])
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(ours(x, y), ref(x, y))


def test_lpips_heads_default_from_package(vgg_file: Path, tmp_path: Path) -> None:
    m = LPIPS(vgg_weights=vgg_file)
    heads = read_state_dict(lpips_mod.lpips_package_heads_file())
    assert torch.equal(m.lin0.model[1].weight, heads["lin0.model.1.weight"])
    assert heads["lin0.model.1.weight"].shape == (1, 64, 1, 1)
    out = export_weights("lpips_heads", tmp_path / "heads.safetensors")
    assert torch.equal(read_state_dict(out)["lin3.model.1.weight"], heads["lin3.model.1.weight"])


def test_missing_file_is_named_error(vgg_file: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        LPIPS(vgg_weights=vgg_file, heads_weights="/nonexistent/heads.pth")
    msg = str(err.value)
    assert "LPIPS linear heads (v0.1 vgg): weights file '/nonexistent/heads.pth'" in msg
    assert "(set by `vavae.lpips_weights`) does not exist" in msg
    assert "pip install lpips && python -m models.weights lpips_heads" in msg

    with pytest.raises(PretrainedWeightsError) as err:
        FoundationModel(timm_name=SMALL_DINO, weights="/nonexistent/dino.pth", config_key="vavae.vf.weights")
    assert "(set by `vavae.vf.weights`) does not exist" in str(err.value)


def test_no_file_and_no_network_is_named_error(
    monkeypatch: pytest.MonkeyPatch, vgg_file: Path, heads_file: Path
) -> None:
    with pytest.raises(PretrainedWeightsError) as err:
        LPIPS(heads_weights=heads_file)
    msg = str(err.value)
    assert msg.startswith(
        "LPIPS VGG16 trunk (torchvision vgg16 IMAGENET1K_V1): no local weights file was given"
    )
    assert "the download failed (URLError" in msg
    assert "Set `vavae.vgg16_weights` to a local copy of a torchvision VGG16 state_dict" in msg
    assert "python -m models.weights vgg16 vgg16_features.pth" in msg

    with pytest.raises(PretrainedWeightsError) as err:
        FoundationModel(timm_name=SMALL_DINO)
    msg = str(err.value)
    assert msg.startswith(f"dinov2 foundation model (timm {SMALL_DINO}): no local weights file was given")
    assert "Set `vavae.foundation_weights` to a local copy of a timm state_dict" in msg
    assert f"python -m models.weights dinov2 dinov2.pth --timm-name {SMALL_DINO}" in msg

    with pytest.raises(
        PretrainedWeightsError, match="downloads are disabled. Set `vavae.foundation_weights`"
    ):
        FoundationModel(allow_download=False)

    def not_installed() -> Path:
        raise ModuleNotFoundError("the `lpips` package is not installed (pip install lpips)")

    monkeypatch.setattr(lpips_mod, "lpips_package_heads_file", not_installed)
    with pytest.raises(PretrainedWeightsError) as err:
        LPIPS(vgg_weights=vgg_file)
    msg = str(err.value)
    assert msg.startswith(
        "LPIPS linear heads (v0.1 vgg): no local weights file was given and the download failed"
    )
    assert "(ModuleNotFoundError: the `lpips` package is not installed (pip install lpips))" in msg
    assert "Set `vavae.lpips_weights` to a local copy of lpips/weights/v0.1/vgg.pth" in msg


def test_nothing_is_fetched_at_import() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise SystemExit('network used at import')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "import models.weights, models.vavae, models.lpips, models.foundation, models.discriminator\n"
        "import models.vavae_losses\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- Files a user hands us, and the files our libraries would load on our behalf, are never unpickled ----


class _Payload:
    """Pickles as a call of ``eval``: what a malicious ``.pth`` holds. Unpickling it appends to ``marker`` and
    then yields a zero tensor of ``shape``, so a loader that unpickles fully gets a complete state_dict and
    reports nothing, as a real attack would."""

    def __init__(self, marker: Path, shape: tuple[int, ...]) -> None:
        self.marker, self.shape = marker, shape

    def __reduce__(self) -> tuple[object, tuple[str]]:
        code = f"[open({str(self.marker)!r}, 'a').write('ran'), __import__('torch').zeros({self.shape!r})][1]"
        return eval, (code,)


def _poisoned(sd: dict[str, torch.Tensor], marker: Path, out: Path) -> Path:
    """``sd`` written with torch.save to ``out``, its first floating-point tensor replaced by a payload."""
    key = next(k for k, v in sd.items() if v.is_floating_point())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**sd, key: _Payload(marker, tuple(sd[key].shape))}, out)
    return out


@pytest.fixture(scope="module")
def inception_sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    from eval.inception import random_weights

    return read_state_dict(random_weights(tmp_path_factory.mktemp("w") / "inception.pth"))


def _hub_cache(name: str) -> Path:
    """Where torch.hub's load_state_dict_from_url keeps (and finds) ``name``: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / name


# Each case: (what the user sets, which network names the error, the export command the error gives).
UNTRUSTED = {
    "inception_weights": ("`eval.inception_weights`", "FID Inception-v3", "python -m eval.inception"),
    "inception_hub_cache": ("`eval.inception_weights`", "FID Inception-v3", "python -m eval.inception"),
    "foundation_weights": (
        "`loss.foundation_weights`",
        "dinov2 foundation model",
        "python -m models.weights",
    ),
    "vgg16_weights": ("`loss.vgg16_weights`", "LPIPS VGG16 trunk", "python -m models.weights vgg16"),
    "vgg16_hub_cache": ("`loss.vgg16_weights`", "LPIPS VGG16 trunk", "python -m models.weights vgg16"),
    "lpips_weights": ("`loss.lpips_weights`", "LPIPS linear heads", "python -m models.weights lpips_heads"),
}


@pytest.mark.parametrize("case", sorted(UNTRUSTED))
def test_a_weights_file_that_needs_unpickling_is_refused_and_never_runs(
    case: str,
    tmp_path: Path,
    inception_sd: dict[str, torch.Tensor],
    vgg_file: Path,
    heads_file: Path,
) -> None:
    """Every weights file a user can hand us (a config key, or the torch-hub cache the libraries read when no
    key is set) holding a pickle that runs code: refused with a PretrainedWeightsError naming the file, the
    key and the export command; the payload never ran (no marker file); torch's advice to unpickle it anyway
    (``weights_only=False``) is not passed on."""
    from eval.inception import WEIGHTS_FILE, InceptionFeatures

    cpu = torch.device("cpu")
    marker = tmp_path / "payload-ran"
    vgg_name = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # vgg16-397923af.pth
    if case.startswith("inception"):
        sd = inception_sd
        bad = tmp_path / WEIGHTS_FILE if case == "inception_weights" else _hub_cache(WEIGHTS_FILE)
        given = bad if case == "inception_weights" else None
        build = lambda: InceptionFeatures(given, config_key="eval.inception_weights", device=cpu)  # noqa: E731
    elif case == "foundation_weights":
        sd = FoundationModel(timm_name=SMALL_DINO, pretrained=False).model.state_dict()
        bad = tmp_path / "dino.pth"
        build = lambda: FoundationModel(  # noqa: E731
            timm_name=SMALL_DINO, weights=bad, config_key="loss.foundation_weights"
        )
    elif case.startswith("vgg16"):
        sd = read_state_dict(vgg_file)
        bad = tmp_path / "vgg16.pth" if case == "vgg16_weights" else _hub_cache(vgg_name)
        given = bad if case == "vgg16_weights" else None
        build = lambda: LPIPS(given, heads_file, vgg_config_key="loss.vgg16_weights")  # noqa: E731
    else:
        sd = read_state_dict(heads_file)
        bad = tmp_path / "heads.pth"
        build = lambda: LPIPS(vgg_file, bad, heads_config_key="loss.lpips_weights")  # noqa: E731
    _poisoned(sd, marker, bad)
    key, network, command = UNTRUSTED[case]

    try:
        build()
    except PretrainedWeightsError as refused:
        msg = str(refused)
    else:
        msg = ""
    assert not marker.exists(), f"the pickle's code ran: {bad} was unpickled"
    assert msg, "no PretrainedWeightsError"
    assert msg.startswith(network), msg
    assert f"{bad} is not a plain tensor file: its pickle calls eval" in msg
    assert "so ldit does not load it" in msg
    assert key in msg and command in msg
    assert "weights_only=False" not in msg
    if case.endswith("hub_cache"):
        assert "the library's cached download was refused" in msg and "Delete that file" in msg
    else:
        assert f"the weights file set by {key} was refused" in msg

    # To a loader that unpickles fully, the same file is a complete state_dict and the payload runs.
    assert set(torch.load(bad, weights_only=False)) == set(sd)
    assert marker.read_text() == "ran"


def test_reference_checkpoint_files_that_need_unpickling_are_refused(tmp_path: Path) -> None:
    """The other files a user hands us, reference checkpoints for ``init_from`` and the eval/extract jobs
    (models/export.py), are read weights_only too: refused, and the payload never ran."""
    import pickle

    from models.export import load_lightningdit, load_vavae

    marker = tmp_path / "payload-ran"
    vavae = _poisoned({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, marker, tmp_path / "vavae.pt")
    with pytest.raises(
        ValueError, match=re.escape(f"{vavae} is not a plain tensor file: its pickle calls eval")
    ):
        load_vavae(vavae)
    dit = _poisoned({"x_embedder.proj.weight": torch.zeros(8, 32, 1, 1)}, marker, tmp_path / "dit.pt")
    with pytest.raises((ValueError, pickle.UnpicklingError), match="calls eval|GLOBAL eval"):
        load_lightningdit(dit)
    assert not marker.exists(), "the pickle's code ran"
