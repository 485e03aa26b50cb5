"""Awkward inputs FOAM accepts, each with its documented behaviour; and the bad inputs that need a model or a
Trainer to be seen (overrides, the command line, the Trainer set-up), with the error a user reads.

Behaviours are checked against something independent of the case itself: the same step on a contiguous copy,
the parameter stepped on its own, torch.optim.AdamW, or the explicit-matrix reference in
:mod:`foam_hf.reference`. Errors are checked on key fragments of the message: the offending value, the rule it
breaks and the fix (R7/R8 of the style notes). The bad inputs that fail without a model (FOAM's options and
parameter lists, ``optim_args``, ``FoamConfig``, ``TrainingArguments`` fields) are one catalogue in
tests/_helpers.py, run by tests/test_errors.py.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import FOR_LOOP, HPARAMS, PATHS, assert_fragments, path_names
from _helpers import leaf as w
from hf_fixtures import lm_dataset, tiny_llama, training_args, unwrap_foam
from transformers import Trainer

from foam_hf import FOAM, FoamConfig, FoamConfigError, NoMatchingModuleError, state_memory
from foam_hf.param_groups import resolve_block_sizes
from foam_hf.reference import FoamReference
from foam_hf.tools.cli import main as cli_main

EXPLICIT_PATHS = path_names("for-loop", "foreach", "fused")
PYTHON_PATHS = ["for-loop", "foreach", "default"]  # the default one fuses where the CPU kernel builds


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)


def twin(p):
    return p.detach().clone().requires_grad_(p.requires_grad)


# ====================================================================== 1. param groups


def test_refused_param_group_leaves_the_optimizer_as_it_was():
    kept, bad = w(3, 8), w(3, 8)
    opt = FOAM([kept], lr=0.1)
    with pytest.raises(FoamConfigError, match=r"block_size=0 .*\(in param group 1\)"):
        opt.add_param_group({"params": [bad], "block_size": 0})
    assert len(opt.param_groups) == 1
    # The refused parameter is not half-registered: it can join a later, valid group.
    opt.add_param_group({"params": [bad], "block_size": 2})
    reference = FOAM([{"params": [twin(kept)]}, {"params": [twin(bad)], "block_size": 2}], lr=0.1)
    for o, params in ((opt, [kept, bad]), (reference, [p for g in reference.param_groups for p in g["params"]])):
        set_grads(params, seed=3)
        o.step()
    for a, b in zip([kept, bad], [p for g in reference.param_groups for p in g["params"]]):
        assert torch.equal(a, b)


def test_same_parameter_twice_in_one_group_warns_as_torch_does():
    p = w(2, 4)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        FOAM([p, p])


# ====================================================================== 2. parameters FOAM steps "as torch does"


@pytest.mark.parametrize("path", EXPLICIT_PATHS)
@pytest.mark.parametrize("how", ["grad is None", "requires_grad=False (frozen)"])
def test_parameters_without_gradient_are_skipped(path, how):
    stepped, idle, also_stepped = (
        w(3, 8),
        w(4, 8),
        w(
            5,
        ),
    )
    if how == "requires_grad=False (frozen)":
        idle.requires_grad_(False)
    before = idle.detach().clone()
    opt = FOAM([stepped, idle, also_stepped], block_size=4, **PATHS[path])
    alone = [twin(stepped), twin(also_stepped)]
    opt_alone = FOAM(alone, block_size=4, **PATHS[path])
    for seed in range(3):
        set_grads([stepped, also_stepped], seed)
        set_grads(alone, seed)
        opt.step()
        opt_alone.step()
    assert torch.equal(idle, before) and len(opt.state[idle]) == 0  # untouched, no state: as torch.optim.AdamW
    for a, b in zip([stepped, also_stepped], alone):
        assert torch.equal(a, b)  # the skipped tensor changes nothing for the others
    if how == "requires_grad=False (frozen)":
        # state_memory skips frozen tensors, so its bytes equal what the optimizer holds.
        held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
        assert state_memory(opt).foam_bytes == held


@pytest.mark.parametrize("path", PYTHON_PATHS)
def test_mixed_dtypes_in_one_group_step_each_tensor_as_alone(path):
    # fp32, bf16 (fp32 states) and fp64 in one group: each steps as it would alone on the same path (the
    # default one fuses all three where the CPU kernel builds, else runs all three on the for-loop path).
    params = [w(3, 8), w(4, 8).bfloat16().detach().requires_grad_(), w(2, 9, dtype=torch.float64)]
    group = FOAM(params, block_size=4, weight_decay=0.1, **PATHS[path])
    singles = [(q, FOAM([q], block_size=4, weight_decay=0.1, **PATHS[path])) for q in map(twin, params)]
    for seed in range(3):
        set_grads(params, seed)
        for p, (q, _) in zip(params, singles):
            q.grad = p.grad.clone()
        group.step()
        for _, opt in singles:
            opt.step()
    for p, (q, opt) in zip(params, singles):
        assert p.dtype == q.dtype and torch.equal(p, q)
        assert group.state[p]["exp_avg"].dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        assert torch.equal(group.state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("path", PYTHON_PATHS)
def test_mixed_devices_in_one_group_step_each_tensor_on_its_device(path):
    # Only CPU and meta exist on every machine; each tensor is stepped on its own device.
    cpu, meta = w(3, 8), torch.empty(5, 10, device="meta", requires_grad=True)
    opt = FOAM([cpu, meta], block_size=4, **PATHS[path])
    cpu_alone = twin(cpu)
    opt_alone = FOAM([cpu_alone], block_size=4, **FOR_LOOP)
    for seed in range(2):
        set_grads([cpu], seed)
        cpu_alone.grad = cpu.grad.clone()
        meta.grad = torch.empty_like(meta)
        opt.step()
        opt_alone.step()
    assert torch.equal(cpu, cpu_alone)  # a device mix takes the for-loop path (or foreach), never fused
    assert opt.state[meta]["exp_avg"].device.type == "meta" and opt.state[meta]["exp_avg"].shape == (5, 3)
    assert opt.state[meta]["step"].item() == 2


@pytest.mark.parametrize("path", [*EXPLICIT_PATHS, "default"])
def test_zero_size_and_zero_dim_tensors(path):
    # Empty tensors never fold (nothing to average) and keep empty AdamW-shaped states; a 0-d tensor is a
    # scalar weight and steps exactly as AdamW steps it.
    empties = [w(0, 4), w(4, 0), w(0), w(2, 0, 8)]
    scalar, matrix = torch.tensor(1.5, requires_grad=True), w(3, 8)
    opt = FOAM([*empties, scalar, matrix], lr=0.1, block_size=4, **PATHS[path])
    adamw_scalar = twin(scalar)
    adamw = torch.optim.AdamW([adamw_scalar], lr=0.1, weight_decay=0.0, foreach=False)
    for seed in range(3):
        set_grads([*empties, scalar, matrix], seed)
        adamw_scalar.grad = scalar.grad.clone()
        opt.step()
        adamw.step()
    for e in empties:
        assert e.numel() == 0 and opt.state[e]["exp_avg"].shape == e.shape and opt.state[e]["step"].item() == 3
    torch.testing.assert_close(scalar, adamw_scalar, atol=1e-6, rtol=0)  # fp32 ulps, as tests/test_optim.py
    torch.testing.assert_close(opt.state[scalar]["exp_avg_sq"], adamw.state[adamw_scalar]["exp_avg_sq"])
    assert opt.state[matrix]["exp_avg"].shape == (3, 2)


# Layouts whose memory is not the plain row-major one. Each makes a leaf from a fresh random tensor.
LAYOUTS = [
    ("transposed", lambda: torch.randn(10, 6).t()),
    ("strided slice", lambda: torch.randn(6, 20)[:, ::2]),
    ("3-D permuted", lambda: torch.randn(7, 2, 3).permute(1, 2, 0)),
    ("channels_last conv weight", lambda: torch.randn(4, 3, 5, 6).to(memory_format=torch.channels_last)),
]


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("path", PYTHON_PATHS)
@pytest.mark.parametrize("make", [m for _, m in LAYOUTS], ids=[n for n, _ in LAYOUTS])
def test_non_contiguous_parameter_steps_as_its_contiguous_copy(make, path, block_size):
    # Folding is along the *logical* last dimension, whatever the strides. The default path sends a
    # non-contiguous tensor to the for-loop path (the fused kernel needs contiguous memory), so its expected
    # value is the contiguous copy on the for-loop path.
    param = make().requires_grad_()
    assert not param.is_contiguous()
    copy = param.detach().contiguous().requires_grad_()
    strides = param.stride()
    opt = FOAM([param], block_size=block_size, weight_decay=0.1, **PATHS[path])
    opt_copy = FOAM([copy], block_size=block_size, weight_decay=0.1, **PATHS["for-loop" if path == "default" else path])
    for seed in range(3):
        set_grads([copy], seed)
        param.grad = copy.grad.clone()
        opt.step()
        opt_copy.step()
    assert torch.equal(param, copy)
    assert param.stride() == strides  # updated in place: the layout the user chose is kept
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[param][key], opt_copy.state[copy][key])


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("path", EXPLICIT_PATHS)
def test_non_contiguous_gradient_steps_as_its_contiguous_copy(path, block_size):
    param = w(6, 10)
    copy = twin(param)
    opt = FOAM([param], block_size=block_size, **PATHS[path])
    opt_copy = FOAM([copy], block_size=block_size, **PATHS[path])
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        grad = torch.randn(10, 6, generator=gen).t()  # a transposed (non-contiguous) gradient
        assert not grad.is_contiguous()
        param.grad, copy.grad = grad, grad.contiguous()
        opt.step()
        opt_copy.step()
        assert not param.grad.is_contiguous()  # FOAM never rewrites p.grad
    assert torch.equal(param, copy)


@pytest.mark.parametrize("block_size", [4, 8, 1000])
@pytest.mark.parametrize("path", EXPLICIT_PATHS)
def test_block_size_larger_than_the_row_is_one_block_per_row(path, block_size):
    # n < B: each row is a single ragged block of n entries; compare with the explicit-matrix reference.
    shapes = [(5, 3), (2, 3, 2), (4, 1), (6,)]
    params = [w(*s) for s in shapes]
    hparams = dict(HPARAMS["decay"], scale=1.5, res_scale=0.5)
    opt = FOAM(params, block_size=block_size, second_moment="mean_sq", **hparams, **PATHS[path])
    reference = FoamReference(params, block_size=block_size, second_moment="mean_sq", **hparams)
    for seed in range(5):
        set_grads(params, seed)
        grads = [p.grad.clone() for p in params]
        opt.step()
        reference.step(grads)
    for p, w_ref, m_ref in zip(params, reference.weights, reference.m):
        expected_state = (*p.shape[:-1], 1) if p.ndim >= 2 else p.shape
        assert opt.state[p]["exp_avg"].shape == expected_state
        # fp32 against the float64 reference over 5 steps: see tests/test_optim.py for the budget.
        torch.testing.assert_close(p.detach().double(), w_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m_ref, atol=1e-7, rtol=1e-6)


# ====================================================================== 3. optim_args


def test_empty_entries_in_optim_args_are_ignored():
    # Documented leniency: a doubled or trailing ',' (easy to type on a command line) is not an error.
    assert FoamConfig.from_optim_args("block_size=8,,scale=2.0,") == FoamConfig(block_size=8, scale=2.0)


def test_a_regex_group_in_target_modules_is_not_a_size():
    # 'q_proj:8' is refused as a size; the ':' of a non-capturing group (with or without inline flags) is regex.
    model = tiny_llama()
    expected = resolve_block_sizes(model, FoamConfig(target_modules=["q_proj", "v_proj"]))
    for text in (r"target_modules=.*\.(?:q|v)_proj", r"target_modules=.*\.(?i:Q|V)_proj"):
        assert resolve_block_sizes(model, FoamConfig.from_optim_args(text)) == expected


# ====================================================================== 4. override syntax (block_sizes patterns)


def freeze(*names):
    def apply(model):
        for name, p in model.named_parameters():
            if any(name.startswith(n) for n in names) or names == ("*",):
                p.requires_grad_(False)
        return model

    return apply


# (id, how to change the tiny Llama, config, optim_target_modules, error type, fragments)
OVERRIDE_ERRORS = [
    (
        "pattern matches nothing",
        None,
        FoamConfig(block_sizes={"q_prj": 8}),
        None,
        NoMatchingModuleError,
        ["'q_prj' matches no trainable parameter", "Closest module names", "'q_proj'", "named_modules()"],
    ),
    (
        "regex matches nothing",
        None,
        FoamConfig(block_sizes={r"layers\.7\..*": 8}),
        None,
        NoMatchingModuleError,
        [r"'layers\\.7\\..*' matches no trainable parameter", "full regex", "named_modules()"],
    ),
    (
        "target module matches nothing",
        None,
        FoamConfig(target_modules=["gate"]),
        None,
        NoMatchingModuleError,
        ["target module 'gate' matches no trainable parameter", "'gate_proj'", "a suffix at a '.' boundary"],
    ),
    (
        "target given as one string matches nothing",
        None,
        FoamConfig(),
        "q_proj",
        NoMatchingModuleError,
        [
            "target module 'q_proj' matches no trainable parameter",
            "one string is one regex matched against the whole module name",
            "Fix: pass a list (['q_proj'])",
            "'.*q_proj'",
            "optim_args target_modules=q_proj.",
        ],
    ),
    (
        "target regex given as one string in FoamConfig matches nothing",
        None,
        FoamConfig(target_modules=r"layers\.0\..*proj"),
        None,
        NoMatchingModuleError,
        [
            "one string is one regex matched against the whole module name",
            r"'.*layers\\.0\\..*proj'",
            r"target_modules=layers\.0\..*proj;",
        ],
    ),
    (
        "pattern matches only frozen parameters",
        freeze("model.embed_tokens"),
        FoamConfig(block_sizes={"embed_tokens": 4}),
        None,
        NoMatchingModuleError,
        ["'embed_tokens' matches modules of the model, but no parameter there is trainable", "embed_tokens (frozen)"],
    ),
    (
        "pattern matches only modules without parameters",  # as PEFT's empty lora_embedding_A on a linear layer
        None,
        FoamConfig(block_sizes={"act_fn": 4}),
        None,
        NoMatchingModuleError,
        [
            "'act_fn' matches modules of the model, but they hold no parameters",
            "act_fn (no parameters)",
            "Fix: name modules that hold parameters",
        ],
    ),  # fmt: skip
    (
        "target module that holds no linear layer",
        None,
        FoamConfig(target_modules=["embed_tokens"]),
        None,
        NoMatchingModuleError,
        ["target module 'embed_tokens' matches modules", "trainable linear weight", "(no linear layer weight)"],
    ),
    (
        "target module whose linear layers are frozen",
        freeze("model.layers.0.mlp", "model.layers.1.mlp"),
        FoamConfig(target_modules=["mlp"]),
        None,
        NoMatchingModuleError,
        ["target module 'mlp' matches modules", "model.layers.0.mlp (frozen)", "model.layers.1.mlp (frozen)"],
    ),
    (
        "every parameter frozen",
        freeze("*"),
        FoamConfig(),
        None,
        FoamConfigError,
        ["no trainable parameter", "requires_grad is False", "Fix: unfreeze"],
    ),
    (
        "two equally specific patterns disagree",
        None,
        FoamConfig(block_sizes={"q_pro[j]": 8, "[q]_proj": 4}),
        None,
        FoamConfigError,
        ["equally specifically", "entries [q]_proj:4;q_pro[j]:8, which disagree", "Fix: make one pattern more"],
    ),
    (
        "override that reaches only parameters that never fold",
        None,
        FoamConfig(block_sizes={"input_layernorm": 8}),
        None,
        FoamConfigError,
        [
            "'input_layernorm' sets block size 8 only on parameters that never fold",
            "model.layers.0.input_layernorm.weight",
            "Fix: drop it",
        ],
    ),
    (
        "targets given twice",
        None,
        FoamConfig(target_modules=["q_proj"]),
        ["v_proj"],
        FoamConfigError,
        ["target modules are given twice", "'q_proj'", "'v_proj'", "Fix: keep one"],
    ),
]


@pytest.mark.parametrize(
    "change, config, targets, error, fragments", [r[1:] for r in OVERRIDE_ERRORS], ids=[r[0] for r in OVERRIDE_ERRORS]
)
def test_bad_override(change, config, targets, error, fragments):
    model = tiny_llama()
    if change is not None:
        change(model)
    with pytest.raises(error) as info:
        resolve_block_sizes(model, config, targets)
    assert_fragments(str(info.value), fragments)


def test_an_override_on_zero3_partitioned_weights_is_not_taken_for_a_no_op():
    """Under deepspeed.zero.Init the model's weights are empty placeholders whose full shape is in ds_shape (as
    ZeRO-3 leaves them when the Trainer resolves block sizes); an override on them folds, it is not the no-op
    that an override on 1-D parameters is."""
    model = tiny_llama()
    for p in model.parameters():
        p.ds_shape = p.shape  # what ZeRO-3 keeps of each parameter it partitions
        p.data = torch.empty(0)
    sizes = resolve_block_sizes(model, FoamConfig(block_sizes={"k_proj": 4})).size_by_parameter
    assert {n for n, b in sizes.items() if b == 4} >= {f"model.layers.{i}.self_attn.k_proj.weight" for i in (0, 1)}


def test_a_target_module_folds_the_linear_layers_inside_it():
    model = tiny_llama()
    plan = resolve_block_sizes(model, FoamConfig(block_size=8, target_modules=["mlp"]))
    mlp_linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n}
    assert len(mlp_linears) == 6  # gate, up and down in each of 2 layers
    assert {n for n, b in plan.size_by_parameter.items() if b > 1} == mlp_linears
    assert {b for n, b in plan.size_by_parameter.items() if n in mlp_linears} == {8}


def test_a_plain_name_wins_over_a_regex_that_matches_the_same_module():
    # At the same depth the longer pattern used to win, so '.*_proj:16' silently overrode 'q_proj:8' for q_proj.
    model = tiny_llama()
    plan = resolve_block_sizes(model, FoamConfig(block_sizes={"q_proj": 8, ".*_proj": 16, "[k]_proj": 2}))
    assert plan.size_by_parameter["model.layers.0.self_attn.q_proj.weight"] == 8
    assert plan.size_by_parameter["model.layers.0.self_attn.k_proj.weight"] == 2  # two regexes: the longer
    assert plan.size_by_parameter["model.layers.0.mlp.up_proj.weight"] == 16


def test_shadowed_override_is_not_an_error_and_the_specific_one_wins():
    # 'down_proj' is shadowed in layer 1 by a deeper pattern but still matches layer 0: not "matches nothing".
    model = tiny_llama()
    plan = resolve_block_sizes(model, FoamConfig(block_sizes={"down_proj": 4, "layers.1.mlp.down_proj": 2}))
    assert plan.size_by_parameter["model.layers.0.mlp.down_proj.weight"] == 4
    assert plan.size_by_parameter["model.layers.1.mlp.down_proj.weight"] == 2


# ====================================================================== 5. the command line


def run_cli(argv, capsys):
    """(exit code, stderr) of ``foam-hf ARGV``: argparse errors exit 2, handled errors return 2."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


