"""The real loading path: open_clip checkpoints in each format, fsspec URLs, sha256, offline tags."""
import hashlib
import json
import os
import time

import fsspec
import numpy as np
import open_clip
import pytest
import torch

import rfclip
from rfclip.testing import random_model, save_checkpoint, save_torchscript_archive
from rfclip.model_factory import load_clip
from rfclip.weights import WeightsError, WeightsUnavailableError, resolve_weights


@pytest.fixture(scope="module")
def vit_b16_files(tmp_path_factory):
    """A random full-size ViT-B-16 saved as an OpenAI/open_clip state dict, a training checkpoint
    and safetensors (about 600 MB each; written once per module)."""
    d = tmp_path_factory.mktemp("vitb16")
    model = random_model("ViT-B-16", seed=1)
    files = {fmt: save_checkpoint(model, d / f"vitb16-{fmt}.{'safetensors' if fmt == 'safetensors' else 'pt'}", fmt)
             for fmt in ("pt", "openclip", "safetensors")}
    return model, files


@pytest.mark.parametrize("fmt", ["pt", "openclip", "safetensors"])
def test_vit_b16_checkpoint_formats_load_exactly(vit_b16_files, fmt):
    model, files = vit_b16_files
    clip, tokenizer, arch, resolved = load_clip("ViT-B-16", str(files[fmt]), quick_gelu=False)   # said: no warning
    assert arch == "ViT-B-16" and resolved.kind == "file"
    ref = model.state_dict()
    got = clip.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert resolved.sha256 == hashlib.sha256(files[fmt].read_bytes()).hexdigest()


