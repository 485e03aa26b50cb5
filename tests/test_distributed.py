"""FOAM under DDP and FSDP2 with 2 CPU processes on gloo, held to a 1-process run on the same global batch.

Each test spawns 2 ranks (a few seconds: most of it is importing torch twice). The ranks write what they
measured to files; the assertions run here, in the test process, against a plain 1-process FOAM.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import stochastically_rounded
from hf_fixtures import end_rank

from foam_hf import FOAM, FoamConfigError, FoamStateError, LayerwiseFOAM
from foam_hf.convert import foam_state_from_adamw
from foam_hf.distributed import local_tensor, sum_over_shards

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
STEPS = 5  # several steps: bias corrections and both moments in play, yet a run of ~1 s
RESUME_AT = 3
FOAM_KWARGS = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, block_size=4)
# Float32 sums of the gradient reduced in another order differ in the last bits; FOAM divides by sqrt(V),
# which can amplify them where V is tiny. The bound, 2e-4, is far above that and far below a
# wrong fold (an O(lr) = O(1e-2) difference per step).
TOLERANCE = 2e-4


def make_model() -> torch.nn.Module:
    # Rows split unevenly across 2 ranks: 12 -> 6/6, 3 -> 2/1, 1 -> 1/0 (rank 1 holds no rows at all);
    # row lengths 10 and 12 with block_size=4: a ragged block and an exact one.
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 10, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(STEPS)]


def train_step(model, opt, x, y) -> None:
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def one_process_run() -> list[torch.Tensor]:
    model = make_model()
    opt = FOAM(model.parameters(), **FOAM_KWARGS)
    for x, y in batches():
        train_step(model, opt, x, y)
    return [p.detach().clone() for p in model.parameters()]


# Splits of the last (folded) dimension that keep blocks whole on 2 ranks, as (shape, block_size, each rank's
# local moment shape): 16 columns as 8 + 8 (2 blocks of 4 each); 9 columns as 5 + 4 (a ragged block of 4 on rank
# 1); a 3-D weight whose last dimension is split.
ROW_SPLITS = [((4, 16), 4, [(4, 2), (4, 2)]), ((4, 9), 5, [(4, 1), (4, 1)]), ((2, 3, 16), 4, [(2, 3, 2)] * 2)]


def row_split_problem(shape) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A weight and STEPS gradients of ``shape``, the same on every rank."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(shape, generator=gen), [torch.randn(shape, generator=gen) for _ in range(STEPS)]


def row_split_one_process(shape, block_size: int, fused: bool) -> list[torch.Tensor]:
    weight, grads = row_split_problem(shape)
    param = torch.nn.Parameter(weight.clone())
    opt = FOAM([param], fused=fused, **{**FOAM_KWARGS, "block_size": block_size})
    for grad in grads:
        param.grad = grad
        opt.step()
    return [param.detach(), opt.state[param]["exp_avg"], opt.state[param]["exp_avg_sq"]]


def local_half(rank, x, y):
    half = x.shape[0] // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def init(rank: int, store_dir: str) -> None:
    torch.set_num_threads(1)  # 2 ranks on a 2-core machine: no oversubscription (torchrun does the same)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD)


def ddp_worker(rank: int, tmp: str) -> None:
    init(rank, tmp)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        opt = FOAM(model.parameters(), **FOAM_KWARGS)
        for x, y in batches():
            train_step(model, opt, *local_half(rank, x, y))
        torch.save([p.detach() for p in model.module.parameters()], f"{tmp}/ddp{rank}.pt")
        end_rank()  # tears the group down and leaves without finalization (see hf_fixtures.end_rank)
    finally:  # on failure only: end_rank does not return
        dist.destroy_process_group()


def stochastic_bf16_model() -> torch.nn.Module:
    # Rows split 24/24 and 3/2; rows of 70 columns (whole pairs of the fused kernel's bf16 code, and a tail) and 48.
    torch.manual_seed(3)
    linears = (torch.nn.Linear(70, 48), torch.nn.Tanh(), torch.nn.Linear(48, 5))
    return torch.nn.Sequential(*linears).to(torch.bfloat16)


def stochastic_weights_steps(rank: int, fused: bool) -> list[list[dict[str, torch.Tensor]]]:
    """Three steps of FOAM(weight_rounding="stochastic") on an FSDP2-sharded bf16 model: per step and parameter, this
    rank's local weights before and after the step, its local gradient and its local moments after it."""
    from torch.distributed.fsdp import fully_shard

    model = stochastic_bf16_model()
    fully_shard(model)
    opt = FOAM(model.parameters(), fused=fused, weight_rounding="stochastic", **FOAM_KWARGS)
    gen = torch.Generator().manual_seed(4)
    steps = []
    for _ in range(3):
        x = torch.randn(2 * WORLD, 70, generator=gen).to(torch.bfloat16)[2 * rank : 2 * rank + 2]
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        before = [(p.to_local().detach().clone(), p.grad.to_local().clone()) for p in model.parameters()]
        opt.step()
        steps.append(
            [
                {
                    "before": weight,
                    "grad": grad,
                    "after": p.to_local().detach().clone(),
                    "exp_avg": opt.state[p]["exp_avg"].to_local().clone(),
                    "exp_avg_sq": opt.state[p]["exp_avg_sq"].to_local().clone(),
                }
                for p, (weight, grad) in zip(model.parameters(), before)
            ]
        )
    return steps


