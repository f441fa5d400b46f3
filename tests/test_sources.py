"""Listing, manifests, image ids and deterministic shards (pipeline/sources.py)."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from PIL import Image

from pipeline import sources


def test_folder_listing_is_recursive_sorted_and_filtered(pipeline_images):
    (pipeline_images / "c").mkdir()
    (pipeline_images / "c" / "UPPER.JPEG").write_bytes(b"x")
    (pipeline_images / "c" / "scan.TIFF").write_bytes(b"x")
    inp = sources.resolve_inputs(str(pipeline_images))
    uris = [it["image_uri"] for it in inp.items]
    assert len(uris) == 12                      # 10 generated + 2 upper-case extensions; notes.txt skipped
    assert uris == sorted(uris)
    assert not any(u.endswith(".txt") for u in uris)
    assert inp.kind == "folder" and inp.root == str(pipeline_images)


def test_text_manifest_resolves_relative_entries_and_skips_comments(pipeline_images, tmp_path):
    imgs = sorted(str(p) for p in pipeline_images.rglob("*.jpg"))
    rel = sorted(p.relative_to(tmp_path) for p in pipeline_images.rglob("*.png"))
    man = tmp_path / "list.txt"
    man.write_text("# my images\n\n" + "\n".join(imgs) + "\n" + "\n".join(str(r) for r in rel) + "\n" + imgs[0] + "\n")
    inp = sources.resolve_inputs(str(man))
    assert inp.kind == "manifest"
    assert len(inp.items) == len(imgs) + len(rel)   # duplicate of imgs[0] dropped
    assert inp.duplicates_dropped == 1
    assert str(tmp_path / rel[0]) in [it["image_uri"] for it in inp.items]


def test_text_manifest_with_a_byte_order_mark(pipeline_images, tmp_path):
    """Windows editors start UTF-8 text with a BOM; it is not part of the first URI."""
    imgs = sorted(str(p) for p in pipeline_images.rglob("*.jpg"))[:2]
    man = tmp_path / "bom.txt"
    man.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(imgs).encode("utf-8"))
    assert [it["image_uri"] for it in sources.resolve_inputs(str(man)).items] == imgs


def test_parquet_manifest_carries_label_uris(tmp_path):
    t = pa.table({"image_uri": ["s3://b/x/2.jpg", "s3://b/x/1.jpg"], "label_uri": ["s3://b/y/2.png", None]})
    pq.write_table(t, tmp_path / "m.parquet")
    inp = sources.resolve_inputs(str(tmp_path / "m.parquet"))
    assert [it["image_uri"] for it in inp.items] == ["s3://b/x/1.jpg", "s3://b/x/2.jpg"]
    assert [it["label_uri"] for it in inp.items] == [None, "s3://b/y/2.png"]


def test_manifest_entries_naming_one_file_are_one_input(pipeline_images, tmp_path):
    img = sorted(pipeline_images.rglob("*.jpg"))[0]
    rel = img.relative_to(tmp_path)
    spellings = [str(img), f"file://{img}", f"{img.parent}/./{img.name}", f"{img.parent}//{img.name}",
                 f"{img.parent}/../{img.parent.name}/{img.name}", str(rel), f"./{rel}"]
    man = tmp_path / "list.txt"
    man.write_text("\n".join(spellings) + "\n")
    inp = sources.resolve_inputs(str(man))
    assert [it["image_uri"] for it in inp.items] == [str(img)] and inp.duplicates_dropped == len(spellings) - 1
    t = pa.table({"image_uri": ["s3a://b/x/1.jpg", "s3://b/x/1.jpg", "s3://b/x/1.jpg/"],
                  "label_uri": ["s3a://b/y/1.png", None, None]})
    pq.write_table(t, tmp_path / "m.parquet")
    inp = sources.resolve_inputs(str(tmp_path / "m.parquet"))
    assert inp.items == [{"image_uri": "s3://b/x/1.jpg", "label_uri": "s3://b/y/1.png"}]   # its label kept
    t = pa.table({"image_uri": ["s3://b/x/1.jpg", "s3a://b/x/1.jpg", "s3://b/x/1.jpg"],
                  "label_uri": [None, "s3://b/y/1.png", "s3a://b/y/1.png"]})
    pq.write_table(t, tmp_path / "m.parquet")
    inp = sources.resolve_inputs(str(tmp_path / "m.parquet"))
    assert inp.items == [{"image_uri": "s3://b/x/1.jpg", "label_uri": "s3://b/y/1.png"}]   # wherever it is
    t = pa.table({"image_uri": ["s3://b/x/1.jpg", "s3://b/x/1.jpg"], "label_uri": ["s3://b/y/1.png", "s3://b/y/2.png"]})
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="listed twice with different labels"):
        sources.resolve_inputs(str(tmp_path / "m.parquet"))


def test_csv_and_tsv_manifests_read_like_parquet_and_a_text_manifest_with_a_header_is_refused(tmp_path):
    """A header row names the columns; quoted names may hold commas; relative entries and an empty label
    cell are as in the other manifests. The same table as a .txt would list its header as a file: refused."""
    (tmp_path / "m.csv").write_text('image_uri,label_uri\n"x/a, b.jpg",y/a.png\ns3://b/2.jpg,\n')
    (tmp_path / "m.tsv").write_text("path\tlabel_uri\nx/c.jpg\ty/c.png\n")
    csv = sources.resolve_inputs(str(tmp_path / "m.csv"))
    assert [(it["image_uri"], it["label_uri"]) for it in csv.items] == [
        (str(tmp_path / "x" / "a, b.jpg"), str(tmp_path / "y" / "a.png")), ("s3://b/2.jpg", None)]
    tsv = sources.resolve_inputs(str(tmp_path / "m.tsv"))
    assert [(it["image_uri"], it["label_uri"]) for it in tsv.items] == [
        (str(tmp_path / "x" / "c.jpg"), str(tmp_path / "y" / "c.png"))]
    (tmp_path / "m.txt").write_text("image_uri,label_uri\nx/a.jpg,y/a.png\n")
    with pytest.raises(ValueError, match=r"header row.*name it \.csv or \.tsv"):
        sources.resolve_inputs(str(tmp_path / "m.txt"))
    (tmp_path / "bad.csv").write_text("name,label\na.jpg,b.png\n")
    with pytest.raises(ValueError, match="needs a column named one of"):
        sources.resolve_inputs(str(tmp_path / "bad.csv"))


def test_parquet_manifest_without_uri_column_is_an_error(tmp_path):
    pq.write_table(pa.table({"foo": ["a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="image_uri"):
        sources.resolve_inputs(str(tmp_path / "m.parquet"))


def test_an_output_inside_the_input_folder_is_not_listed(pipeline_images):
    out = pipeline_images / "out"
    for rel in ("masks/img001-0123456789.png", "figures/samples.png", "mine/x.jpg"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    (pipeline_images / "out2").mkdir()
    (pipeline_images / "out2" / "x.png").write_bytes(b"x")           # a sibling with the same prefix is listed
    for spelling in (str(out), f"{out}/", f"file://{out}"):
        uris = [it["image_uri"] for it in sources.resolve_inputs(str(pipeline_images), exclude=spelling).items]
        assert len(uris) == 11 and not any("/out/" in u for u in uris)
    assert len(sources.resolve_inputs(str(pipeline_images), exclude="/elsewhere/out").items) == 14
    with pytest.raises(ValueError, match="is the input folder"):
        sources.resolve_inputs(str(pipeline_images), exclude=f"{pipeline_images}/")


def test_an_output_inside_an_object_store_input_is_not_listed(tmp_path):
    """On a filesystem that is not local (fsspec's in-memory one stands for S3), the output is left out by
    prefix: its files are not inputs, a sibling that shares the prefix's first letters is."""
    import uuid

    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/in-{uuid.uuid4().hex[:8]}"
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    for rel in ("a.png", "sub/b.png", "out/masks/c.png", "outside.png"):
        fs.pipe_file(f"{root}/{rel}", png.getvalue())
    try:
        uris = [it["image_uri"] for it in sources.resolve_inputs(f"memory://{root}", exclude=f"memory://{root}/out").items]
        assert [u.rsplit("/", 1)[1] for u in uris] == ["a.png", "outside.png", "b.png"]
        assert len(sources.resolve_inputs(f"memory://{root}", exclude=f"memory://{root}/ou").items) == 4
        with pytest.raises(ValueError, match="is the input folder"):
            sources.resolve_inputs(f"memory://{root}", exclude=f"memory://{root}/")
    finally:
        fs.rm(root, recursive=True)


def test_an_output_reached_through_a_symlink_is_not_listed(pipeline_images, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(pipeline_images)
    (pipeline_images / "out" / "masks").mkdir(parents=True)
    (pipeline_images / "out" / "masks" / "m-0123456789.png").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "out").mkdir(parents=True)
    (elsewhere / "out" / "fig.png").write_bytes(b"x")
    (pipeline_images / "linked").symlink_to(elsewhere)               # the output under a followed link
    for input_, output in ((pipeline_images, alias / "out"), (alias, pipeline_images / "out")):
        uris = [it["image_uri"] for it in sources.resolve_inputs(str(input_), exclude=str(output)).items]
        assert not any(u.endswith("m-0123456789.png") for u in uris) and any(u.endswith("fig.png") for u in uris)
    uris = [it["image_uri"] for it in sources.resolve_inputs(str(pipeline_images), exclude=str(elsewhere / "out")).items]
    assert not any(u.endswith("fig.png") for u in uris)
    with pytest.raises(ValueError, match="is the input folder"):
        sources.resolve_inputs(str(pipeline_images), exclude=str(alias))


def test_symlinked_folders_are_followed_once(pipeline_images, tmp_path, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(b"x")
    (elsewhere / "loop").symlink_to(elsewhere)                       # a cycle
    (elsewhere / "back").symlink_to(pipeline_images)                 # back into the input folder
    (pipeline_images / "again").symlink_to(elsewhere)
    (pipeline_images / "linked").symlink_to(elsewhere)               # a second link to the same folder
    (pipeline_images / "self").symlink_to(pipeline_images / "a")     # a folder listed anyway
    (pipeline_images / "file.png").symlink_to(elsewhere / "x.png")   # a symlinked file is an image like any
    (elsewhere / "sub").mkdir()
    (elsewhere / "sub" / "s.png").write_bytes(b"s")
    (pipeline_images / "sub-again").symlink_to(elsewhere / "sub")     # a real folder also reached via "again"
    (pipeline_images / "up").symlink_to(tmp_path)                    # an ancestor: would list the input twice
    (pipeline_images / "root").symlink_to("/")                       # the filesystem's root holds it too
    with caplog.at_level("WARNING", logger="pipeline.sources"):
        uris = [it["image_uri"] for it in sources.resolve_inputs(str(pipeline_images)).items]
    assert len(uris) == 13 and len({u.rsplit("/", 1)[1] for u in uris if u.endswith("s.png")}) == 1
    assert f"{pipeline_images}/again/x.png" in uris and f"{pipeline_images}/file.png" in uris
    assert not any("/up/" in u for u in uris)
    warned = caplog.text
    for name in ("linked", "again/loop", "again/back", "self", "up", "root"):
        assert f"{pipeline_images}/{name} ->" in warned, name


def test_missing_and_empty_inputs_fail_with_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.resolve_inputs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        sources.resolve_inputs(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="lists no image"):
        sources.resolve_inputs(str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="neither an image .* nor a manifest"):
        sources.resolve_inputs(str(tmp_path / "empty" / "readme.md"))      # not read as a list of URIs


def test_an_input_that_cannot_be_listed_is_one_clear_line(monkeypatch):
    """No credentials for an S3 input: botocore's NoCredentialsError (no OSError) becomes a ValueError."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ValueError, match="can't read input 's3://bucket/images': NoCredentialsError"):
        sources.resolve_inputs("s3://bucket/images", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})


def test_shards_are_deterministic_and_cover_every_item_once():
    items = [{"image_uri": f"/d/{i:04d}.jpg", "label_uri": None} for i in range(23)]
    a, b = sources.make_shards(items, 5), sources.make_shards(list(items), 5)
    assert [s.name for s in a] == [f"shard-{i:05d}" for i in range(5)]
    assert [s.digest for s in a] == [s.digest for s in b]
    assert [len(s.items) for s in a] == [5, 5, 5, 5, 3]
    flat = [it["image_uri"] for s in a for it in s.items]
    assert flat == [it["image_uri"] for it in items]
    changed = items[:7] + [{"image_uri": "/d/0007b.jpg", "label_uri": None}] + items[8:]
    c = sources.make_shards(changed, 5)
    assert c[0].digest == a[0].digest and c[1].digest != a[1].digest
    with pytest.raises(ValueError):
        sources.make_shards(items, 0)


def test_image_ids_that_two_inputs_share_take_more_digits(monkeypatch):
    """40 bits of a hash collide once about a million files share a stem: those ids get 80 bits, the others
    keep theirs, and the masks of one never overwrite the other's."""
    real = sources.image_id

    def short_hash(uri, root=None, digits=10):              # collisions on demand: 8 bits for the short ids
        got = real(uri, root, digits)
        return got[:-8] if digits == 10 else got

    monkeypatch.setattr(sources, "image_id", short_hash)
    uris = [f"/d/scene{i}/rgb.png" for i in range(40)]
    ids = sources.image_ids(uris, "/d")
    assert len(set(ids.values())) == 40
    long = [u for u in uris if len(ids[u]) > len("rgb-") + 2]
    assert 0 < len(long) < 40 and all(len(ids[u]) == len("rgb-") + 20 for u in long)
    assert all(ids[u] == short_hash(u, "/d") for u in uris if u not in long)
    assert sources.Inputs([{"image_uri": u} for u in uris], "/d", "folder").ids == ids


def test_image_id_is_stable_safe_and_relative_to_root():
    a = sources.image_id("/data/x/img 1.jpg", "/data")
    assert a == sources.image_id("s3://other/x/img 1.jpg", "s3://other")   # same relative path, same id
    assert a.startswith("img_1-") and "/" not in a and " " not in a
    assert sources.image_id("/data/x/img 1.png", "/data") != a           # extension is part of the identity
    assert sources.image_id("/data/y/img 1.jpg", "/data") != a


def test_given_items_keep_the_root_of_their_listing(pipeline_images):
    """--labels / --limit / --data-root pass items: their ids are relative to the folder they came from."""
    listed = sources.resolve_inputs(str(pipeline_images))
    some = sources.inputs_from_items(listed.items[:3], listed.root)
    assert some.root == listed.root
    ids = [sources.image_id(it["image_uri"], some.root) for it in some.items]
    assert ids == [sources.image_id(it["image_uri"], listed.root) for it in listed.items[:3]]
    assert sources.inputs_from_items(listed.items[:3]).root is None      # no root: whole URIs hashed
