"""foam_hf.zero without DeepSpeed: ZeRO's flat partitions stepped rank by rank equal one-process FOAM.

Every rank of a simulated world steps its own partition with :func:`foam_hf.zero.step_slice`; the one
all-reduce of the cut blocks' partial sums is a plain sum over the simulated ranks. The result is held to
:class:`foam_hf.FOAM` stepping the whole tensor (in float64, so agreement is to rounding). The multi-process
runs under real DeepSpeed are in tests/test_deepspeed_zero.py.
"""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch

from foam_hf import FOAM, FoamConfigError, FoamStateError
from foam_hf.zero import FULL_SHAPE_KEY, PARTITION_KEY, ZeroFOAM, check_zero_config
from foam_hf.zero_layout import partial_block_sums, partitions_of, step_slice

OPTIONS = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, scale=1.0, res_scale=1.0)
GROUP = dict(OPTIONS, second_moment="mean_sq", foreach=None, fused=None, state_dtype=None)

# (shape, block_size, world_size, stage): each row puts partition boundaries somewhere different.
LAYOUTS = [
    ((35, 70), 8, 2, 2),  # boundary mid-row and mid-block, ragged last blocks (70 = 8*8 + 6)
    ((35, 70), 16, 2, 3),  # stage 3's ceil(numel/world) partitions: another cut column
    ((70, 35), 8, 2, 2),  # the boundary one column into a row: a 1-entry head of a cut block
    ((30, 35), 8, 3, 3),  # three ranks: two boundaries
    ((7, 35), 4, 5, 2),  # five ranks on a small tensor: partitions shorter than a row
    ((3, 5), 8, 4, 3),  # B > n: one ragged block per row, cut by several boundaries
    ((1, 9), 2, 8, 2),  # partitions of 1-2 entries: a block spans three ranks, some ranks hold only padding
    ((5, 4, 6), 4, 3, 2),  # 3-D tensor: all leading dimensions are rows
    ((6, 8), 4, 2, 3),  # boundary on a block boundary: nothing cut
    ((35, 70), 8, 1, 2),  # one rank: the padded flat tensor
    ((35, 70), 1, 2, 2),  # block_size 1: AdamW on slices
]


def simulate(shape, block_size, world_size, stage, steps=3, **group_overrides):
    """Step every rank's partition of a random tensor for ``steps`` steps, next to FOAM on the whole tensor."""
    group = dict(GROUP, block_size=block_size, **group_overrides)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64, generator=gen)
    whole = weight.clone().requires_grad_(True)
    reference = FOAM([whole], block_size=block_size, **{k: group[k] for k in (*OPTIONS, "second_moment")})
    layouts = partitions_of(shape, block_size, world_size, stage)
    size = layouts[0].partition_numel
    flat = torch.zeros(size * world_size, dtype=torch.float64)
    flat[: weight.numel()] = weight.flatten()
    parts = list(flat.clone().split(size))
    moments = [
        (torch.zeros(lay.num_local_blocks, dtype=torch.float64), torch.zeros(lay.num_local_blocks, dtype=torch.float64))
        for lay in layouts
    ]
    steps_t = [torch.tensor(0.0) for _ in layouts]
    for _ in range(steps):
        grad = torch.randn(shape, dtype=torch.float64, generator=gen)
        whole.grad = grad.clone()
        reference.step()
        flat_grad = torch.zeros(size * world_size, dtype=torch.float64)
        flat_grad[: grad.numel()] = grad.flatten()
        grads = flat_grad.split(size)
        sums = sum(partial_block_sums(lay, g) for lay, g in zip(layouts, grads))  # the all-reduce
        for lay, part, g, (m, v), t in zip(layouts, parts, grads, moments, steps_t):
            step_slice(lay, part, g, m, v, t, sums, group)
    return reference, whole, layouts, torch.cat(parts), moments


