"""One profile key for the master's cache and the profiler's own cache on a node."""

from oobleck.common.jobspec import parse_job_spec
from oobleck.common.profilekey import node_device, profile_key

SPEC = """
name: k
model: {name: gpt, config: {num_layers: 2, hidden_size: 32, num_heads: 2, vocab_size: 64}}
data: {seq_len: 16}
microbatch_size: 2
global_batch_size: 4
steps: 10
"""


def test_the_master_and_the_node_key_a_profile_the_same_way():
    from oobleck.master.profiles import cache_key as master_key
    from oobleck.worker.profiler import cache_key as node_key

    spec = parse_job_spec(SPEC)
    assert master_key(spec, 2, 0) == node_key(spec, node_device(2, 0)) == profile_key(spec, "cpux2")
    assert master_key(spec, 1, 80 << 30) == node_key(spec, node_device(1, 80 << 30))
    assert len({master_key(spec, 2, 0), master_key(spec, 1, 0), master_key(spec, 2, 80 << 30)}) == 3
    renamed = parse_job_spec(SPEC.replace("name: k", "name: other").replace("steps: 10", "steps: 99"))
    assert profile_key(renamed, "cpux1") == profile_key(spec, "cpux1")  # not what was measured
    assert profile_key(parse_job_spec(SPEC.replace("seq_len: 16", "seq_len: 32")), "cpux1") != profile_key(
        spec, "cpux1"
    )
