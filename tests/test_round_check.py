"""The arithmetic of a round's check (verify.py), the small-group outlier rule (robust.py) and the ban
list (access/bans.py), without a network: honest rounds pass bit for bit, every lie is caught and
pinned on the right party, rounding never is."""
import math
import time
from types import SimpleNamespace

import pytest
import torch

from swarmtrain.access.bans import BanList
from swarmtrain.compression.robust import RobustPolicy, aggregate, plan
from swarmtrain.compression.verify import (ABSENT, COUNTED, INVALID, SPARSE_PROJECTIONS, Measure, UnitEvidence,
                                           commitment, judge_unit, measure, project_range, projection_range, projection_vectors,
                                           quantization_bound, round_seed, small_group_outliers)
from swarmtrain.compression.wire import decode_sparse, encode_sparse

KEY = round_seed(b"group", [b"a" * 16, b"b" * 16, b"c" * 16])
POLICY = RobustPolicy()


def _parts(count=3, size=500, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator) ** 3 * (1 + i) for i in range(count)]


def _evidence(parts, answer, *, reducer=0, weights=None, policy=POLICY, value_format="fp32", claims=None,
              statuses=None, coefficients=None, offset=1000):
    """Member's evidence for a dense unit [offset, offset + size) reduced from ``parts``."""
    weights = weights or [1.0] * len(parts)
    support = torch.arange(offset, offset + len(answer))
    z = projection_vectors(KEY, support, SPARSE_PROJECTIONS)
    views = {j: measure(part, z) for j, part in enumerate(parts)}
    return UnitEvidence(
        reducer=reducer,
        statuses=statuses or {j: (COUNTED, weights[j]) for j in range(len(parts))},
        coefficients=coefficients, views=views,
        claims=dict(views) if claims is None else claims, weights=dict(enumerate(weights)),
        output=measure(answer, z), output_bound=quantization_bound(answer, value_format),
    )