@pytest.mark.parametrize("shape, block_size, world_size, stage", LAYOUTS)
def test_partitions_step_as_one_process_foam(shape, block_size, world_size, stage):
    reference, whole, layouts, flat, moments = simulate(shape, block_size, world_size, stage)
    torch.testing.assert_close(flat[: whole.numel()].view(shape), whole.detach(), atol=1e-12, rtol=0)
    # Padding past the tensor's end is never touched.
    assert torch.all(flat[whole.numel() :] == 0)
    state = reference.state[whole]
    for key, index in (("exp_avg", 0), ("exp_avg_sq", 1)):
        full = state[key].flatten()
        for lay, pair in zip(layouts, moments):
            # every rank's blocks, cut blocks included, equal the one-process folded moments at their index
            local = pair[index]
            torch.testing.assert_close(
                local, full[lay.first_block : lay.first_block + local.numel()], atol=1e-12, rtol=0
            )


@pytest.mark.parametrize("overrides", [{"second_moment": "sq_mean"}, {"res_scale": 0.0}, {"scale": 0.5}])
def test_partitions_follow_every_option(overrides):
    reference, whole, _, flat, _ = simulate((35, 70), 8, 3, 2, **overrides)
    torch.testing.assert_close(flat[: whole.numel()].view(35, 70), whole.detach(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape, block_size, world_size, stage", LAYOUTS)
def test_moments_held_are_the_blocks_each_rank_touches(shape, block_size, world_size, stage):
    n = shape[-1]
    rows = math.prod(shape[:-1])
    layouts = partitions_of(shape, block_size, world_size, stage)
    touched = []
    for lay in layouts:
        blocks = {(i // n, (i % n) // block_size) for i in range(lay.start, lay.stop)}  # brute force
        assert lay.num_local_blocks == len(blocks)
        touched.append(blocks)
    folded = rows * math.ceil(n / block_size)
    duplicates = sum(len(blocks) for blocks in touched) - len(set().union(*touched))
    assert len(set().union(*touched)) == folded
    # Over all ranks: the folded size, plus one copy per extra rank that touches a cut block.
    assert sum(lay.num_local_blocks for lay in layouts) == folded + duplicates
    assert duplicates <= sum(world_size - 1 for _ in layouts[0].cut_blocks()) or world_size == 1


def test_partition_sizes_are_zeros_layouts():
    # ZeRO-1/2 pad the flat group to a multiple of 2 * world; ZeRO-3 pads each tensor to a multiple of world.
    assert [lay.partition_numel for lay in partitions_of((35, 70), 8, 2, 2)] == [1226, 1226]
    assert [lay.partition_numel for lay in partitions_of((35, 70), 8, 2, 3)] == [1225, 1225]
    assert [(lay.start, lay.stop) for lay in partitions_of((1, 9), 2, 8, 2)][-3:] == [(9, 9)] * 3


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(35, 70), torch.nn.Tanh(), torch.nn.Linear(70, 6))


def test_zerofoam_without_zero_is_foam_bitwise():
    a, b = _model(), _model()
    foam = FOAM(a.parameters(), block_size=8, weight_decay=0.1)
    zero = ZeroFOAM(b.parameters(), block_size=8, weight_decay=0.1)
    # One group per folded tensor, recording its shape; the 1-D biases stay together.
    assert [g.get(FULL_SHAPE_KEY) for g in zero.param_groups] == [[70, 35], [6, 70], None]
    assert [len(g["params"]) for g in zero.param_groups] == [1, 1, 2]
    x = torch.randn(4, 35)
    for _ in range(3):
        for model, opt in ((a, foam), (b, zero)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(foam.state[p]["exp_avg"], zero.state[q]["exp_avg"])
    assert zero.state_memory() == foam.state_memory()


def test_named_parameters_are_split_too():
    zero = ZeroFOAM(_model().named_parameters(), block_size=8)
    assert [g.get(FULL_SHAPE_KEY) for g in zero.param_groups] == [[70, 35], [6, 70], None]
    assert [g["param_names"] for g in zero.param_groups] == [["0.weight"], ["2.weight"], ["0.bias", "2.bias"]]


def _as_partition(opt: ZeroFOAM, group_index: int, world_size: int, rank: int) -> torch.Tensor:
    """Replace a folded group's tensor by its flat ZeRO-1/2 partition, as DeepSpeed does."""
    group = opt.param_groups[group_index]
    (param,) = group["params"]
    lay = partitions_of(param.shape, group["block_size"], world_size, 2)[rank]
    flat = torch.zeros(lay.partition_numel * world_size)
    flat[: param.numel()] = param.detach().flatten()
    part = flat[rank * lay.partition_numel : (rank + 1) * lay.partition_numel].clone().requires_grad_(True)
    group["params"] = [part]
    return part


def test_checkpoint_of_another_partitioning_is_refused(monkeypatch):
    opt = ZeroFOAM(_model().parameters(), block_size=8)
    part = _as_partition(opt, 0, world_size=1, rank=0)
    part.grad = torch.randn_like(part)
    opt.step()
    assert opt.param_groups[0][PARTITION_KEY] == {"rank": 0, "world_size": 1, "partition_numel": 2450}
    saved = opt.state_dict()
    opt.load_state_dict(saved)  # same partitioning: loads
    other = ZeroFOAM(_model().parameters(), block_size=8)
    monkeypatch.setattr(ZeroFOAM, "_rank_and_world", lambda self: (1, 2))
    _as_partition(other, 0, world_size=2, rank=1)
    with pytest.raises(FoamStateError, match=r"saved on partition .*'world_size': 1.* resume with that world size"):
        other.load_state_dict(saved)


def test_adamw_sized_state_is_refused_at_step():
    opt = ZeroFOAM(_model().parameters(), block_size=8)
    part = _as_partition(opt, 0, world_size=1, rank=0)
    part.grad = torch.randn_like(part)
    opt.step()
    # What a universal or elastic checkpoint load leaves behind: moments the size of the partition.
    opt.state[part]["exp_avg"] = torch.zeros_like(part)
    with pytest.raises(FoamStateError, match=r"state\['exp_avg'\] of shape \(2450,\).*folds to 350 blocks"):
        opt.step()


FLATTENED = r"one-dimensional.*flat shards.*AdamW-sized.*Fix: .*foam_hf\.zero\.ZeroFOAM.*FSDP2 \(.*fully_shard"


def _flatten_groups(opt: FOAM) -> list[torch.Tensor]:
    """Replace each group's tensors by one flat 1-D tensor with a gradient, as ZeRO-1/2 (and FSDP1) do."""
    flats = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().flatten() for p in group["params"]]).requires_grad_(True)
        flat.grad = torch.randn_like(flat)
        group["params"] = [flat]
        flats.append(flat)
    return flats


def test_plain_foam_warns_once_when_its_tensors_become_flat_shards():
    opt = FOAM(_model().parameters(), block_size=8)
    (flat,) = _flatten_groups(opt)
    with pytest.warns(UserWarning, match=FLATTENED):
        opt.step()
    assert opt.state[flat]["exp_avg"].shape == flat.shape  # what the warning is about: an AdamW-sized state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer: the check ran at the first step and is not repeated


def _backward(model: torch.nn.Module, opt: FOAM) -> None:
    model(torch.randn(4, 35)).square().mean().backward()


def _flat_shards(model: torch.nn.Module, opt: FOAM) -> None:
    # On one rank, ZeRO-1/2's partition of each of ZeroFOAM's one-tensor groups is that tensor flattened.
    _flatten_groups(opt)


@pytest.mark.parametrize(
    "build, prepare",
    [
        pytest.param(lambda m: FOAM(m.parameters(), block_size=8), _backward, id="foam-real-tensors"),
        pytest.param(lambda m: FOAM(m.parameters(), block_size=1), _flat_shards, id="foam-nothing-folded"),
        pytest.param(lambda m: FOAM([m[0].bias, m[2].bias], block_size=8), _flat_shards, id="foam-only-1d"),
        pytest.param(lambda m: ZeroFOAM(m.parameters(), block_size=8), _flat_shards, id="zerofoam-partitions"),
    ],
)
def test_no_flat_shard_warning_when_no_fold_is_lost(build, prepare):
    model = _model()
    opt = build(model)
    prepare(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    if isinstance(opt, ZeroFOAM):  # it folded the partitions: (70, 35) at B=8 is 70 * 5 blocks
        assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].shape == (350,)


def test_partition_of_unknown_size_is_refused():
    opt = ZeroFOAM(_model().parameters(), block_size=8)
    opt.param_groups[0]["params"] = [torch.zeros(100, requires_grad=True)]
    with pytest.raises(FoamStateError, match=r"shape \(70, 35\).*\(100,\).*process_group"):
        opt.step()


@pytest.mark.parametrize(
    "config",
    [{"zero_optimization": {"stage": s}} for s in (0, 1, 2, 3, "auto")]
    + [
        {
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
        },
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}},
        {
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": "auto"}},
            "zero_force_ds_cpu_optimizer": False,
        },
        {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none", "ratio": 0.5}}},
    ],
)
def test_supported_configs_pass(config):
    assert check_zero_config(config) is None


@pytest.mark.parametrize(
    "config, error",
    [
        (
            {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}},
            r"an 'optimizer' section is not supported.*replaced",
        ),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, r"zero_force_ds_cpu_optimizer"),
        (
            {
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}},
                "zero_force_ds_cpu_optimizer": False,
            },
            r"nvme",
        ),
        (
            {
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}},
                "zero_force_ds_cpu_optimizer": False,
            },
            r"ratio < 1.*DeepSpeedCPUAdam",
        ),
        (
            {
                "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": "true"}},
                "zero_force_ds_cpu_optimizer": False,
            },
            r"super_offload",
        ),
        ({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}, r"load_universal"),
        ({"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}, r"elastic_checkpoint"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 2}}, r"MiCS"),
        ({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 2}, r"sequence_parallel_size"),
    ],
)
def test_unsupported_configs_are_refused(config, error):
    with pytest.raises(FoamConfigError, match=rf"FOAM under DeepSpeed: .*{error}.*Fix: "):
        check_zero_config(config)


