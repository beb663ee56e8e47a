"""Prepared datasets (docs/DESIGN.md section 11): the shards hold exactly `tokenizer.encode`
of every document, however the work is cut and shared out; training from them gives the
losses of training from the text; a second run reads the cache instead of the text; bad
input is one clear line; a killed preparation is never taken for a finished one."""

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from tvq.corpus import build, prepare, sample, shards, workers
from tvq.corpus.reader import TokenShards, TokenStream
from tvq.corpus.sources import Segment, SegmentReader, find_sources, text_chunks
from tvq.errors import CorpusError
from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from tvqcli.main import app

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
runner = CliRunner()
MODEL = ["--d-model", "32", "--d-k", "16", "--d-v", "32", "--n-code", "16", "--n-layer", "1",
         "--mem-len", "16", "--batch-size", "4", "--update-len", "32", "--block-len", "16",
         "--lr", "1e-2", "--warmup", "2", "--steps", "4", "--eval-every", "2"]  # fmt: skip
MULTI = "é€😀 naïve 中文\n"  # 2-, 3- and 4-byte characters on every line


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test prepares into its own cache folder."""
    monkeypatch.setenv("TVQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> SentencePieceTokenizer:
    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("".join(p.read_text() for p in sorted(DATA.glob("*.txt"))) + MULTI * 5)
    return train_sentencepiece([text], folder / "small.model", 400)


def corpus(folder: Path) -> list[str]:
    """Text, JSONL and gzip files (with an empty file, blank lines, multi-byte characters,
    an invalid UTF-8 byte) → the documents a run reads, in order."""
    folder.mkdir(parents=True)
    macbeth = (DATA / "macbeth_head.txt").read_text()
    hamlet = (DATA / "hamlet_head.txt").read_text()
    lines = macbeth.splitlines(keepends=True)
    text_a = "".join(line + MULTI for line in lines[:60])
    (folder / "a.txt").write_text(text_a)
    (folder / "b.md").write_bytes(hamlet[:1500].encode() + b"\xff broken\n" + MULTI.encode())
    (folder / "c.txt").write_text("  \n\t")  # whitespace alone: no document
    with gzip.open(folder / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write(hamlet[1500:] + MULTI)
    records = [para for para in macbeth.split("\n\n") if para.strip()][:25]
    jsonl = [json.dumps({"text": r + MULTI, "id": i}) for i, r in enumerate(records)]
    jsonl[3:3] = ["", json.dumps({"text": "   "})]  # a blank line, an empty document
    (folder / "e.jsonl").write_text("\n".join(jsonl) + "\n")
    with gzip.open(folder / "f.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"text": r}) for r in records[:5]))  # no final newline
    b = (hamlet[:1500].encode() + b"\xff broken\n" + MULTI.encode()).decode("utf-8", "replace")
    return [text_a, b, hamlet[1500:] + MULTI, *[r + MULTI for r in records],
            *records[:5]]  # fmt: skip


def expected(docs: list[str], tokenizer, mask: np.ndarray):
    pairs = list(zip(docs, mask, strict=True))
    train = [np.r_[tokenizer.encode(d), tokenizer.eos_id] for d, v in pairs if not v]
    return np.concatenate(train), [tokenizer.encode(d) for d, v in pairs if v]


@pytest.mark.parametrize(
    "kind, procs, unit_bytes, piece_chars",
    [("bytes", 1, None, None), ("bytes", 2, 300, None), ("sentencepiece", 1, 200, 7),
     ("sentencepiece", 2, 700, None)],
)  # fmt: skip
def test_shards_hold_the_encoding_of_every_document(
    tmp_path, sentencepiece, monkeypatch, kind, procs, unit_bytes, piece_chars
):
    """Cut into units of a few hundred bytes (files split after newlines, next to multi-byte
    characters) and, in-process, into tokenizer pieces of 7 characters: the same ids."""
    if piece_chars:
        monkeypatch.setattr(workers, "PIECE_CHARS", piece_chars)
    docs = corpus(tmp_path / "corpus")
    tokenizer = ByteTokenizer() if kind == "bytes" else sentencepiece
    req = prepare.request([tmp_path / "corpus"], tokenizer=tokenizer, val_fraction=0.2, seed=3)
    data = prepare.prepare(req, workers=procs, unit_bytes=unit_bytes)
    order = np.random.default_rng(3).permutation(len(docs))
    mask = np.zeros(len(docs), bool)
    mask[order[: round(len(docs) * 0.2)]] = True
    stream, held = expected(docs, tokenizer, mask)
    assert np.array_equal(data.train.read(0, len(data.train)), stream)
    assert [list(ids) for ids, _ in data.held_out] == held
    assert [size for _, size in data.held_out] == [
        len(d.encode()) for d, v in zip(docs, mask, strict=True) if v
    ]
    info = data.info
    assert info["splits"]["train"]["documents"] == int((~mask).sum())
    assert info["dtype"] == "<u2" and not data.reused
    assert len(info["splits"]["train"]["shards"]) > (1 if unit_bytes else 0)
    # the document index: each training document's first token, after the one before's eos
    index = np.fromfile(data.folder / "train.docs.bin", np.int64).reshape(-1, 5)
    lengths = [len(tokenizer.encode(d)) for d, v in zip(docs, mask, strict=True) if not v]
    assert index[:, 3].tolist() == lengths
    starts = np.concatenate([[0], np.cumsum(np.add(lengths, 1))[:-1]])
    assert index[:, 2].tolist() == starts.tolist()
    again = prepare.prepare(req, workers=procs, unit_bytes=unit_bytes)
    assert again.reused and again.folder == data.folder


def test_text_pieces_decode_like_the_whole_file(tmp_path):
    """Read cuts at every byte: invalid and multi-byte sequences decode as in one piece."""
    path = tmp_path / "t.txt"
    data = ("ab" + MULTI).encode() * 3 + b"\xe2\x82 \xff\xc3" + "€".encode()[:2]
    path.write_bytes(data)
    (src,) = find_sources([path])
    for size in range(1, 8):
        with SegmentReader(src) as reader:
            assert "".join(text_chunks(reader, size)) == data.decode("utf-8", "replace")
    start = data.index(b"\n") + 1
    with SegmentReader(src, Segment(0, start, -1)) as reader:
        assert "".join(text_chunks(reader, 3)) == data[start:].decode("utf-8", "replace")


def test_windows_from_shards_equal_windows_from_one_array():
    tokens = np.random.default_rng(0).integers(0, 300, 5000).astype(np.int32)
    cuts = [0, 1, 17, 1000, 1001, 2600, 5000]
    parts = [tokens[a:b].astype(np.uint16) for a, b in zip(cuts, cuts[1:], strict=False)]
    sharded = TokenShards(parts)
    assert len(sharded) == 5000 and np.array_equal(sharded.read(0, 5000), tokens)
    one, many = (TokenStream(t, 4, 32, seed=5) for t in (tokens, sharded))
    for step in (0, 1, 7, one.windows_per_epoch, 3 * one.windows_per_epoch + 2):
        assert np.array_equal(one.window(step), many.window(step))
        assert np.array_equal(one.window(step, slice(2, 4)), many.window(step)[2:4])


def test_a_process_reads_only_its_rows():
    """What each process of a cluster does (rows_from asks for its devices' rows): only
    those rows' tokens are read from the shards."""
    tokens = np.arange(4000, dtype=np.int32)
    reads = []

    class Counting(TokenShards):
        def read(self, start, length):
            reads.append((start, length))
            return super().read(start, length)

    stream = TokenStream(Counting([tokens[:1500], tokens[1500:]]), 4, 32, seed=1)
    window = stream.window(3, slice(2, 4))
    assert len(reads) == 2 and all(length == 33 for _, length in reads)
    assert [start // stream.row_len for start, _ in reads] == [2, 3]
    assert np.array_equal(window, TokenStream(tokens, 4, 32, seed=1).window(3)[2:4])


def metrics(out: Path) -> list[dict]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    timings = ("tokens_per_second", "mfu")  # measured, not computed
    return [{k: v for k, v in r.items() if k not in timings} for r in records]


def test_cached_runs_train_like_a_run_from_text(tmp_path):
    """tvq train TEXT prepares into the cache; a second run on the same text reads it
    (no tokenizing: the shards are untouched); tvq prepare + tvq train DATA: same losses."""
    texts = tmp_path / "texts"
    texts.mkdir()
    for p in DATA.glob("*.txt"):
        (texts / p.name).write_text(p.read_text())
    (texts / "more.jsonl").write_text(json.dumps({"body": DATA.joinpath("hamlet_head.txt")
                                                  .read_text()}) + "\n")  # fmt: skip
    first = runner.invoke(app, ["train", str(texts), "--bytes", "--text-field", "body",
                                "--out", str(tmp_path / "a"), *MODEL])  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "prepared" in first.stderr and "tokenize:" in first.stderr
    (cached,) = [p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.startswith(".")]
    stamps = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}

    second = runner.invoke(app, ["train", str(texts), "--bytes", "--text-field", "body",
                                 "--out", str(tmp_path / "b"), *MODEL])  # fmt: skip
    assert second.exit_code == 0, second.output
    assert "using the prepared data" in second.stderr and "tokenize:" not in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == stamps

    made = runner.invoke(app, ["prepare", str(texts), "--bytes", "--text-field", "body",
                               "--out", str(tmp_path / "data")])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "train with: tvq train" in made.stderr
    third = runner.invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "c"),
                                *MODEL])  # fmt: skip
    assert third.exit_code == 0, third.output
    log = metrics(tmp_path / "a")
    assert len([r for r in log if "loss" in r]) == 4 and any("val_loss" in r for r in log)
    assert metrics(tmp_path / "b") == log and metrics(tmp_path / "c") == log
    again = runner.invoke(app, ["prepare", str(texts), "--bytes", "--text-field", "body",
                                "--out", str(tmp_path / "data")])  # fmt: skip
    assert again.exit_code == 0 and "nothing to do" in again.stderr
    # a changed input is a new key: prepared again
    os.utime(texts / "more.jsonl", ns=(1, 1))
    fourth = runner.invoke(app, ["prepare", str(texts), "--bytes", "--text-field", "body",
                                 "--out", str(tmp_path / "data")])  # fmt: skip
    assert fourth.exit_code == 0 and "tokenize:" in fourth.stderr


