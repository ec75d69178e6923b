"""Redis killed and restarted empty on its port under a running mesh: requests keep being served
(routing by load, the router's health says so), then the kv-index notices the index is gone,
replays the JetStream event stream into the new Redis, and prefix-aware routing is back."""

from __future__ import annotations

from kvmesh.schemas.messages import ErrorReply, OverlapReply


def test_redis_restart_routes_by_load_then_the_index_is_rebuilt(fault_mesh, probe):
    probe.wait_whole()
    first = probe.conversation("redis-first")
    assert probe.chat(first).status_code == 200
    first_hashes = probe.block_hashes(first)
    held = probe.indexed(first_hashes)

    rebuilds = {n: probe.metric(n, "kvmesh:kv_index_rebuilds_total") for n in ("kv-index", "kv-index-1")}
    fault_mesh.kill("redis")
    try:
        probe.until(lambda: probe.router_health().kv_index_ok is False, "the router reports the index down")
        reply = probe.overlap(first_hashes)
        assert isinstance(reply, ErrorReply) and reply.code == "unavailable", reply
        during = probe.conversation("redis-during")
        for _ in range(2):  # served all the same, by load
            r = probe.chat(during)
            assert r.status_code == 200, r.text
        assert probe.router_health().kv_index_ok is False
    finally:
        fault_mesh.restart("redis")  # same port, nothing on disk: empty

    # Rebuilt from the stream: the same answer as before the fault, and the outage's events too.
    probe.until(lambda: probe.overlap(first_hashes) == OverlapReply(overlap=held), "the index was rebuilt")
    assert probe.indexed(probe.block_hashes(during)), "events published while Redis was down were applied"
    probe.until(lambda: probe.router_health().kv_index_ok, "the router reports the index back")
    leader = probe.kv_index_leader()
    assert probe.metric(leader, "kvmesh:kv_index_leader") == 1
    assert probe.metric(leader, "kvmesh:kv_index_rebuilds_total") == rebuilds[leader] + 1, (
        "it counts the replay"
    )

    # ... and routing uses it again: the first conversation's next turn goes to the worker holding it.
    (holder,) = held
    (other,) = [w for w in fault_mesh.worker_ids if w != holder]
    before = probe.worker_stats(other).prefix_query_tokens
    hits = probe.worker_stats(holder).prefix_hit_tokens
    turn2 = [*first, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    for _ in range(2):
        assert probe.chat(turn2).status_code == 200
    assert probe.worker_stats(other).prefix_query_tokens == before, "nothing went to the other worker"
    assert probe.worker_stats(holder).prefix_hit_tokens > hits
