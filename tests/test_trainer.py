"""optim="foam" through the real transformers.Trainer: by name, configuration, overrides, callback, resume."""

from __future__ import annotations

import json
import pickle
import re
import warnings

import pytest
import torch
from _helpers import expected_block_sizes, expected_state_bytes
from hf_fixtures import StopAt, lm_dataset, tiny_llama, training_args, unwrap_foam
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from foam_hf import (
    FOAM,
    FoamCallback,
    FoamConfig,
    FoamConfigError,
    FoamStateError,
    LayerwiseFOAM,
    NoMatchingModuleError,
    foam_param_groups,
)
from foam_hf.integration import check_seam
from foam_hf.integration.transformers import foam_config_from_args
from foam_hf.param_groups import resolve_block_sizes

# 4 steps at lr 1e-3, logged every 2 steps (the callback's residual ratio is logged twice).
RUN = dict(max_steps=4, learning_rate=1e-3, logging_steps=2)


def make_args(tmp_path, **overrides):
    return training_args(tmp_path / "out", **{**RUN, **overrides})


def named_block_sizes(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["block_size"] for group in optimizer.param_groups for p in group["params"]}


def test_seam_is_intact():
    # Fails with a message naming foam_hf.integration._seam when a transformers release moves an internal.
    check_seam()


def test_lazy_registration_checks_every_internal_it_relies_on():
    # Lazy registration installs place by place, as each transformers module is imported: each place must check
    # what check_seam checks there (the OptimizerContext fields, get_decay_parameter_names' signature), since a
    # process that only ever registers lazily never runs check_seam itself.
    import dataclasses
    import types

    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames

    from foam_hf.integration import SeamError, _seam

    @dataclasses.dataclass
    class OldContext:  # a release whose context lost optimizer_kwargs
        args: object
        model: object

    table = {OptimizerNames.ADAMW_TORCH: None}
    moved = types.SimpleNamespace(_OPTIMIZER_HANDLERS=table, OptimizerContext=OldContext)
    with pytest.raises(SeamError, match="OptimizerContext has fields"):
        _seam.install_handler(moved, lambda ctx: None)
    assert list(table) == [OptimizerNames.ADAMW_TORCH]  # refused before touching the table
    _seam.install_handler(
        types.SimpleNamespace(_OPTIMIZER_HANDLERS=dict(table), OptimizerContext=trainer_optimizer.OptimizerContext),
        lambda ctx: None,
    )

    class MovedTrainer(Trainer):  # a release whose weight-decay rule needs more than the model
        def get_decay_parameter_names(self, model, forbidden_layer_types):
            return []

    for install in (_seam.install_trainer, _seam.install_train_exit):
        with pytest.raises(SeamError, match="get_decay_parameter_names has parameters"):
            install(types.SimpleNamespace(Trainer=MovedTrainer), lambda trainer: None)
    assert "create_optimizer" not in vars(MovedTrainer) and "train" not in vars(MovedTrainer)


def test_trainer_builds_foam_by_name_and_trains(tmp_path):
    model = tiny_llama()
    args = make_args(tmp_path, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    result = trainer.train()
    optimizer = unwrap_foam(trainer.optimizer)  # inside accelerate's wrapper
    assert type(optimizer) is FOAM
    assert torch.isfinite(torch.tensor(result.training_loss))
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
    sizes = named_block_sizes(optimizer, model)
    # The paper's default: linear layers fold, the head and the embeddings do not.
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == 4
    assert sizes["model.layers.1.mlp.down_proj.weight"] == 4
    assert sizes["lm_head.weight"] == 1 and sizes["model.embed_tokens.weight"] == 1
    # Trainer's no-decay rule: norms have weight_decay 0, linear weights 0.1.
    decay = {
        n: g["weight_decay"]
        for g in optimizer.param_groups
        for n, p in model.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert decay["model.norm.weight"] == 0.0 and decay["model.layers.0.mlp.up_proj.weight"] == 0.1
    assert optimizer.state[model.model.layers[0].self_attn.q_proj.weight]["exp_avg"].shape == (32, 8)


def test_callback_logs_state_bytes_and_residual(tmp_path):
    model = tiny_llama()
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=lm_dataset())
    trainer.train()
    assert sum(isinstance(cb, FoamCallback) for cb in trainer.callback_handler.callbacks) == 1
    logs = [entry for entry in trainer.state.log_history if "foam/state_bytes" in entry]
    assert len(logs) == 1
    # from the shapes (not foam_hf.memory, which the callback itself uses)
    expected_foam, expected_adamw = expected_state_bytes(model, expected_block_sizes(model))
    assert logs[0]["foam/state_bytes"] == expected_foam
    assert logs[0]["foam/adamw_state_bytes"] == expected_adamw
    ratios = [e["foam/residual_ratio"] for e in trainer.state.log_history if "foam/residual_ratio" in e]
    assert len(ratios) == 2 and all(0 < r < 1 for r in ratios)  # logging_steps=2 over 4 steps


def test_callback_can_be_turned_off(tmp_path):
    trainer = Trainer(
        model=tiny_llama(), args=make_args(tmp_path, optim_args="callback=false"), train_dataset=lm_dataset()
    )
    trainer.train()
    assert not any(isinstance(cb, FoamCallback) for cb in trainer.callback_handler.callbacks)


def test_callback_fails_fast_when_the_name_was_bypassed(tmp_path):
    model = tiny_llama()
    adamw = torch.optim.AdamW(model.parameters())
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=lm_dataset(), optimizers=(adamw, None))
    with pytest.raises(FoamConfigError, match="optimizer in use is AdamW"):
        trainer.train()


@pytest.mark.parametrize("optim_args", ["block_size=8,block_sizes=q_proj:4", {"block_size": 8}])
def test_foam_options_for_another_optimizer_are_not_dropped_silently(tmp_path, optim_args):
    with pytest.warns(
        UserWarning, match=r"optim_args sets FOAM's \['block_size'.*optim='adamw_torch'.*set optim='foam'"
    ):
        make_args(tmp_path, optim="adamw_torch", optim_args=optim_args)


