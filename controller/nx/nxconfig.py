# SPDX-License-Identifier: Apache-2.0
"""The `NxConfig` opaque parameters: one strict decoder for plugin and controller.

A claim or a DeviceClass carries libnxz settings as opaque parameters:

    apiVersion: nx.device.power.ibm.com/v1alpha1
    kind: NxConfig
    typeSelector: nx
    verbose: 1

Each field becomes one `NX_GZIP_*` environment variable in the container
(libnxz reads its configuration from the environment, see libnxz/power-gzip
`lib/nx_zlib.c`). The decoder rejects anything it does not understand, naming
the field, so a typo fails the claim with a clear message instead of being
silently ignored by libnxz.

IBM's Go driver, which this one replaces, took its own NxConfig:

    apiVersion: device.power.ibm.com/v1alpha1
    kind: NxConfig
    sharing: {strategy: TimeSlicing, timeSlicingConfig: {interval: Long}}

Claims and templates written for it keep working: the decoder accepts that
apiVersion with exactly IBM's schema (checked as strictly as IBM's decoder
did), and returns a note saying that `sharing` has no effect here, where
NX-gzip is shared by credits. None of it reaches the container.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

API_VERSION = "nx.device.power.ibm.com/v1alpha1"
KIND = "NxConfig"
# IBM's driver's NxConfig (group device.power.ibm.com): accepted, without effect.
IBM_API_VERSION = "device.power.ibm.com/v1alpha1"
IBM_SHARING_STRATEGIES = ("TimeSlicing", "SpacePartitioning")
IBM_TIME_SLICE_INTERVALS = ("Default", "Short", "Medium", "Long")

# libnxz logs to /tmp/nx.log by default, which fails on a read-only root
# filesystem; stderr always works and ends up in the container log.
DEFAULT_LOG_FILE = "/dev/stderr"

# Engine selection as libnxz numbers it (lib/nx_zlib.h GZIP_AUTO..GZIP_MIX).
TYPE_SELECTOR_VALUES: Mapping[str, int] = {"auto": 0, "software": 1, "nx": 2, "mixed": 3}
# NX_GZIP_COMP_MODE / NX_GZIP_DEC_MODE accept only 0..2: "mixed" is not a mode
# of one direction.
MODE_VALUES: Mapping[str, int] = {"auto": 0, "software": 1, "nx": 2}
# Bit 0 of NX_GZIP_DHT_CONFIG picks which symbols the dynamic Huffman table
# search scans (lib/nx_dht.c); the other bits are unused.
DHT_CONFIG_VALUES: Mapping[str, int] = {"literals": 0, "literalsAndLengths": 1}
# NX_GZIP_STRATEGY: 0 is fixed Huffman (Z_FIXED), 1 dynamic Huffman (default).
STRATEGY_VALUES: Mapping[str, int] = {"fixed": 0, "dynamic": 1}

VERBOSE_MAX = 255
TRACE_MAX = 0x1F
# libnxz clamps the deflate buffer to [page size, 8 MiB]; Power pages are 64 KiB.
BUFFER_SIZE_MIN = 64 * 1024
BUFFER_SIZE_MAX = 8 * 1024 * 1024
TIMEOUT_PGFAULTS_MAX = 24 * 60 * 60
PATH_MAX = 4096


class NxConfigError(ValueError):
    """Opaque parameters that are not a valid NxConfig.

    The message starts with the path of the offending field, for example
    `parameters.verbose: must be an integer 0..255, got "x"`.
    """


@dataclass(frozen=True)
class NxConfig:
    """Decoded NxConfig; `None` means "not set" (libnxz keeps its default)."""

    type_selector: str | None = None
    comp_mode: str | None = None
    dec_mode: str | None = None
    verbose: int | None = None
    trace: int | None = None
    log_file: str | None = None
    config_file: str | None = None
    default_buffer_size: int | None = None
    dht_config: str | None = None
    strategy: str | None = None
    mlock_csb: bool | None = None
    timeout_pgfaults: int | None = None
    # Settings accepted without effect (IBM's `sharing`), one message each.
    notes: tuple[str, ...] = field(default=(), compare=False)


def _show(value: Any) -> str:
    """A value as the user wrote it (JSON), shortened for error messages."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _enum(choices: Mapping[str, int]) -> Callable[[Any, str], Any]:
    def decode(value: Any, path: str) -> Any:
        if not isinstance(value, str) or value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            raise NxConfigError(f"{path}: must be one of {allowed}, got {_show(value)}")
        return value

    return decode


def _int_range(low: int, high: int) -> Callable[[Any, str], Any]:
    def decode(value: Any, path: str) -> Any:
        # bool is a subclass of int in Python, but `true` is not a number in JSON.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise NxConfigError(f"{path}: must be an integer {low}..{high}, got {_show(value)}")
        return value

    return decode