def test_projection_vectors_depend_on_the_index_only_and_look_standard():
    whole = projection_vectors(KEY, torch.arange(10_000), 4)
    some = projection_vectors(KEY, torch.tensor([9_999, 3, 77]), 4)
    assert torch.equal(some, whole[:, [9_999, 3, 77]])
    assert whole.shape == (4, 10_000)
    assert float(whole.mean().abs()) < 0.05 and abs(float(whole.std()) - 1.0) < 0.05
    assert float(whole.abs().max()) <= math.sqrt(3) + 1e-12
    assert not torch.equal(projection_vectors(round_seed(b"other", []), torch.arange(5), 4), whole[:, :5])
    assert commitment(b"x" * 16) != commitment(b"y" * 16)
    # dense ranges (a faster stream): the same entries however the range is cut into parts
    dense = projection_range(KEY, 0, 150_000, 2)
    assert torch.equal(projection_range(KEY, 65_000, 140_001, 2), dense[:, 65_000:140_001])
    assert abs(float(dense.std()) - 1.0) < 0.01 and float(dense.abs().max()) <= math.sqrt(3) + 1e-12
    # a dense unit is measured a block of z at a time: the same float64 projections and norms as whole
    rows = _parts(3, 140_001 - 65_000, seed=4)
    projections, norms = project_range(KEY, 65_000, 140_001, rows, 2)
    stacked = torch.stack(rows).double()
    torch.testing.assert_close(projections, stacked @ dense[:, 65_000:140_001].T, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(norms, stacked.norm(dim=1), rtol=1e-12, atol=0)


def test_an_honest_average_passes_and_every_kind_of_lie_is_caught():
    parts = _parts()
    honest = aggregate(parts, [1.0, 1.0, 1.0], POLICY).average
    assert judge_unit(_evidence(parts, honest), me=1, policy=POLICY, max_weight=1e6).ok
    for liar_answer in (honest * 10, -honest, honest * 1.001, honest + 1e-3 * torch.randn(len(honest)),
                        (parts[1] + parts[2]) / 2):  # the last one: a sender silently dropped
        verdict = judge_unit(_evidence(parts, liar_answer), me=1, policy=POLICY, max_weight=1e6)
        assert set(verdict.liars) == {0} and "not the average" in verdict.liars[0]


def test_weights_clamps_and_clipping_are_recomputed_by_every_member():
    parts = _parts(4)
    weights = [1.0, 3.0, 2.0, 1e9]  # the last is clamped to 4 x the median of the kept
    for rule in ("mean", "clip"):
        policy = RobustPolicy(aggregation=rule)
        answer = aggregate(parts, weights, policy).average
        assert judge_unit(_evidence(parts, answer, weights=weights, policy=policy), me=2, policy=policy,
                          max_weight=1e12).ok
        unclamped = sum(w * p for w, p in zip(weights, parts)) / sum(weights)
        assert not judge_unit(_evidence(parts, unclamped, weights=weights, policy=policy), me=2, policy=policy,
                              max_weight=1e12).ok


def test_centered_clip_coefficients_must_mix_the_kept_parts():
    policy = RobustPolicy(aggregation="centered_clip")
    parts = _parts(4)
    result = aggregate(parts, [1.0] * 4, policy)
    assert sum(result.coefficients.values()) <= 1.0 + 1e-6
    honest = _evidence(parts, result.average, policy=policy, coefficients=result.coefficients)
    assert judge_unit(honest, me=1, policy=policy, max_weight=1e6).ok
    skewed = {**result.coefficients, 3: 5.0}  # "coefficients" that amplify one part
    lie = _evidence(parts, sum(a * parts[j] for j, a in skewed.items()), policy=policy, coefficients=skewed)
    assert 0 in judge_unit(lie, me=1, policy=policy, max_weight=1e6).liars


def test_a_misreported_part_names_the_reducer_for_its_sender_and_is_a_dispute_for_the_others():
    parts = _parts()
    honest = aggregate(parts, [1.0] * 3, POLICY).average
    evidence = _evidence(parts, honest)
    forged = Measure(evidence.views[2].norm, tuple(v + 50.0 for v in evidence.views[2].projections),
                     evidence.views[2].count)
    evidence.views[2] = forged  # the reducer reports sender 2's part as something else
    assert set(judge_unit(evidence, me=2, policy=POLICY, max_weight=1e6).liars) == {0}
    third_party = judge_unit(evidence, me=1, policy=POLICY, max_weight=1e6)
    assert third_party.liars == {} and third_party.disputes[0][:2] == (0, 2) and not third_party.ok


def test_a_valid_part_refused_as_invalid_names_the_reducer_for_its_sender_only():
    parts = _parts()
    answer = aggregate(parts[:2], [1.0, 1.0], POLICY).average
    statuses = {0: (COUNTED, 1.0), 1: (COUNTED, 1.0), 2: (f"{INVALID}: non-finite values", 1.0)}
    evidence = _evidence(parts, answer, statuses=statuses)
    assert 0 in judge_unit(evidence, me=2, policy=POLICY, max_weight=1e6, my_part_valid=lambda: True).liars
    assert judge_unit(evidence, me=2, policy=POLICY, max_weight=1e6, my_part_valid=lambda: False).ok
    assert judge_unit(evidence, me=1, policy=POLICY, max_weight=1e6).ok  # excluding a part is no poison
    absent = {**statuses, 2: (ABSENT, 0.0)}
    assert 0 in judge_unit(_evidence(parts, answer, statuses=absent), me=2, policy=POLICY, max_weight=1e6).liars


def test_a_kept_part_without_its_senders_measure_cannot_be_checked():
    parts = _parts()
    answer = aggregate(parts, [1.0] * 3, POLICY).average
    evidence = _evidence(parts, answer)
    evidence.claims[2] = None
    verdict = judge_unit(evidence, me=1, policy=POLICY, max_weight=1e6)
    assert not verdict.ok and verdict.unverifiable and not verdict.liars


def test_rounding_of_every_wire_format_never_fails_an_honest_reducer():
    for value_format in ("fp16", "8bit"):
        caught = {2.0: 0, 1.1: 0}
        for trial in range(20):
            parts = _parts(3, 2000, seed=trial)
            exact = aggregate(parts, [1.0] * 3, POLICY).average
            indices = torch.arange(len(exact))
            decoded = decode_sparse(encode_sparse(indices, exact, len(exact), value_format), len(exact)).values
            error = float((decoded - exact).double().norm())
            assert error <= quantization_bound(decoded, value_format)
            evidence = _evidence(parts, decoded, value_format=value_format)
            assert judge_unit(evidence, me=1, policy=POLICY, max_weight=1e6).ok, (value_format, trial)
            for factor in caught:
                lie = decode_sparse(encode_sparse(indices, exact * factor, len(exact), value_format), len(exact))
                caught[factor] += not judge_unit(_evidence(parts, lie.values, value_format=value_format), me=1,
                                                 policy=POLICY, max_weight=1e6).ok
        # fp16 rounds at 2^-11: any lie above that is caught; 8-bit rounds ~1% of a block's maximum, so
        # a x2 liar is caught (almost) always and a 10 % one only sometimes (benchmarks/poison.py: rates)
        assert caught[2.0] >= (20 if value_format == "fp16" else 18), (value_format, caught)
        if value_format == "fp16":
            assert caught[1.1] == 20


def _pair_round(own_parts, other_parts):
    """Member 0's evidence of a round of two: unit u reduced by member u % 2, honestly (the plain mean)."""
    evidences, offset = [], 0
    for unit, (own, other) in enumerate(zip(own_parts, other_parts)):
        result = aggregate([own, other], [1.0, 1.0], POLICY)
        evidences.append(_evidence([own, other], result.average, reducer=unit % 2, offset=offset))
        offset += len(own)
    return evidences


def test_an_outsized_sender_in_a_group_of_two_is_refused_by_the_other_member_not_by_a_reducer():
    own = _parts(2, seed=1) + _parts(1, size=64, seed=2)  # two big tensors and a small one (a LayerNorm bias)
    scaled = [part * 1e6 for part in _parts(2, seed=3) + _parts(1, size=64, seed=4)]
    # no median between two: the reducer keeps both parts, whichever is the outsized one...
    assert aggregate([own[0], scaled[0]], [1.0, 1.0], POLICY).rejected == {}
    # ...every unit's arithmetic is right, and the honest member refuses the round over the whole gradient
    evidences = _pair_round(own, scaled)
    assert all(judge_unit(evidence, me=0, policy=POLICY, max_weight=1e6).ok for evidence in evidences)
    outliers = small_group_outliers(evidences, me=0, policy=POLICY)
    assert list(outliers) == [1] and "10 x ours" in outliers[1]
    # so does a x1e6 sender that scales one small tensor only
    only_small = [own[0] * 1.5, own[1] * 0.7, own[2] * 1e6]
    assert list(small_group_outliers(_pair_round(own, only_small), me=0, policy=POLICY)) == [1]
    # the outsized peer's own judgement (its gradient is the larger) finds nothing: it is not the victim
    assert small_group_outliers(evidences_of_member_1(own, scaled), me=1, policy=POLICY) == {}
    # max_norm_ratio 0 turns outlier rejection off
    assert small_group_outliers(evidences, me=0, policy=RobustPolicy(max_norm_ratio=0.0)) == {}


def test_a_round_of_three_judges_median_less_units_on_the_whole_gradient():
    # a sparse round of three: two big tensors carry parts of all three senders (the median rule judges
    # them), one small tensor only member 0's and 1's (member 2 selected nothing of it). Member 1 ran
    # more local steps than member 0: its whole delta is 2x, its small tensor 20x member 0's
    own = _parts(2, seed=11) + [_parts(1, size=64, seed=12)[0] * 0.05]
    other = [part * 2.0 for part in _parts(2, seed=13)] + [own[2] * 20.0]
    third = _parts(2, seed=14)
    evidences = [_evidence([own[u], other[u], third[u]], own[u], reducer=u, offset=1000 * u) for u in range(2)]
    evidences.append(_evidence([own[2], other[2]], own[2], reducer=1, offset=5000))
    # judged over the small tensor alone, member 1 was a 20x outlier, and the honest round refused
    assert small_group_outliers(evidences[2:], me=0, policy=POLICY) != {}
    assert small_group_outliers(evidences, me=0, policy=POLICY) == {}
    # a sender outsized on the whole gradient is still refused; the senders the median judged are not
    # judged again (member 2 is absent from the small tensor)
    scaled = [part * 1e3 for part in other]
    evidences = [_evidence([own[u], scaled[u], third[u]], own[u], reducer=u, offset=1000 * u) for u in range(2)]
    evidences.append(_evidence([own[2], scaled[2]], own[2], reducer=1, offset=5000))
    assert list(small_group_outliers(evidences, me=0, policy=POLICY)) == [1]


def evidences_of_member_1(own, scaled):
    return [_evidence([o, s], aggregate([o, s], [1.0, 1.0], POLICY).average, reducer=unit % 2, offset=1000 * unit)
            for unit, (o, s) in enumerate(zip(own, scaled))]


def test_honest_spread_of_one_small_tensor_does_not_refuse_a_round_of_two():
    # two honest peers' gradients of a LayerNorm bias differ by up to ~80x at one micro-batch each, their
    # whole gradients by < 3x (benchmarks/honest_norm_ratios.py): judged per tensor, such rounds were refused
    own = _parts(2, seed=5) + [_parts(1, size=64, seed=6)[0] * 0.01]  # a small share of the whole norm
    other = [part * 2.0 for part in _parts(2, seed=7)] + [own[2] * 80.0]
    evidences = _pair_round(own, other)
    assert all(judge_unit(evidence, me=0, policy=POLICY, max_weight=1e6).ok for evidence in evidences)
    assert small_group_outliers(evidences, me=0, policy=POLICY) == {}
    # with a third part in the unit the median rule applies as before (3 parts: no pooled judgement)
    three = [_evidence([own[0], other[0], own[0] * 1e6], own[0], reducer=0)]
    assert small_group_outliers(three, me=0, policy=POLICY) == {}
    assert 2 in aggregate([own[0], other[0], own[0] * 1e6], [1.0] * 3, POLICY).rejected


def test_the_ban_list_counts_its_own_bans_a_quorum_of_others_and_the_organisers_revocations():
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from swarmtrain.net.identity import peer_id_of

    keys = [RSAPrivateKey() for _ in range(4)]
    subkeys = [RSASignatureValidator(key).local_public_key for key in keys]
    authority = str(peer_id_of(keys[3].get_public_key()))
    bans = BanList(authority_id=authority, quorum=2, ban_seconds=60)
    bans.ban("QmLocal", "lied", now=1000.0)
    assert bans.is_banned("QmLocal", now=1059.0) and not bans.is_banned("QmLocal", now=1061.0)

    def published(entries):
        return SimpleNamespace(value={subkey: SimpleNamespace(value={"bans": bans_}) for subkey, bans_ in entries})

    now = 2000.0
    bans.update(published([(subkeys[0], [["QmA", now + 10, "x"], ["QmB", now + 10, "y"]]),
                           (subkeys[1], [["QmA", now + 10, "x"], ["QmB", now - 1, "expired"]]),
                           (b"unsigned", [["QmB", now + 10, "forged"], ["QmC", now + 10, "forged"]]),
                           (subkeys[3], [["QmD", now + 10, "revoked"], "garbage"])]), now=now)
    assert bans.is_banned("QmA", now=now)  # two accusers
    assert not bans.is_banned("QmB", now=now)  # one valid accuser (the other expired, one is unsigned)
    assert not bans.is_banned("QmC", now=now)
    assert bans.is_banned("QmD", now=now)  # the organiser alone


def test_a_reducer_and_a_sender_covering_for_each_other_are_both_named_when_the_cover_is_impossible():
    parts = _parts()
    honest = aggregate(parts, [1.0] * 3, POLICY).average
    evidence = _evidence(parts, honest * 10)
    expected = [sum(evidence.views[j].projections[k] for j in range(3)) / 3 for k in range(SPARSE_PROJECTIONS)]
    wanted = [10 * value for value in expected]
    # sender 2 and the reducer agree on a "measure" of 2's part that makes the x10 answer add up
    view = evidence.views[2]
    forged = Measure(view.norm, tuple(p + 3 * (w - e) for p, w, e in zip(view.projections, wanted, expected)),
                     view.count)
    evidence.views[2] = evidence.claims[2] = forged
    verdict = judge_unit(evidence, me=1, policy=POLICY, max_weight=1e6)
    assert set(verdict.liars) == {0, 2}, verdict.describe()


def test_the_revocations_file_is_read_with_expiries_and_a_bad_line_is_one_clear_error(tmp_path):
    from hivemind.utils.crypto import RSAPrivateKey

    from swarmtrain.access.bans import read_revocations
    from swarmtrain.errors import UserError
    from swarmtrain.net.identity import peer_id_of
    from tests.support import TINY_CONFIG, assert_one_line_error, run_cli

    peers = [str(peer_id_of(RSAPrivateKey().get_public_key())) for _ in range(3)]
    path = tmp_path / "revoked.txt"
    path.write_text(f"# organiser's list\n{peers[0]}\n{peers[1]} 2h  # lied about its answers\n\n"
                    f"{peers[2]} 2001-01-01\n")
    revoked = {peer: (until, reason) for peer, until, reason in read_revocations(path)}
    assert set(revoked) == {peers[0], peers[1]}  # the third expired long ago
    changed = path.stat().st_mtime
    assert abs(revoked[peers[0]][0] - (changed + 30 * 86400)) < 5 and abs(revoked[peers[1]][0] - (changed + 7200)) < 5
    assert revoked[peers[1]][1] == "lied about its answers"
    path.write_text(f"{peers[0]}\nnot-a-peer 1d\n")
    with pytest.raises(UserError, match="line 2"):
        read_revocations(path)
    assert_one_line_error(run_cli("coordinator", "--config", str(TINY_CONFIG), "--revoked", str(path)),
                          "--revoked", "line 2", "not a peer ID")


def test_the_organisers_revocations_reach_every_ban_list_through_the_dht():
    import hivemind
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from swarmtrain.access.bans import bans_key, publish_revocations
    from swarmtrain.net.identity import peer_id_of

    organiser, volunteer = RSAPrivateKey(), RSAPrivateKey()
    signer = RSASignatureValidator(organiser)
    first = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[signer], client_mode=False,
                         start=True)
    second = hivemind.DHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], client_mode=False,
                          host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[RSASignatureValidator(volunteer)],
                          start=True)
    try:
        banned = str(peer_id_of(RSAPrivateKey().get_public_key()))
        assert publish_revocations(first, "revoke_test", signer.local_public_key,
                                   [(banned, time.time() + 600, "revoked")])
        bans = BanList(second, "revoke_test", authority_id=str(peer_id_of(organiser.get_public_key())))
        bans.update(second.get(bans_key("revoke_test"), latest=True))
        assert bans.is_banned(banned)
        # the same entry from anyone else is one accuser among the quorum
        stranger = BanList(second, "revoke_test", authority_id=str(peer_id_of(volunteer.get_public_key())))
        stranger.update(second.get(bans_key("revoke_test"), latest=True))
        assert not stranger.is_banned(banned)
    finally:
        second.shutdown()
        first.shutdown()


