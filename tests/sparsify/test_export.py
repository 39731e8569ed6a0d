"""SAELens export: the folders hold SAELens's layout, and sae-lens itself loads them and gives
our codes and outputs.

sae-lens 6 needs transformer-lens < 4, so it lives in its own small venv (`make saelens-venv`,
`.venv-saelens`, or the interpreter named by SPARSIFY_SAELENS_PYTHON) holding only sae-lens,
transformer-lens 3 and three small packages; everything else it imports (torch, transformers,
safetensors, ...) comes from this venv, appended after its own site-packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config
from safetensors.torch import load_file, save_file

from sparsify.config import validate_config
from sparsify.export import export_saelens, main
from sparsify.hooks import hook_to_key
from sparsify.sae import SAE
from sparsify.training.checkpoint import save_run

ROOT = Path(__file__).parents[2]
SAELENS_PYTHON = Path(os.environ.get("SPARSIFY_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
POSITIONS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
D_IN, N_DICT = 8, 16

# runs in the sae-lens venv: argv = our site-packages, batch file, output file, SAE folders
SAELENS_SCRIPT = """
import json, os, sys
sys.path.extend(sys.argv[1].split(os.pathsep))  # after the venv's own: its transformer-lens 3 wins
from safetensors.torch import load_file, save_file
from sae_lens import SAE

sae_in = load_file(sys.argv[2])["sae_in"]
outputs, info = {}, {}
for folder in sys.argv[4:]:
    sae = SAE.load_from_disk(folder)
    codes = sae.encode(sae_in)
    outputs[folder + ":codes"] = codes
    outputs[folder + ":sae_out"] = sae.decode(codes)
    outputs[folder + ":forward"] = sae(sae_in)
    info[folder] = {"class": type(sae).__name__, "hook_name": sae.cfg.metadata.hook_name,
                    "model_name": sae.cfg.metadata.model_name}
save_file({k: v.detach().contiguous() for k, v in outputs.items()}, sys.argv[3])
print(json.dumps(info))
"""


def make_run(tmp_path: Path) -> tuple[Path, dict[str, SAE]]:
    """A run folder with two random SAEs whose decoder columns are far from unit norm."""
    raw = tiny_train_config(Path("tiny-model"), Path("corpus"), tmp_path)
    raw["saes"]["sae_positions"] = POSITIONS
    cfg = validate_config(raw)
    torch.manual_seed(0)
    saes = {name: SAE(D_IN, N_DICT) for name in POSITIONS}
    with torch.no_grad():
        for sae in saes.values():
            sae.decoder.weight.mul_(torch.rand(1, N_DICT) * 4 + 0.25)  # column norms 0.25 .. 4.25
            sae.decoder.bias.normal_()
            sae.encoder[0].bias.normal_(std=0.1)
    state = {f"{hook_to_key(n)}.{k}": v for n, sae in saes.items() for k, v in sae.state_dict().items()}
    run_dir = tmp_path / "run"
    save_run(run_dir, state, cfg, metrics={})
    return run_dir, saes


def test_export_writes_one_saelens_folder_per_position(tmp_path):
    run_dir, saes = make_run(tmp_path)
    folders = export_saelens(run_dir, tmp_path / "out")
    assert folders == [tmp_path / "out" / name for name in POSITIONS]
    for folder, (name, sae) in zip(folders, saes.items(), strict=True):
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == "standard"
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, N_DICT, "float32")
        assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
        assert cfg["metadata"]["hook_name"] == name and cfg["metadata"]["model_name"] == "tiny-model"
        weights = load_file(str(folder / "sae_weights.safetensors"))
        assert {k: tuple(v.shape) for k, v in weights.items()} == {
            "W_enc": (D_IN, N_DICT),
            "b_enc": (N_DICT,),
            "W_dec": (N_DICT, D_IN),
            "b_dec": (D_IN,),
        }
        torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(N_DICT))
        sae_in = torch.randn(3, 5, D_IN)
        codes = torch.relu(sae_in @ weights["W_enc"] + weights["b_enc"])
        with torch.no_grad():
            want_codes, want_out = sae(sae_in)
        torch.testing.assert_close(codes, want_codes)
        torch.testing.assert_close(codes @ weights["W_dec"] + weights["b_dec"], want_out)


def test_export_one_hook_name(tmp_path):
    run_dir, _ = make_run(tmp_path)
    assert export_saelens(run_dir, tmp_path / "out", hook_name=POSITIONS[1]) == [
        tmp_path / "out" / POSITIONS[1]
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [POSITIONS[1]]


def test_saelens_loads_export_and_reproduces_encode_decode(tmp_path):
    if not SAELENS_PYTHON.exists():
        pytest.fail(f"no sae-lens venv at {SAELENS_PYTHON}: run `make saelens-venv`")
    run_dir, saes = make_run(tmp_path)
    folders = export_saelens(run_dir, tmp_path / "out")
    sae_in = torch.randn(4, 6, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    save_file({"sae_in": sae_in}, tmp_path / "batch.safetensors")
    ours = os.pathsep.join(
        dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    )
    proc = subprocess.run(
        [str(SAELENS_PYTHON), "-c", SAELENS_SCRIPT, ours, str(tmp_path / "batch.safetensors")]
        + [str(tmp_path / "theirs.safetensors"), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = load_file(str(tmp_path / "theirs.safetensors"))
    for folder, (name, sae) in zip(folders, saes.items(), strict=True):
        assert info[str(folder)] == {"class": "StandardSAE", "hook_name": name, "model_name": "tiny-model"}
        with torch.no_grad():
            codes, sae_out = sae(sae_in)
        assert (codes > 0).any() and (codes == 0).any()  # the ReLU is exercised both ways
        torch.testing.assert_close(theirs[f"{folder}:codes"], codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[f"{folder}:sae_out"], sae_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[f"{folder}:forward"], sae_out, rtol=1e-5, atol=1e-5)


def test_cli_exports_a_run(tmp_path):
    run_dir, _ = make_run(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify.export", str(run_dir), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [str(tmp_path / "out" / name) for name in POSITIONS]


def test_cli_missing_run_folder_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsify.export", str(tmp_path / "nope"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope'}: no such run folder\n"
    assert not (tmp_path / "out").exists()


def test_cli_folder_without_weights_prints_one_line_and_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'empty'}: no sae.safetensors; give a run folder of sparsify.train\n"


def test_cli_unknown_hook_name_lists_the_runs_saes(tmp_path, capsys):
    run_dir, _ = make_run(tmp_path)
    assert main([str(run_dir), str(tmp_path / "out"), "--hook-name", "blocks.2.hook_resid_pre"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: hook_name: {run_dir} has no SAE at 'blocks.2.hook_resid_pre'; "
        f"its SAEs: {', '.join(POSITIONS)}\n"
    )