def _bool(value: Any, path: str) -> Any:
    if not isinstance(value, bool):
        raise NxConfigError(f"{path}: must be true or false, got {_show(value)}")
    return value


def _absolute_path(value: Any, path: str) -> Any:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) > PATH_MAX
        or any(c in value for c in "\0\n")
    ):
        raise NxConfigError(
            f"{path}: must be an absolute path in the container (starting with /), "
            f"got {_show(value)}"
        )
    return value


def _number(choices: Mapping[str, int]) -> Callable[[Any], str]:
    return lambda value: str(choices[value])


def _decimal(value: Any) -> str:
    return str(int(value))


def _text(value: Any) -> str:
    return str(value)


def _flag(value: Any) -> str:
    return "1" if value else "0"


@dataclass(frozen=True)
class NxConfigField:
    """One NxConfig field: its JSON name, type, environment variable and meaning.

    `NX_CONFIG_FIELDS` lists them all; the README renders that list.
    """

    name: str
    type: str
    env: str
    meaning: str
    default: str
    attr: str = field(repr=False)
    decode: Callable[[Any, str], Any] = field(repr=False, compare=False)
    to_env: Callable[[Any], str] = field(repr=False, compare=False)


NX_CONFIG_FIELDS: tuple[NxConfigField, ...] = (
    NxConfigField(
        name="typeSelector",
        type='"auto" | "software" | "nx" | "mixed"',
        env="NX_GZIP_TYPE_SELECTOR",
        meaning=(
            "Which engine compresses and decompresses: auto (NX unless the input is small), "
            "software (zlib), nx, or mixed (NX compresses, zlib decompresses). "
            "Cannot be combined with compMode/decMode."
        ),
        default="auto",
        attr="type_selector",
        decode=_enum(TYPE_SELECTOR_VALUES),
        to_env=_number(TYPE_SELECTOR_VALUES),
    ),
    NxConfigField(
        name="compMode",
        type='"auto" | "software" | "nx"',
        env="NX_GZIP_COMP_MODE",
        meaning="Engine for compression only (libnxz ignores it when typeSelector is set).",
        default="auto",
        attr="comp_mode",
        decode=_enum(MODE_VALUES),
        to_env=_number(MODE_VALUES),
    ),
    NxConfigField(
        name="decMode",
        type='"auto" | "software" | "nx"',
        env="NX_GZIP_DEC_MODE",
        meaning="Engine for decompression only (libnxz ignores it when typeSelector is set).",
        default="auto",
        attr="dec_mode",
        decode=_enum(MODE_VALUES),
        to_env=_number(MODE_VALUES),
    ),
    NxConfigField(
        name="verbose",
        type=f"integer 0..{VERBOSE_MAX}",
        env="NX_GZIP_VERBOSE",
        meaning="Log level: 0 errors, 1 also warnings, 2 also information (higher logs as 2).",
        default="0",
        attr="verbose",
        decode=_int_range(0, VERBOSE_MAX),
        to_env=_decimal,
    ),
    NxConfigField(
        name="trace",
        type=f"integer 0..{TRACE_MAX} (bit mask)",
        env="NX_GZIP_TRACE",
        meaning=(
            "Trace bits: 1 logic, 2 hardware calls, 4 software calls, 8 statistics, "
            "16 per-stream statistics."
        ),
        default="0",
        attr="trace",
        decode=_int_range(0, TRACE_MAX),
        to_env=_decimal,
    ),
    NxConfigField(
        name="logFile",
        type="absolute path",
        env="NX_GZIP_LOGFILE",
        meaning=(
            "Where libnxz logs. The driver always sets it (default stderr) because libnxz's "
            "own default, /tmp/nx.log, fails on read-only root filesystems."
        ),
        default=DEFAULT_LOG_FILE,
        attr="log_file",
        decode=_absolute_path,
        to_env=_text,
    ),
    NxConfigField(
        name="configFile",
        type="absolute path",
        env="NX_GZIP_CONFIG",
        meaning="libnxz configuration file to read (settings from the environment win).",
        default="./nx-zlib.conf",
        attr="config_file",
        decode=_absolute_path,
        to_env=_text,
    ),
    NxConfigField(
        name="defaultBufferSize",
        type=f"integer {BUFFER_SIZE_MIN}..{BUFFER_SIZE_MAX} (bytes)",
        env="NX_GZIP_DEF_BUF_SIZE",
        meaning="Size of the deflate stream buffer.",
        default="1048576",
        attr="default_buffer_size",
        decode=_int_range(BUFFER_SIZE_MIN, BUFFER_SIZE_MAX),
        to_env=_decimal,
    ),
    NxConfigField(
        name="dhtConfig",
        type='"literals" | "literalsAndLengths"',
        env="NX_GZIP_DHT_CONFIG",
        meaning="Symbols the dynamic Huffman table search scans.",
        default="literals",
        attr="dht_config",
        decode=_enum(DHT_CONFIG_VALUES),
        to_env=_number(DHT_CONFIG_VALUES),
    ),
    NxConfigField(
        name="strategy",
        type='"fixed" | "dynamic"',
        env="NX_GZIP_STRATEGY",
        meaning="Huffman coding NX uses to compress: fixed or dynamic tables.",
        default="dynamic",
        attr="strategy",
        decode=_enum(STRATEGY_VALUES),
        to_env=_number(STRATEGY_VALUES),
    ),
    NxConfigField(
        name="mlockCsb",
        type="boolean",
        env="NX_GZIP_MLOCK_CSB",
        meaning="Lock the NX request and status blocks in memory (avoids page faults).",
        default="false",
        attr="mlock_csb",
        decode=_bool,
        to_env=_flag,
    ),
    NxConfigField(
        name="timeoutPgfaults",
        type=f"integer 1..{TIMEOUT_PGFAULTS_MAX} (seconds)",
        env="NX_GZIP_TIMEOUT_PGFAULTS",
        meaning="How long libnxz retries a job that keeps hitting page faults.",
        default="300",
        attr="timeout_pgfaults",
        decode=_int_range(1, TIMEOUT_PGFAULTS_MAX),
        to_env=_decimal,
    ),
)