def test_another_optimizers_own_optim_args_say_nothing(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GaLore's keys (scale is also FOAM's): not FOAM's alone, no warning
        make_args(tmp_path, optim="adamw_torch", optim_args="rank=8,scale=0.25")


def test_a_foam_callback_added_to_another_optimizers_run_says_to_set_optim(tmp_path):
    # Not a bypassed name: the run asked for AdamW. The fix is optim='foam', or no FoamCallback; callback=false
    # (the fix for a bypassed name) would do nothing for a callback the user added.
    args = make_args(tmp_path, optim="adamw_torch")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(), callbacks=[FoamCallback()])
    with pytest.raises(FoamConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert "optimizer in use is AdamW (TrainingArguments.optim='adamw_torch')" in message
    assert "Fix: set optim='foam'" in message and "callback=false" not in message


def test_optim_args_configure_foam_and_overrides(tmp_path):
    model = tiny_llama()
    args = make_args(
        tmp_path,
        optim_args="level=3,scale=0.5,res_scale=0.25,second_moment=sq_mean,"
        "block_sizes=q_proj:16;layers.1.mlp.down_proj:2;down_proj:4;lm_head:2;v_proj:1",
    )
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.create_optimizer()
    sizes = named_block_sizes(trainer.optimizer, model)
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == 16
    assert sizes["model.layers.0.self_attn.k_proj.weight"] == 8  # level=3 default
    assert sizes["model.layers.0.self_attn.v_proj.weight"] == 1
    assert sizes["model.layers.0.mlp.down_proj.weight"] == 4
    assert sizes["model.layers.1.mlp.down_proj.weight"] == 2  # the more specific pattern wins
    assert sizes["lm_head.weight"] == 2  # an override folds the head too
    group = trainer.optimizer.param_groups[0]
    assert (group["scale"], group["res_scale"], group["second_moment"]) == (0.5, 0.25, "sq_mean")


def test_typed_config_produces_the_same_optim_args():
    config = FoamConfig(block_size=8, block_sizes={"q_proj": 16, "lm_head": 1}, res_scale=0.5)
    text = config.to_optim_args()
    assert text == "block_size=8,res_scale=0.5,block_sizes=q_proj:16;lm_head:1"
    assert FoamConfig.from_optim_args(text) == config


# target_modules in every form whose meaning the optim_args string must keep: one str is one regex over the whole
# module name (a plain name, a regex, a regex already in a group, the all-linear keyword); a list holds patterns
# matched as suffixes (a plain name, a regex, the keyword as a name).
TARGET_FORMS = [
    "q_proj",
    r".*\.mlp\..*",
    "(?:q_proj)",
    r"(?:.*\.q_proj)|(?:.*\.v_proj)",
    "all-linear",
    ["q_proj"],
    [r"layers\.0\..*proj"],
    ["(?:q|v)_proj"],
    ["all-linear"],
    ["q_proj", r"mlp\..*_proj"],
    ("q_proj", "v_proj"),
]


@pytest.mark.parametrize("targets", TARGET_FORMS, ids=repr)
def test_target_modules_survive_the_optim_args_string(targets):
    config = FoamConfig(block_size=8, target_modules=targets)
    assert FoamConfig.from_optim_args(config.to_optim_args()) == config


def _fold_plan(model, config):
    """What ``config`` folds in ``model``: each parameter's block size, or the error when a target matches nothing."""
    try:
        return resolve_block_sizes(model, config).size_by_parameter
    except NoMatchingModuleError as err:
        return str(err)


@pytest.mark.parametrize("targets", [r"model\.layers\.1\..*", "q_proj", [r"layers\.0\..*proj"], ["mlp"]], ids=repr)
def test_targets_given_as_a_config_or_a_mapping_fold_what_the_config_names(tmp_path, targets):
    # TrainingArguments hands a FoamConfig or a mapping on as the optim_args string. That string read one regex
    # in a list as one full regex, and one plain-looking str as a list of one suffix pattern: other modules folded.
    model = tiny_llama()
    expected = _fold_plan(model, FoamConfig(target_modules=targets))
    given = [FoamConfig(target_modules=targets)]
    if isinstance(targets, list):  # in a mapping (a YAML config) a str is the optim_args text, a list is a list
        given.append({"target_modules": targets})
    for optim_args in given:
        args = training_args(tmp_path, optim_args=optim_args)
        assert isinstance(args.optim_args, str)
        assert _fold_plan(model, foam_config_from_args(args)) == expected


def _optimizer_options(trainer):
    """What the optimizer a Trainer builds holds: each parameter's block size and the group options."""
    trainer.create_optimizer()
    group = trainer.optimizer.param_groups[0]
    return named_block_sizes(trainer.optimizer, trainer.model), (group["res_scale"], group["second_moment"])


def test_a_yaml_mapping_or_a_foamconfig_as_optim_args_builds_what_the_string_builds(tmp_path):
    # TRL's --config and args.json files give optim_args as a mapping; transformers reads only the string form,
    # and before this was converted a valid mapping passed the early check and failed in transformers' parser.
    text = "block_size=8,res_scale=0.5,block_sizes=q_proj:16;lm_head:2,target_modules=q_proj;v_proj;k_proj"
    from_string = Trainer(model=tiny_llama(), args=make_args(tmp_path, optim_args=text), train_dataset=lm_dataset())
    expected = _optimizer_options(from_string)
    assert expected[0]["model.layers.0.self_attn.k_proj.weight"] == 8 and expected[1] == (0.5, "mean_sq")

    config = tmp_path / "config.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'yaml'}\nmax_steps: 4\noptim: foam\noptim_args:\n  block_size: 8\n"
        "  res_scale: 0.5\n  block_sizes: {q_proj: 16, lm_head: 2}\n  target_modules: [q_proj, v_proj, k_proj]\n"
    )
    (from_yaml,) = HfArgumentParser(TrainingArguments).parse_yaml_file(str(config))
    assert isinstance(from_yaml.optim_args, str)  # what transformers' own parser and to_json_string need
    trainer = Trainer(model=tiny_llama(), args=from_yaml, train_dataset=lm_dataset())
    assert _optimizer_options(trainer) == expected
    trainer.train()  # transformers parses optim_args again when it builds the optimizer by name

    typed = FoamConfig(block_size=8, res_scale=0.5, block_sizes={"q_proj": 16, "lm_head": 2},
                       target_modules=["q_proj", "v_proj", "k_proj"])  # fmt: skip
    from_config = Trainer(model=tiny_llama(), args=make_args(tmp_path, optim_args=typed), train_dataset=lm_dataset())
    assert _optimizer_options(from_config) == expected


