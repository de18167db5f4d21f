"""The `jaxstack` command: bad input gives one line naming the problem (exit 2, no traceback);
a tiny train run then generation from its exported checkpoint works end to end; importing the
package parses no arguments and starts no device backend."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxstack import hf
from jaxstack.models.llm import LLMConfig, init_llm


def run_cli(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "jaxstack.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = LLMConfig(architecture="qwen2", vocab_size=263, attention_bias=True)
    hf.save_model(init_llm(cfg, seed=0), str(path))
    return path


def test_unknown_config_key(tmp_path):
    proc = run_cli("train", "optim.lrr=1", cwd=tmp_path)
    assert_one_line_error(proc, "optim.lrr")
    assert "lr" in proc.stderr  # lists the valid keys


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("train", "nope.yaml", cwd=tmp_path), "nope.yaml")


def test_generate_missing_checkpoint(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "absent"), "--tokenizer", "byte",
                   "--prompt", "hi")  # fmt: skip
    assert_one_line_error(proc, "absent")


def test_generate_truncated_safetensors(tmp_path, tiny_checkpoint):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_cli("generate", "--model", str(bad), "--tokenizer", "byte", "--prompt", "hi")
    assert_one_line_error(proc, "model.safetensors")


def test_generate_shape_mismatch(tmp_path, tiny_checkpoint):
    bad = tmp_path / "mismatch"
    bad.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    proc = run_cli("generate", "--model", str(bad), "--tokenizer", "byte", "--prompt", "hi")
    assert_one_line_error(proc, "mlp")


def test_generate_unsupported_architecture(tmp_path, tiny_checkpoint):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", str(bad), "--tokenizer", "byte", "--prompt", "hi")
    assert_one_line_error(proc, "GPT2LMHeadModel")
    assert "Qwen2ForCausalLM" in proc.stderr  # names the supported ones


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_train_then_generate_end_to_end(tmp_path):
    proc = run_cli("train", "steps=6", "checkpoint_every=3", "log_every=2", "eval=4",
                   "data.num_records=200", "output_dir=run", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy" in proc.stdout
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "hf/config.json"):
        assert (run / name).exists(), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    proc = run_cli("generate", "--model", str(run / "hf"), "--tokenizer", "byte",
                   "--prompt", "Q: 1+2=?\nA: ", "--max-new-tokens", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Q: 1+2=?")


def test_import_parses_no_arguments_and_allocates_nothing():
    code = (
        "import sys; sys.argv = ['x', '--bogus', 'key=value'];"
        "import jaxstack, jaxstack.hf, jaxstack.train, jaxstack.generate, jaxstack.parallel;"
        "import jaxstack.data, jaxstack.config, jaxstack.cli;"
        "from jax._src import xla_bridge;"
        "assert not xla_bridge._backends, 'a device backend was started on import';"
        "print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_presets_build_abstractly():
    from flax import nnx

    model = nnx.eval_shape(
        lambda: init_llm(LLMConfig.preset("qwen2.5-7b"), dtype=jnp.bfloat16)
    )  # no memory: shapes only
    assert model.layers[0].mlp.gate_proj.kernel.shape == (3584, 18944)


def _copy_checkpoint(src, dst, **config_updates):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(config_updates)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    return dst


def test_generate_without_tokenizer_files_says_pass_tokenizer(tmp_path, tiny_checkpoint):
    proc = run_cli("generate", "--model", str(tiny_checkpoint), "--prompt", "hi")
    assert_one_line_error(proc, "has no tokenizer files")
    assert "--tokenizer" in proc.stderr and "prompt 0 is empty" not in proc.stderr


def test_generate_unsupported_architecture_checked_before_tokenizer(tmp_path, tiny_checkpoint):
    # transformers builds (or fails to build) a tokenizer from a bare Mistral config.json: the
    # architecture must be refused first, not reported as a tokenizer problem.
    bad = _copy_checkpoint(tiny_checkpoint, tmp_path / "mistral",
                           architectures=["MistralForCausalLM"], model_type="mistral")  # fmt: skip
    proc = run_cli("generate", "--model", str(bad), "--prompt", "hi")  # no --tokenizer
    assert_one_line_error(proc, "unsupported architecture ['MistralForCausalLM']")


def test_generate_uses_the_byte_tokenizer_a_training_job_recorded(tmp_path, tiny_checkpoint):
    from jaxstack.train.trainer import TOKENIZER_RECORD

    export = _copy_checkpoint(tiny_checkpoint, tmp_path / "hf")
    (export / TOKENIZER_RECORD).write_text(json.dumps({"tokenizer": "byte"}))
    proc = run_cli("generate", "--model", str(export), "--prompt", "hi", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hi")
    assert "has no tokenizer files" in proc.stderr and "'byte'" in proc.stderr


def test_generate_beyond_max_positions_is_one_line_error(tmp_path, tiny_checkpoint):
    short = _copy_checkpoint(tiny_checkpoint, tmp_path / "short", max_position_embeddings=8)
    proc = run_cli("generate", "--model", str(short), "--tokenizer", "byte",
                   "--prompt", "hello", "--max-new-tokens", "4")  # fmt: skip
    assert_one_line_error(proc, "max_position_embeddings=8")