def _round_check(peers, clients, timeout):
    """The check of a three-member round as member 0 holds it (its seed b"s" * 16; no network: calls to
    the others fail and are ignored, as calls to an unreachable groupmate are)."""
    from swarmtrain.compression.crosscheck import RoundCheck

    return RoundCheck(averager=SimpleNamespace(peer_id=peers[0]), group_id=b"g", peer_ids=peers, clients=clients,
                      commitments=(None,) * len(peers), seed=b"s" * 16, policy=POLICY, max_weight=1.0, timeout=timeout)


def test_a_dialable_groupmate_is_answered_at_once_and_a_client_only_once_our_message_is_ready():
    """Every member pushes its check message to every member it can dial, so a dialable caller needs no
    answer: waiting for ours would cost it a round trip per phase (60 ms more on home links). A client
    cannot be dialled: it gets ours, and what we relay, in the answer."""
    import asyncio
    from hivemind.utils import MSGPackSerializer
    peers = ("server-0", "server-1", "client-2")

    async def scenario():
        check = _round_check(peers, clients=(False, False, True), timeout=5.0)
        started = time.monotonic()
        answer = await check.serve("server-1", 0, b"from 1")
        assert time.monotonic() - started < 0.5 and MSGPackSerializer.loads(answer) == {}
        assert check.inboxes[0].message(1) == b"from 1"
        client_call = asyncio.ensure_future(check.serve("client-2", 0, b"from 2"))
        await asyncio.sleep(0.3)
        assert not client_call.done()  # nothing of ours to give it yet
        check.own_messages[0] = b"from 0"
        check.own_ready[0].set()
        assert MSGPackSerializer.loads(await client_call) == {"0": b"from 0", "1": b"from 1"}
        assert await check.serve("stranger", 0, b"x") is None

    asyncio.run(scenario())


