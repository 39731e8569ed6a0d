"""SAELens both ways, for every architecture: our export is a SAELens folder that sae-lens itself
loads with our codes and outputs, and a SAELens folder (hand-written, and as sae-lens re-saves
it) imports into our SAE with SAELens's outputs.

sae-lens 6 needs transformer-lens < 4, so it lives in its own small venv (`make saelens-venv`,
`.venv-saelens`, or the interpreter named by SPARSIFY_SAELENS_PYTHON) holding only sae-lens,
transformer-lens 3 and three small packages; everything else it imports (torch, transformers,
safetensors, ...) comes from this venv, appended after its own site-packages. One sae-lens
process serves every test (the `saelens` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config
from safetensors.torch import load_file, save_file
from torch import Tensor

from sparsify.architectures import BatchTopKSAE, JumpReLUSAE, SparseAutoencoder, sae_factory
from sparsify.config import SAEsConfig, validate_config
from sparsify.export import export_saelens, main
from sparsify.hooks import hook_to_key
from sparsify.training.checkpoint import load_sae_state, save_run

ROOT = Path(__file__).parents[2]
SAELENS_PYTHON = Path(os.environ.get("SPARSIFY_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
POSITIONS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
D_IN, N_DICT, K = 8, 16, 3
ARCHITECTURES = ["relu", "topk", "batchtopk", "jumprelu"]
SAES_FIELDS: dict[str, dict[str, Any]] = {
    "relu": {},
    "topk": {"k": K},
    "batchtopk": {"k": K},
    "jumprelu": {"jumprelu_threshold_init": 0.5},
}
SPARSITY_LOSS = {"relu": {"sparsity": {"coeff": 0.5}}, "jumprelu": {"l0_penalty": {"coeff": 0.01}}}
SAELENS_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
SAELENS_CLASS = {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}
BATCHTOPK_THRESHOLD = 0.4
RESAVED = ".resaved"

# runs in the sae-lens venv: argv = our site-packages, batch file, output file, SAE folders.
# Each folder is also saved again by sae-lens (`save_model`) next to itself, + RESAVED.
SAELENS_SCRIPT = f"""
import json, os, sys
sys.path.extend(sys.argv[1].split(os.pathsep))  # after the venv's own: its transformer-lens 3 wins
from safetensors.torch import load_file, save_file
from sae_lens import SAE

sae_in = load_file(sys.argv[2])["sae_in"]
outputs, info = {{}}, {{}}
for folder in sys.argv[4:]:
    sae = SAE.load_from_disk(folder)
    codes = sae.encode(sae_in)
    outputs[folder + ":codes"] = codes
    outputs[folder + ":sae_out"] = sae.decode(codes)
    outputs[folder + ":forward"] = sae(sae_in)
    info[folder] = {{"class": type(sae).__name__, "hook_name": sae.cfg.metadata.hook_name,
                    "model_name": sae.cfg.metadata.model_name}}
    sae.save_model(folder + "{RESAVED}")