def test_load_state_dict_keeps_the_process_group_and_the_whole_model_figures():
    # torch's load_state_dict ends with __setstate__: on a live ZeroFOAM, whose groups ZeRO has replaced by flat
    # partitions, that once dropped the data-parallel group and recomputed the memory figures from the partitions.
    weight, bias = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(6))
    process_group = object()  # stands for a data-parallel group; read only under torch.distributed
    optimizer = ZeroFOAM([weight, bias], block_size=4, process_group=process_group)
    expected = optimizer.state_memory()
    assert expected.folded_params == 1 and expected.unfolded_params == 1
    for group in optimizer.param_groups:  # what ZeRO-1/2 does to the groups: one flat partition each (1 rank)
        group["params"] = [torch.nn.Parameter(torch.zeros(sum(p.numel() for p in group["params"])))]
    optimizer.load_state_dict(optimizer.state_dict())
    assert optimizer.state_memory() == expected
    assert optimizer._process_group is process_group
    restored = pickle.loads(pickle.dumps(ZeroFOAM([torch.nn.Parameter(torch.randn(6, 10))], block_size=4)))
    assert restored._process_group is None and restored.state_memory().folded_params == 1


def test_frozen_tensors_that_would_fold_share_the_unfolded_group():
    # ZeRO-1/2 drops frozen parameters from its groups: a frozen weight in a group of its own left that group
    # empty, and DeepSpeed failed at initialisation (tests/test_deepspeed_zero.py runs it).
    frozen, trained = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(6, 10))
    frozen.requires_grad_(False)
    bias = torch.nn.Parameter(torch.randn(6))
    optimizer = ZeroFOAM([frozen, trained, bias], block_size=4)
    groups = [[id(p) for p in group["params"]] for group in optimizer.param_groups]
    assert groups == [[id(trained)], [id(frozen), id(bias)]]
    assert optimizer.state_memory().folded_params == 1


