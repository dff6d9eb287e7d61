"""The MLLP frame parser on its own: corner cases of the wire format, independent of TCP."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.hl7.mllp import FrameDecoder, FrameTooLarge, encode_frame, unframeable
from tests.mllp_reference import reference

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(decoder.feed(chunk))
    return frames


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def test_one_frame() -> None:
    assert FrameDecoder(100).feed(b"\x0bMSH|^~\\&|A\rPID|1\r\x1c\r") == [b"MSH|^~\\&|A\rPID|1\r"]


def test_frame_split_byte_by_byte() -> None:
    decoder = FrameDecoder(100)
    message = b"MSH|^~\\&|A|B\rPID|1||X\r"
    data = encode_frame(message) * 3
    assert feed_all(decoder, bytewise(data)) == [message] * 3
    assert decoder.junk_bytes == 0 and decoder.abandoned_frames == 0
    assert not decoder.in_frame and decoder.pending_bytes == 0


def test_several_frames_in_one_read_and_a_rest() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(encode_frame(b"one") + encode_frame(b"two") + b"\x0bthr") == [b"one", b"two"]
    assert decoder.in_frame and decoder.pending_bytes == 3
    assert decoder.feed(b"ee\x1c\r") == [b"three"]
    assert decoder.frames_decoded == 3


def test_junk_before_start_is_counted_and_dropped() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"garbage\r\n" + encode_frame(b"msg") + b"\n") == [b"msg"]
    assert decoder.junk_bytes == 10
    assert decoder.feed(b"xx") == []
    assert decoder.junk_bytes == 12


def test_start_block_inside_frame_restarts() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x0bhalf a mess") == []
    assert decoder.feed(b"age\x0bwhole\x1c\r") == [b"whole"]
    assert decoder.abandoned_frames == 1
    assert decoder.abandoned_bytes == len(b"half a message")


def test_end_block_at_end_of_read_waits_for_carriage_return() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x0bmsg\x1c") == []
    assert decoder.in_frame
    assert decoder.feed(b"\r") == [b"msg"]
    assert not decoder.in_frame


def test_end_block_not_followed_by_carriage_return_is_content() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x0ba\x1cb\x1c") == []
    assert decoder.feed(b"c\x1c\x1c\r") == [b"a\x1cb\x1cc\x1c"]


def test_end_block_at_end_of_read_then_start_block() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x0bcut\x1c") == []
    assert decoder.feed(b"\x0bnext\x1c\r") == [b"next"]
    assert decoder.abandoned_frames == 1


def test_carriage_return_alone_does_not_end_a_frame() -> None:
    decoder = FrameDecoder(100)
    assert decoder.feed(b"\x0bMSH|x\r\rPID\r") == []
    assert decoder.feed(b"\x1c\r") == [b"MSH|x\r\rPID\r"]


def test_empty_frame() -> None:
    assert FrameDecoder(100).feed(b"\x0b\x1c\r\x0b\x1c\r") == [b"", b""]


def test_exactly_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(5)
    assert feed_all(decoder, bytewise(encode_frame(b"12345"))) == [b"12345"]
    assert FrameDecoder(5).feed(encode_frame(b"1234\x1c")) == [b"1234\x1c"]


def test_oversize_in_one_read_keeps_earlier_frames() -> None:
    decoder = FrameDecoder(5)
    with pytest.raises(FrameTooLarge) as raised:
        decoder.feed(encode_frame(b"ok") + encode_frame(b"123456") + encode_frame(b"lost"))
    assert raised.value.frames == [b"ok"]
    assert raised.value.limit == 5 and raised.value.size == 6
    with pytest.raises(FrameTooLarge):  # stays failed: the stream cannot be resynchronised safely
        decoder.feed(encode_frame(b"x"))


def test_oversize_detected_before_the_end_arrives() -> None:
    decoder = FrameDecoder(10)
    assert decoder.feed(b"\x0b" + b"x" * 10) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"y")
    assert decoder.pending_bytes == 0


def test_oversize_with_end_block_pending() -> None:
    decoder = FrameDecoder(3)
    assert decoder.feed(b"\x0babc\x1c") == []  # the 0x1C may be the terminator
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"d")  # it was not: four bytes of content


def test_oversize_abandoned_frame_is_still_oversize() -> None:
    with pytest.raises(FrameTooLarge) as raised:
        FrameDecoder(3).feed(b"\x0babcdef\x0bok\x1c\r")
    assert raised.value.frames == []


def test_memory_is_bounded_by_junk_and_limit() -> None:
    decoder = FrameDecoder(1000)
    for _ in range(100):
        decoder.feed(b"z" * 10_000)
    assert decoder.pending_bytes == 0 and decoder.junk_bytes == 1_000_000


def test_start_block_flood_takes_linear_time() -> None:
    """Every byte a restart: must not rescan the rest of the read each time (that took minutes)."""
    decoder = FrameDecoder(1000)
    started = time.perf_counter()
    assert decoder.feed(SB * 262_144) == []
    assert decoder.feed(b"ok\x1c\r") == [b"ok"]
    assert time.perf_counter() - started < 5
    assert decoder.abandoned_frames == 262_143 and decoder.abandoned_bytes == 0


def test_encode_frame_and_unframeable() -> None:
    assert encode_frame(b"abc") == b"\x0babc\x1c\r"
    assert not unframeable(b"MSH|\x1cx\r")
    assert unframeable(b"a\x0bb") and unframeable(b"a\x1c\rb")


def test_negative_limit_rejected() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(-1)


piece = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([SB, EB, CR, EB + CR, SB + EB + CR, b"\r\n"]),
    st.binary(max_size=12).map(lambda content: SB + content + EB + CR),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(piece, max_size=25), st.data(), st.integers(min_value=0, max_value=30))
def test_any_split_gives_the_reference_result(parts: list[bytes], data: st.DataObject, limit: int) -> None:
    """However the stream is cut into reads, the result equals the byte-at-a-time rules."""
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=10)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected, too_large = reference(stream, limit)
    decoder = FrameDecoder(limit)
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
    except FrameTooLarge as exc:
        frames.extend(exc.frames)
        assert too_large
    else:
        assert not too_large
    assert frames == expected