def fsdp2_worker(rank: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    init(rank, tmp)
    try:
        data = batches()

        def sharded():
            model = make_model()
            fully_shard(model)
            return model, FOAM(model.parameters(), **FOAM_KWARGS)

        model, opt = sharded()
        for x, y in data[:RESUME_AT]:
            train_step(model, opt, *local_half(rank, x, y))
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=f"{tmp}/ckpt")
        for x, y in data[RESUME_AT:]:
            train_step(model, opt, *local_half(rank, x, y))
        result = {
            "params": [p.full_tensor() for p in model.parameters()],
            "state_shapes": [
                (tuple(p.shape), tuple(opt.state[p]["exp_avg"].shape), tuple(opt.state[p]["exp_avg"].to_local().shape))
                for p in model.parameters()
            ],
        }

        # A fresh model (other init) and optimizer, resumed from the checkpoint.
        torch.manual_seed(123)
        resumed, resumed_opt = sharded()
        for p in resumed.parameters():
            p.data.normal_()
        state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
        dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
        for x, y in data[RESUME_AT:]:
            train_step(resumed, resumed_opt, *local_half(rank, x, y))
        result["resumed"] = [p.full_tensor() for p in resumed.parameters()]
        result["resumed_steps"] = [resumed_opt.state[p]["step"].item() for p in resumed.parameters()]

        # load_state_dict still validates the (global, folded) shapes of DTensor moments.
        tampered = opt.state_dict()
        weight = next(iter(model.parameters()))
        tampered["state"][0]["exp_avg"] = distribute_tensor(torch.zeros(weight.shape), weight.device_mesh, [Shard(0)])
        try:
            FOAM(model.parameters(), **FOAM_KWARGS).load_state_dict(tampered)
            result["tampered"] = "loaded"
        except FoamStateError as e:
            result["tampered"] = str(e)

        # Converting AdamW moments folds whole tensors: refused on shards, naming the route that works.
        try:
            foam_state_from_adamw(torch.optim.AdamW(model.parameters()), FOAM(model.parameters(), **FOAM_KWARGS))
            result["convert"] = "converted"
        except FoamStateError as e:
            result["convert"] = str(e)

        # fused=True over FSDP2's DTensors: the kernel steps each rank's rows.
        model, _ = sharded()
        opt = FOAM(model.parameters(), fused=True, **FOAM_KWARGS)
        for x, y in data:
            train_step(model, opt, *local_half(rank, x, y))
        result["fused"] = [p.full_tensor() for p in model.parameters()]

        # weight_rounding="stochastic" on bf16 shards: each step's local weights, gradients and moments, which the test
        # holds to the rule (the test process has no process group to replay them under).
        for fused in (False, True):
            result[f"stochastic_{fused}"] = stochastic_weights_steps(rank, fused)

        # A one-process state_dict (full moments) loaded under FSDP2: each rank keeps its rows of the moments.
        model = make_model()
        opt = FOAM(model.parameters(), **FOAM_KWARGS)
        for x, y in data[:RESUME_AT]:
            train_step(model, opt, x, y)
        full_state = opt.state_dict()
        fully_shard(model)
        opt = FOAM(model.parameters(), **FOAM_KWARGS)
        opt.load_state_dict(full_state)
        for x, y in data[RESUME_AT:]:
            train_step(model, opt, *local_half(rank, x, y))
        result["from_full_state"] = [p.full_tensor() for p in model.parameters()]

        # The last (folded) dimension split by tensor parallelism's row-wise Shard: exact where every piece holds
        # whole blocks (ROW_SPLITS), fused or not.
        mesh = init_device_mesh("cpu", (WORLD,))
        for case, (shape, block_size, _) in enumerate(ROW_SPLITS):
            weight, grads = row_split_problem(shape)
            placement = [Shard(len(shape) - 1)]
            for fused in (False, True):
                whole_blocks = torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, placement))
                opt = FOAM([whole_blocks], fused=fused, **{**FOAM_KWARGS, "block_size": block_size})
                for grad in grads:
                    whole_blocks.grad = distribute_tensor(grad, mesh, placement)
                    opt.step()
                moments = (opt.state[whole_blocks]["exp_avg"], opt.state[whole_blocks]["exp_avg_sq"])
                result[f"row_split_{case}_{fused}"] = [whole_blocks.full_tensor(), *(m.full_tensor() for m in moments)]
                result[f"row_split_local_{case}_{fused}"] = [tuple(m.to_local().shape) for m in moments]

        # The callback's sums over shards count FSDP2's _StridedShard (FSDP2 over tensor parallelism) as sharded.
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.placement_types import _StridedShard

        strided = DTensor.from_local(torch.ones(2, 4), mesh, [_StridedShard(0, split_factor=2)], run_check=False)
        result["strided_sum"] = sum_over_shards([(torch.tensor(float(rank + 1)), strided)]).item()

        # ... and refused when the optimizer is built where a piece would cut a block: 12 columns on 2 ranks are
        # pieces of 6, which cut blocks of 4 (blocks of 2 would not).
        split = torch.nn.Parameter(distribute_tensor(torch.randn(4, 12), mesh, [Shard(1)]))
        try:
            FOAM([split], block_size=4)
            result["last_dim"] = "accepted"
        except FoamConfigError as e:
            result["last_dim"] = str(e)
        try:
            FOAM([{"params": [split], "param_names": ["layers.0.self_attn.o_proj.weight"]}], block_size=4)
            result["last_dim_named"] = "accepted"
        except FoamConfigError as e:
            result["last_dim_named"] = str(e)
        strided_split = torch.nn.Parameter(
            DTensor.from_local(torch.randn(4, 8), mesh, [_StridedShard(1, split_factor=2)], run_check=False)
        )
        try:  # a strided split interleaves pieces of the row: refused whatever the block size
            FOAM([strided_split], block_size=2)
            result["strided_split"] = "accepted"
        except FoamConfigError as e:
            result["strided_split"] = str(e)
        FOAM([split], block_size=1)  # ... but fine without folding: plain AdamW is element-wise
        FOAM([split], block_size=2)  # ... or with blocks that divide the pieces
        # ... and when it comes in after the optimizer was built (accelerate swaps FSDP2's DTensors into the groups
        # of an optimizer built before fully_shard): refused at the first step, before any state exists.
        swapped = FOAM([torch.nn.Parameter(torch.randn(4, 12))], block_size=4)
        swapped.param_groups[0]["params"] = [split]
        split.grad = distribute_tensor(torch.ones(4, 12), mesh, [Shard(1)])
        try:
            swapped.step()
            result["swapped_in"] = "stepped"
        except FoamConfigError as e:
            result["swapped_in"] = str(e) + f" (state: {sum(map(len, swapped.state.values()))})"
        torch.save(result, f"{tmp}/fsdp{rank}.pt")
        end_rank()  # tears the group down and leaves without finalization (see hf_fixtures.end_rank)
    finally:  # on failure only: end_rank does not return
        dist.destroy_process_group()


