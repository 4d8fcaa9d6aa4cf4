"""Fuzzing the archive readers (issue 18, item 8): mutated tar, tar.gz and zip files, seeded and bounded.

Every mutated input is unpacked into a fresh ``dest`` inside an otherwise empty ``box``; the only outcomes
allowed are success, :class:`ArchiveError` and :class:`InsufficientSpaceError` (the documented errors).
After each input: nothing exists in ``box`` but the archive and ``dest``; after an error ``dest`` is gone
(nothing left behind); after a success ``dest`` holds only regular files and folders.

The loop runs in a child process under an address-space limit (``RLIMIT_AS``), importing
``raml/data/archives.py`` alone (standard library and tqdm, no torch), so that a single allocation the size a
forged header claims fails as ``MemoryError`` (an undocumented error, hence a test failure) instead of
passing unseen. Run this file as a script for a longer campaign:
``python tests/data/test_archive_fuzz.py --inputs 5000 --seed 1`` prints the outcome counts as JSON.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import io
import json
import os
import random
import resource
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import pytest

ARCHIVES_PY = Path(__file__).resolve().parents[2] / "src" / "raml" / "data" / "archives.py"
ADDRESS_SPACE_LIMIT = 1 << 30
"""The child's RLIMIT_AS: 1 GiB (an idle child uses about 50 MiB)."""
INPUTS_PER_SEED = 60
PEAK_RSS_LIMIT_MIB = 256
"""The child's peak RSS must stay below this (about 33 MiB measured: the readers stream)."""
"""Inputs per seed archive in the test (7 seeds): 420 inputs, a few seconds."""


# ------------------------------------------------------------------------------------------------ seeds
def _members() -> list[tuple[str, bytes | None]]:
    rng = random.Random(0)
    return [
        ("car_ims", None),
        ("car_ims/000001.jpg", rng.randbytes(3000)),
        ("car_ims/000002.jpg", bytes(2000)),
        ("car_ims/sub", None),
        ("car_ims/sub/" + "long_name_" * 9 + ".txt", b"a name longer than 100 characters\n"),
        ("cars_annos.txt", b"1 car_ims/000001.jpg\n2 car_ims/000002.jpg\n"),
    ]


def _tar_bytes(form: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=form) as tar:
        for name, data in _members():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip_bytes(method: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as z:
        for name, data in _members():
            if data is None:
                z.writestr(name + "/", b"")
            else:
                info = zipfile.ZipInfo(name)
                info.create_system, info.external_attr = 3, (stat.S_IFREG | 0o644) << 16
                info.compress_type = method
                z.writestr(info, data)
    return buffer.getvalue()


SEEDS: dict[str, tuple[str, bytes]] = {  # name -> (kind, uncompressed tar or zip bytes)
    "gnu.tgz": ("tgz", _tar_bytes(tarfile.GNU_FORMAT)),
    "pax.tgz": ("tgz", _tar_bytes(tarfile.PAX_FORMAT)),
    "gnu.tar": ("tar", _tar_bytes(tarfile.GNU_FORMAT)),
    "ustar.tar": ("tar", _tar_bytes(tarfile.USTAR_FORMAT)),
    "raw.tgz": ("gz-bytes", _tar_bytes(tarfile.GNU_FORMAT)),
    "deflated.zip": ("zip", _zip_bytes(zipfile.ZIP_DEFLATED)),
    "stored.zip": ("zip", _zip_bytes(zipfile.ZIP_STORED)),
}


# ------------------------------------------------------------------------------------------------ mutations
_TYPES = b"0123456789KLSxgAVDM\x00"
_TAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "type": (156, 1), "linkname": (157, 100)}
_TAR_FIELDS |= {"magic": (257, 8), "prefix": (345, 155), "uid": (108, 8), "mtime": (136, 12)}