def test_a_tags_open_clip_config_gives_its_activation_and_normalisation(vit_b16_files, monkeypatch):
    """open_clip's pretrained configs mark tags of plain architectures as QuickGELU (ViT-B-16 dfn2b, MetaCLIP)
    or give them another mean/std (ViT-L-14 laion2b_s32b_b82k): the tag's weights get them, and no warning."""
    import warnings

    model, files = vit_b16_files
    monkeypatch.setattr(rfclip.weights, "_resolve_tag", lambda arch, tag, cache_dir: str(files["openclip"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip, _, _, dfn = load_clip("ViT-B-16", "dfn2b")
        _, _, _, laion = load_clip("ViT-B-16", "laion2b_s34b_b88k")
    assert dfn.kind == "tag" and dfn.quick_gelu and dfn.mean == rfclip.weights.OPENAI_MEAN
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not laion.quick_gelu
    other = resolve_weights("ViT-L-14", "laion2b_s32b_b82k")           # the file is not loaded here
    assert (other.mean, other.std, other.quick_gelu) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False)


def test_a_file_whose_architecture_has_tags_with_other_choices_warns_naming_them(vit_b16_files):
    """A ViT-B-16 file that is not OpenAI's could be a MetaCLIP or DFN one (QuickGELU): the warning says what
    was assumed and how to say otherwise; saying it silences the warning and is what the model gets."""
    import warnings

    _, files = vit_b16_files
    with pytest.warns(UserWarning, match=r"(?s)assumes GELU.*dfn2b.*--quick-gelu") as caught:
        load_clip("ViT-B-16", str(files["pt"]))
    assert "laion2b_s34b_b88k" not in str(caught[0].message)          # a GELU tag with OpenAI's mean/std
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip, _, _, said = load_clip("ViT-B-16", str(files["pt"]), quick_gelu=True, image_mean=(0.5, 0.5, 0.5),
                                     image_std="0.25,0.25,0.25")
    assert said.quick_gelu and said.mean == (0.5, 0.5, 0.5) and said.std == (0.25, 0.25, 0.25)
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_image_normalisation_is_what_the_segmenter_uses_and_records(tiny_model):
    """image_mean / image_std reach the input normalisation and config(); bad values are errors."""
    cfg, weights = tiny_model
    kw = dict(model=cfg, weights=weights, method="clip", vocabulary=["cat", "dog"], device="cpu", short_side=64,
              slide_crop=0)
    default = rfclip.Segmenter(**kw)
    other = rfclip.Segmenter(**kw, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert default.config()["weights"]["image_mean"] == list(rfclip.weights.OPENAI_MEAN)
    assert other.config()["weights"]["image_std"] == [0.5, 0.5, 0.5]
    image = np.full((40, 40, 3), 255, np.uint8)
    x = other._normalise(torch.from_numpy(image).permute(2, 0, 1))
    assert torch.allclose(x, torch.ones_like(x))                     # (1 - 0.5) / 0.5
    for bad in ({"image_std": (0.5, 0.0, 0.5)}, {"image_mean": (0.5, 0.5)}, {"image_mean": "a,b,c"}):
        with pytest.raises(ValueError, match="must be 3"):
            rfclip.Segmenter(**kw, **bad)


def test_torchscript_archive_like_openai_loads_with_quick_gelu(tiny_model, tmp_path):
    cfg, weights = tiny_model
    clip, _, arch, _ = load_clip(cfg, weights)
    archive = save_torchscript_archive(clip, tmp_path / "openai-like.pt")
    clip2, _, _, resolved = load_clip(cfg, str(archive))
    assert resolved.quick_gelu
    assert isinstance(clip2.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), clip2.state_dict().values()))


def test_sha256_is_verified(tiny_model):
    cfg, weights = tiny_model
    digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert resolve_weights("rfclip-tiny", weights, digest).sha256 == digest
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        rfclip.Segmenter(model=cfg, weights=weights, weights_sha256="0" * 64, vocabulary=["a"], method="clip")
    with pytest.raises(ValueError, match="64 hex"):
        resolve_weights("rfclip-tiny", weights, "abc")


def test_fsspec_url_is_streamed_once_into_the_cache(tiny_model, tmp_path, monkeypatch):
    cfg, weights = tiny_model
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    url = "memory://models/tiny.pt"
    with fsspec.open(url, "wb") as f, open(weights, "rb") as src:
        f.write(src.read())
    digest = hashlib.sha256(open(weights, "rb").read()).hexdigest()
    r1 = resolve_weights("rfclip-tiny", url, digest)
    assert r1.kind == "url" and r1.sha256 == digest and str(tmp_path / "cache") in r1.path
    fsspec.filesystem("memory").rm("/models/tiny.pt")          # a second resolve must not fetch again
    r2 = resolve_weights("rfclip-tiny", url, digest)
    assert r2.path == r1.path
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("rfclip-tiny", "memory://models/missing.pt")


def test_a_url_that_gave_no_checkpoint_is_fetched_again_next_time(tiny_model, tmp_path, monkeypatch):
    """A page instead of weights (no sha256 given) fails to load, and its cached copy goes with it: the next
    run fetches the URL again rather than failing on the copy for good."""
    from rfclip.model_factory import load_clip

    cfg, weights = tiny_model
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    url = "memory://models/page.pt"
    with fsspec.open(url, "wb") as f:
        f.write(b"<html>Sign in to download</html>")
    with pytest.raises(WeightsError, match=f"not a readable checkpoint.*came from {url}, and its cached copy is removed"):
        load_clip(cfg, url)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    with fsspec.open(url, "wb") as f, open(weights, "rb") as src:
        f.write(src.read())
    assert load_clip(cfg, url)[3].kind == "url"


def test_offline_tag_fails_fast_with_a_pointer_to_weights_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="weights=PATH"):
        rfclip.Segmenter(model="ViT-B-16", weights="openai", vocabulary=["cat"])
    assert time.monotonic() - t0 < 20
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        resolve_weights("ViT-B-16", "laion2b_s34b_b88k")
    (tmp_path / "openai").mkdir()                       # a folder named like the tag does not hide it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsUnavailableError, match="weights=PATH"):
        resolve_weights("ViT-B-16", "openai")


