"""The stage planner on synthetic budgets: contiguous, complete, within every budget, refusals with numbers."""

from __future__ import annotations

import re

import pytest

from nvfp4_pp.model.arch import SUPPORTED, architecture_of
from nvfp4_pp.planning.budget import GB, RankFacts, budgets
from nvfp4_pp.config import ConfigError
from nvfp4_pp.runtime.dist import DeviceError, requested_device, wire_backend
from nvfp4_pp.planning.memory import ModelSizes, Workload
from nvfp4_pp.planning.plan import PlanError, owner_of, plan_stages
from nvfp4_pp.model.source import SourceCheckpoint
from sparse_checkpoint import BEHEMOTH_X_123B, write_sparse_checkpoint

GiB = 2**30
CALIBRATION = Workload(batch_size=1, max_length=1024)


@pytest.fixture(scope="module")
def behemoth(tmp_path_factory) -> ModelSizes:
    """Behemoth-X-123B's real tensor sizes, read from safetensors headers over sparse files."""
    source = SourceCheckpoint(write_sparse_checkpoint(tmp_path_factory.mktemp("behemoth"), BEHEMOTH_X_123B))
    return ModelSizes.from_source(source, architecture_of(source.config))


def spark(rank: int) -> RankFacts:
    """A 128 GiB DGX Spark (GB10, unified memory): CUDA would claim terabytes; psutil says ~120 GiB free."""
    return RankFacts(rank, f"spark{rank}", "cuda:0", "unified", device_free=5 * 10**12,
                     host_available=120 * GiB, baseline=3 * GB)


def rtx3090(rank: int) -> RankFacts:
    """A 24 GiB RTX 3090 in a desktop: 23.5 GiB free after the CUDA context, 48 GiB host RAM free."""
    return RankFacts(rank, "desktop", "cuda:0", "discrete", device_free=int(23.5 * GiB),
                     host_available=48 * GiB, baseline=3 * GB)


