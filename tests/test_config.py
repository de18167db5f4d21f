"""Config loading: YAML + dotted overrides, strict unknown keys, type checks, YAML round trip."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import pytest

from jaxstack.config import ConfigError, config_to_dict, load_config, save_config


class Kind(enum.Enum):
    SFT = "sft"
    RL = "rl"


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    preset: str = "tiny"
    dtype: Literal["float32", "bfloat16"] = "float32"
    rope_scaling: dict | None = None


@dataclasses.dataclass(frozen=True)
class LoraCfg:
    rank: int = 8
    targets: tuple[str, ...] = ("q", "v")


@dataclasses.dataclass(frozen=True)
class TrainCfg:
    lr: float = 1e-3
    steps: int = 100
    batch_size: int = 8
    bf16: bool = False
    warmup: int | None = None
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


@dataclasses.dataclass(frozen=True)
class RunCfg:
    name: str = "run"
    kind: Kind = Kind.SFT
    seed: int = 0
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    train: TrainCfg = dataclasses.field(default_factory=lambda: TrainCfg(steps=50))
    lora: LoraCfg | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, int] = dataclasses.field(default_factory=dict)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_nested_overrides(tmp_path):
    path = _write(tmp_path, "seed: 3\ntrain:\n  batch_size: 4\nmodel:\n  dtype: bfloat16\n")
    cfg = load_config(
        RunCfg, path, ["train.lr=3e-4", "model.preset=qwen2.5-1.5b", "train.bf16=true", "name=007"]
    )
    assert cfg.seed == 3
    assert cfg.train == TrainCfg(lr=3e-4, steps=50, batch_size=4, bf16=True)  # keeps factory steps
    assert isinstance(cfg.train.lr, float)
    assert cfg.model == ModelCfg(preset="qwen2.5-1.5b", dtype="bfloat16")
    assert cfg.name == "007"  # str fields keep override text verbatim
    assert cfg.lora is None
    # later overrides win; Optional sections come alive through a dotted key; null clears
    cfg = load_config(RunCfg, None, ["seed=1", "seed=2", "lora.rank=16", "train.warmup=10"])
    assert cfg.seed == 2 and cfg.lora == LoraCfg(rank=16) and cfg.train.warmup == 10
    cfg = load_config(RunCfg, None, ["lora.rank=4", "lora=null", "train.warmup=null"])
    assert cfg.lora is None and cfg.train.warmup is None


def test_container_enum_literal_values():
    cfg = load_config(
        RunCfg,
        None,
        [
            "tags=[a, b]",
            "extra={x: 1, y: 2}",
            "train.betas=[0.8, 0.99]",
            "lora.targets=[q, k, v]",
            "kind=rl",
            "model.rope_scaling={factor: 8.0, rope_type: llama3}",
        ],
    )
    assert cfg.tags == ["a", "b"] and cfg.extra == {"x": 1, "y": 2}
    assert cfg.train.betas == (0.8, 0.99) and cfg.lora.targets == ("q", "k", "v")
    assert cfg.kind is Kind.RL
    assert cfg.model.rope_scaling == {"factor": 8.0, "rope_type": "llama3"}


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(RunCfg, None, ["train.lrr=1"])
    msg = str(e.value)
    assert "\n" not in msg and "'train.lrr'" in msg and "did you mean 'lr'" in msg
    assert "valid keys in 'train.': " not in msg
    assert "lr, steps, batch_size, bf16, warmup, betas" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'sed'.*top level: name, kind, seed"):
        load_config(RunCfg, _write(tmp_path, "sed: 1\n"), [])
    with pytest.raises(ConfigError, match=r"'model.size'.*valid keys in 'model': preset, dtype"):
        load_config(RunCfg, _write(tmp_path, "model:\n  size: 3\n"), [])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
        load_config(RunCfg, None, ["modle.preset=x"])
    with pytest.raises(ConfigError, match=r"'seed' is not a section"):
        load_config(RunCfg, None, ["seed.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(RunCfg, None, ["seed"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=fast", r"'train.lr': 'fast' \(expected float\)"),
        ("train.steps=1.5", r"'train.steps': 1.5 \(expected int\)"),
        ("train.bf16=1", r"'train.bf16': 1 \(expected bool\)"),
        ("train.betas=[1, 2, 3]", r"'train.betas'"),
        ("model.dtype=float16", r"'model.dtype': 'float16' \(expected one of"),
        ("kind=dpo", r"'kind': 'dpo' \(expected one of \['sft', 'rl'\]\)"),
        ("extra={x: a}", r"'extra.x': 'a' \(expected int\)"),
        ("model=tiny", r"'model' is a section"),
        ("train.steps=-1", r"invalid 'train': steps must be >= 0"),
    ],
)
def test_bad_values(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(RunCfg, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(RunCfg, _write(tmp_path, "- 1\n- 2\n"), [])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(RunCfg, str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ConfigError, match="bad YAML"):
        load_config(RunCfg, _write(tmp_path, "a: [1,\n"), [])
    with pytest.raises(ConfigError, match=r"'train' is a section"):
        load_config(RunCfg, _write(tmp_path, "train: 3\n"), [])
    assert load_config(RunCfg, _write(tmp_path, ""), []) == RunCfg()


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(
        RunCfg,
        None,
        [
            "kind=rl",
            "lora.rank=4",
            "train.betas=[0.8, 0.9]",
            "tags=[x]",
            "model.rope_scaling={a: 1}",
        ],
    )
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert load_config(RunCfg, str(path), []) == cfg
    d = config_to_dict(cfg)
    assert d["kind"] == "rl" and d["train"]["betas"] == [0.8, 0.9] and d["lora"]["rank"] == 4


def test_real_model_config():
    from jaxstack.models.llm import LLMConfig

    cfg = load_config(LLMConfig, None, ["num_layers=4", "rope_scaling={factor: 8.0}"])
    assert cfg.num_layers == 4 and cfg.rope_scaling == {"factor": 8.0}
    with pytest.raises(ConfigError, match="invalid 'LLMConfig': unknown architecture"):
        load_config(LLMConfig, None, ["architecture=gpt2"])


def test_defaults_include_order_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("name: base\nseed: 1\ntags: [a, b]\ntrain:\n  lr: 0.1\n")
    (tmp_path / "sub" / "more.yaml").write_text("seed: 2\ntrain:\n  steps: 7\n")
    (tmp_path / "job.yaml").write_text(
        "defaults: [base.yaml, sub/more.yaml]\nname: job\ntags: [c]\ntrain:\n  batch_size: 3\n"
    )
    cfg = load_config(RunCfg, str(tmp_path / "job.yaml"), ["train.lr=0.5"])
    # later includes win over earlier ones, the file over its includes, overrides over all
    assert (cfg.name, cfg.seed, cfg.tags) == ("job", 2, ["c"])  # lists replace, never append
    assert cfg.train == TrainCfg(lr=0.5, steps=7, batch_size=3)
    assert load_config(RunCfg, str(tmp_path / "job.yaml")).train.lr == 0.1


def test_defaults_nested_merge(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  preset: big\n  rope_scaling: {factor: 8.0}\n")
    (tmp_path / "b.yaml").write_text(
        "defaults: a.yaml\nmodel:\n  dtype: bfloat16\nlora:\n  rank: 4\n"
    )
    (tmp_path / "c.yaml").write_text(
        "defaults: b.yaml\nmodel:\n  rope_scaling: {type: llama3}\nlora: null\n"
    )
    cfg = load_config(RunCfg, str(tmp_path / "b.yaml"))
    assert cfg.model == ModelCfg(preset="big", dtype="bfloat16", rope_scaling={"factor": 8.0})
    assert cfg.lora == LoraCfg(rank=4)
    cfg = load_config(RunCfg, str(tmp_path / "c.yaml"))  # two levels; mappings merge key by key
    assert cfg.model.preset == "big" and cfg.model.dtype == "bfloat16"
    assert cfg.model.rope_scaling == {"factor": 8.0, "type": "llama3"}
    assert cfg.lora is None  # null replaces a whole section


def test_defaults_missing_include(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [nope.yaml]\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"a\.yaml' includes missing file '.*nope\.yaml'") as e:
        load_config(RunCfg, str(tmp_path / "a.yaml"))
    assert "\n" not in str(e.value)
    (tmp_path / "b.yaml").write_text("defaults: {x: 1}\n")
    with pytest.raises(ConfigError, match=r"bad 'defaults' in '.*b\.yaml'"):
        load_config(RunCfg, str(tmp_path / "b.yaml"))


def test_defaults_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: [c.yaml]\n")
    (tmp_path / "c.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle in '.*c\.yaml'.*a\.yaml -> .*b\.yaml"):
        load_config(RunCfg, str(tmp_path / "a.yaml"))
    (tmp_path / "d.yaml").write_text("defaults: ./d.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(RunCfg, str(tmp_path / "d.yaml"))


def test_every_config_file_parses_with_its_job_class():
    """Each configs/*.yaml builds its job's config; include-only bases through their includers."""
    import glob
    import os

    import yaml

    from jaxstack.rl.trainer import RLJobConfig
    from jaxstack.train.dit_trainer import DiTTrainConfig
    from jaxstack.train.dllm_trainer import DLLMTrainConfig
    from jaxstack.train.trainer import TrainJobConfig
    from jaxstack.train.vlm_sft import VLMSFTConfig

    classes = {
        "rl_": RLJobConfig,
        "vlm_sft": VLMSFTConfig,
        "dllm_": DLLMTrainConfig,
        "train_": TrainJobConfig,
        "dit_": DiTTrainConfig,
    }
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    raw = {os.path.basename(p): yaml.safe_load(open(p)) or {} for p in paths}
    included = set()
    for data in raw.values():
        inc = data.get("defaults", [])
        included.update(os.path.basename(i) for i in ([inc] if isinstance(inc, str) else inc))
    assert included <= set(raw), f"includes of missing files: {included - set(raw)}"
    parsed = 0
    for name in raw:
        if name in included:
            continue  # a base: parsed below through the files that include it
        cls = [c for prefix, c in classes.items() if name.startswith(prefix)]
        assert len(cls) == 1, f"configs/{name}: no job class for its name prefix"
        cfg = load_config(cls[0], os.path.join(root, name), [])
        assert cfg.name == name.removesuffix(".yaml"), name
        parsed += 1
    assert parsed >= 8
    tiny = load_config(RLJobConfig, os.path.join(root, "rl_tiny.yaml"), [])
    assert tiny == RLJobConfig()  # the file spells out the embedded default of `jaxstack rl`
    assert load_config(DiTTrainConfig, os.path.join(root, "dit_shapes_tiny.yaml")) == (
        DiTTrainConfig()
    )
    sizes = [
        load_config(RLJobConfig, os.path.join(root, f"rl_nvila_qwen2.5-{s}.yaml"))
        for s in ("1.5b", "7b")
    ]
    assert sizes[0].sft.model.name == "nvila-qwen2.5-1.5b" and sizes[1].sft.model.name == "nvila-8b"
    assert sizes[0].sft.data.num_frames == sizes[1].sft.data.num_frames == 256  # from the base