def test_no_shared_group_of_only_frozen_tensors():
    # With every unfolded tensor frozen (a frozen layer beside a bias-free trained one), the shared group would hold
    # only frozen tensors: ZeRO-1/2 dropped them and failed on the empty group (tests/test_deepspeed_zero.py).
    frozen_weight, frozen_bias = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(6))
    for p in (frozen_weight, frozen_bias):
        p.requires_grad_(False)
    trained = torch.nn.Parameter(torch.randn(6, 10))
    optimizer = ZeroFOAM([frozen_weight, frozen_bias, trained], block_size=4)
    assert [[id(p) for p in group["params"]] for group in optimizer.param_groups] == [[id(trained)]]
    only_frozen = ZeroFOAM([frozen_bias], block_size=4)  # nothing folds: the one group stays, as torch keeps it
    assert [[id(p) for p in group["params"]] for group in only_frozen.param_groups] == [[id(frozen_bias)]]


def test_a_state_of_the_other_layout_is_refused_naming_both():
    # ZeroFOAM gives every folded tensor a group of its own: a FOAM state does not load into it, nor the reverse,
    # and the error says so rather than blaming block sizes.
    weight, bias = torch.nn.Parameter(torch.randn(6, 10)), torch.nn.Parameter(torch.randn(6))
    for p in (weight, bias):
        p.grad = torch.ones_like(p)
    plain, zero = FOAM([weight, bias], block_size=4), ZeroFOAM([weight, bias], block_size=4)
    plain.step()
    zero.step()
    for source, target, writer in (
        (plain, ZeroFOAM([weight, bias], block_size=4), "FOAM"),
        (zero, FOAM([weight, bias], block_size=4), "ZeroFOAM"),
    ):
        with pytest.raises(FoamStateError, match=rf"written by {writer} \(\d param groups\) and this optimizer is a"):
            target.load_state_dict(source.state_dict())
        assert not target.state


