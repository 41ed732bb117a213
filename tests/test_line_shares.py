"""Fair share of the ingest queue: one flooding line cannot take the room other lines need."""

from musc_stream.service.ingest import LineShares


def test_a_flooding_line_leaves_room_for_the_others():
    shares = LineShares(capacity=12)
    admitted = 0
    while shares.admits("flood") and admitted < 100:
        shares.added("flood")
        admitted += 1
    assert admitted == 6  # half the queue is free for anyone; then capacity // (1 waiting + 1)
    assert shares.admits("quiet")  # a line with nothing waiting always gets in
    for _ in range(4):
        shares.added("quiet")
    assert not shares.admits("flood") and not shares.admits("quiet")  # 12 // (2 + 1) = 4 each
    assert shares.admits("third")
    for _ in range(3):
        shares.removed("flood")
    assert shares.admits("flood")


def test_counts_never_go_negative():
    shares = LineShares(capacity=4)
    shares.removed("x")
    shares.added("x")
    shares.removed("x")
    shares.removed("x")
    assert all(shares.admits(line) for line in ("x", "y"))