def _header_offsets(data: bytes) -> list[int]:
    offsets, position = [], 0
    while position + 512 <= len(data):
        block = data[position : position + 512]
        if block == bytes(512):
            break
        offsets.append(position)
        size_field = block[124:136].rstrip(b"\x00 ")
        try:
            size = int(size_field or b"0", 8)
        except ValueError:
            break
        position += 512 + -(-size // 512) * 512
    return offsets


def _field_value(rng: random.Random, field: str, width: int) -> bytes:
    choice = rng.randrange(8)
    if field == "type":
        return bytes([rng.choice(_TYPES)])
    if choice == 0:
        return rng.randbytes(width)
    if choice == 1:  # an octal number, possibly huge
        return f"{rng.choice([0, 1, 511, 4096, 8**11 - 1, rng.randrange(8**11)]):0{width - 1}o}".encode()[:width]
    if choice == 2 and width >= 8:  # GNU base-256 number
        return b"\x80" + rng.randbytes(width - 1)
    if choice == 3:
        return rng.choice([b"../../escaped", b"/abs/escaped", b"car_ims/../../x", b"a\x00b", b"."]).ljust(
            width, b"\x00"
        )
    if choice == 4:
        return rng.choice([b"car_ims/000001.jpg", b"car_ims", b"car_ims/sub", b"escape/x"]).ljust(width, b"\x00")
    return bytes(width)


def _with_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block) & 0o7777777:06o}\x00 ".encode()