@pytest.mark.parametrize("shape, block_size, world_size, stage", [((35, 70), 8, 2, 2), ((35, 70), 16, 2, 3)])
def test_bf16_partitions_round_their_weights_stochastically(shape, block_size, world_size, stage):
    """bf16 partitions (DeepSpeed's bf16_master_weights_and_grads) under weight_rounding="stochastic": a constant
    gradient at lr 1e-4 moves each weight in [0.5, 1) by lr a step (m̂/√v̂ = 1), under half its bf16 spacing
    (2^-9). Rounded to nearest no weight moves; stochastically the mean moves by steps·lr, the entries of blocks
    that partition boundaries cut (stepped apart from the whole blocks) included."""
    lr, steps = 1e-4, 200
    layouts = partitions_of(shape, block_size, world_size, stage)
    size, numel = layouts[0].partition_numel, math.prod(shape)
    start = torch.zeros(size * world_size, dtype=torch.bfloat16)
    start[:numel] = torch.empty(numel).uniform_(0.5, 0.999, generator=torch.Generator().manual_seed(0))
    grad = torch.zeros(size * world_size, dtype=torch.bfloat16)
    grad[:numel] = 1.0
    in_cut_block = torch.zeros(size * world_size, dtype=torch.bool)
    for lay in layouts:
        for block in lay.partial_blocks():
            in_cut_block[max(lay.block_start(block), lay.start) : min(lay.block_stop(block), lay.stop)] = True
    assert in_cut_block.any()
    moved = {}
    for rounding in ("nearest", "stochastic"):
        group = dict(GROUP, lr=lr, weight_decay=0.0, block_size=block_size, weight_rounding=rounding)
        parts = list(start.clone().split(size))
        moments = [(torch.zeros(lay.num_local_blocks), torch.zeros(lay.num_local_blocks)) for lay in layouts]
        steps_t = [torch.tensor(0.0) for _ in layouts]
        grads = grad.split(size)
        for _ in range(steps):
            sums = sum(partial_block_sums(lay, g) for lay, g in zip(layouts, grads))
            for lay, part, g, (m, v), t in zip(layouts, parts, grads, moments, steps_t):
                step_slice(lay, part, g, m, v, t, sums, group)
        moved[rounding] = torch.cat(parts).float() - start.float()
    assert torch.all(moved["nearest"] == 0)
    assert moved["stochastic"][:numel].mean().item() == pytest.approx(-steps * lr, rel=0.05)
    assert moved["stochastic"][in_cut_block].mean().item() == pytest.approx(-steps * lr, rel=0.5)
    assert torch.all(moved["stochastic"][numel:] == 0)  # padding is never touched