def test_the_tokenizer_trains_on_a_bounded_sample(tmp_path, monkeypatch):
    """Under the bound, all training text (as a run from text trains on); above it, a
    sample within the bound drawn from every file."""
    seen = []
    real = build.train_sentencepiece

    def spy(files, model_path, vocab_size, **kw):
        seen.append(Path(files[0]).read_text())
        return real(files, model_path, vocab_size, **kw)

    monkeypatch.setattr(build, "train_sentencepiece", spy)
    folder = tmp_path / "texts"
    folder.mkdir()
    parts = [(DATA / "macbeth_head.txt").read_text(), (DATA / "hamlet_head.txt").read_text()]
    for i, part in enumerate(parts):
        (folder / f"{i}.txt").write_text(part * 4)
    prepare.prepare(prepare.request([folder], vocab_size=400, val_fraction=0))
    assert seen[-1] == "\n".join(p * 4 for p in parts)
    monkeypatch.setattr(build, "SAMPLE_BYTES", 20000)
    monkeypatch.setattr(sample, "SAMPLE_MIN_TAKE", 100)
    data = prepare.prepare(prepare.request([folder], vocab_size=400, val_fraction=0))
    assert 10000 < len(seen[-1].encode()) <= 20000
    assert parts[0][:500] in seen[-1] and parts[1][:500] in seen[-1]
    assert data.info["tokenizer"]["trained_on_bytes"] == len(seen[-1].encode())


