"""Method recipes: built-ins resolve, `extends` inherits, and bad recipes are named errors."""

import pytest

from ltbench.spec import config, methods


@pytest.mark.parametrize("name", methods.available())
def test_every_builtin_recipe_resolves_and_checks(name):
    r = methods.recipe(name)
    methods.check(name, r)
    assert "extends" not in r
    assert r["views"] and r["classify_on"]


def test_extends_inherits_and_overrides():
    full = methods.recipe("baseline+cbn+sbn+dpl")
    assert full["loss"]["name"] == "balanced_softmax" and full["augment"] == "autoaugment"  # from baseline
    assert full["norm"]["name"] == "cbn" and full["norm"]["options"]["num_components"] == 4  # from baseline+cbn
    assert full["paths"] == ["compound", "split"] and full["views"] == ["weak", "strong"]
    assert full["classify_on"] == ["compound/strong", "split/strong"]
    m2 = methods.recipe("cbn-m2")
    assert m2["norm"]["options"]["num_components"] == 2
    assert {k: v for k, v in m2.items() if k not in ("norm", "description")} == {
        k: v for k, v in full.items() if k not in ("norm", "description")
    }
    assert methods.recipe("baseline")["views"] == ["strong"]
    assert methods.recipe("ce")["views"] == ["weak"]


def test_recipe_records_every_norm_and_loss_default():
    r = methods.recipe("baseline+cbn")
    for key in ("num_components", "mean_momentum", "train_stats", "responsibilities", "init", "em", "unbiased_var"):
        assert key in r["norm"]["options"], key
    assert methods.recipe("focal")["loss"]["options"]["gamma"] == 1.0
    assert methods.recipe("nbn")["norm"]["options"]["alpha"] == "shared"


def test_config_recipe_overrides_builtin_and_extends_user_recipes():
    extra = {
        "my-cbn": {"extends": "baseline+cbn", "norm": {"options": {"num_components": 3}}},
        "focal": {"loss": {"options": {"gamma": 2.0}}},
    }
    assert methods.recipe("my-cbn", extra)["norm"]["options"]["num_components"] == 3
    assert methods.recipe("focal", extra)["loss"]["options"]["gamma"] == 2.0


def _cfg(methods_section, method):
    return {
        "methods": methods_section,
        "experiments": {
            "e": {"datasets": ["digits-lt"], "ratios": [10], "methods": [method], "backbones": ["resnet8"]}
        },
    }


@pytest.mark.parametrize(
    "recipe, needle",
    [
        ({"extends": "nope"}, "extends 'nope'"),
        ({"extends": "x"}, "cycle"),
        ({"norm": {"name": "groupnorm"}}, "unknown norm 'groupnorm'"),
        ({"loss": {"name": "hinge"}}, "unknown loss 'hinge'"),
        ({"sampler": "square"}, "unknown sampler 'square'"),
        ({"decoupled": {"enabled": True, "loss": "nope"}}, "unknown decoupled.loss 'nope'"),
        ({"paths": ["compound", "split"]}, "needs norm cbn"),
        ({"classify_on": ["split/weak"]}, "classify_on 'split/weak'"),
        ({"consistency": {"weight": 1.0}}, "consistency.weight > 0 needs"),
        ({"head": "cosine", "decoupled": {"enabled": True}}, "needs head: linear"),
        ({"norm": {"name": "cbn", "options": {"num_componentz": 2}}}, "num_componentz"),
        ({"norm": {"scope": "everywhere"}}, "everywhere"),
        ({"views": ["blurry"]}, "blurry"),
    ],
)
def test_bad_recipe_is_a_config_error_naming_the_method_and_part(recipe, needle):
    with pytest.raises(config.ConfigError) as e:
        config.validate(_cfg({"x": recipe}, "x"))
    assert needle in str(e.value) and ("x" in str(e.value))