def test_foam_param_groups_are_the_groups_optim_foam_builds(tmp_path):
    # A plain loop gets the Trainer's folding (not FOAM(model.parameters()), which folds the embeddings too).
    from foam_hf import foam_param_groups

    optim_args = "block_size=8,block_sizes=q_proj:4,res_scale=0.5,state_dtype=bfloat16"
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, optim_args=optim_args, weight_decay=0.1),
        train_dataset=lm_dataset(),
    )
    trainer.create_optimizer()
    model = tiny_llama()
    plain = FOAM(foam_param_groups(model, optim_args, weight_decay=0.1), lr=1e-3)
    keys = ("param_names", "block_size", "weight_decay", "res_scale", "state_dtype", "scale", "second_moment")
    assert [{k: g[k] for k in keys} for g in plain.param_groups] == [
        {k: g[k] for k in keys} for g in trainer.optimizer.param_groups
    ]
    sizes = {name: g["block_size"] for g in plain.param_groups for name in g["param_names"]}
    assert sizes["model.embed_tokens.weight"] == 1 and sizes["lm_head.weight"] == 1  # the paper's choice
    assert sizes["model.layers.0.self_attn.q_proj.weight"] == 4 and sizes["model.layers.0.mlp.up_proj.weight"] == 8


def test_an_optimizer_keyword_that_the_groups_of_foam_param_groups_override_is_refused():
    # foam_param_groups sets the block size, the weight decay and FOAM's options in every group, and a group's value
    # wins over the optimizer's keyword (torch's rule): FOAM(groups, weight_decay=0.1) trained with no decay at all.
    from foam_hf import foam_param_groups

    model = tiny_llama()
    with pytest.raises(FoamConfigError) as refused:
        FOAM(foam_param_groups(model), lr=1e-3, weight_decay=0.1, block_size=8, state_dtype="bfloat16")
    assert str(refused.value).startswith(
        "FOAM: block_size=8, weight_decay=0.1, state_dtype='bfloat16' reaches no parameter: every group from "
        "foam_param_groups sets its own value (block_size 1, 4; weight_decay 0.0; state_dtype None)"
    )
    fix = 'foam_param_groups(model, "block_size=8,state_dtype=bfloat16", weight_decay=0.1)'
    assert str(refused.value).endswith(f"Fix: give it to foam_param_groups instead: {fix}.")
    # The fix builds what was asked for, and passing the same values to both is no error.
    fixed = FOAM(foam_param_groups(model, "block_size=8,state_dtype=bfloat16", weight_decay=0.1), lr=1e-3)
    again = FOAM(foam_param_groups(model, "block_size=8", weight_decay=0.1), lr=1e-3, weight_decay=0.1, block_size=8)
    for optimizer in (fixed, again):  # linear weights fold and decay; embeddings and head decay; norms neither
        assert {(g["block_size"], g["weight_decay"]) for g in optimizer.param_groups} == {(8, 0.1), (1, 0.1), (1, 0.0)}
    assert {g["state_dtype"] for g in fixed.param_groups} == {"bfloat16"}
    # A keyword at its default, or groups written by hand (torch's rule, a group's value wins), are left alone.
    assert FOAM(foam_param_groups(model), lr=1e-3, weight_decay=0.0, block_size=4).param_groups[0]["block_size"] == 4
    by_hand = [{**group} for group in foam_param_groups(model)]
    assert {g["weight_decay"] for g in FOAM(by_hand, lr=1e-3, weight_decay=0.1).param_groups} == {0.0}


def test_a_null_in_a_yaml_mapping_leaves_its_key_at_the_default(tmp_path):
    # YAML's null for a key reads as "not set", as FoamConfig(target_modules=None) does; before, it became the
    # module name 'None' and failed at train() (target_modules) or as "not an integer" (block_size).
    config = tmp_path / "config.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'yaml'}\nmax_steps: 1\noptim: foam\noptim_args:\n  block_size: 8\n"
        "  target_modules: null\n  block_sizes: null\n  scale: null\n"
    )
    (from_yaml,) = HfArgumentParser(TrainingArguments).parse_yaml_file(str(config))
    with_nulls = Trainer(model=tiny_llama(), args=from_yaml, train_dataset=lm_dataset())
    plain = Trainer(model=tiny_llama(), args=make_args(tmp_path, optim_args="block_size=8"), train_dataset=lm_dataset())
    assert _optimizer_options(with_nulls) == _optimizer_options(plain)
    assert 8 in _optimizer_options(plain)[0].values()


def test_override_that_matches_nothing_lists_close_names(tmp_path):
    args = make_args(tmp_path, optim_args="block_sizes=q_prj:8")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    with pytest.raises(NoMatchingModuleError, match=r"'q_prj' matches no trainable parameter.*'q_proj'"):
        trainer.create_optimizer()