_FIELDS_BY_NAME = {f.name: f for f in NX_CONFIG_FIELDS}
_HEADER_FIELDS = ("apiVersion", "kind")
# The attributes of one "which engine" choice: setting one side clears the
# other when configs merge, because libnxz never reads both.
_SELECTOR_ATTRS = ("type_selector",)
_MODE_ATTRS = ("comp_mode", "dec_mode")


def decode_nx_config(obj: Any, *, path: str = "parameters") -> NxConfig:
    """Decode and validate one NxConfig from opaque parameters.

    `obj` is the `parameters` object of an opaque device configuration for
    this driver; `path` prefixes field names in error messages.

    Raises:
        NxConfigError: naming the first invalid field: not an object, wrong
            apiVersion or kind, unknown field, wrong type or value out of range.
    """
    if not isinstance(obj, Mapping):
        raise NxConfigError(f"{path}: must be an object, got {_show(obj)}")
    if "apiVersion" not in obj:
        raise NxConfigError(f'{path}.apiVersion: required, must be "{API_VERSION}"')
    if obj["apiVersion"] not in (API_VERSION, IBM_API_VERSION):
        raise NxConfigError(
            f'{path}.apiVersion: must be "{API_VERSION}", got {_show(obj["apiVersion"])} '
            f'("{IBM_API_VERSION}", the NxConfig of IBM\'s earlier driver, is accepted too)'
        )
    if "kind" not in obj:
        raise NxConfigError(f'{path}.kind: required, must be "{KIND}"')
    if obj["kind"] != KIND:
        raise NxConfigError(f'{path}.kind: must be "{KIND}", got {_show(obj["kind"])}')
    if obj["apiVersion"] == IBM_API_VERSION:
        return _decode_ibm_nx_config(obj, path)
    values: dict[str, Any] = {}
    for key, value in obj.items():
        if key in _HEADER_FIELDS:
            continue
        spec = _FIELDS_BY_NAME.get(key)
        if spec is None:
            if key == "sharing":
                raise NxConfigError(
                    f'{path}.sharing: not a field of "{API_VERSION}" NxConfig; it belongs to '
                    f'IBM\'s "{IBM_API_VERSION}" NxConfig and has no effect with this driver, '
                    "which shares NX-gzip by credits: remove it"
                )
            raise NxConfigError(f"{path}.{key}: {_unknown_field_hint(key)}")
        values[spec.attr] = spec.decode(value, f"{path}.{key}")
    if "type_selector" in values:
        for attr in _MODE_ATTRS:
            if attr in values:
                name = next(f.name for f in NX_CONFIG_FIELDS if f.attr == attr)
                raise NxConfigError(
                    f"{path}.{name}: cannot be set together with typeSelector "
                    "(libnxz ignores compMode and decMode when typeSelector is set)"
                )
    return NxConfig(**values)


def _check_keys(obj: Mapping[str, Any], path: str, allowed: Sequence[str], what: str) -> None:
    for key in obj:
        if key not in allowed:
            known = ", ".join(allowed)
            raise NxConfigError(f"{path}.{key}: unknown field of {what} (known: {known})")


