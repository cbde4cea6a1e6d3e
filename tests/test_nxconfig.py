# SPDX-License-Identifier: Apache-2.0
"""NxConfig opaque parameters: strict decoding, merging, environment."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from controller.nx.nxconfig import (
    API_VERSION,
    DEFAULT_LOG_FILE,
    IBM_API_VERSION,
    KIND,
    NX_CONFIG_FIELDS,
    NxConfig,
    NxConfigError,
    decode_nx_config,
    merge_nx_configs,
    nx_config_env,
)

HEADER = {"apiVersion": API_VERSION, "kind": KIND}


def params(**fields: Any) -> dict[str, Any]:
    return {**HEADER, **fields}


def test_a_config_with_only_apiversion_and_kind_sets_nothing() -> None:
    assert decode_nx_config(params()) == NxConfig()


def test_every_field_decodes_to_its_attribute() -> None:
    cfg = decode_nx_config(
        params(
            compMode="nx",
            decMode="software",
            verbose=2,
            trace=9,
            logFile="/var/log/nx.log",
            configFile="/etc/nx-zlib.conf",
            defaultBufferSize=2 * 1024 * 1024,
            dhtConfig="literalsAndLengths",
            strategy="fixed",
            mlockCsb=True,
            timeoutPgfaults=60,
        )
    )
    assert cfg == NxConfig(
        comp_mode="nx",
        dec_mode="software",
        verbose=2,
        trace=9,
        log_file="/var/log/nx.log",
        config_file="/etc/nx-zlib.conf",
        default_buffer_size=2 * 1024 * 1024,
        dht_config="literalsAndLengths",
        strategy="fixed",
        mlock_csb=True,
        timeout_pgfaults=60,
    )


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "parameters: must be an object, got [1,2]"),
        (None, "parameters: must be an object, got null"),
        ({"kind": KIND}, 'parameters.apiVersion: required, must be "' + API_VERSION + '"'),
        (
            {"apiVersion": "nx.device.power.ibm.com/v1", "kind": KIND},
            'parameters.apiVersion: must be "'
            + API_VERSION
            + '", got "nx.device.power.ibm.com/v1"',
        ),
        ({"apiVersion": API_VERSION}, 'parameters.kind: required, must be "NxConfig"'),
        (
            {"apiVersion": API_VERSION, "kind": "GpuConfig"},
            'parameters.kind: must be "NxConfig", got "GpuConfig"',
        ),
        (params(verbos=1), 'parameters.verbos: unknown field, did you mean "verbose"?'),
        (params(zzz=1), "parameters.zzz: unknown field (known: apiVersion, kind, typeSelector"),
        (params(verbose="x"), 'parameters.verbose: must be an integer 0..255, got "x"'),
        (params(verbose=True), "parameters.verbose: must be an integer 0..255, got true"),
        (params(verbose=1.0), "parameters.verbose: must be an integer 0..255, got 1.0"),
        (params(verbose=-1), "parameters.verbose: must be an integer 0..255, got -1"),
        (params(verbose=256), "parameters.verbose: must be an integer 0..255, got 256"),
        (params(verbose=None), "parameters.verbose: must be an integer 0..255, got null"),
        (params(trace=32), "parameters.trace: must be an integer 0..31, got 32"),
        (params(trace=False), "parameters.trace: must be an integer 0..31, got false"),
        (
            params(typeSelector="NX"),
            'parameters.typeSelector: must be one of "auto", "software", "nx", "mixed", got "NX"',
        ),
        (params(typeSelector=2), "parameters.typeSelector: must be one of"),
        (
            params(compMode="mixed"),
            'parameters.compMode: must be one of "auto", "software", "nx", got "mixed"',
        ),
        (params(decMode=None), "parameters.decMode: must be one of"),
        (params(logFile="nx.log"), "parameters.logFile: must be an absolute path"),
        (params(logFile="/tmp/a\nb"), "parameters.logFile: must be an absolute path"),
        (params(logFile="/" + "a" * 4096), "parameters.logFile: must be an absolute path"),
        (params(configFile=5), "parameters.configFile: must be an absolute path"),
        (
            params(defaultBufferSize=4096),
            "parameters.defaultBufferSize: must be an integer 65536..8388608, got 4096",
        ),
        (
            params(defaultBufferSize=16 * 1024 * 1024),
            "parameters.defaultBufferSize: must be an integer 65536..8388608",
        ),
        (params(defaultBufferSize="1MiB"), "parameters.defaultBufferSize: must be an integer"),
        (params(dhtConfig="both"), 'parameters.dhtConfig: must be one of "literals"'),
        (params(strategy=0), 'parameters.strategy: must be one of "fixed", "dynamic", got 0'),
        (params(mlockCsb=1), "parameters.mlockCsb: must be true or false, got 1"),
        (params(mlockCsb="true"), 'parameters.mlockCsb: must be true or false, got "true"'),
        (params(timeoutPgfaults=0), "parameters.timeoutPgfaults: must be an integer 1..86400"),
        (
            params(typeSelector="nx", compMode="software"),
            "parameters.compMode: cannot be set together with typeSelector",
        ),
        (
            params(typeSelector="nx", decMode="software"),
            "parameters.decMode: cannot be set together with typeSelector",
        ),
    ],
)
def test_invalid_parameters_are_rejected_naming_the_field(obj: Any, message: str) -> None:
    with pytest.raises(NxConfigError) as excinfo:
        decode_nx_config(obj)
    assert str(excinfo.value).startswith(message)


def test_error_messages_start_with_the_callers_path() -> None:
    with pytest.raises(NxConfigError, match=r"^spec\.config\[2\]\.parameters\.verbose: "):
        decode_nx_config(params(verbose="x"), path="spec.config[2].parameters")


def test_long_values_are_shortened_in_error_messages() -> None:
    with pytest.raises(NxConfigError) as excinfo:
        decode_nx_config(params(strategy="x" * 500))
    assert len(str(excinfo.value)) < 200


def test_nxconfigerror_is_a_valueerror() -> None:
    assert issubclass(NxConfigError, ValueError)


@pytest.mark.parametrize(
    ("field", "value", "env", "expected"),
    [
        ("typeSelector", "auto", "NX_GZIP_TYPE_SELECTOR", "0"),
        ("typeSelector", "software", "NX_GZIP_TYPE_SELECTOR", "1"),
        ("typeSelector", "nx", "NX_GZIP_TYPE_SELECTOR", "2"),
        ("typeSelector", "mixed", "NX_GZIP_TYPE_SELECTOR", "3"),
        ("compMode", "nx", "NX_GZIP_COMP_MODE", "2"),
        ("decMode", "software", "NX_GZIP_DEC_MODE", "1"),
        ("verbose", 2, "NX_GZIP_VERBOSE", "2"),
        ("trace", 8, "NX_GZIP_TRACE", "8"),
        ("logFile", "/var/log/nx.log", "NX_GZIP_LOGFILE", "/var/log/nx.log"),
        ("configFile", "/etc/nx.conf", "NX_GZIP_CONFIG", "/etc/nx.conf"),
        ("defaultBufferSize", 1048576, "NX_GZIP_DEF_BUF_SIZE", "1048576"),
        ("dhtConfig", "literals", "NX_GZIP_DHT_CONFIG", "0"),
        ("dhtConfig", "literalsAndLengths", "NX_GZIP_DHT_CONFIG", "1"),
        ("strategy", "fixed", "NX_GZIP_STRATEGY", "0"),
        ("strategy", "dynamic", "NX_GZIP_STRATEGY", "1"),
        ("mlockCsb", True, "NX_GZIP_MLOCK_CSB", "1"),
        ("mlockCsb", False, "NX_GZIP_MLOCK_CSB", "0"),
        ("timeoutPgfaults", 600, "NX_GZIP_TIMEOUT_PGFAULTS", "600"),
    ],
)
def test_each_field_becomes_its_libnxz_variable(
    field: str, value: Any, env: str, expected: str
) -> None:
    assert nx_config_env(decode_nx_config(params(**{field: value})))[env] == expected


def test_the_log_goes_to_stderr_unless_configured() -> None:
    assert nx_config_env(NxConfig()) == {"NX_GZIP_LOGFILE": DEFAULT_LOG_FILE}


def test_unset_fields_produce_no_variables() -> None:
    assert set(nx_config_env(NxConfig(verbose=1))) == {"NX_GZIP_LOGFILE", "NX_GZIP_VERBOSE"}


def test_environment_is_sorted_by_name() -> None:
    env = nx_config_env(NxConfig(verbose=1, trace=1, strategy="fixed", comp_mode="nx"))
    assert list(env) == sorted(env)


def test_merging_nothing_gives_the_empty_config() -> None:
    assert merge_nx_configs([]) == NxConfig()


def test_a_later_config_wins_for_the_fields_it_sets() -> None:
    merged = merge_nx_configs([NxConfig(verbose=1, trace=8), NxConfig(verbose=2)])
    assert merged == NxConfig(verbose=2, trace=8)


def test_fields_only_an_earlier_config_sets_are_kept() -> None:
    merged = merge_nx_configs([NxConfig(strategy="fixed"), NxConfig(), NxConfig(verbose=0)])
    assert merged == NxConfig(strategy="fixed", verbose=0)


def test_a_later_type_selector_replaces_earlier_per_direction_modes() -> None:
    merged = merge_nx_configs(
        [NxConfig(comp_mode="nx", dec_mode="software"), NxConfig(type_selector="auto")]
    )
    assert merged == NxConfig(type_selector="auto")


def test_a_later_per_direction_mode_replaces_an_earlier_type_selector() -> None:
    merged = merge_nx_configs([NxConfig(type_selector="nx"), NxConfig(dec_mode="software")])
    assert merged == NxConfig(dec_mode="software")


def test_per_direction_modes_from_different_configs_combine() -> None:
    merged = merge_nx_configs([NxConfig(comp_mode="nx"), NxConfig(dec_mode="software")])
    assert merged == NxConfig(comp_mode="nx", dec_mode="software")


def test_the_field_table_describes_every_nxconfig_attribute_once() -> None:
    attrs = [f.attr for f in NX_CONFIG_FIELDS]
    settings = [f.name for f in dataclasses.fields(NxConfig) if f.name != "notes"]
    assert sorted(attrs) == sorted(settings)
    assert len({f.name for f in NX_CONFIG_FIELDS}) == len(NX_CONFIG_FIELDS)


def test_the_field_table_documents_name_type_env_and_meaning() -> None:
    for f in NX_CONFIG_FIELDS:
        assert f.env.startswith("NX_GZIP_")
        assert f.type and f.meaning and f.default
        assert f.name[0].islower() and "_" not in f.name


# --- IBM's driver's NxConfig: accepted, without effect -----------------------------------

IBM_HEADER = {"apiVersion": IBM_API_VERSION, "kind": KIND}


@pytest.mark.parametrize(
    "sharing",
    [
        {"strategy": "TimeSlicing"},
        {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Default"}},
        {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Short"}},
        {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Medium"}},
        {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
        {"strategy": "SpacePartitioning"},
        {"strategy": "SpacePartitioning", "spacePartitioningConfig": {"partitionCount": 4}},
        {"strategy": "SpacePartitioning", "spacePartitioningConfig": {"partitionCount": 0}},
    ],
)
def test_ibm_sharing_configs_are_accepted_and_set_nothing(sharing: dict[str, Any]) -> None:
    cfg = decode_nx_config({**IBM_HEADER, "sharing": sharing})
    assert cfg == NxConfig()
    assert nx_config_env(cfg) == nx_config_env(NxConfig())  # nothing reaches the container


def test_ibm_sharing_is_noted_as_without_effect_and_credits_named_instead() -> None:
    cfg = decode_nx_config(
        {
            **IBM_HEADER,
            "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Long"}},
        }
    )
    (note,) = cfg.notes
    assert note.startswith("parameters.sharing (TimeSlicing, interval Long) has no effect")
    assert "credits" in note


def test_an_ibm_config_without_sharing_is_accepted_without_a_note() -> None:
    assert decode_nx_config(dict(IBM_HEADER)).notes == ()
    assert decode_nx_config({**IBM_HEADER, "sharing": None}).notes == ()


def test_ibm_configs_merge_with_ours_and_only_ours_take_effect() -> None:
    ibm = decode_nx_config({**IBM_HEADER, "sharing": {"strategy": "SpacePartitioning"}})
    ours = decode_nx_config(params(verbose=1))
    assert merge_nx_configs([ibm, ours]) == NxConfig(verbose=1)
    assert merge_nx_configs([ours, ibm]) == NxConfig(verbose=1)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            {**IBM_HEADER, "sharing": {"strategy": "RoundRobin"}},
            'parameters.sharing.strategy: must be one of "TimeSlicing", "SpacePartitioning"',
        ),
        ({**IBM_HEADER, "sharing": {}}, "parameters.sharing.strategy: must be one of"),
        ({**IBM_HEADER, "sharing": "TimeSlicing"}, "parameters.sharing: must be an object"),
        (
            {
                **IBM_HEADER,
                "sharing": {"strategy": "TimeSlicing", "timeSlicingConfig": {"interval": "Tiny"}},
            },
            'parameters.sharing.timeSlicingConfig.interval: must be one of "Default"',
        ),
        (
            {
                **IBM_HEADER,
                "sharing": {
                    "strategy": "TimeSlicing",
                    "spacePartitioningConfig": {"partitionCount": 2},
                },
            },
            'parameters.sharing.spacePartitioningConfig: cannot be used with strategy "TimeSlicing"',
        ),
        (
            {
                **IBM_HEADER,
                "sharing": {
                    "strategy": "SpacePartitioning",
                    "timeSlicingConfig": {"interval": "Long"},
                },
            },
            "parameters.sharing.timeSlicingConfig: cannot be used with strategy",
        ),
        (
            {
                **IBM_HEADER,
                "sharing": {
                    "strategy": "SpacePartitioning",
                    "spacePartitioningConfig": {"partitionCount": -1},
                },
            },
            "parameters.sharing.spacePartitioningConfig.partitionCount: must be an integer >= 0",
        ),
        (
            {
                **IBM_HEADER,
                "sharing": {
                    "strategy": "SpacePartitioning",
                    "spacePartitioningConfig": {"partitionCount": "2"},
                },
            },
            "parameters.sharing.spacePartitioningConfig.partitionCount: must be an integer",
        ),
        (
            {**IBM_HEADER, "sharing": {"strategy": "TimeSlicing", "timeslicingConfig": {}}},
            "parameters.sharing.timeslicingConfig: unknown field of IBM's",
        ),
        ({**IBM_HEADER, "verbose": 1}, "parameters.verbose: unknown field of IBM's"),
        (
            {"apiVersion": "device.power.ibm.com/v1", "kind": KIND},
            f'parameters.apiVersion: must be "{API_VERSION}", got "device.power.ibm.com/v1"',
        ),
        (
            {"apiVersion": IBM_API_VERSION, "kind": "GpuConfig"},
            'parameters.kind: must be "NxConfig", got "GpuConfig"',
        ),
        (
            params(sharing={"strategy": "TimeSlicing"}),
            f'parameters.sharing: not a field of "{API_VERSION}" NxConfig; it belongs to IBM',
        ),
    ],
)
def test_invalid_ibm_configs_are_rejected_naming_the_field(obj: Any, message: str) -> None:
    with pytest.raises(NxConfigError) as excinfo:
        decode_nx_config(obj)
    assert str(excinfo.value).startswith(message), str(excinfo.value)
