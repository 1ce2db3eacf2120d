"""Config: every section typed, unknown keys and wrong types fail with `section.key: message`."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loradeploy.config import config_from_dict, load_config, parse_adapter_source
from loradeploy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MIN = {"models": {"majora": {"base_model": "/m/base", "adapter": "/a/majora", "port": 5000}}}


def with_(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(MIN))
    cur = data
    keys = path.split(".")
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return data


def test_example_config_loads_with_three_models(monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    cfg = load_config(REPO / "examples" / "deployment_config.yaml")
    assert {n: m.port for n, m in cfg.models.items()} == {"majora": 5000, "nayru": 5001, "veran": 5002}
    assert cfg.models["nayru"].adapter_source.kind == "ssh"
    assert cfg.models["nayru"].adapter_source.port == 22345
    assert cfg.models["majora"].adapter_source.kind == "vast"
    assert cfg.quantization.primary == "Q4_K_M"
    # relative paths resolve against the config's folder
    assert cfg.logging.log_dir == REPO / "examples" / "logs"
    assert Path(cfg.models["veran"].adapter) == REPO / "examples" / "adapters" / "veran"


def test_defaults_fill_every_section():
    cfg = config_from_dict(MIN)
    assert cfg.pipeline.stages[0] == "fetch" and cfg.pipeline.stages[-1] == "evaluate"
    assert cfg.vast.host_key_policy == "strict"
    assert cfg.quantization.formats == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    assert cfg.deployment.targets == ["llamacpp"]


@pytest.mark.parametrize("path,value,expect", [
    ("models.majora.portt", 1, "models.majora.portt: unknown key"),
    ("merge.stratgy", "peft", "merge.stratgy: unknown key"),
    ("models.majora.port", "fivethousand", "models.majora.port:"),
    ("models.majora.port", 80, "models.majora.port:"),
    ("quantization.formats", ["Q4_K_X"], "unknown llama.cpp quantization type 'Q4_K_X'"),
    ("quantization.primary_format", "Q6_K", "primary_format Q6_K is not one of formats"),
    ("merge.strategy", "magic", "merge.strategy:"),
    ("vast.host_key_policy", "yolo", "vast.host_key_policy:"),
    ("vast.remote_output_dir", "workspace/output", "must be an absolute path"),
    ("notifications.slack", {"webhook_url": "not a url"}, "notifications.slack.webhook_url: must be an http(s) URL"),
    ("models.majora.adapter", "ftp://x/y", "unsupported adapter source"),
    ("models.majora.adapter", "vast://nobox", "vast instance 'nobox'"),
    ("pipeline.stages", ["merge", "polish"], "pipeline.stages.1:"),
    ("logging.level", "LOUD", "logging.level:"),
])
def test_bad_values_name_the_key(path, value, expect):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(with_(path, value))
    assert expect in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"models\.majora\.port: required key is missing"):
        config_from_dict({"models": {"majora": {"base_model": "/b", "adapter": "/a"}}})
    with pytest.raises(ConfigError, match=r"models: required key is missing"):
        config_from_dict({"merge": {}})


def test_duplicate_ports_rejected():
    data = with_("models.nayru", {"base_model": "/b", "adapter": "/a", "port": 5000})
    with pytest.raises(ConfigError, match="5000 is already used by model majora"):
        config_from_dict(data)


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("HOOK", "https://hooks.slack.com/services/T/B/SECRET")
    cfg = config_from_dict(with_("notifications.slack", {"webhook_url": "${HOOK}"}))
    assert cfg.notifications.slack.webhook_url.endswith("/SECRET")
    cfg = config_from_dict(with_("vast.api_key", "${NOPE_UNSET:-fallback}"))
    assert cfg.vast.api_key == "fallback"
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    with pytest.raises(ConfigError, match="vast.api_key: environment variable NOPE_UNSET is not set"):
        config_from_dict(with_("vast.api_key", "${NOPE_UNSET}"))


def test_config_is_frozen():
    cfg = config_from_dict(MIN)
    with pytest.raises(Exception):
        cfg.merge.strategy = "peft"


def test_adapter_sources():
    s = parse_adapter_source("ssh://root@10.0.0.5:2222/workspace/output/run1")
    assert (s.kind, s.user, s.host, s.port, s.path) == ("ssh", "root", "10.0.0.5", 2222, "/workspace/output/run1")
    v = parse_adapter_source("vast://123456/run-7")
    assert (v.kind, v.instance, v.path) == ("vast", "123456", "run-7")
    assert parse_adapter_source("vast://123456").path == ""
    with pytest.raises(ValueError):
        parse_adapter_source("ssh://host-without-path")


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("models:\n  majora: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_cli_validate_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MIN))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("merge.oops", 1)))
    exe = [sys.executable, "-m", "loradeploy.cli"]
    ok = subprocess.run([*exe, "config", "validate", "-c", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "majora (port 5000)" in ok.stdout
    no = subprocess.run([*exe, "config", "validate", "-c", str(bad)], capture_output=True, text=True)
    assert no.returncode == 2
    assert "merge.oops: unknown key" in no.stderr
    assert "Traceback" not in no.stderr


# ----------------------------------------------------------------------------- notifications

class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def config_log():
    log = logging.getLogger("loradeploy.config")
    h = _Lines()
    log.addHandler(h)
    yield h
    log.removeHandler(h)


HOOK = {"webhook_url": "https://hooks.slack.com/services/T0/B0/tok"}


def test_notifications_master_switch_defaults_on(config_log):
    cfg = config_from_dict(with_("notifications.slack", HOOK))
    assert cfg.notifications.enabled is True
    assert cfg.notifications.active() == ["slack"]
    assert cfg.warnings == () and config_log.lines == []
    assert config_from_dict(MIN).notifications.active() == []  # nothing configured, nothing sent


def test_channel_switched_off_on_its_own():
    cfg = config_from_dict(with_("notifications.slack", {**HOOK, "enabled": False}))
    assert cfg.notifications.active() == [] and cfg.warnings == ()


def test_channels_configured_while_notifications_off_warn_at_load(config_log):
    data = with_("notifications", {"enabled": False, "slack": HOOK,
                                   "email": {"smtp_host": "mail", "from_addr": "a@x", "to_addrs": ["b@x"]}})
    cfg = config_from_dict(data, source="c.yaml")
    assert cfg.notifications.active() == []
    (w,) = cfg.warnings
    assert "notifications.enabled is false" in w and "slack, email" in w
    assert config_log.lines == [f"c.yaml: {w}"]
    assert config_from_dict(with_("notifications", {"enabled": False})).warnings == ()


# ----------------------------------------------------------------------------- imatrix formats

@pytest.mark.parametrize("path,value", [
    ("quantization.formats", ["Q4_K_M", "IQ2_XS"]),
    ("quantization.formats", ["IQ4_XS"]),
    ("quantization.formats", ["q2_k_s"]),
    ("models.majora.formats", ["IQ3_M"]),
    ("evaluation.formats", ["IQ1_S"]),
])
def test_formats_that_need_an_imatrix_fail_at_load(path, value):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(with_(path, value))
    msg = str(ei.value)
    assert f"{path}: " in msg and "needs an importance matrix: set quantization.imatrix: auto" in msg
    assert "Q4_K_M" in msg and "\n" not in msg


@pytest.mark.parametrize("path,value", [
    ("quantization.formats", ["Q4_K_M", "IQ2_XS"]),
    ("models.majora.formats", ["IQ3_M"]),
    ("evaluation.formats", ["IQ1_S"]),
])
@pytest.mark.parametrize("imatrix", ["auto", "imatrix.gguf"])
def test_formats_that_need_an_imatrix_load_with_one(path, value, imatrix):
    data = with_(path, value)
    data.setdefault("quantization", {})["imatrix"] = imatrix
    cfg = config_from_dict(data)
    # a relative path in a config given as data resolves against the working folder, once, at load
    assert cfg.quantization.imatrix == ("auto" if imatrix == "auto" else Path.cwd().resolve() / imatrix)


def test_quantize_cannot_be_reached_with_an_iq_format(tmp_path):
    """The only way to a Config is through validation, so `run` stops at load with exit code 2."""
    from click.testing import CliRunner

    from loradeploy.cli import main
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(with_("quantization.formats", ["IQ2_XS"])))
    r = CliRunner().invoke(main, ["run", "-c", str(path), "--only", "quantize"])
    assert r.exit_code == 2
    assert "quantization.formats: IQ2_XS needs an importance matrix" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- served ports

KEY = "sk-test-0123456789abcdef"


def test_api_key_empty_is_an_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"deployment\.llamacpp\.api_key: is empty"):
        config_from_dict(with_("deployment.llamacpp", {"api_key": ""}))
    monkeypatch.delenv("LD_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"api_key: is empty"):
        config_from_dict(with_("deployment.llamacpp", {"api_key": "${LD_UNSET_KEY:-}"}))


@pytest.mark.parametrize("key", ["s3cret\n", " s3cret", "s3 cret", "s3cr\x00et", "s3crét"])
def test_api_key_that_no_header_can_carry_is_an_error(key):
    # a trailing newline from a key file passed validate and then failed at serve start with a raw ValueError
    with pytest.raises(ConfigError, match=r"deployment\.llamacpp\.api_key: holds whitespace, a control character"):
        config_from_dict(with_("deployment.llamacpp", {"api_key": key}))


def test_non_loopback_host_needs_a_key_or_an_explicit_opt_out():
    with pytest.raises(ConfigError, match=r"deployment\.llamacpp: host '0\.0\.0\.0' is not loopback"):
        config_from_dict(with_("deployment.llamacpp", {"host": "0.0.0.0"}))
    with_key = config_from_dict(with_("deployment.llamacpp", {"host": "0.0.0.0", "api_key": KEY}))
    assert with_key.deployment.llamacpp.api_key.get_secret_value() == KEY
    open_ = config_from_dict(with_("deployment.llamacpp", {"host": "0.0.0.0", "allow_unauthenticated": True}))
    assert open_.deployment.llamacpp.api_key is None
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert config_from_dict(with_("deployment.llamacpp", {"host": host})).deployment.llamacpp.host == host


def test_secrets_never_in_repr_or_json_dump(monkeypatch):
    monkeypatch.setenv("LD_KEY", KEY)
    data = with_("deployment.llamacpp", {"host": "0.0.0.0", "api_key": "${LD_KEY}"})
    data["notifications"] = {"slack": {"webhook_url": "https://hooks.slack.com/services/T0/B0/hooktoken123"},
                             "email": {"smtp_host": "mail", "from_addr": "a@x", "to_addrs": ["b@x"],
                                       "password": "smtp-pass-123"}}
    data["vast"] = {"api_key": "vast-key-123"}
    cfg = config_from_dict(data)
    shown = repr(cfg) + str(cfg) + cfg.model_dump_json() + json.dumps(cfg.model_dump(mode="json"))
    assert KEY not in shown
    for secret in ("hooktoken123", "smtp-pass-123", "vast-key-123"):
        assert secret not in repr(cfg)


# ----------------------------------------------------------------------------- adapter mode

@pytest.mark.parametrize("where", ["deployment.mode", "models.majora.mode"])
def test_adapter_mode_is_per_model_or_global(where):
    cfg = config_from_dict(with_(where, "adapter"))
    assert cfg.mode_for("majora") == "adapter"
    assert config_from_dict(MIN).mode_for("majora") == "merged"


@pytest.mark.parametrize("key,value,expect", [
    ("deployment.llamacpp.backend", "python", "adapter mode needs deployment.llamacpp.backend: llama-server"),
    ("deployment.targets", ["llamacpp", "lmstudio"], "lmstudio cannot load a LoRA adapter at run time"),
    ("deployment.targets", ["llamacpp", "ollama"], "ollama cannot load a LoRA adapter at run time"),
    ("quantization.imatrix", "auto", "would weigh it by one adapter's calibration"),
])
def test_adapter_mode_refuses_what_it_cannot_serve(key, value, expect):
    data = with_("models.majora.mode", "adapter")
    cur = data
    *parents, last = key.split(".")
    for k in parents:
        cur = cur.setdefault(k, {})
    cur[last] = value
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data)
    msg = str(ei.value)
    assert "models.majora.mode: " in msg and expect in msg and "\n" not in msg


def test_model_samples_override_the_evaluation_samples(tmp_path):
    data = with_("models.majora.samples", "mine.jsonl")
    data["evaluation"] = {"samples": "all.jsonl"}
    cfg = config_from_dict(data, base_dir=tmp_path)
    assert cfg.samples_for("majora") == tmp_path / "mine.jsonl"
    assert config_from_dict(MIN).samples_for("majora").name == "eval_samples.jsonl"
