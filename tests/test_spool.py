"""The warm-up spool: what is written is read back bit-exact, damage is set aside, never scored."""

import numpy as np

from musc_stream.service.spool import FrameSpool
from musc_stream.stream.records import Frame


def _frame(i: int, frame_id: str = None) -> Frame:
    rng = np.random.default_rng(i)
    return Frame(line="l1", frame_id=frame_id or f"f{i}", ts=1000.0 + i,
                 image=rng.integers(0, 255, (17, 23, 3), dtype=np.uint8), received_at=2000.0 + i,
                 camera="cam", payload_bytes=1234, decode_s=0.01)


def test_frames_come_back_in_order_and_bit_exact(tmp_path):
    spool = FrameSpool(tmp_path / "spool")
    frames = [_frame(i) for i in range(3)] + [_frame(9, frame_id="\u00e9t\u00e9 / id")]
    paths = [spool.write(f) for f in frames]
    again = FrameSpool(tmp_path / "spool").load()  # a new process
    assert [s.path for s in again] == paths
    for frame, spooled in zip(frames, again):
        back = spooled.frame
        assert (back.line, back.frame_id, back.ts, back.received_at, back.camera) == \
            (frame.line, frame.frame_id, frame.ts, frame.received_at, frame.camera)
        assert np.array_equal(back.image, frame.image) and back.ack is None
    spool.delete(paths[0])
    assert len(spool) == 3


def test_a_new_spool_continues_the_sequence(tmp_path):
    first = FrameSpool(tmp_path).write(_frame(0))
    second = FrameSpool(tmp_path).write(_frame(1))
    assert [s.path for s in FrameSpool(tmp_path).load()] == [first, second]


def test_a_torn_or_damaged_file_is_set_aside(tmp_path, caplog):
    spool = FrameSpool(tmp_path)
    good, torn, flipped = (spool.write(_frame(i)) for i in range(3))
    torn.write_bytes(torn.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    (tmp_path / "000000000099-x.frame.tmp").write_bytes(b"half")
    loaded = FrameSpool(tmp_path).load()
    assert [s.path for s in loaded] == [good]
    assert sorted(p.name for p in tmp_path.glob("*.bad")) == sorted([torn.name + ".bad", flipped.name + ".bad"])
    assert not list(tmp_path.glob("*.tmp"))
    assert "checksum mismatch" in caplog.text
