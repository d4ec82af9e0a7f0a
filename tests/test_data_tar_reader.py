"""The tar reader: what tarfile and webdataset read, plus damage that tarfile lets through."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from mgmoe_ds.data.shards import load_manifest
from mgmoe_ds.data.tar_reader import TarFormatError, tar_members, tar_samples
from test_data_shards import image_bytes, make_dataset

LONG_NAME = "nested/" + "a" * 90 + "/" + "b" * 90 + "/key.jpg"  # > 100 bytes: ustar prefix or long-name headers


def write_tar(path, members: dict[str, bytes], fmt=tarfile.PAX_FORMAT, extra=()):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime: PAX headers in PAX format
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def regular_members(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_are_what_tarfile_reads(tmp_path, fmt):
    members = {"s1.jpg": image_bytes(1), "s1.cls": b"3", LONG_NAME: b"x" * 700, "s2.json": b"{}", "empty.txt": b""}
    if fmt == tarfile.PAX_FORMAT:
        members["søren.jpg"] = b"non-ascii name"
    directory, link = tarfile.TarInfo("folder"), tarfile.TarInfo("folder/link")
    directory.type, link.type, link.linkname = tarfile.DIRTYPE, tarfile.SYMTYPE, "../s1.jpg"
    path = write_tar(tmp_path / "t.tar", members, fmt, extra=(directory, link))
    assert list(tar_members(str(path))) == regular_members(path) == list(members.items())


def test_a_tar_cut_at_a_header_or_with_a_bad_header_is_an_error(tmp_path):
    path = write_tar(tmp_path / "t.tar", {"a.cls": b"1", "b.cls": b"2"}, tarfile.USTAR_FORMAT)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 2 * 512])  # exactly after the first member: tarfile sees a clean end
    assert [name for name, _ in regular_members(cut)] == ["a.cls"]
    read = []
    with pytest.raises(TarFormatError, match="truncated"):
        read.extend(tar_members(str(cut)))
    assert read == [("a.cls", b"1")]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:1024] + bytes([data[1024] ^ 0x01]) + data[1025:])  # a flipped bit in the 2nd header
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_members(str(bad)))


def test_samples_are_grouped_as_webdataset_groups_them(tmp_path):
    out = tmp_path / "stock.tar"
    with wds.TarWriter(str(out)) as writer:  # stock writer: PAX headers, float mtimes
        for i in range(4):
            writer.write({"__key__": f"dir/s{i}", "jpg": image_bytes(i), "cls": str(i).encode(), "seg.png": b"p"})
    stock = wds.WebDataset(str(out), shardshuffle=False)
    expected = [{k: v for k, v in sample.items() if k != "__local_path__"} for sample in stock]
    ours = list(tar_samples([{"url": str(out)}], handler=lambda exn: False))
    assert ours == expected and len(ours) == 4 and ours[0]["__key__"] == "dir/s0" and "seg.png" in ours[0]


def test_shard_errors_and_duplicates_go_to_the_handler(tmp_path):
    dataset = make_dataset(tmp_path, "d", {"train": [0, 1, 0]}, ["a", "b"], shard_size=10)
    shard = str(dataset / load_manifest(dataset)["shards"][0]["path"])
    duplicate = write_tar(tmp_path / "dup.tar", {"k.cls": b"1", "k.jpg": b"j"})
    with tarfile.open(duplicate, "a") as tar:
        info = tarfile.TarInfo("k.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"2"))
    errors = []
    sources = [{"url": str(tmp_path / "missing.tar")}, {"url": str(duplicate)}, {"url": shard}]
    samples = list(tar_samples(sources, handler=lambda exn: errors.append(exn) or True))
    assert [s["__key__"] for s in samples] == ["k", "d_train_0000000", "d_train_0000001", "d_train_0000002"]
    assert samples[0]["cls"] == b"1"  # the first of the duplicates is kept
    assert isinstance(errors[0], OSError) and "duplicate" in str(errors[1]) and len(errors) == 2


def test_our_shards_have_one_plain_header_per_member(tmp_path):
    dataset = make_dataset(tmp_path, "d", {"train": [0, 1, 0, 1]}, ["a", "b"], shard_size=10)
    with tarfile.open(dataset / "d-train-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 4 * 3  # jpg, cls, json per sample
    assert all(m.offset_data - m.offset == 512 and not m.pax_headers for m in members)