def _mutate_tar(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(6)
        offsets = _header_offsets(bytes(out))
        if kind <= 2 and offsets:  # a header field, usually with a valid checksum so that tarfile reads it
            base = rng.choice(offsets)
            field = rng.choice(list(_TAR_FIELDS))
            start, width = _TAR_FIELDS[field]
            out[base + start : base + start + width] = _field_value(rng, field, width)
            if rng.random() < 0.85:
                block = bytearray(out[base : base + 512])
                _with_checksum(block)
                out[base : base + 512] = block
        elif kind == 3:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 4:
            del out[rng.randrange(len(out)) :]
        elif out:
            at = rng.randrange(0, len(out), 512) if len(out) >= 512 else 0
            src = rng.randrange(0, max(len(out) - 512, 1))
            out[at:at] = out[src : src + 512 * rng.randint(1, 3)]
    return bytes(out)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(3)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:
        del out[rng.randrange(len(out)) :]
    else:
        at = rng.randrange(len(out))
        out[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x80", b"\xff\xff"])
    return bytes(out)


_ZIP_CENTRAL = {"made_by": (4, "<H"), "flags": (8, "<H"), "method": (10, "<H"), "csize": (20, "<I")}
_ZIP_CENTRAL |= {"usize": (24, "<I"), "name_len": (28, "<H"), "extra_len": (30, "<H"), "attr": (38, "<I")}
_ZIP_CENTRAL |= {"offset": (42, "<I")}
_ZIP_LOCAL = {"flags": (6, "<H"), "method": (8, "<H"), "csize": (18, "<I"), "usize": (22, "<I"), "name_len": (26, "<H")}


def _mutate_zip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        signature, fields = (b"PK\x01\x02", _ZIP_CENTRAL) if kind <= 1 else (b"PK\x03\x04", _ZIP_LOCAL)
        positions = [i for i in range(len(out) - 4) if out[i : i + 4] == signature]
        if kind <= 2 and positions:
            base = rng.choice(positions)
            offset, form = fields[rng.choice(list(fields))]
            width = struct.calcsize(form)
            interesting = [0, 1, 3, 8, 12, 14, 99, 0xFFFF, 0xFFFFFFFF, 1 << 31, (stat.S_IFLNK | 0o777) << 16]
            interesting += [(stat.S_IFIFO | 0o644) << 16, (stat.S_IFCHR | 0o644) << 16, 3 << 8, 0x0801]
            value = rng.choice(interesting + [rng.randrange(1 << (8 * width))]) & ((1 << (8 * width)) - 1)
            out[base + offset : base + offset + width] = struct.pack(form, value)
        else:
            out = bytearray(_mutate_bytes(rng, bytes(out)))
    return bytes(out)


def mutated(seed_name: str, rng: random.Random) -> bytes:
    kind, data = SEEDS[seed_name]
    if kind == "zip":
        return _mutate_zip(rng, data)
    if kind == "gz-bytes":  # the compressed stream itself (CRC, length trailer, deflate blocks)
        return _mutate_bytes(rng, gzip.compress(data, mtime=0))
    tar = _mutate_tar(rng, data)
    return gzip.compress(tar, mtime=0) if kind == "tgz" else tar


# ------------------------------------------------------------------------------------------------ the loop
def _load_archives_module() -> object:
    spec = importlib.util.spec_from_file_location("raml_archives_alone", ARCHIVES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _unexpected_files(box: Path, archive: Path, dest: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(box):
        for name in dirs + files:
            path = Path(root) / name
            if path in (archive, dest) or dest in path.parents:
                continue
            found.append(str(path.relative_to(box)))
    return found


def _peak_rss_mib() -> float:
    """This process's peak RSS since it started its program (``VmHWM``; ``ru_maxrss`` would carry the
    parent's peak over a fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_campaign(inputs_per_seed: int, seed: int) -> dict[str, object]:
    """Mutate every seed archive ``inputs_per_seed`` times and unpack each input; returns outcome counts and
    the failures (undocumented errors, escapes, leftovers), each with the seed and index to replay it."""
    archives = _load_archives_module()
    documented = (archives.ArchiveError, archives.InsufficientSpaceError)
    counts: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed_name, (kind, _) in SEEDS.items():
            unpacker = archives.ZipArchive() if kind == "zip" else archives.TarArchive()
            for index in range(inputs_per_seed):
                rng = random.Random(f"{seed}/{seed_name}/{index}")
                box = Path(tmp) / f"{seed_name}-{index}"
                box.mkdir()
                archive, dest = box / seed_name, box / "dest"
                archive.write_bytes(mutated(seed_name, rng))
                where = f"{seed_name} #{index} (seed {seed})"
                try:
                    unpacker.unpack(archive, dest)
                    outcome = "unpacked"
                except documented as error:
                    outcome = type(error).__name__
                except Exception as error:  # noqa: BLE001 - the point of the test: anything else is a finding
                    outcome = "UNDOCUMENTED"
                    failures.append(f"{where}: {type(error).__name__}: {error}")
                counts[outcome] += 1
                if escaped := _unexpected_files(box, archive, dest):
                    failures.append(f"{where}: wrote outside dest: {escaped}")
                if outcome in ("ArchiveError", "InsufficientSpaceError") and dest.exists():
                    failures.append(f"{where}: {outcome} left {dest} behind")
                if outcome == "unpacked":
                    for path in dest.rglob("*"):
                        mode = path.lstat().st_mode
                        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                            failures.append(f"{where}: wrote a non-regular member {path}")
                for path in sorted(box.rglob("*"), reverse=True):  # clean up as we go: bounded disk
                    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
                box.rmdir()
    return {
        "inputs": sum(counts.values()),
        "outcomes": dict(sorted(counts.items())),
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": _peak_rss_mib(),
        "address_space_limit_mib": ADDRESS_SPACE_LIMIT >> 20,
    }


def _child(inputs_per_seed: int, seed: int) -> dict[str, object]:
    """Run the campaign in a child process under RLIMIT_AS; its JSON report."""
    result = subprocess.run(
        [sys.executable, __file__, "--inputs", str(inputs_per_seed), "--seed", str(seed), "--limit"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and the file-type checks are for Linux")
def test_mutated_archives_give_only_documented_errors_and_write_nothing_outside():
    report = _child(INPUTS_PER_SEED, seed=0)
    assert report["failures"] == []
    assert report["inputs"] == INPUTS_PER_SEED * len(SEEDS)
    assert report["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB
    outcomes = report["outcomes"]
    # the mutations reach both the refusals and the unpacking (not only "not an archive")
    assert outcomes.get("unpacked", 0) > 0.05 * report["inputs"]
    assert outcomes.get("ArchiveError", 0) > 0.2 * report["inputs"]


def test_the_mutators_are_deterministic():
    first = [mutated(name, random.Random(f"0/{name}/3")) for name in SEEDS]
    assert first == [mutated(name, random.Random(f"0/{name}/3")) for name in SEEDS]
    assert all(m != SEEDS[name][1] for m, name in zip(first, SEEDS, strict=True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fuzz raml's archive readers with mutated tar/tgz/zip files.")
    parser.add_argument("--inputs", type=int, default=INPUTS_PER_SEED, help="inputs per seed archive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", action="store_true", help=f"set RLIMIT_AS to {ADDRESS_SPACE_LIMIT >> 20} MiB")
    options = parser.parse_args()
    if options.limit:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    print(json.dumps(run_campaign(options.inputs, options.seed)))