def _decode_ibm_nx_config(obj: Mapping[str, Any], path: str) -> NxConfig:
    """IBM's NxConfig: validated as its driver did, then noted as without effect."""
    what = f"IBM's {IBM_API_VERSION} NxConfig"
    _check_keys(obj, path, (*_HEADER_FIELDS, "sharing"), what)
    sharing = obj.get("sharing")
    if sharing is None:  # IBM's driver defaulted it; nothing was asked for
        return NxConfig()
    where = f"{path}.sharing"
    if not isinstance(sharing, Mapping):
        raise NxConfigError(f"{where}: must be an object, got {_show(sharing)}")
    _check_keys(sharing, where, ("strategy", "timeSlicingConfig", "spacePartitioningConfig"), what)
    strategy = sharing.get("strategy")
    if strategy not in IBM_SHARING_STRATEGIES:
        allowed = ", ".join(f'"{s}"' for s in IBM_SHARING_STRATEGIES)
        raise NxConfigError(f"{where}.strategy: must be one of {allowed}, got {_show(strategy)}")
    own, other = (
        ("timeSlicingConfig", "spacePartitioningConfig")
        if strategy == "TimeSlicing"
        else ("spacePartitioningConfig", "timeSlicingConfig")
    )
    if sharing.get(other) is not None:
        raise NxConfigError(f'{where}.{other}: cannot be used with strategy "{strategy}"')
    settings = sharing.get(own)
    detail = ""
    if settings is not None:
        if not isinstance(settings, Mapping):
            raise NxConfigError(f"{where}.{own}: must be an object, got {_show(settings)}")
        if own == "timeSlicingConfig":
            _check_keys(settings, f"{where}.{own}", ("interval",), what)
            interval = settings.get("interval", "Default")
            if interval not in IBM_TIME_SLICE_INTERVALS:
                allowed = ", ".join(f'"{i}"' for i in IBM_TIME_SLICE_INTERVALS)
                raise NxConfigError(
                    f"{where}.{own}.interval: must be one of {allowed}, got {_show(interval)}"
                )
            detail = f", interval {interval}"
        else:
            _check_keys(settings, f"{where}.{own}", ("partitionCount",), what)
            count = settings.get("partitionCount", 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise NxConfigError(
                    f"{where}.{own}.partitionCount: must be an integer >= 0, got {_show(count)}"
                )
            detail = f", {count} partitions"
    note = (
        f"{where} ({strategy}{detail}) has no effect with this driver: NX-gzip is shared by "
        "credits (one per claim by default; ask for more with a capacity request, "
        "`capacity: {requests: {credits: N}}`), not by time slices or partitions; "
        f"remove sharing, or use apiVersion {API_VERSION} for libnxz settings"
    )
    return NxConfig(notes=(note,))


def _unknown_field_hint(key: Any) -> str:
    import difflib  # only for a config that names an unknown field

    known = [*_HEADER_FIELDS, *_FIELDS_BY_NAME]
    close = difflib.get_close_matches(str(key), known, n=1)
    if close:
        return f'unknown field, did you mean "{close[0]}"?'
    return "unknown field (known: " + ", ".join(known) + ")"


def merge_nx_configs(configs: Sequence[NxConfig]) -> NxConfig:
    """Merge configs in order: for every field, the last config that sets it wins.

    Class configs come first and claim configs last, so a claim overrides its
    class. typeSelector and compMode/decMode are one choice: a later config
    setting either side replaces what an earlier one set on the other side.
    """
    merged = NxConfig()
    for cfg in configs:
        changes = {f.attr: getattr(cfg, f.attr) for f in NX_CONFIG_FIELDS}
        changes = {attr: value for attr, value in changes.items() if value is not None}
        if any(attr in changes for attr in _SELECTOR_ATTRS):
            changes.update({attr: changes.get(attr) for attr in _MODE_ATTRS})
        elif any(attr in changes for attr in _MODE_ATTRS):
            changes.update({attr: None for attr in _SELECTOR_ATTRS})
        merged = replace(merged, **changes)
    return merged


def nx_config_env(cfg: NxConfig) -> dict[str, str]:
    """The container environment for a (merged) NxConfig, sorted by name.

    Unset fields produce no variable, except the log file, which always
    defaults to stderr.
    """
    env: dict[str, str] = {}
    for spec in NX_CONFIG_FIELDS:
        value = getattr(cfg, spec.attr)
        if value is None and spec.attr == "log_file":
            value = DEFAULT_LOG_FILE
        if value is not None:
            env[spec.env] = spec.to_env(value)
    return dict(sorted(env.items()))