def test_a_member_whose_part_failed_returns_at_once_yet_its_check_still_serves_the_group():
    """A groupmate absent from the round (hivemind's matchmaking counted it in, but it had given up on
    the group) sends no check messages. A member whose own part failed loses the round anyway: it must
    not wait two phase timeouts for that groupmate (the whole averaging timeout, 30 s of every member's
    time) before it may retry -- yet the others still get its seed and measures. A member whose part
    went through waits for the verdict as before, and an incomplete check refuses the round."""
    import asyncio
    from hivemind.averaging.partition import AllreduceException
    from hivemind.utils import MSGPackSerializer
    from swarmtrain.compression.crosscheck import CheckedAveragerMixin
    from swarmtrain.compression.stats import CompressionStats

    peers, timeout = ("server-0", "client-1", "absent-2"), 1.0
    host = CheckedAveragerMixin()
    host.stats = CompressionStats()

    def new_check():
        return _round_check(peers, clients=(False, True, False), timeout=timeout)

    async def scenario():
        check = new_check()
        started = time.monotonic()
        await host.finish_check(check, round_failed=True)
        assert time.monotonic() - started < 0.5 * timeout
        # the check runs on: our first message reaches the client that asks for it
        answer = MSGPackSerializer.loads(await check.serve("client-1", 0, b"from 1"))
        assert set(answer) == {"0"} and MSGPackSerializer.loads(answer["0"])["seed"] == b"s" * 16
        await asyncio.wait_for(asyncio.gather(*host._background_checks), 4 * timeout)
        assert check.seconds >= 2 * timeout and not host._background_checks  # it waited, in the background

        started = time.monotonic()
        with pytest.raises(AllreduceException, match="incomplete"):
            await host.finish_check(new_check(), round_failed=False)
        assert time.monotonic() - started >= 2 * timeout

    asyncio.run(scenario())