def cpu_ranks(n: int, available: int = 16 * GiB, host: str = "box") -> list[RankFacts]:
    return [RankFacts(r, host, "cpu", "cpu", 0, available, GB // 2) for r in range(n)]


def assert_within_budgets(plans) -> None:
    for p in plans:
        assert p.overflows() == []
        if p.budget.shared:
            assert p.need.host <= p.budget.pool
        else:
            assert p.need.device <= p.budget.pool and p.need.host <= p.budget.host_pool


def test_sizes_come_from_headers(behemoth):
    layer = 2 * (2 * 12288 * 12288 + 2 * 1024 * 12288 + 3 * 28672 * 12288 + 2 * 12288)
    assert behemoth.layer_bytes == (layer,) * 88
    assert behemoth.embed_bytes == 2 * 32768 * 12288
    assert behemoth.head_bytes == 2 * 32768 * 12288 + 2 * 12288
    assert behemoth.largest_linear == 2 * 28672 * 12288 and behemoth.layer_linears == 7


def test_seed_case_two_sparks_and_a_3090(behemoth):
    plans = plan_stages(behemoth, budgets([spark(0), spark(1), rtx3090(2)], reserve_gb=4), "auto", CALIBRATION)
    counts = [p.layers for p in plans]
    # The seed's author found 41/41/6 by hand after two OOM kills. Packing in row chunks needs far
    # less export scratch than a whole 12288 x 28672 Linear, so the 3090 takes a little more and the
    # slowest stage gets shorter: within two layers of the hand split, and never a longer stage.
    assert sum(counts) == 88 and all(abs(c - s) <= 2 for c, s in zip(counts, [41, 41, 6]))
    assert max(counts) <= 41 and counts[2] == min(counts)
    assert [p.start for p in plans] == [0, counts[0], counts[0] + counts[1]]
    check = plan_stages(behemoth, budgets([spark(0), spark(1), rtx3090(2)], reserve_gb=4), [41, 41, 6], CALIBRATION)
    assert_within_budgets(check)  # the hand split is accepted too
    assert_within_budgets(plans)
    # The Spark's budget is psutil's RAM less the reserve, never CUDA's 5 TB figure.
    assert plans[0].budget.pool == 3 * GB + 120 * GiB - 4 * GB


@pytest.mark.parametrize("batch_size,max_length", [(1, 512), (1, 2048), (4, 1024), (8, 2048), (1, 8192)])
def test_seed_hardware_never_over_budget(behemoth, batch_size, max_length):
    """Whatever the calibration shape, a plan fits every pool of every rank, or is refused."""
    facts = [spark(0), spark(1), rtx3090(2)]
    try:
        plans = plan_stages(behemoth, budgets(facts, reserve_gb=4), "auto", Workload(batch_size, max_length))
    except PlanError as e:
        assert "GB missing" in str(e)
        return
    assert sum(p.layers for p in plans) == 88
    assert_within_budgets(plans)


def test_smallest_node_gets_smallest_slice_wherever_it_sits(behemoth):
    for order in ([rtx3090, spark, spark], [spark, rtx3090, spark]):
        plans = plan_stages(behemoth, budgets([f(r) for r, f in enumerate(order)], reserve_gb=4), "auto", CALIBRATION)
        small = order.index(rtx3090)
        assert plans[small].layers == min(p.layers for p in plans) <= 8
        assert_within_budgets(plans)


def test_impossible_model_is_refused_with_missing_amount(behemoth):
    facts = [spark(0), rtx3090(1)]
    with pytest.raises(PlanError) as e:
        plan_stages(behemoth, budgets(facts, reserve_gb=4), "auto", CALIBRATION)
    message = str(e.value)
    total = float(re.search(r"(\d+\.\d+) GB missing in all", message).group(1))
    weights = sum(behemoth.layer_bytes) / GB
    assert weights - (120 * GiB + 23.5 * GiB) / GB < total < weights  # about a third of the model has no home
    assert "GB missing on rank 0 (spark0, unified memory" in message
    assert "GB missing on rank 1 (desktop, cuda:0 memory" in message


def test_explicit_split_checked_against_budgets(behemoth):
    b = budgets([spark(0), spark(1), rtx3090(2)], reserve_gb=4)
    assert [p.layers for p in plan_stages(behemoth, b, [41, 41, 6], CALIBRATION)] == [41, 41, 6]
    with pytest.raises(PlanError) as e:
        plan_stages(behemoth, b, [29, 29, 30], CALIBRATION)
    assert re.search(r"pipeline.layers = \[29, 29, 30\] does not fit: \d+\.\d\d GB missing on rank 2 "
                     r"\(desktop, cuda:0 memory: needs \d+\.\d\d GB, budget 25\.23 GB\); "
                     r"'auto' would fit, e\.g\. \[\d+, \d+, \d+\]", str(e.value)), str(e.value)


def test_memory_limits_shape_the_split(behemoth):
    even = plan_stages(behemoth, budgets([spark(0), spark(1), spark(2)]), "auto", CALIBRATION)
    assert sorted(p.layers for p in even) == [29, 29, 30] and even[0].layers == 29  # rank 0 holds the embeddings
    capped = plan_stages(behemoth, budgets([spark(0), spark(1), spark(2)], [120, 120, 60]), "auto", CALIBRATION)
    assert [p.layers for p in capped][2] < 29 and capped[2].budget.capped and capped[2].peak <= 60 * GB
    by_host = plan_stages(behemoth, budgets([spark(0), spark(1), spark(2)], {"spark0": 50, "spark1": 200,
                                                                             "spark2": 200}), "auto", CALIBRATION)
    assert by_host[0].layers < by_host[1].layers and by_host[0].peak <= 50 * GB


def test_even_split_on_equal_ranks():
    sizes = ModelSizes(layer_bytes=(10**8,) * 30, layer_linear_bytes=(9 * 10**7,) * 30, layer_linears=7,
                       largest_linear=10**7, embed_bytes=10**8, head_bytes=10**8, hidden=1024,
                       intermediate=4096, heads=16, kv_heads=4, head_dim=64)
    for world, expected in [(1, [30]), (3, [10, 10, 10]), (4, [7, 7, 8, 8])]:
        counts = [p.layers for p in plan_stages(sizes, budgets(cpu_ranks(world)), "auto", CALIBRATION)]
        assert sorted(counts) == expected and counts[0] == min(counts)


def test_ranks_on_one_host_share_its_memory():
    b = budgets(cpu_ranks(4, available=18 * GB), reserve_gb=2)
    assert [x.pool for x in b] == [GB // 2 + 4 * GB] * 4
    mixed = budgets(cpu_ranks(2, host="a") + [RankFacts(2, "b", "cpu", "cpu", 0, 8 * GB, GB)], {"a": 6, "b": 100}, 2)
    assert [x.pool for x in mixed] == [3 * GB, 3 * GB, GB + 8 * GB - 2 * GB]
    assert [x.capped for x in mixed] == [True, True, False]


@pytest.mark.parametrize("limit,message", [
    ([10, 10], "pipeline.memory_limit_gb has 2 entries but 3 ranks are running"),
    ({"other": 10}, "pipeline.memory_limit_gb has no entry for host 'box' (it has ['other'])"),
])
def test_bad_memory_limits(limit, message):
    with pytest.raises(ConfigError) as e:
        budgets(cpu_ranks(3), limit)
    assert message in str(e.value)


@pytest.mark.parametrize("layers,world,message", [
    ("auto", 31, "31 ranks but the model has only 30 decoder layers; use at most 30 ranks"),
    ([10, 10], 3, "pipeline.layers has 2 entries but 3 ranks are running"),
    ([10, 10, 11], 3, "sums to 31 but the model has 30 decoder layers; make the counts sum to 30"),
    ([15, 0, 15], 3, "every rank needs at least one layer"),
])
def test_bad_splits(layers, world, message):
    sizes = ModelSizes(layer_bytes=(10**6,) * 30, layer_linear_bytes=(10**6,) * 30, layer_linears=7,
                       largest_linear=10**5, embed_bytes=10**6, head_bytes=10**6, hidden=64,
                       intermediate=256, heads=4, kv_heads=2, head_dim=16)
    with pytest.raises(PlanError) as e:
        plan_stages(sizes, budgets(cpu_ranks(world)), layers, CALIBRATION)
    assert message in str(e.value)


def test_tensor_owners():
    arch = SUPPORTED["LlamaForCausalLM"]
    ranges = [(0, 10), (10, 20), (20, 30)]
    assert owner_of("model.embed_tokens.weight", arch, ranges) == 0
    assert owner_of("model.layers.9.mlp.up_proj.weight", arch, ranges) == 0
    assert owner_of("model.layers.10.self_attn.q_proj.weight", arch, ranges) == 1
    assert owner_of("model.layers.29.input_layernorm.weight", arch, ranges) == 2
    assert owner_of("model.norm.weight", arch, ranges) == 2
    assert owner_of("lm_head.weight", arch, ranges) == 2


def test_ranks_agree_on_the_hidden_state_backend():
    assert wire_backend("auto", ["cuda", "cuda"]) == "nccl"
    assert wire_backend("auto", ["cuda", "cpu", "cuda"]) == "gloo"
    assert wire_backend("gloo", ["cuda", "cuda"]) == "gloo"
    with pytest.raises(DeviceError, match=r"pipeline.backend is 'nccl' but rank\(s\) \[1\] run on CPU"):
        wire_backend("nccl", ["cuda", "cpu"])
    assert requested_device(["cuda", "cpu"], 1, 2) == "cpu"
    with pytest.raises(DeviceError, match="pipeline.device has 2 entries but 3 ranks are running"):
        requested_device(["cuda", "cpu"], 0, 3)


def test_a_model_larger_than_two_sparks_streams_instead_of_failing(behemoth):
    """Behemoth-X-123B (246 GB in BF16) on two 128 GiB DGX Sparks and no third node: resident
    stages cannot fit (refused with the GB missing); `auto` plans streaming stages that fit."""
    facts = [spark(0), spark(1)]
    with pytest.raises(PlanError, match=r"GB missing in all"):
        plan_stages(behemoth, budgets(facts, reserve_gb=4), "auto", CALIBRATION, stream="never")
    plans = plan_stages(behemoth, budgets(facts, reserve_gb=4), "auto", CALIBRATION, stream="auto")
    assert plans[0].start == 0 and plans[0].stop == plans[1].start and plans[1].stop == 88
    assert any(p.streaming for p in plans)
    assert_within_budgets(plans)
    streamed = [p for p in plans if p.streaming]
    assert all(p.need.items["weights"] < 3 * behemoth.layer_bytes[0] + behemoth.embed_bytes for p in streamed)


def test_gptq_counts_its_hessians_and_one_linears_solve(behemoth):
    """Flat GPTQ holds every Hessian of the stage, layer by layer one layer's; either way one Linear's
    update at a time (3 Hessian-sized matrices of its down_proj, 28672 wide, and FP32 weight copies)."""
    import dataclasses

    from nvfp4_pp.planning.memory import stage_need

    plain = Workload(batch_size=1, max_length=1024)
    gptq = dataclasses.replace(plain, hessians=True)
    solve = 3 * 28672**2 * 4 + 4 * behemoth.largest_linear
    assert behemoth.largest_hessian_bytes == 28672**2 * 4

    def device(workload):
        return stage_need(behemoth, "discrete", 0, 10, 12, False, False, workload).device

    def within_allocator_slack(grown: int, expected: int) -> bool:  # CUDA ranks add 2% for the caching allocator
        return expected <= grown <= expected * 1.03

    assert within_allocator_slack(device(gptq) - device(plain), 2 * behemoth.layer_hessian_bytes + solve)
    layer_major = dataclasses.replace(gptq, layer_major=True)
    assert within_allocator_slack(device(layer_major) - device(dataclasses.replace(plain, layer_major=True)),
                                  behemoth.layer_hessian_bytes + solve)


def test_layer_major_stages_count_the_export_overlap(behemoth):
    """A resident layer-by-layer stage exports layer k while layer k+1 calibrates, as a streaming one does: the
    packing transient and one packed layer on top of calibration (not under `auto`'s guard, which exports after
    its verdict); on a CPU rank the export buffer too."""
    import dataclasses

    from nvfp4_pp.planning.memory import stage_need

    def need(kind, **workload):
        return stage_need(behemoth, kind, 0, 10, 12, False, False, dataclasses.replace(CALIBRATION, **workload))

    overlap = need("discrete", layer_major=True).items["export overlap"]
    assert overlap > 0 and need("discrete").items["export overlap"] == 0
    assert need("discrete", layer_major=True, guard=True).items["export overlap"] == 0
    assert need("discrete", layer_major=True).device > need("discrete", layer_major=True, guard=True).device
    # CPU: calibration (with the overlap) and the export buffer at once, above the export after calibration
    cpu = need("cpu", layer_major=True)
    assert cpu.host >= cpu.items["export buffer"] + overlap + cpu.items["weights"] > need("cpu").host


def test_plan_predicts_gptqs_solve_time_and_what_parallel_stages_divide(behemoth):
    """Behemoth-X-123B's GPTQ solve predicted from its shapes at the H200's measured rate (4.4 s a layer,
    Mistral-Large shapes); 3 stages: sequential stages take turns, parallel and flat ones solve at once."""
    from nvfp4_pp.planning.plan import describe, gptq_layer_solve_seconds

    plans = plan_stages(behemoth, budgets([spark(0), spark(1), spark(2)]), "auto", CALIBRATION)
    per_layer = gptq_layer_solve_seconds(behemoth)
    assert 4.0 < per_layer < 5.0
    sequential, parallel = describe(plans, behemoth, "sequential")[-1], describe(plans, behemoth, "parallel")[-1]
    assert f"{per_layer:.1f} s a layer" in sequential and f"{per_layer * 88:.0f} s for this split" in sequential
    longest = max(p.layers for p in plans)
    assert f"{per_layer * longest:.0f} s for this split" in parallel and "the 3 stages solve at once" in parallel
    assert not any("GPTQ" in line for line in describe(plans, behemoth))