def test_optim_target_modules_replaces_the_default_set(tmp_path):
    model = tiny_llama()
    args = make_args(tmp_path, optim_target_modules=["q_proj", "v_proj"])
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.create_optimizer()
    sizes = named_block_sizes(trainer.optimizer, model)
    assert {n for n, b in sizes.items() if b > 1} == {
        f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    args = make_args(tmp_path, optim_target_modules="all-linear")
    trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    trainer.create_optimizer()
    assert named_block_sizes(trainer.optimizer, trainer.model)["lm_head.weight"] == 1


def test_a_trainer_subclass_weight_decay_rule_reaches_foams_groups(tmp_path):
    """FOAM's groups take the weight decay of the Trainer that builds them, a subclass's get_decay_parameter_names
    included, as AdamW's do (FOAM once applied transformers' base rule whatever the Trainer said)."""

    class NoDecayOnProjections(Trainer):
        def get_decay_parameter_names(self, model):
            return [n for n in super().get_decay_parameter_names(model) if "proj" not in n]

    decays = {}
    for optim in ("adamw_torch", "foam"):
        trainer = NoDecayOnProjections(
            model=tiny_llama(), args=make_args(tmp_path / optim, optim=optim, weight_decay=0.1),
            train_dataset=lm_dataset(),
        )  # fmt: skip
        trainer.create_optimizer()
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        decays[optim] = {names[id(p)]: g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decays["foam"] == decays["adamw_torch"]
    assert decays["foam"]["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert decays["foam"]["model.layers.0.mlp.gate_proj.weight"] == 0.0 and 0.1 in decays["foam"].values()


def test_tied_weights_land_in_one_group_once(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=lm_dataset())
    trainer.train()
    all_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    assert sum(p is model.lm_head.weight for p in all_params) == 1


def test_tied_weights_asked_two_sizes_through_their_modules_are_refused():
    # lm_head:4 and embed_tokens:1 reach one tensor: the deeper owner won without a word, and lm_head:4 did nothing.
    from foam_hf import foam_param_groups

    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(FoamConfigError, match=r"one tensor shared by 2 modules.*embed_tokens:1.*lm_head:4.*Fix:"):
        foam_param_groups(model, {"block_size": 4, "block_sizes": {"lm_head": 4, "embed_tokens": 1}})
    # One size through both, one of them named, or one named beside a parent's pattern that reaches the other
    # (model:16 reaches embed_tokens only as their parent): the tied tensor takes the specific one.
    for sizes in ({"lm_head": 8, "embed_tokens": 8}, {"lm_head": 8}, {"model": 16, "lm_head": 8}):
        groups = foam_param_groups(model, {"block_size": 4, "block_sizes": sizes})
        assert [g["block_size"] for g in groups if any(p is model.lm_head.weight for p in g["params"])] == [8]


def test_command_line_json_and_pickle(tmp_path):
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "foam", "--optim_args", "block_size=8,block_sizes=q_proj:16"]
    )
    assert args.optim == "foam"
    assert json.loads(args.to_json_string())["optim"] == "foam"
    assert args.to_dict()["optim"] == "foam"
    assert pickle.loads(pickle.dumps(args)).optim == "foam"


def test_command_line_target_modules_as_a_regex_or_in_optim_args_fold_the_listed_modules(tmp_path):
    # On a command line, --optim_target_modules takes one string (transformers parses the field so), which is one
    # regex over the whole module name; several names go in a regex or in optim_args' target_modules list.
    def folded(argv):
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--optim", "foam", *argv]
        )
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
        return {name for name, size in _optimizer_options(trainer)[0].items() if size > 1}

    expected = {
        f"model.layers.{i}.self_attn.{proj}.weight"
        for i in range(len(tiny_llama().model.layers))
        for proj in ("q_proj", "v_proj")
    }
    assert folded(["--optim_args", "target_modules=q_proj;v_proj"]) == expected
    assert folded(["--optim_target_modules", r".*\.(q_proj|v_proj)"]) == expected


