"""The parameter set (unclip.parameters) and what derives from it, checked parameter by parameter.

Every generation parameter, sent at a value other than its default, changes what the in-process
pipeline produces; test_e2e and test_ray_serve send the same requests through `serve all` and
Ray Serve and compare with these results, so a layer that drops a parameter fails there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from parameter_cases import BASE, COUNTS_IMAGES, NON_DEFAULT, PARAMETER_NAMES, SENDS_PREVIEWS, generate_in_process, pixels, varied

from unclip import codec
from unclip.calls import DecodeCall, SampleCall, UpsampleCall
from unclip.cli import build_parser
from unclip.cli.common import parameters_from_args
from unclip.errors import InvalidArgument
from unclip.parameters import OPERATIONS, GenerationParameters, parameters, spec_of, value_type
from unclip.stage import Stage
from unclip.v1 import images_pb2


def test_every_parameter_has_a_non_default_test_value():
    assert set(NON_DEFAULT) == set(PARAMETER_NAMES)
    for item in parameters():
        assert NON_DEFAULT[item.name] != item.default, item.name
        assert isinstance(NON_DEFAULT[item.name], value_type(item.name)), item.name


def test_every_parameter_is_in_the_protobuf_message_with_its_type():
    fields = images_pb2.GenerationParameters.DESCRIPTOR.fields_by_name
    assert set(fields) == set(PARAMETER_NAMES)
    for name in PARAMETER_NAMES:
        message = codec.to_message(GenerationParameters(**{name: NON_DEFAULT[name]}), images_pb2.GenerationParameters())
        assert getattr(codec.from_message(GenerationParameters, message), name) == NON_DEFAULT[name], name


@pytest.fixture(scope="module")
def base_result(local_stages):
    return generate_in_process(local_stages, BASE)


@pytest.mark.parametrize("name", PARAMETER_NAMES)
def test_a_non_default_value_changes_the_result(local_stages, base_result, name):
    base_images, base_previews = base_result
    images, previews = generate_in_process(local_stages, varied(name))
    if name == COUNTS_IMAGES:
        assert (len(base_images), len(images)) == (1, NON_DEFAULT[name])
        assert not np.array_equal(pixels(images[0]), pixels(images[1]))
        assert images[0].png == base_images[0].png  # image i of a batch is the image of seed + i alone
    elif name == SENDS_PREVIEWS:
        assert (base_previews, previews) == (0, BASE["decoder_steps"])
        np.testing.assert_array_equal(pixels(images[0]), pixels(base_images[0]))  # previews change no pixel
    else:
        first, base = pixels(images[0]), pixels(base_images[0])
        assert first.shape != base.shape or not np.array_equal(first, base), f"{name} changed nothing"


def test_each_setting_reaches_the_stage_call_it_names():
    params = GenerationParameters(**{name: NON_DEFAULT[name] for name in PARAMETER_NAMES})
    calls = {Stage.PRIOR: SampleCall, Stage.DECODER: DecodeCall, Stage.UPSAMPLER: UpsampleCall}
    for item in parameters():
        for stage, target in spec_of(item).to:
            settings = params.stage_settings(stage)
            field, _, sub = target.partition(".")
            assert field in {f.name for f in dataclasses.fields(calls[stage])}, (item.name, target)
            got = getattr(settings[field], sub) if sub else settings[field]
            assert got == NON_DEFAULT[item.name], (item.name, stage)
    assert params.stage_settings(Stage.ENCODER) == {}


@pytest.mark.parametrize("name", [n for n in PARAMETER_NAMES if n != "prompt"])
def test_bounds_are_checked_by_name(name):
    spec = spec_of(next(item for item in parameters() if item.name == name))
    bad = []
    if spec.low is not None:
        bad.append(value_type(name)(spec.low - 1))
    if spec.high is not None:
        bad.append(value_type(name)(spec.high + 1))
    if spec.choices is not None:
        bad.append("no-such-choice")
    if value_type(name) is float:
        bad.append(float("nan"))
    assert bad, f"{name} has no bounds to check"
    for value in bad:
        with pytest.raises(InvalidArgument, match=f"^{name}: "):
            dataclasses.replace(GenerationParameters(prompt="p"), **{name: value}).validate("generate_stream")


def test_the_prompt_is_required_only_where_the_operation_takes_one():
    for operation, groups in OPERATIONS.items():
        takes_prompt = any(spec_of(item).group.value == "prompt" for item in parameters(operation))
        if takes_prompt:
            with pytest.raises(InvalidArgument, match="prompt: must not be empty"):
                GenerationParameters().validate(operation)
        else:
            GenerationParameters().validate(operation)
        assert bool(groups)


COMMANDS = {
    "generate": "generate_stream",
    "variations": "variations",
    "edit": "edit",
    "interpolate": "interpolate",
    "textdiff": "text_diff",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_parameter_of_a_command_has_a_flag(command):
    operation = COMMANDS[command]
    positional = {
        "generate": ["p"],
        "variations": ["x.png"],
        "edit": ["x.png", "--prompt", "p"],
        "interpolate": ["--prompts", "a", "b"],
        "textdiff": ["x.png", "--caption", "a", "--target", "b"],
    }
    argv = [command, *positional[command]]
    expected = {}
    for item in parameters(operation):
        if item.name == "prompt":
            continue
        flag = spec_of(item).flag or "--" + item.name.replace("_", "-")
        argv += [flag, str(NON_DEFAULT[item.name])]
        expected[item.name] = NON_DEFAULT[item.name]
    args = build_parser().parse_args(argv)
    assert parameters_from_args(args, operation) == expected
    assert parameters_from_args(build_parser().parse_args([command, *positional[command]]), operation) == {}
