"""The stream position (data/stream_position.py): one dataclass for a share's place, the merge of
shares (loader and ranks) and the plain form checkpoints hold."""
import pytest

from m3ae.data.stream_position import ShareState, StreamPosition

# What checkpoints written before StreamPosition hold under state["data"]["stream"] (the format is unchanged).
SAVED = {"parts": 4, "workers": {"0": {"n": 9, "sources": [[2, 5], 3]}, "1": {"n": 7, "sources": [None, 1]},
                                 "3": {"n": 8, "sources": [[6, 0], 2]}}}


def test_plain_form_round_trips_and_old_checkpoints_load():
    pos = StreamPosition.from_state(SAVED)
    assert pos.parts == 4 and sorted(pos.shares) == [0, 1, 3]
    assert pos.shares[0] == ShareState(9, [[2, 5], 3]) and pos.shares[1].sources == [None, 1]
    assert pos.to_state() == SAVED
    assert StreamPosition.from_state(None) is None and StreamPosition.from_state({}) is None
    with pytest.raises(ValueError, match="unreadable stream position"):
        StreamPosition.from_state({"parts": 2, "workers": {"0": "garbage"}})


def test_merge_keeps_the_latest_of_every_share_across_batches_and_ranks():
    a = StreamPosition(4, {0: ShareState(1, [1]), 1: ShareState(1, [2])})
    later = StreamPosition(4, {0: ShareState(5, [7])})
    assert a.merged(later).shares == {0: ShareState(5, [7]), 1: ShareState(1, [2])}
    assert a.merged(None) is a
    other_layout = StreamPosition(2, {1: ShareState(3, [3])})
    assert a.merged(other_layout) is other_layout  # a new layout replaces the old
    rank1 = StreamPosition(4, {2: ShareState(2, [4]), 3: ShareState(2, [4])})
    merged = StreamPosition.merge([a, None, StreamPosition(4), rank1])
    assert sorted(merged.shares) == [0, 1, 2, 3] and merged.parts == 4
    assert StreamPosition.merge([None, StreamPosition(4)]) is None


def test_share_start_same_layout_exact_other_layout_at_the_slowest_shard():
    pos = StreamPosition.from_state(SAVED)
    exact = [False, True]  # a tar stream, an indexed source
    assert pos.share_start(3, 4, exact) == ShareState(8, [[6, 0], 2])
    pos.share_start(0, 4, exact).sources[0][1] = 99  # a copy: the saved position is not touched
    assert pos.shares[0].sources[0] == [2, 5]
    assert StreamPosition(4).share_start(2, 4, exact) == ShareState(0, [None, None])  # nothing saved: fresh
    assert pos.share_start(2, 4, exact) == ShareState(0, [None, 1])  # share 2 saved nothing: the slowest
    # 2 shares instead of 4: progress is per old share x 4 old shares; the slowest (None -> 0 for the
    # tar stream; 1 for the indexed one) over 2 new shares.
    assert pos.share_start(0, 2, exact) == ShareState(0, [None, 2])
    ahead = StreamPosition(4, {g: ShareState(1, [[3, 1], 2]) for g in range(4)})
    assert ahead.share_start(1, 2, exact) == ShareState(0, [[6, 0], 4])


def test_a_shares_bad_data_counts_travel_with_its_position():
    # The counts that stop a share yielding nothing usable: back to the same share at a resume
    # (a copy), not to the shares of another layout (other records), and refused when damaged.
    counts = {"samples": 8, "bad": {"undecodable": 3}, "bad_keys": {"undecodable": ["a", "b", "c"]}}
    state = {"parts": 2, "workers": {"0": {"n": 11, "sources": [[0, 11]], "bad": counts},
                                     "1": {"n": 4, "sources": [[1, 4]]}}}  # one saved before counts were
    pos = StreamPosition.from_state(state)
    assert pos.shares[0].bad == counts and pos.shares[1].bad is None
    assert pos.to_state() == state
    start = pos.share_start(0, 2, [False])
    assert start == ShareState(11, [[0, 11]], counts)
    start.bad["bad"]["undecodable"] = 99
    assert pos.shares[0].bad["bad"]["undecodable"] == 3
    assert pos.share_start(0, 1, [False]).bad is None
    for damaged in ("garbage", {"samples": "8"}, {"bad": {"undecodable": -1}}, {"bad_keys": {"undecodable": "a"}}):
        with pytest.raises(ValueError, match="unreadable stream position.*bad-data counts"):
            StreamPosition.from_state({"parts": 1, "workers": {"0": {"n": 1, "sources": [None], "bad": damaged}}})