def one_line_error(args: list[str], code: int = 1) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    return " ".join(result.stderr.split())


def test_bad_input_is_one_line(tmp_path):
    out = ["--out", str(tmp_path / "data"), "--bytes"]
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"})
    for content, message in [
        (f"{good}\n{good}\n{{nope\n", "bad.jsonl:3: not JSON"),
        (f"{good}\n[1, 2]\n", "bad.jsonl:2: not a JSON object (a list)"),
        (f'{good}\n\n{{"title": "x"}}\n', "bad.jsonl:3: no field 'text'"),
        ('{"text": 3}\n', "bad.jsonl:1: field 'text' is not a string"),
    ]:
        bad.write_text(content)
        assert message in one_line_error(["prepare", str(bad), *out])
    many = tmp_path / "many"
    many.mkdir()
    lines = [good] * 300 + ["{broken"] + [good] * 10
    (many / "x.jsonl").write_text("\n".join(lines) + "\n")
    message = one_line_error(["prepare", str(many), *out, "--workers", "2"])
    assert "x.jsonl:301: not JSON" in message and "--skip-bad-lines" in message
    with pytest.raises(CorpusError, match="x.jsonl:301: not JSON"):  # in the 3rd of 5 units
        prepare.prepare(prepare.request([many], tokenizer=ByteTokenizer()), workers=2,
                        unit_bytes=2000)  # fmt: skip
    skipped = runner.invoke(app, ["prepare", str(many / "x.jsonl"), *out, "--skip-bad-lines"])
    assert skipped.exit_code == 0, skipped.output
    assert "1 bad line skipped" in skipped.stderr
    info = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert info["bad_lines"] == 1
    assert sum(info["splits"][s]["documents"] for s in ("train", "val")) == 310

    whole = gzip.compress(("x" * 5000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    assert "cut.txt.gz is not a complete gzip file" in one_line_error(
        ["prepare", str(tmp_path / "cut.txt.gz"), *out]
    )
    (tmp_path / "notes.pdf").write_text("x")
    assert "notes.pdf: unknown kind of file" in one_line_error(
        ["prepare", str(tmp_path / "notes.pdf"), *out]
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text(" \n")
    (empty / "b.jsonl").write_text('{"text": ""}\n\n')
    assert "every file is empty" in one_line_error(["prepare", str(empty), *out])
    assert "every file is empty" in one_line_error(
        ["train", str(empty), "--bytes", "--out", str(tmp_path / "m")]
    )
    # usage errors: exit 2
    made = runner.invoke(app, ["prepare", str(DATA), "--out", str(tmp_path / "ok"), "--bytes"])
    assert made.exit_code == 0, made.output
    assert "--bytes does not go with a prepared dataset" in one_line_error(
        ["train", str(tmp_path / "ok"), "--bytes", "--out", str(tmp_path / "m2")], 2
    )
    assert "not both" in one_line_error(
        ["prepare", str(DATA), *out, "--tokenizer", str(tmp_path / "x.model")], 2
    )


KILL_AT_PUBLISH = """
import os, signal, sys
from tvq.corpus import prepare, shards
from tvqcli.main import main

def killed(*args, **kwargs):  # everything is written but the dataset is not published yet
    os.kill(os.getpid(), signal.SIGKILL)

shards.publish = killed
sys.argv = ["tvq", *sys.argv[1:]]
main()
"""


def test_a_killed_preparation_is_never_taken_for_a_finished_one(tmp_path):
    data = tmp_path / "data"
    args = ["prepare", str(DATA), "--bytes", "--out", str(data)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, "-c", KILL_AT_PUBLISH, *args], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    assert not data.exists()
    (leftover,) = tmp_path.glob(".data.partial-*")
    assert (leftover / "train-00000.bin").is_file() and not shards.is_prepared(leftover)
    # what a kill between dataset.json and COMPLETE would leave, under the final name
    leftover.rename(data)
    (data / shards.INFO_FILE).write_text(json.dumps({"key": "x"}))
    assert "unfinished prepared dataset" in one_line_error(
        ["train", str(data), "--out", str(tmp_path / "m")]
    )
    data.rename(leftover)
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert shards.is_prepared(data) and not list(tmp_path.glob(".data.partial-*"))
    # a dataset whose COMPLETE is gone is not a dataset
    (data / shards.COMPLETE_FILE).unlink()
    assert not shards.is_prepared(data)


def test_a_damaged_cache_entry_is_made_again(tmp_path):
    """A finished dataset whose shard was cut short is refused by name when given as DATA,
    and rebuilt when it is the cache of tvq train TEXT."""
    req = prepare.request([DATA], tokenizer=ByteTokenizer(), val_fraction=0)
    data = prepare.prepare(req)
    shard = data.folder / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CorpusError, match="prepare it again"):
        shards.PreparedData.open(data.folder)
    again = prepare.prepare(req)
    assert not again.reused and again.folder == data.folder
    assert shard.stat().st_size == 2 * len(again.train)


def prepared_digest(folder: Path, corpus_dir: Path) -> dict[str, str]:
    """sha256 of every file of a prepared dataset; dataset.json without what names this
    run (its key and inputs' paths and times, the date, the timings, the tokenizer's
    fingerprint), COMPLETE skipped (the key again), of a trained tokenizer its pieces."""
    digests = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.name == "COMPLETE":
            continue
        if path.name == "tokenizer.model":  # its pieces: the file names its training text
            model = spm.SentencePieceProcessor(model_file=str(path))
            data = json.dumps([(model.id_to_piece(i), model.get_score(i))
                               for i in range(model.get_piece_size())]).encode()  # fmt: skip
        if path.name == "dataset.json":
            info = json.loads(data)
            for volatile in ("key", "created", "seconds"):
                info.pop(volatile)
            if info["tokenizer"]["kind"] == "sentencepiece":
                file = (folder / "tokenizer.model").read_bytes()
                fingerprint = "sha256:" + hashlib.sha256(file).hexdigest()
                assert info["tokenizer"].pop("fingerprint") == fingerprint
            for item in info["inputs"]:
                item["path"] = str(Path(item.pop("path")).relative_to(corpus_dir.resolve()))
                item.pop("mtime_ns")
                item.pop("ctime_ns")
            if "files" in info["held_out"]:
                info["held_out"]["files"] = [Path(p).name for p in info["held_out"]["files"]]
            data = json.dumps(info).encode()  # the order of the fields too
        digests[path.name] = hashlib.sha256(data).hexdigest()[:16]
    return digests


GOLDEN_SENTENCEPIECE = {
    "dataset.json": "eccb16c6daf53b1a", "tokenizer.model": "b99d4bcecc3662d5",
    "train-00000.bin": "a60878fffe639657", "train.docs.bin": "7a585c494e195d02",
    "val-00000.bin": "d4c0ba68e7d217ac", "val.docs.bin": "7bde917efe376906"
}  # fmt: skip
GOLDEN_BYTES = {
    "dataset.json": "3196979d64325929", "train-00000.bin": "23986f0e2d87de6c",
    "train-00001.bin": "fef7c3889a2934d6", "train-00002.bin": "eabdd69838176ce7",
    "train-00003.bin": "8ac010c69204af01", "train-00004.bin": "3d88bcfc09b7145d",
    "train-00005.bin": "2b0518eb77b3cd12", "train-00006.bin": "949ae9ca576669f6",
    "train-00007.bin": "279289d8c7c7ac26", "train-00008.bin": "3025fcdeebe38230",
    "train-00009.bin": "5932ce52d5f351bf", "train-00010.bin": "7d404abfdc317940",
    "train-00011.bin": "7a01137212467790", "train-00012.bin": "62f41bf389eadb96",
    "train-00013.bin": "a3d74dabb6f8f607", "train-00014.bin": "7662aec5c13112cb",
    "train-00024.bin": "67030ad3d18074a5", "train.docs.bin": "7031b0b436df1e6f",
    "val-00015.bin": "ba1723ea90705e9d", "val-00016.bin": "5c6a2450e4a1f0d7",
    "val-00017.bin": "c5be546312c4b605", "val-00018.bin": "180c6a10023270da",
    "val-00019.bin": "9045e2679f9eb2af", "val-00020.bin": "747eb8b9727e8bcb",
    "val-00021.bin": "e028c9e8f348684c", "val-00022.bin": "d87b158f8882a973",
    "val-00023.bin": "bee9a7fffe4c92cb", "val.docs.bin": "d17e2c8f3ee90b70"
}  # fmt: skip


def test_prepared_shards_hash_as_recorded(tmp_path):
    """The prepared files of a small corpus are byte for byte those recorded when the
    format was made (a sentencepiece tokenizer trained by tvq prepare with a held-out
    fraction; bytes with a --val file, cut into units of 300 bytes)."""
    corpus(tmp_path / "corpus")
    made = runner.invoke(app, ["prepare", str(tmp_path / "corpus"), "--vocab-size", "400",
                               "--val-fraction", "0.2", "--seed", "3",
                               "--out", str(tmp_path / "spm")])  # fmt: skip
    assert made.exit_code == 0, made.output
    req = prepare.request([tmp_path / "corpus"], tokenizer=ByteTokenizer(),
                          held_out=[tmp_path / "corpus" / "e.jsonl"])  # fmt: skip
    prepare.prepare(req, out=tmp_path / "bytes", workers=1, unit_bytes=300)
    assert prepared_digest(tmp_path / "spm", tmp_path / "corpus") == GOLDEN_SENTENCEPIECE
    assert prepared_digest(tmp_path / "bytes", tmp_path / "corpus") == GOLDEN_BYTES


def test_one_cache_folder_holds_compiled_programs_and_datasets(tmp_path, monkeypatch):
    """$TVQ_CACHE_DIR, else $XDG_CACHE_HOME/tvq: JAX's compiled programs, the warm-start
    files and the prepared datasets of tvq train TEXT side by side in it, either way."""
    import jax

    from tvq.files import warm

    seen = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: seen.__setitem__(name, value))
    monkeypatch.setattr(warm, "enable", lambda folder: seen.__setitem__("warm", folder))
    for variable, folder in [("TVQ_CACHE_DIR", tmp_path / "own"),
                             ("XDG_CACHE_HOME", tmp_path / "xdg")]:  # fmt: skip
        monkeypatch.delenv("TVQ_CACHE_DIR")
        monkeypatch.setenv(variable, str(folder))
        root = folder if variable == "TVQ_CACHE_DIR" else folder / "tvq"
        warm.enable_caches()
        assert Path(seen["jax_compilation_cache_dir"]) == root / "jax"
        assert seen["warm"] == root / "warm"
        assert prepare.data_cache_dir() == root / "data"
