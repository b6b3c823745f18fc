"""A replica's side of registering again (replica_rejoin.Rejoin): what it lists, what it holds
back until answered, and what the answer keeps, for the coordinator it held requests of and
for one that restarted since."""

from __future__ import annotations

from megatron_coord.replica_rejoin import Rejoin


def _record(request_id: int) -> dict:
    return {"requests": [{"request_id": request_id, "generated_tokens": [1]}]}


def test_a_first_registration_lists_nothing_and_holds_nothing_back():
    rejoin = Rejoin()
    assert rejoin.fields([], None) == {}
    assert rejoin.awaiting is None and rejoin.hold_back([_record(1)]) == [_record(1)]
    assert rejoin.answered({"coordinator_id": "c1"}) is None
    assert rejoin.coordinator_id == "c1"


def test_registering_again_with_the_same_coordinator_keeps_what_it_does_not_drop():
    rejoin = Rejoin()
    rejoin.answered({"coordinator_id": "c1"})
    fields = rejoin.fields([3, 1, 2], previous_identity=b"\x01\x02")
    assert fields == {"coordinator_id": "c1", "holds": [1, 2, 3], "previous_identity": "0102"}
    # Until answered, the listed requests' outputs wait; others go.
    assert rejoin.hold_back([_record(1), _record(9), _record(2)]) == [_record(9)]
    assert rejoin.unlisted([[3, [7]], [9, [8]]]) == [[9, [8]]]
    rejoin.keep(3, ["error", 3])
    answer = rejoin.answered({"coordinator_id": "c1", "drop": [2, 77], "streamed": [[3, 4]]})
    assert answer.drop == {2} and answer.kept == {1, 3}
    assert sorted(map(str, answer.outputs)) == sorted(map(str, [_record(1), ["error", 3]]))
    assert answer.streamed == {3: 4}
    assert rejoin.awaiting is None and rejoin.hold_back([_record(1)]) == [_record(1)]


def test_a_restarted_coordinator_knows_none_of_them_and_unanswered_outputs_are_listed_again():
    rejoin = Rejoin()
    rejoin.answered({"coordinator_id": "c1"})
    rejoin.fields([5], None)
    assert rejoin.hold_back([_record(5)]) == []  # finished while waiting for the answer
    # No answer (the coordinator went away): the next registration lists it again.
    assert rejoin.fields([], None)["holds"] == [5]
    answer = rejoin.answered({"coordinator_id": "c2", "drop": []})  # another coordinator
    assert answer.drop == {5} and not answer.kept and not answer.outputs
    assert rejoin.coordinator_id == "c2" and rejoin.fields([], None) == {
        "coordinator_id": "c2",
        "holds": [],
    }
