"""unpack checks each member with tarfile.data_filter, plus titanenv's stricter rules, naming the member."""

from __future__ import annotations

import tarfile

import pytest

from test_assets_pack import crafted, file_member
from titanenv.assets import unpack as unpack_mod
from titanenv.assets.unpack import UnpackError, unpack


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_device_and_fifo_members_are_refused_by_name(tmp_path, kind):
    info = tarfile.TarInfo("hub/dev")
    info.type = kind
    src = crafted(tmp_path / "evil", [(info, None)])
    with pytest.raises(UnpackError, match="'hub/dev': special file"):
        unpack(src, tmp_path / "hf")
    assert not (tmp_path / "hf" / "hub" / "dev").exists()


def test_every_member_goes_through_data_filter(tmp_path, monkeypatch):
    seen, real = [], tarfile.data_filter

    def spy(member, dest):
        seen.append((member.name, dest))
        return real(member, dest)

    monkeypatch.setattr(unpack_mod.tarfile, "data_filter", spy)
    src = crafted(tmp_path / "ok", [file_member("hub/a.txt"), file_member("hub/b.txt")])
    unpack(src, tmp_path / "hf")
    assert seen == [("hub/a.txt", str(tmp_path / "hf")), ("hub/b.txt", str(tmp_path / "hf"))]
    assert (tmp_path / "hf" / "hub" / "b.txt").read_bytes() == b"pwned\n"


def test_a_filter_refusal_names_the_member(tmp_path, monkeypatch):
    def refuse(member, dest):
        raise tarfile.FilterError(f"{member.name} refused by the filter")

    monkeypatch.setattr(unpack_mod.tarfile, "data_filter", refuse)
    src = crafted(tmp_path / "evil", [file_member("hub/a.txt")])
    with pytest.raises(UnpackError, match="archive member 'hub/a.txt'"):
        unpack(src, tmp_path / "hf")