save_file({{k: v.detach().contiguous() for k, v in outputs.items()}}, sys.argv[3])
print(json.dumps(info))
"""


def saes_config(architecture: str, positions: list[str] = POSITIONS) -> dict[str, Any]:
    return {"sae_positions": positions, "architecture": architecture, **SAES_FIELDS[architecture]}


def make_run(tmp_path: Path, architecture: str = "relu") -> tuple[Path, dict[str, SparseAutoencoder]]:
    """A run folder with two random SAEs whose decoder columns are far from unit norm; JumpReLU
    thresholds 0.05 .. 2 and a BatchTopK threshold of 0.4, so on inputs of scale 3 some latents
    fire and some are held off by their threshold."""
    raw = tiny_train_config(
        Path("tiny-model"),
        Path("corpus"),
        tmp_path,
        saes=saes_config(architecture),
        loss={**SPARSITY_LOSS.get(architecture, {}), "logits_kl": {"coeff": 1.0}},
    )
    cfg = validate_config(raw)
    torch.manual_seed(0)
    make_sae = sae_factory(cfg.saes)
    saes = {name: make_sae(D_IN, N_DICT) for name in POSITIONS}
    with torch.no_grad():
        for sae in saes.values():
            sae.decoder.weight.mul_(torch.rand(1, N_DICT) * 4 + 0.25)  # column norms 0.25 .. 4.25
            sae.decoder.bias.normal_()
            sae.get_parameter("encoder.0.bias").normal_(std=0.1)
            if isinstance(sae, JumpReLUSAE):
                sae.log_threshold.copy_(torch.linspace(0.05, 2.0, N_DICT)[torch.randperm(N_DICT)].log())
            if isinstance(sae, BatchTopKSAE):
                sae.get_buffer("threshold").fill_(BATCHTOPK_THRESHOLD)
    state = {f"{hook_to_key(n)}.{k}": v for n, sae in saes.items() for k, v in sae.state_dict().items()}
    run_dir = tmp_path / "run"
    save_run(run_dir, state, cfg, metrics={})
    return run_dir, {name: sae.eval() for name, sae in saes.items()}


@dataclass
class SAELensFolder:
    """A SAELens-format folder we wrote by hand, to import as `architecture`."""

    folder: Path
    architecture: str
    code_scale: Tensor
    """Our codes / SAELens's: the decoder norms, which SAELens's topk with
    rescale_acts_by_decoder_norm already puts in its codes."""


def write_saelens_folder(folder: Path, architecture: str, seed: int = 0) -> SAELensFolder:
    """A SAELens 6 folder at POSITIONS[0] whose import needs every conversion: input centering
    (`apply_b_dec_to_input: true`), decoder rows of norms 0.25 .. 4 (one common norm 2 for
    batchtopk, whose shared threshold must stay shared), mixed jumprelu thresholds, and a topk
    that selects on pre * ||W_dec|| (`rescale_acts_by_decoder_norm`)."""
    gen = torch.Generator().manual_seed(seed)
    shared = architecture == "batchtopk"
    norms = (
        torch.full((N_DICT,), 2.0)
        if shared
        else torch.linspace(0.25, 4.0, N_DICT)[torch.randperm(N_DICT, generator=gen)]
    )
    tensors = {
        "W_enc": torch.randn(D_IN, N_DICT, generator=gen) * 0.4,
        "b_enc": torch.randn(N_DICT, generator=gen) * 0.2,
        "W_dec": F.normalize(torch.randn(N_DICT, D_IN, generator=gen), dim=1) * norms[:, None],
        "b_dec": torch.randn(D_IN, generator=gen) * 0.5,
    }
    fields: dict[str, Any] = {}
    if architecture == "topk":
        fields = {"k": K, "rescale_acts_by_decoder_norm": True}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.linspace(0.05, 1.5, N_DICT)[torch.randperm(N_DICT, generator=gen)]
    if architecture == "batchtopk":
        tensors["threshold"] = torch.full((N_DICT,), 0.3)
    cfg = {
        "architecture": SAELENS_ARCHITECTURE[architecture],
        "d_in": D_IN,
        "d_sae": N_DICT,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **fields,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": POSITIONS[0], "model_name": "tiny-model"},
    }
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return SAELensFolder(folder, architecture, torch.ones(N_DICT) if architecture == "topk" else norms)


def imported_sae(folder: Path, architecture: str) -> tuple[SparseAutoencoder, dict[str, Tensor]]:
    saes = SAEsConfig.model_validate(saes_config(architecture, [POSITIONS[0]]))
    state = load_sae_state(folder, saes)
    sae = sae_factory(saes)(D_IN, N_DICT)
    sae.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
    return sae.eval(), state


@dataclass
class SAELensRun:
    sae_in: Tensor
    theirs: dict[str, Tensor]
    info: dict[str, Any]
    exported: dict[str, tuple[list[Path], dict[str, SparseAutoencoder]]]
    imports: dict[str, SAELensFolder]


@pytest.fixture(scope="module")
def saelens(tmp_path_factory: pytest.TempPathFactory) -> SAELensRun:
    """Every architecture's export and import folder through one sae-lens process."""
    if not SAELENS_PYTHON.exists():
        pytest.fail(f"no sae-lens venv at {SAELENS_PYTHON}: run `make saelens-venv`")
    tmp = tmp_path_factory.mktemp("saelens")
    exported = {}
    for arch in ARCHITECTURES:
        run_dir, saes = make_run(tmp / arch, arch)
        exported[arch] = (export_saelens(run_dir, tmp / arch / "out"), saes)
    imports = {arch: write_saelens_folder(tmp / "import" / arch, arch) for arch in ARCHITECTURES}
    folders = [f for fs, _ in exported.values() for f in fs] + [i.folder for i in imports.values()]
    sae_in = torch.randn(4, 6, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    save_file({"sae_in": sae_in}, tmp / "batch.safetensors")
    ours = os.pathsep.join(
        dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    )
    proc = subprocess.run(
        [str(SAELENS_PYTHON), "-c", SAELENS_SCRIPT, ours, str(tmp / "batch.safetensors")]
        + [str(tmp / "theirs.safetensors"), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return SAELensRun(sae_in, load_file(str(tmp / "theirs.safetensors")), info, exported, imports)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_writes_saelens_fields_and_tensors(tmp_path, architecture):
    run_dir, saes = make_run(tmp_path, architecture)
    folders = export_saelens(run_dir, tmp_path / "out")
    assert folders == [tmp_path / "out" / name for name in POSITIONS]
    for folder, (name, sae) in zip(folders, saes.items(), strict=True):
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == SAELENS_ARCHITECTURE[architecture]
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, N_DICT, "float32")
        assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
        assert cfg["metadata"]["hook_name"] == name and cfg["metadata"]["model_name"] == "tiny-model"
        assert cfg["metadata"]["sparsify_architecture"] == architecture
        if architecture == "topk":
            assert (cfg["k"], cfg["rescale_acts_by_decoder_norm"]) == (K, False)
        weights = load_file(str(folder / "sae_weights.safetensors"))
        shapes = {"W_enc": (D_IN, N_DICT), "b_enc": (N_DICT,), "W_dec": (N_DICT, D_IN), "b_dec": (D_IN,)}
        if cfg["architecture"] == "jumprelu":
            shapes["threshold"] = (N_DICT,)
        assert {k: tuple(v.shape) for k, v in weights.items()} == shapes
        torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(N_DICT))
        if architecture == "batchtopk":
            assert torch.equal(weights["threshold"], torch.full((N_DICT,), BATCHTOPK_THRESHOLD))
        if architecture == "jumprelu":
            assert isinstance(sae, JumpReLUSAE)
            torch.testing.assert_close(weights["threshold"], sae.threshold.detach())


def test_export_one_hook_name(tmp_path):
    run_dir, _ = make_run(tmp_path)
    assert export_saelens(run_dir, tmp_path / "out", hook_name=POSITIONS[1]) == [
        tmp_path / "out" / POSITIONS[1]
    ]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [POSITIONS[1]]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_loads_export_and_reproduces_encode_decode_forward(saelens, architecture):
    folders, saes = saelens.exported[architecture]
    for folder, (name, sae) in zip(folders, saes.items(), strict=True):
        assert saelens.info[str(folder)] == {
            "class": SAELENS_CLASS[SAELENS_ARCHITECTURE[architecture]],
            "hook_name": name,
            "model_name": "tiny-model",
        }
        with torch.no_grad():
            codes, sae_out = sae(saelens.sae_in)
            pre = sae.pre_acts(saelens.sae_in)
        assert (codes > 0).any() and (codes == 0).any()
        if architecture in ("jumprelu", "batchtopk"):
            assert ((pre > 0) & (codes == 0)).any()  # the threshold holds some latents off
        theirs = {part: saelens.theirs[f"{folder}:{part}"] for part in ("codes", "sae_out", "forward")}
        torch.testing.assert_close(theirs["codes"], codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["sae_out"], sae_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs["forward"], sae_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saelens_folder_imports_with_saelens_outputs(saelens, architecture):
    written = saelens.imports[architecture]
    sae, state = imported_sae(written.folder, architecture)
    assert saelens.info[str(written.folder)]["class"] == SAELENS_CLASS[SAELENS_ARCHITECTURE[architecture]]
    with torch.no_grad():
        codes, sae_out = sae(saelens.sae_in)
        pre = sae.pre_acts(saelens.sae_in)
    assert (codes > 0).any() and (codes == 0).any()
    if architecture in ("jumprelu", "batchtopk"):
        assert ((pre > 0) & (codes == 0)).any()
    theirs = {part: saelens.theirs[f"{written.folder}:{part}"] for part in ("codes", "sae_out", "forward")}
    # our codes carry the decoder norms SAELens keeps in W_dec (saelens_import docstring)
    torch.testing.assert_close(codes, theirs["codes"] * written.code_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae_out, theirs["sae_out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae_out, theirs["forward"], rtol=1e-5, atol=1e-5)
    # the folder as sae-lens itself writes it imports to the same weights
    _, resaved = imported_sae(Path(f"{written.folder}{RESAVED}"), architecture)
    assert resaved.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(resaved[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_then_import_gives_back_the_same_function(saelens, architecture):
    folders, saes = saelens.exported[architecture]
    for folder, sae in zip(folders, saes.values(), strict=True):
        saes_cfg = SAEsConfig.model_validate(saes_config(architecture, [sae_hook(folder)]))
        state = load_sae_state(folder, saes_cfg)
        back = sae_factory(saes_cfg)(D_IN, N_DICT)
        back.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        with torch.no_grad():
            for ours, theirs in zip(back.eval()(saelens.sae_in), sae(saelens.sae_in), strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def sae_hook(folder: Path) -> str:
    return json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"]


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