def test_bad_weights_give_clear_errors(tiny_model, tmp_path):
    cfg, _ = tiny_model
    with pytest.raises(FileNotFoundError):
        load_clip(cfg, str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsError, match="nor an open_clip pretrained tag"):
        load_clip(cfg, "no-such-tag")
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(WeightsError, match="weights_only=True") as e:
        load_clip(cfg, str(bad))
    assert "will likely succeed" not in str(e.value)       # torch's advice to unpickle code is not passed on
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(os.urandom(1000))
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_clip(cfg, str(bad_st))
    with pytest.raises(WeightsError, match="is a directory"):
        load_clip(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip("ViT-Q-99", str(bad))


def test_file_urls_and_home_paths_are_local_files(tiny_model, tmp_path, monkeypatch):
    cfg, weights = tiny_model
    digest = resolve_weights(cfg, weights).sha256
    url = "file://" + str(os.path.abspath(weights))
    resolved = resolve_weights(cfg, url)
    assert resolved.kind == "file" and resolved.sha256 == digest and resolved.spec == url
    monkeypatch.setenv("HOME", os.path.dirname(os.path.abspath(weights)))
    resolved = resolve_weights(cfg, "~/" + os.path.basename(weights))
    assert resolved.kind == "file" and resolved.sha256 == digest
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(cfg, "file://" + str(tmp_path / "missing.pt"))


def test_unreachable_weights_host_is_not_reported_as_a_missing_file(tiny_model):
    cfg, _ = tiny_model
    with pytest.raises(WeightsError, match="can't fetch weights URL .*can't connect to 127.0.0.1"):        # nothing listens on port 9
        resolve_weights(cfg, "http://127.0.0.1:9/ViT-B-16.pt")


def test_object_store_errors_that_are_not_oserrors_are_weights_errors(tiny_model, tmp_path, monkeypatch):
    """botocore's own errors (no credentials, an endpoint it can't reach) and a protocol whose package is
    missing are WeightsErrors with the URL, not raw tracebacks."""
    cfg, _ = tiny_model
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    dead = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(WeightsError, match=r"can't fetch weights URL s3://bkt/w.pt \(NoCredentialsError: .*"
                                           r"credentials and endpoint \(storage_options="):
        resolve_weights(cfg, "s3://bkt/w.pt", storage_options=dead)
    with pytest.raises(WeightsError, match=r"can't fetch weights URL s3://bkt/w.pt \(EndpointConnectionError: "):
        resolve_weights(cfg, "s3://bkt/w.pt", storage_options={**dead, "key": "k", "secret": "s"})
    with pytest.raises(WeightsError, match=r"can't read weights URL nosuchproto://bkt/w.pt: .*nosuchproto"):
        resolve_weights(cfg, "nosuchproto://bkt/w.pt")


def test_a_weights_url_is_recorded_and_reported_without_its_credentials(tiny_model, tmp_path, monkeypatch):
    from rfclip.weights import public_spec

    cfg, weights = tiny_model
    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    assert public_spec("https://user:s3cret@host/w.pt?X-Amz-Signature=abc#f") == "https://***@host/w.pt?***#f"
    assert public_spec("s3://bkt/w.pt") == "s3://bkt/w.pt" and public_spec("/a/b@c.pt") == "/a/b@c.pt"
    import functools
    import http.server
    import shutil
    import threading

    (tmp_path / "site").mkdir()
    shutil.copy(weights, tmp_path / "site" / "w.pt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        got = resolve_weights(cfg, f"http://user:s3cret@127.0.0.1:{port}/w.pt?token=s3cret")
        assert got.spec == f"http://***@127.0.0.1:{port}/w.pt?***" and got.kind == "url"
        with pytest.raises(WeightsError) as e:
            resolve_weights(cfg, f"http://user:s3cret@127.0.0.1:{port}/w.pt", "0" * 64)
        assert "s3cret" not in str(e.value) and "sha256 mismatch for http://***@127.0.0.1" in str(e.value)
    finally:
        server.shutdown()
    with pytest.raises(WeightsError) as e:
        resolve_weights(cfg, "http://user:s3cret@127.0.0.1:9/w.pt")
    assert "s3cret" not in str(e.value) and "http://***@127.0.0.1:9/w.pt" in str(e.value)

    class Refusing(http.server.BaseHTTPRequestHandler):       # HEAD finds the file, GET is refused
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()

        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        signed = (f"http://127.0.0.1:{server.server_address[1]}/w.pt?X-Amz-Credential=AKIA%2F2026%2Fus"
                  f"&X-Amz-Signature=deadbeefcafe")
        with pytest.raises(WeightsError) as e:
            resolve_weights(cfg, signed)
    finally:
        server.shutdown()
    text = str(e.value)                                         # the client quotes the URL decoded
    assert "403" in text and "AKIA" not in text and "deadbeefcafe" not in text, text


def test_quick_gelu_override_is_what_config_and_the_text_cache_see(tiny_model):
    cfg, weights = tiny_model
    kw = dict(model=cfg, weights=weights, method="clip", vocabulary=["sky", "road"], device="cpu")
    detected, forced = rfclip.Segmenter(**kw), rfclip.Segmenter(**kw, quick_gelu=True)
    assert detected.config()["weights"]["quick_gelu"] is False and forced.config()["weights"]["quick_gelu"] is True
    assert isinstance(forced.clip.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert not torch.allclose(detected.text, forced.text)      # not served from the other activation's cache
    again = rfclip.Segmenter(**kw, quick_gelu=True)
    torch.testing.assert_close(again.text, forced.text)


def test_an_architecture_built_with_quick_gelu_records_it(tiny_model, tmp_path):
    import json

    cfg, weights = tiny_model
    qcfg = tmp_path / "tiny-built-quickgelu.json"
    qcfg.write_text(json.dumps({**json.loads(open(cfg).read()), "quick_gelu": True}))
    clip, _, _, resolved = load_clip(str(qcfg), weights)
    assert resolved.quick_gelu is True
    assert isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    with pytest.raises(ValueError, match="can't turn it off"):
        load_clip(str(qcfg), weights, quick_gelu=False)


def test_wrong_architecture_is_reported(vit_b16_files, tiny_model):
    _, files = vit_b16_files
    cfg, _ = tiny_model
    with pytest.raises(WeightsError, match="does not fit") as e:
        load_clip(cfg, str(files["pt"]))
    # Short, with counts and a few names, and says what to pass (not PyTorch's list of every key).
    message = str(e.value)
    assert len(message) < 900 and "tensors it has no place for: " in message and "of other shapes: " in message
    assert "pass model= (CLI: --model)" in message and ", ..." in message


@pytest.fixture
def fake_proxy(monkeypatch):
    """An HTTP proxy on loopback that answers every request 502 and records the request lines;
    ``$HTTPS_PROXY`` and ``$HTTP_PROXY`` point at it, and no host is exempt."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    seen: list[str] = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    for var in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{srv.getsockname()[1]}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{srv.getsockname()[1]}")
    yield seen
    srv.close()


def test_behind_a_proxy_the_tag_download_is_tried_through_it(fake_proxy, tmp_path, monkeypatch):
    """The offline check connects to the proxy, not to the hub (which a proxied network may not route to
    directly); the download then goes through the proxy, and its answer is what the error reports."""
    from rfclip.weights import _resolve_tag

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(WeightsUnavailableError, match="download failed.*502"):
        _resolve_tag("ViT-B-16", "openai", str(tmp_path / "cache"))
    assert any(line.startswith("CONNECT huggingface.co:443") for line in fake_proxy), fake_proxy


def test_reachability_takes_either_route_and_names_what_failed(fake_proxy, monkeypatch):
    """Reachable if the host or a configured proxy answers (clients differ on $NO_PROXY, so no guessing
    which route the download takes); when neither does, both are named."""
    from rfclip.weights import _unreachable

    assert _unreachable("nowhere.invalid") is None                    # only the proxy answers
    monkeypatch.setenv("NO_PROXY", "*")
    assert _unreachable("nowhere.invalid") is None                    # still a route some client may take
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")            # nothing listens on port 9
    why = _unreachable("nowhere.invalid")
    assert why.startswith("can't connect to the proxy 127.0.0.1:9 (") and " nor nowhere.invalid (" in why
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:hunter22@127.0.0.1:9")           # credentials never shown
    assert "the proxy 127.0.0.1:9 (" in _unreachable("nowhere.invalid")
    assert "hunter22" not in _unreachable("nowhere.invalid")
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert "the proxy 127.0.0.1:9" in _unreachable("nowhere.invalid")
    monkeypatch.setenv("ALL_PROXY", "http://bob:pw@proxy:abc")                       # skipped, and said
    why = _unreachable("nowhere.invalid")
    assert "a proxy setting that is not a valid URL (host proxy)" in why and "pw" not in why


def test_weights_url_through_a_proxy_when_fsspec_is_told_to_use_it(fake_proxy, tmp_path, monkeypatch):
    """fsspec's HTTP client uses the proxy only with ``client_kwargs={"trust_env": True}``: then the proxy's
    answer (502) is reported, not an unreachable host nor a missing file; without it the host is
    checked directly."""
    from rfclip.weights import _fetch_url

    monkeypatch.setenv("RFCLIP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsUnavailableError, match="the server answered HTTP 502"):
        _fetch_url("http://nowhere.invalid/w.pt", None, {"client_kwargs": {"trust_env": True}})
    assert any(line.startswith("HEAD http://nowhere.invalid/w.pt") for line in fake_proxy), fake_proxy
    with pytest.raises(WeightsUnavailableError, match=r"can't connect to nowhere.invalid \("):
        _fetch_url("http://nowhere.invalid/w.pt", None, None)
    # a route the check counts (the proxy answers) that fsspec's client does not take: $ALL_PROXY. The
    # connection fails, and that is what is said, not "does not exist"
    monkeypatch.delenv("HTTPS_PROXY")
    proxy = os.environ["HTTP_PROXY"]
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("ALL_PROXY", proxy)
    with pytest.raises(WeightsUnavailableError, match="can't fetch weights URL http://127.0.0.1:9/w.pt .*Error"):
        _fetch_url("http://127.0.0.1:9/w.pt", None, {"client_kwargs": {"trust_env": True}})


def test_a_model_config_named_like_a_built_in_architecture_is_refused(tiny_model, tmp_path):
    """open_clip registers a config under its file's stem: ViT-B-16.json holding a tiny model would replace
    the real ViT-B-16 for the whole process."""
    from rfclip.model_factory import register_model

    before = open_clip.get_model_config("ViT-B-16")
    clash = tmp_path / "ViT-B-16.json"
    clash.write_text(open(tiny_model[0]).read())
    with pytest.raises(ValueError, match="named like open_clip's built-in ViT-B-16 but differs"):
        register_model(str(clash))
    assert open_clip.get_model_config("ViT-B-16") == before
    same = tmp_path / "same" / "ViT-B-16.json"
    same.parent.mkdir()
    same.write_text(json.dumps(before))
    assert register_model(str(same)) == "ViT-B-16"                # the built-in's own config is no clash


def test_two_custom_configs_of_one_name_load_one_after_the_other(tmp_path):
    """A custom name (not built in) may be registered again with other contents: the later file wins."""
    from rfclip.model_factory import register_model

    for width in (32, 64):
        cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": width, "patch_size": 16},
               "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
        path = tmp_path / str(width) / "my-tiny.json"
        path.parent.mkdir()
        path.write_text(json.dumps(cfg))
        assert register_model(str(path)) == "my-tiny"
        assert open_clip.get_model_config("my-tiny")["vision_cfg"]["width"] == width


def test_misfit_follows_what_a_strict_load_accepts():
    """The short misfit message counts what PyTorch's strict load would refuse, and nothing it takes: a 1-D
    tensor for a 0-dim parameter (such as a logit_bias saved as shape (1,)) loads."""
    import torch

    from rfclip.model_factory import _misfit

    model = torch.nn.Linear(3, 2)
    model.register_parameter("bias0", torch.nn.Parameter(torch.zeros(())))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["bias0"] = torch.ones(1)
    assert _misfit(sd, model.state_dict()) == ""
    model.load_state_dict(sd, strict=True)                       # PyTorch agrees
    sd["weight"], sd["extra"] = torch.zeros(3, 3), torch.zeros(1)
    del sd["bias"]
    assert _misfit(sd, model.state_dict()) == ("1 of the model's tensors missing: bias; 1 tensors it has no place "
                                               "for: extra; 1 of other shapes: weight (3, 3) vs (2, 3)")