def test_unpickling_training_args_registers_the_name_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "training_args.bin"
    torch.save(make_args(tmp_path), path)
    code = (
        "import sys, torch; a = torch.load(sys.argv[1], weights_only=False); "
        "print(a.optim.value, 'foam_hf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["foam", "True"]


def _train(tmp_path, name, resume=None, stop_at=None, **overrides):
    args = make_args(tmp_path / name, max_steps=6, save_strategy="steps", save_steps=3, logging_steps=1, **overrides)
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=lm_dataset(24), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("optim", ["foam", "foam_layerwise"])
def test_resume_from_checkpoint_is_bitwise_exact(tmp_path, optim):
    extra = dict(optim=optim, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1)
    if optim == "foam_layerwise":
        extra["max_grad_norm"] = 0.0
    straight = _train(tmp_path, "straight", **extra)
    interrupted = _train(tmp_path, "interrupted", stop_at=3, **extra)  # saves checkpoint-3, then stops
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "interrupted" / "out" / "checkpoint-3"
    # Trainer's safe loading: the optimizer state must load with weights_only=True.
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    resumed = _train(tmp_path, "interrupted", resume=str(checkpoint), **extra)
    assert resumed.state.global_step == 6
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_resume_with_other_per_module_block_sizes_says_so(tmp_path):
    # Other overrides change the number of groups, so the refusal comes from the group count: it must still say
    # which block sizes differ, and how to resume.
    overrides = "block_size=8,block_sizes=q_proj:16;lm_head:1"
    saved = _train(tmp_path, "saved", stop_at=3, optim_args=overrides)
    checkpoint = tmp_path / "saved" / "out" / "checkpoint-3"
    groups = saved.optimizer.param_groups
    with pytest.raises(FoamStateError) as info:
        _train(tmp_path, "resumed", resume=str(checkpoint), optim_args="block_size=8")
    message = str(info.value)
    assert f"saved state has {len(groups)} param groups" in message
    assert str([g["block_size"] for g in groups]) in message
    assert "block_sizes" in message and "Fix: resume with that run's optim_args" in message


def test_resume_with_an_override_moved_to_a_module_of_the_same_shape_is_refused_by_name(tmp_path):
    # gate_proj and up_proj are both intermediate x hidden: moving the override keeps every group's block size,
    # parameter count and shapes, so only the names tell that gate_proj's saved moments would load onto up_proj.
    saved = _train(tmp_path, "saved", stop_at=3, optim_args="block_size=4,block_sizes=gate_proj:8")
    checkpoint = tmp_path / "saved" / "out" / "checkpoint-3"
    saved_groups = torch.load(checkpoint / "optimizer.pt", weights_only=True)["param_groups"]
    assert saved_groups[0]["param_names"] == saved.optimizer.param_groups[0]["param_names"]
    assert all(name.endswith("gate_proj.weight") for name in saved_groups[0]["param_names"])
    with pytest.raises(FoamStateError) as info:
        _train(tmp_path, "resumed", resume=str(checkpoint), optim_args="block_size=4,block_sizes=up_proj:8")
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj.weight' (param group 0, block_size=8) would load onto" in message
    assert "'model.layers.0.mlp.up_proj.weight'" in message and "Fix: resume with that run's optim_args" in message


def test_resume_with_another_block_size_for_one_module_names_every_groups_sizes(tmp_path):
    _train(tmp_path, "saved", stop_at=3, optim_args="block_size=4,block_sizes=q_proj:8")
    checkpoint = tmp_path / "saved" / "out" / "checkpoint-3"
    with pytest.raises(FoamStateError) as info:
        _train(tmp_path, "resumed", resume=str(checkpoint), optim_args="block_size=4,block_sizes=q_proj:16")
    message = str(info.value)
    assert "param group 0 was saved with block_size=8 but this optimizer has block_size=16" in message
    # The fix names the optim_args, not a global block_size=8 (which would change every other group).
    assert "Fix: resume with the optim_args of the run that saved it" in message and "[8, 4, 1, 1] saved" in message


def test_layerwise_matches_foam_and_frees_gradients(tmp_path):
    plain = Trainer(model=tiny_llama(), args=make_args(tmp_path / "a", max_grad_norm=0.0), train_dataset=lm_dataset())
    plain.train()
    args = make_args(tmp_path / "b", optim="foam_layerwise", max_grad_norm=0.0)
    layerwise = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    layerwise.train()
    assert isinstance(unwrap_foam(layerwise.optimizer), LayerwiseFOAM)
    for a, b in zip(plain.model.parameters(), layerwise.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert b.grad is None
    assert_same_gradient_logs(plain, layerwise)


def assert_same_gradient_logs(plain, layerwise):
    """The gradient figures logged under foam_layerwise (read in its hooks) are those the Trainer and the callback
    read from the whole model's gradients under foam; before, foam_layerwise logged grad_norm 0.0 (the gradients
    were freed when the Trainer looked) and no residual ratio."""
    keys = ("grad_norm", "foam/residual_ratio")
    expected = [(e["step"], *(e[k] for k in keys)) for e in plain.state.log_history if "grad_norm" in e]
    logged = [(e["step"], *(e.get(k) for k in keys)) for e in layerwise.state.log_history if "grad_norm" in e]
    assert len(expected) == 2 and all(norm > 0 for _, norm, _ in expected)
    assert [e[0] for e in logged] == [e[0] for e in expected]
    for want, got in zip(expected, logged):
        assert got[1:] == pytest.approx(want[1:], rel=1e-4), (want, got)


@pytest.mark.parametrize(
    "logging",
    [
        dict(logging_first_step=True, logging_steps=3),
        dict(logging_strategy="epoch", num_train_epochs=2),
        dict(logging_strategy="epoch", num_train_epochs=2, eval_strategy="steps", eval_steps=2),
    ],
    ids=["logging_first_step", "epoch strategy", "epoch strategy, evaluations between"],
)
def test_gradient_figures_reach_every_training_log(tmp_path, logging):
    """Every training log holds foam/residual_ratio, and foam_layerwise's grad_norm is the one the Trainer
    computes under foam, also for logs the steps strategy does not schedule: the first step's and the epochs'
    (they once held no residual ratio, and grad_norm 0.0 under foam_layerwise). Evaluation logs get none of
    them: figures waiting for the epoch's log once went into the evaluations logged before it."""
    run = dict(max_grad_norm=0.0, **logging)
    if "num_train_epochs" in logging:
        run["max_steps"] = -1  # epochs decide: 16 samples in batches of 4, 4 steps an epoch
    evaluates = "eval_strategy" in logging
    logs = []
    for name, optim in (("a", "foam"), ("b", "foam_layerwise")):
        trainer = Trainer(
            model=tiny_llama(),
            args=make_args(tmp_path / name, optim=optim, per_device_eval_batch_size=4, **run),
            train_dataset=lm_dataset(),
            eval_dataset=lm_dataset(4) if evaluates else None,
        )
        trainer.train()
        logs.append([e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e])
        evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
        assert len(evaluations) == (4 if evaluates else 0)  # steps 2, 4, 6, 8
        for entry in evaluations:
            assert not [key for key in entry if key.startswith("foam/") or key == "grad_norm"], entry
    plain, layerwise = logs
    assert len(plain) == 2 and [e["step"] for e in plain] == [e["step"] for e in layerwise]
    for want, got in zip(plain, layerwise):
        assert "foam/residual_ratio" in want and want["grad_norm"] > 0
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["foam/residual_ratio"] == pytest.approx(want["foam/residual_ratio"], rel=1e-4)


def test_layerwise_supports_gradient_accumulation(tmp_path):
    common = dict(max_grad_norm=0.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    plain = Trainer(model=tiny_llama(), args=make_args(tmp_path / "a", **common), train_dataset=lm_dataset())
    plain.train()
    args = make_args(tmp_path / "b", optim="foam_layerwise", **common)
    layerwise = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset())
    layerwise.train()
    for a, b in zip(plain.model.parameters(), layerwise.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_same_gradient_logs(plain, layerwise)  # the accumulated gradients, as the Trainer sees them


class _TwoTowers(torch.nn.Module):
    """A text tower every batch uses and a vision tower only batches with images use (a VLM on a mixed text and
    image dataset)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.text = torch.nn.Linear(8, 8, bias=False)
        self.vision = torch.nn.Linear(8, 8, bias=False)
        self.head = torch.nn.Linear(8, 1, bias=False)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3

    def forward(self, x, has_image, y):
        h = self.text(x)
        if bool(has_image.any()):
            h = h + self.vision(x)
        return {"loss": (self.head(h).squeeze(-1) - y).square().mean()}


class _MixedBatches(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(i)
        return {
            "x": torch.randn(8, generator=gen),
            "has_image": torch.tensor(i % 2 == 0),
            "y": torch.randn((), generator=gen),
        }


def test_layerwise_steps_a_branch_the_last_micro_batch_does_not_reach(tmp_path):
    """Gradient accumulation over micro-batches of which only the first uses the vision tower: its hook does not
    fire on the last one, so its accumulated gradient is stepped by step() (it was once left to zero_grad, and the
    tower never trained). foam_layerwise ends where foam ends."""
    weights, trainers = {}, {}
    for optim in ("foam", "foam_layerwise"):
        args = make_args(
            tmp_path / optim, optim=optim, per_device_train_batch_size=1, gradient_accumulation_steps=2,
            max_grad_norm=0.0, max_steps=2, train_sampling_strategy="sequential", remove_unused_columns=False,
            logging_steps=1,
        )  # fmt: skip
        model = _TwoTowers()
        before = model.vision.weight.detach().clone()
        trainers[optim] = Trainer(model=model, args=args, train_dataset=_MixedBatches())
        trainers[optim].train()
        assert not torch.equal(model.vision.weight, before), optim
        weights[optim] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in weights["foam"].items():
        torch.testing.assert_close(weights["foam_layerwise"][name], value, atol=1e-6, rtol=1e-5)
    # and the logged figures count the tower's gradient, which step() stepped after the hooks (the callback
    # once summed before step() and logged 13.2 where optim="foam" logged 15.2)
    assert_same_gradient_logs(trainers["foam"], trainers["foam_layerwise"])


@pytest.mark.parametrize("callback", ["true", "false"])
def test_after_layerwise_training_the_model_trains_with_another_optimizer(tmp_path, callback):
    """Layer-wise FOAM's hooks leave with train(): a later run of the same model with AdamW trains it exactly as
    it trains a fresh copy of those weights (the hooks once went on stepping, with the finished schedule's
    learning rate 0, and freed every gradient AdamW waited for). callback=false too: the hooks are not the
    reporting callback's business."""
    model = tiny_llama()
    args = make_args(tmp_path / "a", optim="foam_layerwise", max_grad_norm=0.0, optim_args=f"callback={callback}")
    Trainer(model=model, args=args, train_dataset=lm_dataset()).train()
    twin = tiny_llama()
    twin.load_state_dict(model.state_dict())
    before = [p.detach().clone() for p in twin.parameters()]
    after = [make_args(tmp_path / name, optim="adamw_torch", max_grad_norm=0.0) for name in ("b", "c")]
    for run_model, run_args in ((model, after[0]), (twin, after[1])):
        Trainer(model=run_model, args=run_args, train_dataset=lm_dataset()).train()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    assert all(not torch.equal(a, b) for a, b in zip(before, twin.parameters()))  # AdamW trained every one


class _FailsAtStep(TrainerCallback):
    """Raises at the end of a step, as an out-of-memory error or an interrupted notebook cell would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("stopped at a step")


def test_a_layerwise_train_that_raises_leaves_no_hooks_behind(tmp_path):
    """A train() that raises hears no on_train_end: the hooks still come off (the integration's Trainer.train
    wrapper), so a later AdamW run trains the model as it trains a twin, and train() again resumes stepping."""
    model = tiny_llama()
    args = make_args(tmp_path / "a", optim="foam_layerwise", max_grad_norm=0.0, max_steps=3)
    failing = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[_FailsAtStep(1)])
    with pytest.raises(RuntimeError, match="stopped at a step"):
        failing.train()
    layerwise = unwrap_foam(failing.optimizer)
    assert isinstance(layerwise, LayerwiseFOAM) and not layerwise.hooks_attached
    twin = tiny_llama()
    twin.load_state_dict(model.state_dict())
    after = [make_args(tmp_path / name, optim="adamw_torch", max_grad_norm=0.0) for name in ("b", "c")]
    for run_model, run_args in ((model, after[0]), (twin, after[1])):
        Trainer(model=run_model, args=run_args, train_dataset=lm_dataset()).train()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    # the failed Trainer trains again: its hooks go back on at on_train_begin
    failing.callback_handler.remove_callback(_FailsAtStep)
    steps_before = {float(s["step"]) for s in layerwise.state.values()}
    failing.train()
    assert {float(s["step"]) for s in layerwise.state.values()} != steps_before
    assert not layerwise.hooks_attached


def test_a_layerwise_optimizer_passed_in_keeps_its_hooks_after_train(tmp_path):
    """A LayerwiseFOAM handed to the Trainer (optimizers=) is the caller's: its hooks stay, at a normal end as
    before, so a second train() still trains."""
    model = tiny_llama()
    optimizer = LayerwiseFOAM(model.parameters(), lr=1e-3, block_size=4)
    args = make_args(tmp_path, optim="adamw_torch", max_grad_norm=0.0, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), optimizers=(optimizer, None))
    trainer.train()
    assert optimizer.hooks_attached
    optimizer.remove_hooks()


def test_layerwise_trains_again_in_a_second_train_call(tmp_path):
    """Two train() calls of one Trainer: foam_layerwise (hooks removed at the end of the first, put back at the
    start of the second) ends where optim="foam" ends."""
    trainers = []
    for name, optim in (("a", "foam"), ("b", "foam_layerwise")):
        trainer = Trainer(
            model=tiny_llama(),
            args=make_args(tmp_path / name, optim=optim, max_grad_norm=0.0),
            train_dataset=lm_dataset(),
        )
        trainer.train()
        first = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        assert any(not torch.equal(a, b) for a, b in zip(first, trainer.model.parameters()))  # it trained again
        trainers.append(trainer)
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_second_layerwise_optimizer_takes_the_parameters_over():
    """Two LayerwiseFOAM over one model: the newer steps it (once per backward), the older no longer does, and
    the user is told; remove_hooks gives the gradients back to backward."""
    model = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    old = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) were stepped by another LayerwiseFOAM"):
        new = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    reference = FOAM(twin, lr=0.1, block_size=4)
    model(x).square().sum().backward()
    torch.nn.functional.linear(x, twin[0], twin[1]).square().sum().backward()
    reference.step()
    for p, q in zip(model.parameters(), twin):
        torch.testing.assert_close(p, q)
        assert p.grad is None
    assert old.state == {} and len(new.state) == 2 and not old.hooks_attached and new.hooks_attached
    old.step()  # the older one's step does not take its parameters back (it hooks only parameters nobody steps)
    assert not old.hooks_attached and new.hooks_attached
    new.remove_hooks()
    model(x).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_an_optimizer_built_over_parameters_a_layerwise_optimizer_still_steps_is_warned_about():
    # Its hooks step the parameters inside backward and free their gradients: FOAM's step() found none and changed
    # nothing, silently. Told when built; once the hooks are off, it trains.
    model = torch.nn.Linear(8, 4)
    layerwise = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    with pytest.warns(UserWarning, match=r"FOAM: 2 of its parameter\(s\) are stepped inside backward by a Layerwise"):
        FOAM(model.parameters(), lr=0.1, block_size=4)
    layerwise.remove_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = FOAM(model.parameters(), lr=0.1, block_size=4)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 8)).square().sum().backward()
    plain.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_layerwise_gradient_that_arrives_in_pieces_is_refused_not_stepped_twice():
    """Reentrant checkpointing of two blocks sharing a layer runs a backward per block, so the shared weight's hook
    fired twice in one step and stepped each partial gradient as a whole one (a review measured weights 0.06 off
    optim="foam"); so did two backward() calls per step. Now the second piece is refused; step() or zero_grad()
    ends the step, and the next backward steps again."""
    from torch.utils.checkpoint import checkpoint

    shared = torch.nn.Linear(8, 8)
    optimizer = LayerwiseFOAM(shared.parameters(), lr=0.1, block_size=4)
    x = torch.randn(3, 8, requires_grad=True)
    # The fix names transformers' current field (gradient_checkpointing_kwargs is its deprecated alias since 5.23).
    refused = r"second gradient after it was stepped.*use_reentrant=False in activation_checkpointing_kwargs"
    with pytest.raises(RuntimeError, match=refused):
        y = checkpoint(shared, x, use_reentrant=True)
        checkpoint(shared, y, use_reentrant=True).square().sum().backward()
    optimizer.zero_grad()
    shared(x).square().sum().backward()  # a new step: stepped
    with pytest.raises(RuntimeError, match="several backward\\(\\) calls per optimizer step"):
        shared(x).square().sum().backward()  # a second backward in the same step
    optimizer.zero_grad()  # the refused piece's gradients go
    shared(x).square().sum().backward()
    optimizer.step()  # as the Trainer calls it after every backward of a step: it ends the step
    shared(x).square().sum().backward()
    assert all(p.grad is None for p in shared.parameters())
    optimizer.remove_hooks()


@pytest.mark.parametrize("answer", [None, "no", 1])
def test_a_should_step_that_answers_other_than_a_bool_is_refused_in_the_hook(answer):
    # None (a should_step that forgot its return) read as "not now" in every hook: nothing stepped inside backward,
    # and the layer-wise saving was gone, silently.
    layer = torch.nn.Linear(8, 8)
    optimizer = LayerwiseFOAM(layer.parameters(), lr=0.1, block_size=4, should_step=lambda: answer)
    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(TypeError, match=rf"should_step\(\) returned {re.escape(repr(answer))} .*not True or False"):
        layer(torch.randn(3, 8)).square().sum().backward()
    assert all(torch.equal(p, q) for p, q in zip(layer.parameters(), before))  # refused before any step
    optimizer.remove_hooks()


def test_a_layerwise_optimizer_stepped_by_a_grad_scaler_is_refused_by_name():
    # GradScaler cannot unscale gradients that the hooks already stepped on and freed; it failed with its own
    # "No inf checks were recorded for this optimizer". FOAM itself, stepped by the scaler, trains as AdamW does.
    layer = torch.nn.Linear(8, 8)
    optimizer = LayerwiseFOAM(layer.parameters(), lr=0.1, block_size=4)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(layer(torch.randn(3, 8)).square().sum()).backward()
    with pytest.raises(RuntimeError, match=r"LayerwiseFOAM: stepped by a GradScaler .* Fix: train in bf16"):
        scaler.step(optimizer)
    optimizer.remove_hooks()
    plain = FOAM(layer.parameters(), lr=0.1, block_size=4)
    before = [p.detach().clone() for p in layer.parameters()]
    scaler.scale(layer(torch.randn(3, 8)).square().sum()).backward()
    scaler.step(plain)
    assert all(not torch.equal(p, q) for p, q in zip(layer.parameters(), before))


def test_a_group_added_to_a_layerwise_optimizer_is_hooked_and_stepped():
    first, second = torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)
    optimizer = LayerwiseFOAM(first.parameters(), lr=0.1, block_size=4)
    optimizer.add_param_group({"params": list(second.parameters())})
    before = second.weight.detach().clone()
    second(first(torch.randn(3, 8))).square().sum().backward()
    assert not torch.equal(second.weight, before) and second.weight.grad is None  # stepped inside backward
    assert len(optimizer.state) == 4
    optimizer.remove_hooks()


def test_a_parameter_unfrozen_after_construction_is_stepped_then_hooked():
    # Progressive unfreezing: the hooks went on at construction, on the parameters that required grad then, and
    # a weight unfrozen later was never stepped (its gradient accumulated forever).
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    optimizer = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    model[0].weight.requires_grad_(True)
    x = torch.randn(3, 8)
    twin = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    reference = FOAM(twin.parameters(), lr=0.1, block_size=4)
    for _ in range(2):
        model(x).square().sum().backward()
        optimizer.step()  # steps the unhooked weight on its gradient the first time, and hooks it
        twin(x).square().sum().backward()
        reference.step()
        reference.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    assert model[0].weight.grad is None and len(optimizer.state) == 4  # the second time, stepped inside backward
    optimizer.remove_hooks()


def test_a_parameter_unfrozen_while_another_is_frozen_is_hooked():
    # Unfreezing was detected by counting hooks against trainable parameters: one frozen and one unfrozen together
    # kept the counts equal, and the unfrozen weight was stepped in step() but never in backward.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    optimizer = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    model[0].weight.requires_grad_(True)
    model[1].weight.requires_grad_(False)
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    model(torch.randn(3, 8)).square().sum().backward()
    assert model[0].weight.grad is None  # stepped and freed inside backward
    optimizer.remove_hooks()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_layerwise_optimizer_has_the_state_and_no_hooks(how):
    import copy
    import pickle

    model = torch.nn.Linear(8, 4)
    optimizer = LayerwiseFOAM(model.parameters(), lr=0.1, block_size=4)
    model(torch.randn(3, 8)).square().sum().backward()
    optimizer.remove_hooks()
    copied = copy.deepcopy(optimizer) if how == "deepcopy" else pickle.loads(pickle.dumps(optimizer))
    assert not copied.hooks_attached and len(copied.state) == 2
    params = [p for g in copied.param_groups for p in g["params"]]
    copied.attach_hooks()
    (torch.nn.functional.linear(torch.randn(3, 8), params[0], params[1])).square().sum().backward()
    copied.step()
    copied.zero_grad()
    assert all(s["step"].item() == 2 for s in copied.state.values())
    copied.remove_hooks()


@pytest.mark.parametrize("first", ["foam_hf", "transformers"])
def test_either_import_order_wraps_trainer_train_and_create_optimizer(first):
    """The Trainer places are installed whether foam_hf comes first (lazily, when transformers.trainer is
    imported) or second (at once)."""
    import subprocess
    import sys

    imports = ["import foam_hf", "import transformers.trainer"]
    code = "\n".join([*(imports if first == "foam_hf" else imports[::-1]), (
        "from transformers import Trainer\n"
        "print([getattr(f, '_foam_hf_wrapped', False) for f in (Trainer.train, Trainer.create_optimizer)])"
    )])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[True, True]", out.stdout + out.stderr


def test_import_registers_both_names():
    """In a fresh interpreter transformers refuses optim="foam"; ``import foam_hf`` registers both names with
    FOAM's handler."""
    import subprocess
    import sys

    code = (
        "from transformers import trainer_optimizer\n"
        "from transformers.training_args import OptimizerNames\n"
        "def known(name):\n"
        "    try:\n"
        "        return OptimizerNames(name) in trainer_optimizer._OPTIMIZER_HANDLERS\n"
        "    except ValueError:\n"
        "        return False\n"
        "before = [known('foam'), known('foam_layerwise')]\n"
        "import foam_hf\n"
        "handlers = [trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames(n)] for n in ('foam', 'foam_layerwise')]\n"
        "after = [h.__module__.startswith('foam_hf.') for h in handlers]\n"
        "print(before, after)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[False, False] [True, True]", out.stdout + out.stderr


def test_deepspeed_zero_gets_zerofoam_from_the_handler(tmp_path):
    from foam_hf.integration import optimizer_cls_and_kwargs
    from foam_hf.zero import ZeroFOAM

    args = make_args(tmp_path)
    # Set after construction: building TrainingArguments(deepspeed=...) needs deepspeed installed.
    for stage in (1, 2, 3):
        args.deepspeed = {"zero_optimization": {"stage": stage}}
        cls, kwargs = optimizer_cls_and_kwargs(args, tiny_llama())
        assert cls is ZeroFOAM and kwargs["params"]
    args.deepspeed = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(FoamConfigError, match=r"DeepSpeedCPUAdam.*Fix: "):
        optimizer_cls_and_kwargs(args, tiny_llama())
    args.deepspeed = {"zero_optimization": {"stage": 0}}
    cls, kwargs = optimizer_cls_and_kwargs(args, tiny_llama())
    assert cls is FOAM and kwargs["params"]


def test_state_dtype_may_be_written_as_torch_prints_it():
    # str(torch.bfloat16) is "torch.bfloat16"; in optim_args it names the same storage as "bfloat16".
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        assert FoamConfig.from_optim_args(f"state_dtype={dtype}") == FoamConfig(state_dtype=name)


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def test_mixture_of_experts_weights_left_unfolded_are_named_in_a_warning():
    # transformers keeps a MoE layer's experts as 3-D parameters of one MixtralExperts module, not as linear layers:
    # the default targets leave them on AdamW states (here 49,152 of the model's entries) without a word.
    import warnings

    model = tiny_mixtral()
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n}
    assert experts and all(p.ndim == 3 for p in experts.values())
    with pytest.warns(
        UserWarning, match=r"4 mixture-of-experts weight tensors \(49,152 entries.*block_sizes=experts:4"
    ):
        plan = resolve_block_sizes(model, FoamConfig())
    assert all(plan.size_by_parameter[n] == 1 for n in experts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named either way, the warning is gone
        folded = resolve_block_sizes(model, FoamConfig(block_sizes={"experts": 4}))
        kept = resolve_block_sizes(model, FoamConfig(block_sizes={"experts": 1}))
        resolve_block_sizes(model, FoamConfig(block_size=1))  # AdamW states everywhere, as asked
        resolve_block_sizes(model, FoamConfig(target_modules=["q_proj"]))  # a chosen set of modules
    assert all(folded.size_by_parameter[n] == 4 for n in experts)
    assert all(kept.size_by_parameter[n] == 1 for n in experts)
    # and folded, each expert's weight keeps (experts, rows, ceil(n / 4)) moments
    optimizer = FOAM(foam_param_groups(model, "block_sizes=experts:4"), lr=1e-3)
    model(input_ids=torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    for name, p in experts.items():
        assert optimizer.state[p]["exp_avg"].shape == (*p.shape[:-1], -(-p.shape[-1] // 4)), name
