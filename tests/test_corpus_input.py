"""The corpus under bad input (docs/DESIGN.md section 11): memory that does not grow with
a line's length, a cache that notices an edit that kept the size and time, tvq's own
folders and a crash's leftovers never read as documents, bad input as one line."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tvq.corpus import prepare, shards, sources, workers
from tvq.corpus.jsonl import RESTART, long_document
from tvq.corpus.sources import BadLine, document_text, find_files
from tvq.errors import CorpusError
from tvq.text.tokenizer import ByteTokenizer, train_sentencepiece
from tvqcli.main import app

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
runner = CliRunner()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("".join(p.read_text() for p in sorted(DATA.glob("*.txt"))))
    return train_sentencepiece([text], folder / "small.model", 400)


# -- 1. memory bounded whatever a line's length ---------------------------------------------


class Pieces:
    """A LongLine stand-in: the line's bytes in pieces of n."""

    def __init__(self, data: bytes, n: int) -> None:
        self.data, self.n = data, n

    def pieces(self):
        return (self.data[i : i + self.n] for i in range(0, len(self.data), self.n))


def streamed(data: bytes, n: int) -> str:
    parts: list[str] = []
    try:
        for piece in long_document(Pieces(data, n), "text"):
            parts = [] if piece is RESTART else [*parts, piece]
    except BadLine as e:
        return f"bad: {e}"
    return "".join(parts)


def whole(data: bytes) -> str:
    try:
        return document_text(data, "text") or ""
    except BadLine as e:
        return f"bad: {e}"


LINES = [
    b'{"text": "hello"}\n',
    b' { "a" : [1, 2.5e3, {"b": null}, [], {}], "text" : "h\\u00e9\\ud83d\\ude00 \\\\ud83d '
    b'x\\n\\"q" , "c": true}  \n',
    '{"text": "é€😀 naïve 中文", "id": -0.5E-3}'.encode(),
    b'{"text": "a", "text": "bb"}', b'{"text": "\\ud83d"}', b'{"text": "\\ude00\\ud83d"}',
    b'{"te\\u0078t": "escaped key"}', b'{"text": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"text": "bom"}',
    b'{"text": "a", "n": NaN, "m": -Infinity}', b'{"a": {"text": "inner"}, "text": "outer"}',
    b'{"text": ""}', b"{}", b'{"text": 3}', b'{"x": "y"}', b"[1, 2]", b'"str"', b"12", b"true",
    b'{"text": "a"', b'{"text": "a"} x', b'{"text": "a\tb"}', b'{"text": "a\\xb"}',
    b'{"text": "\xff"}', b'{"text": "a", "n": 1' + b"1" * 5000 + b"}", b'{"text": "a", "n": [1,]}',
    b'{"text": "a",}', b'{"text": "x", "text": 5}', b'{"text": 5, "text": "x"}',
    b'{"text": "x", "a": 01}', b'{"text": "\\u12"}',
]  # fmt: skip


def test_a_long_line_is_parsed_as_json_loads_parses_it():
    """Read in pieces of 1 to 11 bytes (cutting escapes, surrogate pairs and UTF-8
    sequences): the same document, or a bad line with the same reason for the kinds of
    bad line that name one."""
    for line in LINES:
        expect = whole(line)
        for n in range(1, 12):
            got = streamed(line, n)
            if expect.startswith("bad: not JSON"):
                assert got.startswith("bad: not JSON"), (line, n, got)
            else:
                assert got == expect, (line, n)


