"""FSDP as far as a CPU allows (torch refuses to start FSDP there): the committed accelerate configs parse as
the launcher reads them, and the family's wrap policy names blocks every family's network has."""

from pathlib import Path

import pytest

from fewstep.distill.families import TeacherError, load_teacher
from fewstep.distill.fsdp import fill_wrap_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "multinode"])
def test_the_committed_launch_configs_parse_as_accelerate_reads_them(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    if name == "ddp":
        assert config.distributed_type.value == "MULTI_GPU"
        return
    assert config.distributed_type.value == "FSDP"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "auto" and fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def _launch_env(**extra):
    """What ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` puts in the environment."""
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "auto", "FSDP_USE_ORIG_PARAMS": "true", **extra}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_family_pixart import tiny_pixart_pipeline
    from test_family_dit_ldm import tiny_dit_pipeline
    from test_family_flux import tiny_flux_pipeline
    from test_family_sd import tiny_sd_pipeline
    from test_family_sd3 import tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("fsdp")
    builders = {"sd": tiny_sd_pipeline, "dit": tiny_dit_pipeline, "sd3": tiny_sd3_pipeline,
                "flux": tiny_flux_pipeline, "pixart": tiny_pixart_pipeline}
    return {name: load_teacher(build(root / name)) for name, build in builders.items()}


@pytest.mark.parametrize("name, blocks", [("sd", {"ResnetBlock2D", "BasicTransformerBlock"}),
                                          ("dit", {"BasicTransformerBlock"}), ("pixart", {"BasicTransformerBlock"}),
                                          ("sd3", {"JointTransformerBlock"}),
                                          ("flux", {"FluxTransformerBlock", "FluxSingleTransformerBlock"})])
def test_auto_wraps_each_familys_blocks_and_accelerates_plugin_reads_them(families, name, blocks):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    family = families[name]
    env = _launch_env()
    assert set(fill_wrap_policy(family, lora=False, env=env)) == blocks
    net = family.denoiser_network
    for block in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):  # what accelerate's wrap policy looks up
        assert get_module_class_from_name(net, block) is not None, block
    plugin = _plugin_from(env, FullyShardedDataParallelPlugin)
    assert set(plugin.transformer_cls_names_to_wrap) == blocks


def _plugin_from(env, plugin_class):
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env):
        return plugin_class()


def test_what_fsdp_could_not_run_is_refused_in_one_line(families):
    sd = families["sd"]
    with pytest.raises(TeacherError, match="fsdp_use_orig_params: true"):
        fill_wrap_policy(sd, lora=True, env=_launch_env(FSDP_USE_ORIG_PARAMS="false"))
    with pytest.raises(TeacherError, match="does not have; use auto"):
        fill_wrap_policy(sd, lora=False, env=_launch_env(FSDP_TRANSFORMER_CLS_TO_WRAP="JointTransformerBlock"))
    assert fill_wrap_policy(sd, lora=False, env={}) is None  # not an FSDP launch: nothing to do
    assert fill_wrap_policy(sd, lora=False, env=_launch_env(FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP")) is None
    env = _launch_env(FSDP_TRANSFORMER_CLS_TO_WRAP="ResnetBlock2D")  # a user's own choice stays
    assert fill_wrap_policy(sd, lora=False, env=env) == ["ResnetBlock2D"]
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "ResnetBlock2D"
