"""Teacher assignments."""

from __future__ import annotations

import pytest

from cohort.pairing import list_pairings, make_pairing


def test_cyclic_learns_from_the_next_peer():
    pairing = make_pairing("cyclic")
    assert [pairing.teachers(j, 4, 0) for j in range(4)] == [(1,), (2,), (3,), (0,)]
    assert pairing.teachers(0, 2, 5) == (1,) and pairing.teachers(1, 2, 5) == (0,)  # n=2: mutual learning


def test_all_pairs_learns_from_everyone_else():
    pairing = make_pairing("all_pairs")
    assert pairing.teachers(1, 4, 0) == (0, 2, 3)


def test_shuffled_ring_is_a_seeded_ring_that_changes_between_epochs():
    pairing = make_pairing("shuffled_ring", seed=3)
    rings = []
    for epoch in range(6):
        teacher = {j: pairing.teachers(j, 5, epoch)[0] for j in range(5)}
        assert sorted(teacher.values()) == list(range(5)) and all(t != j for j, t in teacher.items())
        walk, seen = 0, set()
        for _ in range(5):
            seen.add(walk)
            walk = teacher[walk]
        assert seen == set(range(5))  # one single cycle through every peer
        rings.append(tuple(teacher.values()))
    assert len(set(rings)) > 1
    assert rings[0] == tuple(make_pairing("shuffled_ring", seed=3).teachers(j, 5, 0)[0] for j in range(5))


@pytest.mark.parametrize("name", list_pairings())
def test_possible_teachers_cover_every_epoch(name):
    pairing = make_pairing(name, seed=1)
    for n in (2, 3, 5):
        for j in range(n):
            for epoch in range(5):
                assert set(pairing.teachers(j, n, epoch)) <= set(pairing.possible_teachers(j, n))
                assert j not in pairing.teachers(j, n, epoch)