def test_long_lines_prepare_as_short_ones(tmp_path, monkeypatch, sentencepiece):
    """Lines over LONG_LINE (here 40 bytes) streamed into the shards: the same ids as
    `encode` of each document, a repeated field's last value, blank and bad lines
    skipped (what a bad line had written is cut off again)."""
    monkeypatch.setattr(sources, "LONG_LINE", 40)
    monkeypatch.setattr(workers, "PIECE_CHARS", 7)
    docs = [(DATA / "macbeth_head.txt").read_text()[:3000], "short", "x" * 100 + " é€😀"]
    lines = [json.dumps({"text": docs[0], "id": 1}), json.dumps({"text": docs[1]}),
             '{"text": "first, dropped", "text": ' + json.dumps(docs[2]) + "}",
             json.dumps({"text": " " * 80}), json.dumps({"text": "bad" * 30}) + " {",
             json.dumps({"text": 7, "pad": "y" * 60})]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    for tokenizer in (ByteTokenizer(), sentencepiece):
        req = prepare.request([tmp_path / "a.jsonl"], tokenizer=tokenizer, val_fraction=0,
                              skip_bad_lines=True)  # fmt: skip
        data = prepare.prepare(req, out=tmp_path / f"out-{tokenizer.kind}", workers=1)
        want = np.concatenate([np.r_[tokenizer.encode(d), tokenizer.eos_id] for d in docs])
        assert np.array_equal(data.train.read(0, len(data.train)), want)
        assert data.info["bad_lines"] == 2
        assert data.info["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in docs)


def test_a_document_with_no_cut_is_tokenized_in_bounded_pieces(sentencepiece, monkeypatch):
    """Text with spaces: cut exactly (the ids of the whole). Text with none: cut every
    MAX_PIECE_CHARS characters anyway, each piece encoded exactly, the ids decoding to
    the text."""
    monkeypatch.setattr(workers, "PIECE_CHARS", 50)
    monkeypatch.setattr(workers, "MAX_PIECE_CHARS", 200)
    encoder = workers.Encoder(sentencepiece, np.dtype("<u2"))
    spaced = (DATA / "hamlet_head.txt").read_text()[:2000]
    chunks = [spaced[i : i + 30] for i in range(0, len(spaced), 30)]
    pieces = list(encoder.pieces(iter(chunks)))
    assert len(pieces) > 5 and max(n for _, n in pieces) <= 200 + 30
    assert np.concatenate([ids for ids, _ in pieces]).tolist() == sentencepiece.encode(spaced)
    solid = "".join(spaced.split())  # no space, no newline
    chunks = [solid[i : i + 30] for i in range(0, len(solid), 30)]
    pieces = list(encoder.pieces(iter(chunks)))
    assert [n for _, n in pieces][:-1] == [210] * (len(pieces) - 1)  # 7 chunks each
    ids = np.concatenate([ids for ids, _ in pieces])
    assert sentencepiece.decode(ids) == solid
    cuts = range(0, len(solid), 210)
    assert ids.tolist() == [i for a in cuts for i in sentencepiece.encode(solid[a : a + 210])]


PEAK = """
import sys
from pathlib import Path
from tvq.corpus import prepare
from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer

def status(field):  # KiB
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1])

path, model = Path(sys.argv[1]), sys.argv[2]
tokenizer = ByteTokenizer() if model == "bytes" else SentencePieceTokenizer(model)
req = prepare.request([path], tokenizer=tokenizer, val_fraction=0)
tokenizer.encode("warm up " * 1000)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
data = prepare.prepare(req, out=path.parent / "out", workers=1)
print(status("VmHWM") - before, len(data.train))
"""


def peak_growth(folder: Path, name: str, content: bytes, model: str) -> int:
    """KiB that a preparation of one file adds to its process's peak memory."""
    folder.mkdir()
    (folder / name).write_bytes(content)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PEAK, str(folder / name), model], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    growth, tokens = map(int, done.stdout.split())
    assert tokens > len(content) // 4
    return growth


def test_memory_does_not_grow_with_a_line(tmp_path, sentencepiece):
    """One JSONL line of 6 and of 24 MB, and a text of 3 and of 12 MB with no newline or
    space: the peak memory of the preparation is the same (a read piece, a tokenizer
    piece), where holding the line would add tens of MB per MB."""
    for kind, model, sizes in (("jsonl", "bytes", (6, 24)),  # over LONG_LINE, 4 MiB
                               ("text", str(sentencepiece.path), (3, 12))):  # fmt: skip
        growth = []
        for mb in sizes:
            text = ("abcdefghijklmnopqrstuvwxyz0123456789" * (mb << 15))[: mb << 20]
            content = json.dumps({"text": text}).encode() if kind == "jsonl" else text.encode()
            growth.append(peak_growth(tmp_path / f"{kind}{mb}", f"a.{kind}", content, model))
        print(kind, "peak growth KiB", growth)
        assert growth[1] - growth[0] < 8 << 10, (kind, growth)  # KiB: under 8 MB more


# -- 2. the cache notices an edit that kept the size and the time ---------------------------


