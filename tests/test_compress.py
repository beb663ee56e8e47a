"""tvq compress (docs/DESIGN.md section 16): exact round trips of any bytes, files coded
together equal each alone, one process's output read by another (and on several
devices), and every kind of wrong file refused with its own error."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, forced_devices, save_byte_model, tiny_config

import tvq
from tvq.compression import coder, files, jobs, rans, split
from tvq.compression.container import END_BYTES, FRAME_BYTES, VERSION, Frame, Header, read_record
from tvq.compression.files import compress, compress_streams, decompress
from tvq.compression.symbols import NO_BYTE, Symbols
from tvq.errors import InputError
from tvq.text.tokenizer import SentencePieceTokenizer, train_sentencepiece

TEXT = ("Whether 'tis nobler in the mind to suffer\r\nThe slings and arrows of outrageous "
        "fortune,\n\tOr to take arms against a sea of troubles.\n") * 3  # fmt: skip
ODD = TEXT.encode() + b"\x00NUL \xff\xfe invalid \xc3( utf-8 \xe2\x82 cut" + TEXT[:40].encode()
OTHER_SCRIPT = "Ἐν ἀρχῇ ἦν ὁ λόγος. 道可道，非常道。 Съешь же ещё этих мягких булок.\n".encode()


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    return tvq.load(save_byte_model(tmp_path_factory.mktemp("bytes"), seed=3))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny model over a sentencepiece vocabulary with byte fallback (tvq's own kind)."""
    folder = tmp_path_factory.mktemp("spm")
    (folder / "text.txt").write_text(TEXT * 20 + OTHER_SCRIPT.decode())
    tokenizer = train_sentencepiece([folder / "text.txt"], folder / "t.model", 340)
    model = tvq.Model.init(tiny_config(n_vocab=340, mem_len=8), seed=1, block_len=4)
    return model.with_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def normalizing_model(tmp_path_factory):
    """A vocabulary with no byte fallback that normalises (NFKC) and adds a dummy prefix,
    like T5's: what it cannot give back exactly must go through the escape."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("nfkc")
    (folder / "text.txt").write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "n"),
                                   vocab_size=40, model_type="unigram", minloglevel=2,
                                   character_coverage=1.0)  # fmt: skip
    tokenizer = SentencePieceTokenizer(folder / "n.model")
    model = tvq.Model.init(tiny_config(n_vocab=tokenizer.vocab_size, mem_len=8), seed=2,
                           block_len=4)  # fmt: skip
    return model.with_tokenizer(tokenizer)


CASES = {"empty": b"", "one byte": b"A", "text": TEXT.encode(), "CRLF, NUL, invalid UTF-8": ODD,
         "another script": OTHER_SCRIPT}  # fmt: skip


@pytest.mark.parametrize("kind", ["byte_model", "spm_model"])
def test_round_trips_are_exact(kind, request):
    model = request.getfixturevalue(kind)
    for name, data in CASES.items():
        packed = compress(model, data)
        assert decompress(model, packed) == data, name
        assert packed[:4] == b"TVQZ"


def test_the_program_decodes_what_the_host_encodes():
    """rans: tables peaked, flat and random, with escaped bytes among the tokens, coded
    on the host and decoded by the JAX decoder, which ends at LOW having read every byte;
    each table sums to TOTAL with a floor of 1."""
    rng = np.random.default_rng(0)
    v = 300
    tables, symbols, expected = [], [], []
    for i in range(400):
        logits = rng.normal(size=v) * (0.1, 4.0, 40.0)[i % 3]
        log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
        freq = np.asarray(rans.frequencies(log_probs))
        assert freq.sum() == rans.TOTAL and freq.min() >= 1
        starts = np.cumsum(freq) - freq
        token = int(rng.integers(v)) if i % 5 else int(np.argmax(freq))
        byte = int(rng.integers(256)) if i % 7 == 0 else NO_BYTE
        tables.append(freq)
        symbols.append((int(starts[token]), int(freq[token])))
        if byte != NO_BYTE:
            symbols.append((byte << rans.BYTE_BITS, 1 << rans.BYTE_BITS))
        expected.append((token, byte))
    stream = rans.encode(symbols)
    ideal = -sum(np.log2(f / rans.TOTAL) for _, f in symbols) / 8
    assert ideal <= len(stream) <= ideal + 5

    @jax.jit
    def decode_one(state, at, freq, window):
        slot_of = rans.token_slot(jnp.cumsum(freq) - freq, freq)
        token, state, at = rans.decode(state, window, at, slot_of)
        byte, state_b, at_b = rans.decode(state, window, at, rans.byte_slot)
        return token, byte, state, at, state_b, at_b

    window = jnp.asarray(np.frombuffer(stream, np.uint8))
    state, at = jnp.uint32(rans.first_state(stream)), jnp.int32(4)
    for freq, (token, byte) in zip(tables, expected, strict=True):
        got, got_byte, state, at, state_b, at_b = decode_one(state, at, freq, window)
        assert int(got) == token
        if byte != NO_BYTE:
            assert int(got_byte) == byte
            state, at = state_b, at_b
    assert int(state) == rans.LOW and int(at) == len(stream)


def test_the_decompressor_decodes_32_tokens_a_call(spm_model, monkeypatch):
    """The decoder runs inside the program: decompressing takes the calls compressing
    takes, 32 steps each but for a frame's last few."""
    calls = {}
    steps = coder.coding_steps

    def counting(config, params, rings, coder_state, targets, windows, **options):
        calls[mode].append(targets.shape[0])
        return steps(config, params, rings, coder_state, targets, windows, **options)

    monkeypatch.setattr(coder, "coding_steps", counting)
    monkeypatch.setattr(jobs, "worth_coding", lambda coded, stored: True)  # untrained: coded
    data = TEXT.encode() * 4
    mode = "compress"
    calls[mode] = []
    packed = compress(spm_model, data)
    mode = "decompress"
    calls[mode] = []
    assert decompress(spm_model, packed) == data
    probe = [1] * len(coder.PROBE_TOKENS)  # the header's probe: one step a call
    tokens = sum(calls["compress"]) - len(probe)
    assert tokens > 200 and calls["decompress"] == calls["compress"]
    assert calls["compress"] == probe + [32] * (tokens // 32) + [1] * (tokens % 32)


def test_what_the_tokenizer_cannot_give_back_is_escaped(normalizing_model):
    symbols = Symbols(normalizing_model.tokenizer)
    assert symbols.escape == normalizing_model.tokenizer.unk_id
    for data in (b"", ODD, OTHER_SCRIPT, "ﬁ ① Ａ\u00a0x  spaces".encode()):  # NFKC changes these
        tokens, escaped = symbols.encode(data)
        assert b"".join(map(symbols.bytes_of, tokens, escaped)) == data
        assert decompress(normalizing_model, compress(normalizing_model, data)) == data
    assert any(b != -1 for b in symbols.encode(OTHER_SCRIPT)[1])  # escapes were needed


def test_random_bytes_grow_by_a_small_bound(spm_model):
    data = np.random.default_rng(0).bytes(200_000)
    packed = compress(spm_model, data)
    assert decompress(spm_model, packed) == data
    assert len(packed) <= len(data) + 64 + 9 * (len(data) // 8192 + 1)


def test_frames_coded_in_vain_are_stored_and_the_state_rewinds(byte_model, monkeypatch):
    """An untrained byte model needs more than 8 bits a byte: frames are stored and the
    row goes back to its state before them; a frame coded later still decodes."""
    monkeypatch.setattr(jobs, "FRAME_TOKENS", 40)
    data = TEXT.encode() * 2
    packed = io.BytesIO()
    results = list(compress_streams(byte_model, [(io.BytesIO(data), packed, "t")]))
    assert results[0].error is None and results[0].original == len(data)
    kinds = record_kinds(packed.getvalue())
    assert kinds.count("stored") == len(data) // 40 + 1 and kinds[-1] == "end"
    assert decompress(byte_model, packed.getvalue()) == data
    # every other frame kept coded: the decompressor's state must follow the rewinds
    turns = iter(range(10**6))
    monkeypatch.setattr(jobs, "worth_coding", lambda coded, stored: next(turns) % 2 == 1)
    packed = compress(byte_model, data)
    assert record_kinds(packed)[:4] == ["stored", "coded", "stored", "coded"]
    assert decompress(byte_model, packed) == data


def record_kinds(packed: bytes) -> list[str]:
    """The container's records in order: coded, stored, end."""
    stream, kinds = io.BytesIO(packed), []
    Header.read(stream, "x")
    while True:
        record = read_record(stream, "x", len(kinds) + 1)
        kinds.append("coded" if isinstance(record, Frame) else
                     "stored" if isinstance(record, bytes) else "end")  # fmt: skip
        if kinds[-1] == "end":
            return kinds


def test_several_files_at_once_equal_each_alone(spm_model, monkeypatch):
    monkeypatch.setattr(jobs, "FRAME_TOKENS", 50)  # several frames each, ending apart
    texts = [TEXT.encode(), OTHER_SCRIPT * 3, b"", ODD, TEXT.encode()[::-1]]
    alone = [compress(spm_model, data) for data in texts]
    sinks = [io.BytesIO() for _ in texts]
    items = [(io.BytesIO(d), s, f"f{i}") for i, (d, s) in enumerate(zip(texts, sinks, strict=True))]
    results = list(compress_streams(spm_model, items, rows=3))
    assert sorted(r.name for r in results) == [f"f{i}" for i in range(len(texts))]
    assert [s.getvalue() for s in sinks] == alone
    assert [decompress(spm_model, packed) for packed in alone] == texts


@pytest.mark.parametrize("rows", [2, 3])
def test_a_split_file_round_trips(spm_model, monkeypatch, rows):
    """Frames go to the rows in turn, as one batch: binary frames, frames coded in vain
    (their rows go back to the round's start on both sides, the decompressor's having
    idled), escapes and a last round shorter than the others all come back exact."""
    monkeypatch.setattr(split, "SPLIT_FRAME_TOKENS", 40)
    turns = iter(range(10**6))
    monkeypatch.setattr(jobs, "worth_coding", lambda coded, stored: next(turns) % 3 != 1)
    data = TEXT.encode() * 3 + bytes(range(256)) * 2 + ODD + OTHER_SCRIPT * 2
    sink = io.BytesIO()
    (there,) = compress_streams(spm_model, [(io.BytesIO(data), sink, "x")], split=rows)
    packed = sink.getvalue()
    back = io.BytesIO()
    (again,) = files.decompress_streams(spm_model, [(io.BytesIO(packed), back, "x")])
    assert back.getvalue() == data and again.error is None
    assert (there.tokens, there.escapes, there.original) == (again.tokens, again.escapes,
                                                             again.original)  # fmt: skip
    assert Header.read(io.BytesIO(packed), "x").rows == rows
    kinds = record_kinds(packed)
    assert kinds.count("coded") >= 2 * rows and kinds.count("stored") >= rows
    assert decompress(spm_model, packed) == data
    assert compress(spm_model, data) != packed  # one row: another file
    monkeypatch.setattr(files, "probe", lambda model, rows=1: b"\x00" * 8)
    with pytest.raises(InputError, match="computes other numbers"):  # at the file's width
        decompress(spm_model, packed)


def test_a_split_pipe_gets_the_rows_its_length_needs(spm_model, monkeypatch):
    """A stream of unknown length: sized by what two rounds' read-ahead finds, at least
    2 rows; a long one gets the rows asked for."""
    monkeypatch.setattr(split, "SPLIT_FRAME_TOKENS", 40)
    for data, rows in ((b"short", 2), (TEXT.encode() * 6, 8)):
        pipe, sink = io.BufferedReader(io.BytesIO(data)), io.BytesIO()  # no length to read
        (result,) = compress_streams(spm_model, [(pipe, sink, "pipe")], split=8)
        assert result.error is None
        assert Header.read(io.BytesIO(sink.getvalue()), "x").rows == rows
        assert decompress(spm_model, sink.getvalue()) == data


def test_split_files_at_once_equal_each_alone(spm_model, monkeypatch):
    monkeypatch.setattr(split, "SPLIT_FRAME_TOKENS", 40)
    monkeypatch.setattr(jobs, "worth_coding", lambda coded, stored: True)
    texts = [TEXT.encode() * 2, b"short", OTHER_SCRIPT * 4]
    alone = [compress(spm_model, data, split=3) for data in texts]
    assert [Header.read(io.BytesIO(p), "x").rows for p in alone] == [3, 1, 3]  # short: 1 row
    sinks = [io.BytesIO() for _ in texts]
    items = [(io.BytesIO(d), s, f"f{i}") for i, (d, s) in enumerate(zip(texts, sinks, strict=True))]
    results = list(compress_streams(spm_model, items, split=3))
    assert all(r.error is None for r in results) and len(results) == 3
    assert [s.getvalue() for s in sinks] == alone
    assert [decompress(spm_model, packed) for packed in alone] == texts
    assert split.rows_for(32, 100) == 1 and split.rows_for(32, None) == 32
    assert split.rows_for(4, 10**9) == 4


def test_a_split_files_last_round_keeps_every_row_busy(byte_model, monkeypatch):
    """Rounds of `rows` frames while two or more are left, then the rest cut into `rows`
    equal frames; together, the input."""
    symbols = Symbols(byte_model.tokenizer)
    monkeypatch.setattr(split, "SPLIT_FRAME_TOKENS", 10)
    data = bytes(range(95))
    frames = jobs.Frames(symbols, io.BytesIO(data), 10)
    rounds = list(split.rounds(frames, 3, symbols))
    assert [[len(tokens) for tokens, _, _ in r] for r in rounds] == [[10] * 3, [10] * 3,
                                                                      [12, 12, 11]]  # fmt: skip
    assert b"".join(frame[2] for r in rounds for frame in r) == data
    assert frames.length == len(data)


def test_the_batched_program_gives_the_same_numbers_in_any_steps_a_call(spm_model):
    """32 steps in one call equal 32 calls of one step at a split file's width: the two
    sides of a split file cut a round into calls differently where a row coded in vain
    ran on one side and idled on the other."""
    config, params, width = spm_model.config, spm_model.params, 3
    rng = np.random.default_rng(1)
    targets = np.stack([rng.integers(0, config.n_vocab, [32, width]),
                        np.full([32, width], NO_BYTE)], -1).astype(np.int32)  # fmt: skip
    windows = np.zeros([width, coder.WINDOW], np.uint8)
    state = (np.zeros(width, np.int32), np.zeros(width, np.uint32), np.zeros(width, bool),
             np.int32(NO_BYTE))  # fmt: skip

    def fresh():
        return jax.tree_util.tree_map(jnp.copy, split.empty_rings(config, width))

    (_, (last, _, _)), whole = coder.coding_steps(config, params, fresh(), state, targets,
                                                  windows, batched=True)  # fmt: skip
    ring, calls, tokens = fresh(), [], state[0]
    for k in range(32):
        step_state = (tokens, *state[1:])
        (ring, (tokens, _, _)), outs = coder.coding_steps(config, params, ring, step_state,
                                                          targets[k : k + 1], windows,
                                                          batched=True)  # fmt: skip
        calls.append(np.asarray(outs))
    assert np.array_equal(np.concatenate(calls, 1), np.asarray(whole))
    assert np.array_equal(np.asarray(tokens), np.asarray(last))


def test_wrong_files_are_refused_each_with_its_own_error(spm_model, byte_model):
    data = TEXT.encode() * 2
    packed = compress(spm_model, data)
    errors = {
        "another model": (spm_model.with_agg_cache(True), None),  # checked below
        "not a tvq": (spm_model, b"PK\x03\x04 a zip file"),
        "truncated": (spm_model, packed[:-5]),
        "format version 9": (spm_model, packed[:4] + b"\x09" + packed[5:]),
    }
    other = tvq.Model.init(spm_model.config, seed=9, block_len=4).with_tokenizer(
        spm_model.tokenizer
    )
    errors["another model"] = (other, packed)
    for message, (model, wrong) in errors.items():
        with pytest.raises(InputError, match=message):
            decompress(model, wrong)
    with pytest.raises(InputError, match="truncated"):
        decompress(spm_model, packed[:30])

    refused = 0
    for at in range(0, len(packed), max(1, len(packed) // 40)):  # a flipped byte anywhere
        edited = bytearray(packed)
        edited[at] ^= 0x10
        try:  # never wrong bytes: refused, or (a bit the coder never reads) the original
            assert decompress(spm_model, bytes(edited)) == data
        except InputError as e:
            assert any(word in str(e) for word in ("corrupt", "truncated", "another", "not a"))
            refused += 1
    assert refused >= 35


def test_a_frame_claiming_too_many_tokens_is_refused_at_once(spm_model, monkeypatch):
    """A frame's token count is not under its checksum: an edited one is refused before
    it runs, never decoded for 2**28 steps."""
    monkeypatch.setattr(jobs, "worth_coding", lambda coded, stored: True)
    packed = compress(spm_model, TEXT.encode())
    at = len(Header.read(io.BytesIO(packed), "x").to_bytes())
    assert packed[at : at + 1] == b"F"
    huge = packed[: at + 1] + (1 << 28).to_bytes(4, "little") + packed[at + 5 :]
    with pytest.raises(InputError, match="impossible"):
        decompress(spm_model, huge)


def test_numbers_computed_elsewhere_are_refused(spm_model, monkeypatch):
    packed = compress(spm_model, b"some text")
    monkeypatch.setattr(coder, "probe", lambda model: b"\x00" * 8)
    monkeypatch.setattr(files, "probe", lambda model: b"\x00" * 8)
    with pytest.raises(InputError, match="computes other numbers"):
        decompress(spm_model, packed)


def test_the_header_records_the_settings(spm_model):
    packed = compress(spm_model.with_agg_cache(False), TEXT.encode())
    header = Header.read(io.BytesIO(packed), "x")
    assert not header.agg_cache and not header.bfloat16
    assert decompress(spm_model, packed) == TEXT.encode()  # the decompressor applies them
    assert compress(spm_model, TEXT.encode()) != packed


def test_the_builtin_model_costs_what_score_says():
    """The coded words take the bits `tvq score` gives the same text, within 1% and the
    range coder's last word or two (bench/compress.py: within 1% on whole plays)."""
    model = tvq.load()
    data = (ROOT / "tests" / "data" / "hamlet_head.txt").read_bytes()[:1200]
    packed = compress(model, data)
    assert decompress(model, packed) == data
    scored, _ = tvq.score_stream(model, io.BytesIO(data), "x")
    header = len(Header.read(io.BytesIO(packed), "x").to_bytes())
    coded_bits = 8 * (len(packed) - header - FRAME_BYTES - END_BYTES)
    score_bits = scored.nll_sum / np.log(2)
    assert score_bits * 0.99 < coded_bits < score_bits * 1.01 + 64


def _tvq(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "tvqcli", *args], capture_output=True,
                          env=env or dict(os.environ, PYTHONPATH=str(ROOT)), **kwargs)  # fmt: skip


def test_cli_round_trip_across_processes_and_devices(tmp_path):
    model = save_byte_model(tmp_path / "m", seed=5)
    (tmp_path / "a.txt").write_bytes(ODD)
    (tmp_path / "b.txt").write_bytes(OTHER_SCRIPT)
    done = _tvq("compress", "a.txt", "b.txt", "-m", str(model), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert b"bits per byte" in done.stderr
    packed = (tmp_path / "a.txt.tvqz").read_bytes()
    one = _tvq("compress", "-", "-m", str(model), input=ODD, cwd=tmp_path)
    assert one.returncode == 0 and one.stdout == packed  # alone, from stdin: the same bytes
    (tmp_path / "a.txt").unlink()
    back = _tvq("decompress", "a.txt.tvqz", "-m", str(model), cwd=tmp_path,
                env=forced_devices(4))  # fmt: skip
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "a.txt").read_bytes() == ODD
    piped = _tvq("compress", "-d", "-c", "b.txt.tvqz", "-m", str(model), cwd=tmp_path)
    assert piped.stdout == OTHER_SCRIPT
    split_file = _tvq(
        "compress", "-", "--split", "3", "-m", str(model), input=ODD * 8, cwd=tmp_path
    )
    assert split_file.returncode == 0, split_file.stderr
    # from a pipe: sized by what two rounds' read-ahead found (one short frame: 2 rows)
    assert Header.read(io.BytesIO(split_file.stdout), "x").rows == 2
    back = _tvq("decompress", "-", "-m", str(model), input=split_file.stdout, cwd=tmp_path,
                env=forced_devices(4))  # fmt: skip
    assert back.returncode == 0 and back.stdout == ODD * 8, back.stderr


def test_cli_refuses_and_leaves_nothing_behind(tmp_path):
    model = save_byte_model(tmp_path / "m", seed=5)
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "a.txt.tvqz").write_bytes(b"old")
    done = _tvq("compress", "a.txt", "-m", str(model), cwd=tmp_path)
    assert done.returncode == 1 and b"--force" in done.stderr
    assert (tmp_path / "a.txt.tvqz").read_bytes() == b"old"
    (tmp_path / "bad.tvqz").write_bytes(b"TVQZ" + bytes([VERSION]) + b" broken")
    (tmp_path / "good.txt").write_bytes(b"good")
    assert _tvq("compress", "good.txt", "-m", str(model), cwd=tmp_path).returncode == 0
    (tmp_path / "good.txt").unlink()
    done = _tvq("decompress", "bad.tvqz", "good.txt.tvqz", "-m", str(model), cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count(b"error:") == 1 and b"bad.tvqz is truncated" in done.stderr
    assert (tmp_path / "good.txt").read_bytes() == b"good"  # the other file went on
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert not (tmp_path / "bad").exists()
    usage = [(("x.txt",), b"x.txt"), (("a.txt", "-o", "o", "a.txt.tvqz"), b"one input"),
             (("-d", "a.txt"), b"does not end in .tvqz"), (("a.txt", "--split", "0"), b"--split"),
             (("a.txt", "--split", "65"), b"--split")]  # fmt: skip
    for args, message in usage:
        done = _tvq("compress", *args, "-m", str(model), cwd=tmp_path)
        assert done.returncode in (1, 2) and message in done.stderr
        assert b"Traceback" not in done.stderr
