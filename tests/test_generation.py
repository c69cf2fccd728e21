"""TextStream, the text side of Model.stream: pieces never end inside a UTF-8 character or
give out a possible start of a stop string, the text stops before the first stop string, and
whatever was held back comes out at the end."""

from __future__ import annotations

from edgemoe.runtime.generation import TextStream


def byte_decode(ids):
    """Token ids are bytes; an incomplete UTF-8 character decodes to U+FFFD, as tokenizers' do."""
    return bytes(ids).decode("utf-8", errors="replace")


def run(text: str, stop=()):
    s = TextStream(byte_decode, stop)
    pieces = [s.push(b) for b in text.encode()]
    return pieces, s.flush(), s.stopped


def test_pieces_join_to_the_text_and_never_split_a_character():
    pieces, tail, stopped = run("naïve ✓ done")
    assert "".join(pieces) + tail == "naïve ✓ done" and not stopped
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_the_text_and_its_prefix_is_held_back():
    pieces, tail, stopped = run("hello\nUser: more", stop=["\nUser:"])
    assert stopped and "".join(pieces) + tail == "hello"
    # "\nUs" was held back while it could still become the stop string
    assert pieces[5:10] == ["", "", "", "", ""]


def test_a_prefix_that_does_not_become_the_stop_string_is_released():
    pieces, tail, stopped = run("a\nUsb", stop=["\nUser:"])
    assert not stopped and "".join(pieces) + tail == "a\nUsb" and pieces[-1] == "\nUsb"


def test_held_back_prefix_comes_out_at_the_end():
    pieces, tail, stopped = run("end\nUs", stop=["\nUser:"])
    assert not stopped and "".join(pieces) == "end" and tail == "\nUs"
