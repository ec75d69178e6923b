"""Two replicas each of the tokenizer, router and kv-index: killing one of each (SIGKILL, the kv-index
one being the lease holder) leaves the mesh serving, and the index keeps being written."""

from __future__ import annotations


def test_one_replica_of_each_control_service_killed_the_others_serve(fault_mesh, probe):
    probe.wait_whole()
    before = probe.conversation("replicas-before")
    assert probe.chat(before).status_code == 200
    before_hashes = probe.block_hashes(before)
    held = probe.indexed(before_hashes)
    leader = probe.kv_index_leader()
    assert leader is not None and leader.startswith("kv-index")
    killed = ["tokenizer", "router", leader]
    try:
        for name in killed:
            fault_mesh.kill(name)
        # The survivors take every request (queue groups): NATS dropped the dead ones' subscriptions.
        for i in range(6):
            r = probe.chat([{"role": "user", "content": f"Count to {i + 2}."}])
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
        # The surviving kv-index answers from the same Redis, and takes the lease over to keep indexing.
        assert probe.overlap(before_hashes).overlap == held
        after = probe.conversation("replicas-after")
        assert probe.chat(after).status_code == 200
        assert probe.indexed(probe.block_hashes(after)), "events after the kill are indexed"
        new_leader = probe.kv_index_leader()
        assert new_leader is not None and new_leader not in killed
        assert probe.metric(new_leader, "kvmesh:kv_index_leader") == 1
        health = probe.router_health()
        assert health.kv_index_ok and sorted(health.workers) == sorted(fault_mesh.worker_ids)
    finally:
        for name in killed:
            fault_mesh.restart(name)
        fault_mesh.wait_healthy(killed)  # whole again for whatever runs next
