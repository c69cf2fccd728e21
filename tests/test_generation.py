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


def test_model_stream_steps_finish_reasons_and_cancel(tiny_checkpoint, tmp_path):
    import edgemoe
    from edgemoe.converters.convert import convert

    convert(tiny_checkpoint("mixtral"), tmp_path / "m", bits=8, progress=False)
    m = edgemoe.load(tmp_path / "m")
    steps = list(m.stream("the robot", max_new_tokens=12, ignore_eos=True))
    assert len(steps) == 12 and steps[-1].finish == "length" and all(s.finish is None for s in steps[:-1])
    made = []

    def cancel():  # what another thread would set: here, after the third token
        return len(made) >= 3

    for step in m.stream("the robot", max_new_tokens=50, ignore_eos=True, cancel=cancel):
        made.append(step)
    assert len(made) == 4 and made[-1].token is None and made[-1].finish == "cancelled"
    assert all(s.token is not None and s.finish is None for s in made[:3])
    assert m.stats()["tokens_generated"] == 11 + 2  # decode passes: none after the cancel