_CUDA_99 = "CUDA device(s)" if torch.cuda.is_available() else "CUDA is not available"

# (argv, fragments of stderr). Every row exits with status 2 before any training starts. "{file}" is
# replaced by the path of an existing regular file, "{bad_json}" by a file holding invalid JSON.
CLI_ERRORS = [
    ([], ["the following arguments are required: COMMAND"]),
    (["train"], ["invalid choice: 'train'", "'demo', 'memory'"]),
    (["demo", "--steps", "abc"], ["argument --steps", "'abc' is not an integer", "int >= 1"]),
    (["demo", "--steps", "0"], ["argument --steps", "0 is invalid", "int >= 1"]),
    (["demo", "--block-size", "-4"], ["argument --block-size", "-4 is invalid", "int >= 1"]),
    (["demo", "--lr", "inf"], ["argument --lr", "inf is invalid", "finite number > 0"]),
    (["demo", "--seed", "-1"], ["argument --seed", "-1 is invalid", "[0, 2**32 - 1]"]),
    (["demo", "--lr", "nan"], ["argument --lr", "nan is invalid", "finite number > 0"]),
    (["demo", "--lr", "fast"], ["argument --lr", "'fast' is not a number"]),
    (["demo", "--model-size", "huge"], ["argument --model-size", "invalid choice: 'huge'", "'tiny'"]),
    (["demo", "--device", "tpu"], ["argument --device", "'tpu' is not a torch device", "cpu"]),
    (["demo", "--device", "cuda:99"], ["argument --device", "'cuda:99'", _CUDA_99]),
    (["demo", "--output-dir", "{file}"], ["argument --output-dir", "is a file", "pass another --output-dir"]),
    (["demo", "--output-dir", "{file}/sub"], ["argument --output-dir", "is a file"]),
    (["memory"], ["the following arguments are required: MODEL"]),
    (["memory", "no-such-model"], ["MODEL='no-such-model'", "Built-in names: llama-60m", "Fix:"]),
    (["memory", "{bad_json}"], ["could not be read as a JSON config", "Fix: pass the path of a model's config.json"]),
    (["memory", "llama-60m", "--block-sizes", "0,4"], ["'0,4'", "block sizes are ints >= 1", "Example:"]),
    (["memory", "llama-60m", "--rank", "0"], ["'0' is not an int >= 1", "Example: --rank 256"]),
    (["memory", "llama-60m", "--optim-args", "blocksize=4"], ["unknown key(s) ['blocksize']", "Valid keys"]),
    (["memory", "llama-60m", "--optim-args", "block_sizes=q_prj:8"], ["'q_prj' matches no trainable", "'q_proj'"]),
]


