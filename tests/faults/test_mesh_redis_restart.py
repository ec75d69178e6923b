"""Redis killed and restarted empty on its port under a running mesh: the kv-index answers
'unavailable', notices the index is gone once Redis is back and replays the JetStream event stream
into it. The routers keep their own replica of the index (`--index local`, the default): they stay
healthy and keep routing by prefix throughout. (A router reading the kv-index or Redis routes by
load while it is down and says so: tests/router/test_router_logic.py, test_direct_index.py.)"""

from __future__ import annotations

from kvmesh.schemas.messages import ErrorReply, OverlapReply


def test_redis_restart_keeps_prefix_routing_and_the_index_is_rebuilt(fault_mesh, probe):
    probe.wait_whole()
    first = probe.conversation("redis-first")
    assert probe.chat(first).status_code == 200
    first_hashes = probe.block_hashes(first)
    held = probe.indexed(first_hashes)
    (holder,) = held
    (other,) = [w for w in fault_mesh.worker_ids if w != holder]
    turn2 = [*first, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]

    rebuilds = {n: probe.metric(n, "kvmesh:kv_index_rebuilds_total") for n in ("kv-index", "kv-index-1")}
    fault_mesh.kill("redis")
    try:
        probe.until(lambda: isinstance(probe.overlap(first_hashes), ErrorReply), "the kv-index is down")
        reply = probe.overlap(first_hashes)
        assert isinstance(reply, ErrorReply) and reply.code == "unavailable", reply
        during = probe.conversation("redis-during")
        for _ in range(2):  # served all the same
            r = probe.chat(during)
            assert r.status_code == 200, r.text
        before = probe.worker_stats(other).prefix_query_tokens
        hits = probe.worker_stats(holder).prefix_hit_tokens
        for _ in range(2):  # both routers: the conversation's next turn still goes where it is cached
            assert probe.chat(turn2).status_code == 200
        assert probe.worker_stats(other).prefix_query_tokens == before, "nothing went to the other worker"
        assert probe.worker_stats(holder).prefix_hit_tokens > hits
        assert probe.router_health().kv_index_ok, "the routers' own index does not need Redis"
    finally:
        fault_mesh.restart("redis")  # same port, nothing on disk: empty

    # Rebuilt from the stream: the same answer as before the fault, and the outage's events too.
    probe.until(lambda: probe.overlap(first_hashes) == OverlapReply(overlap=held), "the index was rebuilt")
    assert probe.indexed(probe.block_hashes(during)), "events published while Redis was down were applied"
    assert probe.router_health().kv_index_ok
    leader = probe.kv_index_leader()
    assert probe.metric(leader, "kvmesh:kv_index_leader") == 1
    assert probe.metric(leader, "kvmesh:kv_index_rebuilds_total") == rebuilds[leader] + 1, (
        "it counts the replay"
    )

    # ... and routing still goes by prefix: the first conversation's next turn goes to its holder.
    before = probe.worker_stats(other).prefix_query_tokens
    hits = probe.worker_stats(holder).prefix_hit_tokens
    for _ in range(2):
        assert probe.chat(turn2).status_code == 200
    assert probe.worker_stats(other).prefix_query_tokens == before, "nothing went to the other worker"
    assert probe.worker_stats(holder).prefix_hit_tokens > hits