def tiny_tensor_parallel_llama(directory: str) -> None:
    """A Llama whose row-wise weights (o_proj: 64 columns, down_proj: 128) split into whole blocks of 4 on 2 ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def train_language_model(model, optimizer_class=FOAM) -> tuple[FOAM, list[float]]:
    """STEPS steps of FOAM (or LayerwiseFOAM) over the param groups optim="foam" builds, on the same token batches
    on every rank."""
    from foam_hf import foam_param_groups

    opt = optimizer_class(foam_param_groups(model, "block_size=4"), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 100, (2, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return opt, losses


def tensor_parallel_worker(rank: int, tmp: str) -> None:
    from transformers import DistributedConfig, LlamaForCausalLM

    # What torchrun sets, which transformers reads to shard the model over the process group.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    init(rank, tmp)
    try:
        model = LlamaForCausalLM.from_pretrained(f"{tmp}/model", distributed_config=DistributedConfig(tp_plan="auto"))
        opt, losses = train_language_model(model)
        result = {
            "losses": losses,
            "params": {
                n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()
            },
            "placements": {n: [repr(x) for x in getattr(p, "placements", ())] for n, p in model.named_parameters()},
            "local_moments": {
                n: tuple(local_tensor(opt.state[p]["exp_avg"]).shape) for n, p in model.named_parameters()
            },
        }
        # Layer-wise FOAM steps each weight in its gradient hook: the same layout, the same steps.
        model = LlamaForCausalLM.from_pretrained(f"{tmp}/model", distributed_config=DistributedConfig(tp_plan="auto"))
        train_language_model(model, LayerwiseFOAM)
        result["layerwise_params"] = {
            n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in model.named_parameters()
        }
        torch.save(result, f"{tmp}/tp{rank}.pt")
        end_rank()  # tears the group down and leaves without finalization (see hf_fixtures.end_rank)
    finally:  # on failure only: end_rank does not return
        dist.destroy_process_group()


def spawn(worker, tmp_path) -> list:
    mp.spawn(worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    name = {ddp_worker: "ddp", fsdp2_worker: "fsdp", tensor_parallel_worker: "tp"}[worker]
    return [torch.load(os.path.join(tmp_path, f"{name}{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_transformers_tensor_parallel_model_trains_as_one_process(tmp_path):
    # transformers' tp_plan="auto" splits o_proj and down_proj row-wise (Shard(1): refused until whole-block splits
    # were taken) and the embedding by vocabulary, whose gradient comes back Replicate() for a Shard(0) weight (the
    # fused kernel then refused its full-size gradient).
    from transformers import LlamaForCausalLM

    tiny_tensor_parallel_llama(str(tmp_path / "model"))
    results = spawn(tensor_parallel_worker, tmp_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model")
    _, losses = train_language_model(model)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    for result in results:
        assert result["placements"]["model.layers.0.self_attn.o_proj.weight"] == ["Shard(dim=1)"]
        assert result["placements"]["model.embed_tokens.weight"] == ["Shard(dim=0)"]
        assert result["local_moments"]["model.layers.0.self_attn.o_proj.weight"] == (64, 8)  # 32 columns / 4
        assert result["local_moments"]["model.layers.0.mlp.down_proj.weight"] == (64, 16)  # 64 columns / 4
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
        for name, want in expected.items():
            torch.testing.assert_close(result["params"][name], want, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(result["layerwise_params"][name], want, atol=1e-5, rtol=0, msg=name)


def check_stochastic_shards(steps: list[list[dict[str, torch.Tensor]]], fused: bool, rank: int) -> None:
    """Under FSDP2 each rank steps its shard as one process steps a tensor: at every step its new bf16 weights are
    exactly the rule's stochastic rounding, with the entries' indices in the shard, of what the same path computes
    for fp32 copies of that shard's weights, gradient and moments (its fp32 twin), and its moments are the twin's."""
    shapes = [tuple(entry["before"].shape) for entry in steps[0]]
    not_to_nearest = 0
    assert shapes == ([(24, 70), (24,), (3, 48), (3,)] if rank == 0 else [(24, 70), (24,), (2, 48), (2,)])
    for index in range(len(shapes)):
        twin_weight = torch.zeros(shapes[index], requires_grad=True)
        twin = FOAM([twin_weight], fused=fused, **FOAM_KWARGS)
        for step, entries in enumerate(steps, start=1):
            entry = entries[index]
            assert entry["before"].dtype == entry["grad"].dtype == entry["after"].dtype == torch.bfloat16
            twin_weight.data.copy_(entry["before"].float())
            if step > 1:
                for key in ("exp_avg", "exp_avg_sq"):
                    twin.state[twin_weight][key].copy_(steps[step - 2][index][key])
            twin_weight.grad = entry["grad"].float()
            twin.step()
            expected = stochastically_rounded(twin_weight.detach(), step)
            assert torch.equal(entry["after"].view(torch.int16), expected.view(torch.int16)), (rank, index, step)
            not_to_nearest += int((expected != twin_weight.detach().to(torch.bfloat16)).sum())
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(entry[key], twin.state[twin_weight][key]), (rank, index, step, key)
    assert not_to_nearest > 0  # the rounding is not round-to-nearest in disguise


def test_ddp_matches_one_process(tmp_path):
    expected = one_process_run()
    for rank_params in spawn(ddp_worker, tmp_path):
        for got, want in zip(rank_params, expected):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)


def test_fsdp2_matches_one_process_and_resumes_exactly_through_dcp(tmp_path):
    expected = one_process_run()
    results = spawn(fsdp2_worker, tmp_path)
    for rank, result in enumerate(results):
        for got, want in zip(result["params"], expected):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
        # Resumed from torch.distributed.checkpoint == uninterrupted, bit for bit (CPU is deterministic).
        for resumed, uninterrupted in zip(result["resumed"], result["params"]):
            assert torch.equal(resumed, uninterrupted)
        assert result["resumed_steps"] == [float(STEPS)] * len(expected)
        assert "has shape (12, 10), but with block_size=4 FOAM keeps shape (12, 3)" in result["tampered"]
        for got, want in zip(result["fused"], expected):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
        for got, want in zip(result["from_full_state"], expected):
            torch.testing.assert_close(got, want, atol=TOLERANCE, rtol=0)
        for case, (shape, block_size, local_shapes) in enumerate(ROW_SPLITS):
            for fused in (False, True):
                one_process = row_split_one_process(shape, block_size, fused)
                for got, want in zip(result[f"row_split_{case}_{fused}"], one_process):
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
                assert result[f"row_split_local_{case}_{fused}"] == [local_shapes[rank]] * 2
        assert "split on several mesh dimensions or strided" in result["strided_split"]
        assert "is a DTensor (FSDP2 shard)" in result["convert"] and "unsharded copy" in result["convert"]
        assert result["strided_sum"] == 3.0  # 1 on rank 0 + 2 on rank 1
        assert "Shard(dim=1)" in result["last_dim"] and "into pieces of 6" in result["last_dim"]
        assert "block_sizes=MODULE:2" in result["last_dim"] and "block_sizes=MODULE:1" in result["last_dim"]
        named = result["last_dim_named"]
        assert "parameter 'layers.0.self_attn.o_proj.weight'" in named
        assert "block_sizes=layers.0.self_attn.o_proj:2" in named and "block_sizes=layers.0.self_attn.o_proj:1" in named
        assert "into pieces of 6" in result["swapped_in"] and result["swapped_in"].endswith("(state: 0)")
    for rank, result in enumerate(results):
        for fused in (False, True):
            check_stochastic_shards(result[f"stochastic_{fused}"], fused, rank)
    # Moments are DTensors with the folded global shape; each rank holds the folded shape of its rows.
    rank0, rank1 = (r["state_shapes"] for r in results)
    assert rank0[0] == ((12, 10), (12, 3), (6, 3)) and rank1[0] == ((12, 10), (12, 3), (6, 3))
    assert rank0[2] == ((3, 12), (3, 3), (2, 3)) and rank1[2] == ((3, 12), (3, 3), (1, 3))
    assert rank0[4] == ((1, 3), (1, 1), (1, 1)) and rank1[4] == ((1, 3), (1, 1), (0, 1))