@pytest.mark.parametrize("argv, fragments", CLI_ERRORS, ids=[" ".join(a) or "(no arguments)" for a, _ in CLI_ERRORS])
def test_bad_command_line(argv, fragments, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    argv = [a.replace("{file}", str(a_file)).replace("{bad_json}", str(bad_json)) for a in argv]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_fragments(err, fragments)
    assert a_file.read_text() == "not a folder"  # nothing the user had was touched


# ====================================================================== 6. the Trainer integration


def make_args(tmp_path, **overrides):
    return training_args(tmp_path / "out", **overrides)


# (id, TrainingArguments overrides, model change, error type, fragments): refused when the Trainer builds the
# optimizer, before any step. The Adam-style fields reach FOAM under its own names (lr, betas, eps).
TRAINER_ERRORS = [
    (
        "optim_target_modules matches nothing",
        dict(optim_target_modules=["q_prj"]),
        None,
        NoMatchingModuleError,
        ["'q_prj' matches no trainable parameter", "'q_proj'"],
    ),
    (
        "optim_target_modules as one string matches nothing",  # what `trl sft --optim_target_modules q_proj` passes
        dict(optim_target_modules="q_proj"),
        None,
        NoMatchingModuleError,
        ["'q_proj' matches no trainable parameter", "one string is one regex", "Fix: pass a list (['q_proj'])"],
    ),
    ("all weights frozen", {}, freeze("*"), FoamConfigError, ["no trainable parameter", "Fix: unfreeze"]),
]


@pytest.mark.parametrize(
    "overrides, change, error, fragments", [r[1:] for r in TRAINER_ERRORS], ids=[r[0] for r in TRAINER_ERRORS]
)
def test_bad_trainer_setup_fails_before_the_first_step(tmp_path, overrides, change, error, fragments):
    model = tiny_llama()
    if change is not None:
        change(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=make_args(tmp_path, **overrides), train_dataset=lm_dataset())
    with pytest.raises(error) as info:
        trainer.train()
    assert_fragments(str(info.value), fragments)
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layerwise_clipping_set_after_the_arguments_is_refused_when_the_optimizer_is_built(tmp_path):
    """The arguments are checked when built; a field changed on them afterwards is checked again when the Trainer
    builds the optimizer (clipping would otherwise be silently ineffective under foam_layerwise)."""
    args = make_args(tmp_path, optim="foam_layerwise", max_grad_norm=0.0)
    args.max_grad_norm = 1.0
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    with pytest.raises(FoamConfigError) as info:
        trainer.train()
    assert_fragments(str(info.value), ["max_grad_norm=1.0", "Fix: pass max_grad_norm=0"])
    assert trainer.state.global_step == 0


def test_trainer_leaves_frozen_parameters_out_of_the_optimizer(tmp_path):
    model = tiny_llama()
    freeze("model.layers.0.self_attn", "model.embed_tokens")(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=lm_dataset())
    trainer.train()
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable and len(frozen) == 5  # q, k, v, o of layer 0 and the embedding
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p not in unwrap_foam(trainer.optimizer).state


def test_foreign_group_keys_far_from_any_option_are_kept_as_torch_keeps_them():
    # Schedulers write initial_lr into groups; users tag groups (e.g. "name"): torch keeps such keys, so does FOAM.
    params = [torch.nn.Parameter(torch.randn(2, 4))]
    optimizer = FOAM([{"params": params, "initial_lr": 0.1, "name": "attention"}])
    assert optimizer.param_groups[0]["initial_lr"] == 0.1 and optimizer.param_groups[0]["name"] == "attention"