def test_an_edit_with_the_same_size_and_time_is_prepared_again(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("the first text, long enough\n")
    req = lambda: prepare.request([text], tokenizer=ByteTokenizer(), val_fraction=0)  # noqa: E731
    first = prepare.prepare(req())
    stat = text.stat()
    text.write_text("THE OTHER TEXT, LONG ENOUGH\n")  # the same size
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same time
    assert text.stat().st_size == stat.st_size and text.stat().st_mtime_ns == stat.st_mtime_ns
    second = prepare.prepare(req())
    assert not second.reused and second.folder != first.folder
    assert ByteTokenizer().decode(second.train.read(0, len(second.train))) == text.read_text()
    assert prepare.prepare(req()).reused
    assert not first.folder.exists()  # its input changed: pruned from the cache


# -- 3. tvq's own folders inside an input folder are not documents --------------------------


def test_own_folders_inside_an_input_folder_are_not_read(tmp_path, monkeypatch):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a document\n")
    (texts / "b.jsonl").write_text(json.dumps({"text": "another"}) + "\n")
    out = ["--bytes", "--val-fraction", "0", "--out", str(texts / "data")]
    made = runner.invoke(app, ["prepare", str(texts), *out])
    assert made.exit_code == 0, made.output
    again = runner.invoke(app, ["prepare", str(texts), *out])  # data/COMPLETE is no input
    assert again.exit_code == 0 and "nothing to do" in again.stderr, again.stderr
    info = json.loads((texts / "data" / "dataset.json").read_text())
    assert info["splits"]["train"]["documents"] == 2
    model = texts / "model"  # what tvq train --out writes: a model and its run
    (model / "params" / "d").mkdir(parents=True)
    (model / "params" / "d" / "0f3a9c").write_bytes(b"\x00\x01 orbax")
    (model / "config.json").write_text("{}")
    (model / "train").mkdir()
    (model / "train" / "run.json").write_text("{}")
    (model / "train" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.9}\n')
    cache = texts / "cache"  # the user cache, compiled programs without a suffix
    (cache / "jax").mkdir(parents=True)
    (cache / "jax" / "jit_step-0123abcd").write_bytes(b"\x7fELF")
    monkeypatch.setenv("TVQ_CACHE_DIR", str(cache))
    leftover = texts / ".data.old-host-1"  # a crash's folder
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("key\n")
    assert find_files([texts]) == [texts / "a.txt", texts / "b.jsonl"]


# -- 4. a crash between the renames of publish ---------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    """What a kill between `publish`'s renames leaves: no dataset under its name, the old
    one and the new one hidden beside it. The next run puts the new one in place and
    reads it (nothing tokenized), and no hidden folder stays behind."""
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("a document\n")
    req = prepare.request([texts], tokenizer=ByteTokenizer(), val_fraction=0)
    out = tmp_path / "data"
    prepare.prepare(req, out=out)
    host = socket.gethostname()
    new = tmp_path / f".data{shards.PARTIAL}{host}-{dead_pid()}"
    old = tmp_path / f".data{shards.OLD}{host}-{dead_pid()}"
    out.rename(new)
    shutil.copytree(new, old)
    again = prepare.prepare(req, out=out)
    assert again.reused and shards.is_prepared(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "texts"]
    # in the cache: another key's leftovers (one of the older naming, without the host)
    cached = prepare.prepare(req)
    for name in (f".abc{shards.OLD}{host}-{dead_pid()}", f".abc{shards.OLD}{dead_pid()}",
                 f".abc{shards.PARTIAL}{host}-{dead_pid()}"):  # fmt: skip
        (cached.folder.parent / name).mkdir()
        (cached.folder.parent / name / "train-00000.bin").write_bytes(b"\0\0")
    assert prepare.prepare(req).reused
    assert [p.name for p in cached.folder.parent.iterdir()] == [cached.folder.name]


# -- bad input is one line ---------------------------------------------------------------


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return " ".join(result.stderr.split())


def test_bad_files_are_one_line(tmp_path):
    out = ["--bytes", "--out", str(tmp_path / "data")]
    digits = tmp_path / "digits.jsonl"
    digits.write_text('{"text": "fine"}\n{"text": "x", "n": ' + "1" * 5000 + "}\n")
    assert "digits.jsonl:2: not JSON" in one_line_error(["prepare", str(digits), *out])
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "binary.jsonl:1: not JSON" in one_line_error(["prepare", str(binary), *out])
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    assert "pipe.txt is not a regular file" in one_line_error(["prepare", str(fifo), *out])
    gone = tmp_path / "gone.txt"
    gone.write_text("here while the inputs are found\n")
    req = prepare.request([gone], tokenizer=ByteTokenizer(), val_fraction=0)
    gone.unlink()
    with pytest.raises(CorpusError, match="gone.txt cannot be read: No such file"):
        prepare.prepare(req, out=tmp_path / "x")
