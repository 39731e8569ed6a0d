"""Tests for sparsify.flops: FLOP counts against hand counts, and what a training run records."""

import pytest
from conftest import tiny_train_config

from sparsify import metric_names as names
from sparsify import train
from sparsify.config import validate_config
from sparsify.flops import FlopCount, ModelShape, SAEShape, train_flops_per_sequence
from sparsify.training.build import build_model
from sparsify.training.objective import make_loss_plan

# 2 layers, d_model 8, 2 heads of 4, d_mlp 32 (ungated: 2 matrices), vocab 16, n_ctx 4
SMALL = ModelShape(d_model=8, n_layers=2, d_mlp=32, n_heads=2, d_head=4, d_vocab=16)
N_CTX = 4
SAE = SAEShape(d_in=8, n_dict=16, layer=1)  # blocks.1.hook_resid_pre
# per token, by hand:
#   block forward: W_Q, W_K, W_V, W_O 4 x 2*8*8 = 512; attention 4*n_ctx*d_model = 4*4*8 = 128;
#                  MLP 2 matrices x 2*8*32 = 1024                               -> 1664
#   block input-grad backward: linears 1x (1536) + attention 2x (256)          -> 1792
#   unembed: 2*8*16                                                             -> 256
#   SAE: forward 2*8*16 + 2*16*8 = 512 (S); trained backward 2S = 1024          -> 1536
BLOCK, BLOCK_BACK, UNEMBED, SAE_STEP = 1664, 1792, 256, 1536


def test_local_step_runs_the_model_once_to_the_logits_and_trains_the_sae():
    # local: no original model; stop_layer_for(blocks.1.hook_resid_pre) = 2 = n_layers, so
    # TransformerLens runs the whole model (stop None); no backward through the model
    count = train_flops_per_sequence(SMALL, [SAE], N_CTX, runs_original=False, stop_layer=None)
    assert count == FlopCount(
        original_forward=0,
        spliced_forward=N_CTX * (2 * BLOCK + UNEMBED),  # 4 * 3584 = 14336
        model_backward=0,
        sae=N_CTX * SAE_STEP,  # 6144
    )
    assert count.total == 20480


def test_local_step_stopped_after_the_sae_block():
    count = train_flops_per_sequence(SMALL, [SAE], N_CTX, runs_original=False, stop_layer=1)
    assert count.total == N_CTX * (BLOCK + SAE_STEP) == 12800


def test_e2e_step_counts_both_forwards_and_the_frozen_backward():
    # original forward 0..end; spliced forward resumed at block 1; backward from the logits
    # through the unembedding and block 1 (input gradients only); the SAE
    count = train_flops_per_sequence(
        SMALL, [SAE], N_CTX, runs_original=True, stop_layer=None, resume_layer=1, backward_unembed=True
    )
    assert count == FlopCount(
        original_forward=N_CTX * (2 * BLOCK + UNEMBED),  # 14336
        spliced_forward=N_CTX * (BLOCK + UNEMBED),  # 7680
        model_backward=N_CTX * (BLOCK_BACK + UNEMBED),  # 8192
        sae=N_CTX * SAE_STEP,  # 6144
    )
    assert count.total == 36352
    # without the resume shortcut the spliced forward runs block 0 again
    full = train_flops_per_sequence(
        SMALL, [SAE], N_CTX, runs_original=True, stop_layer=None, backward_unembed=True
    )
    assert full.total == 36352 + N_CTX * BLOCK


def test_gated_mlp_grouped_query_attention_and_skipped_first_position():
    # 3 MLP matrices; 1 key/value head of 4: W_K, W_V cost 2*8*4 each instead of 2*8*8
    shape = ModelShape(
        d_model=8, n_layers=2, d_mlp=32, n_heads=2, d_head=4, d_vocab=16, n_key_value_heads=1, mlp_matrices=3
    )
    block = 2 * 8 * 8 + 2 * (2 * 8 * 4) + 2 * 8 * 8 + 4 * 4 * 8 + 3 * 2 * 8 * 32  # 2048
    count = train_flops_per_sequence(shape, [SAE], N_CTX, runs_original=False, stop_layer=1, first_position=1)
    assert count.total == N_CTX * block + (N_CTX - 1) * SAE_STEP


def test_model_shape_reads_a_transformer_lens_config():
    class Cfg:
        d_model, n_layers, d_mlp, n_heads, d_head, d_vocab = 576, 30, 1536, 9, 64, 49152
        n_key_value_heads, gated_mlp, act_fn, d_vocab_out = 3, True, "silu", -1

    shape = ModelShape.from_tlens_cfg(Cfg())
    assert (shape.mlp_matrices, shape.d_kv, shape.d_q, shape.d_vocab) == (3, 192, 576, 49152)


# the tiny Llama (tests/tiny_model.py): 3 layers, d_model 64, 4 heads of 16 (4 key/value heads),
# gated MLP of 128; n_ctx 16; one SAE at blocks.1.hook_resid_pre, n_dict 2 * 64 = 128
TINY_BLOCK = 4 * (2 * 64 * 64) + 4 * 16 * 64 + 3 * (2 * 64 * 128)  # 32768 + 4096 + 49152 = 86016
TINY_BLOCK_BACK = TINY_BLOCK + 4 * 16 * 64  # 90112
TINY_SAE = 3 * 4 * 64 * 128  # 98304


def _tiny_run(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, **overrides):
    cfg = validate_config(
        tiny_train_config(
            tiny_model_dir, corpus_dir, tmp_path, save_dir=None, eval_data=None, n_samples=32, **overrides
        )
    )
    result = train(cfg, tlens_model=tiny_bridge, show_progress=False)
    return cfg, result


def test_e2e_training_run_records_its_flops_and_device_seconds(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    cfg, result = _tiny_run(tiny_bridge, tiny_model_dir, corpus_dir, tmp_path)
    plan = make_loss_plan(build_model(cfg, tiny_bridge), cfg.loss)
    assert plan.resume_hook == "blocks.1.hook_resid_pre" and plan.stop_at_layer is None
    unembed = 2 * 64 * int(tiny_bridge.cfg.d_vocab)
    per_token = (
        (3 * TINY_BLOCK + unembed)  # original forward
        + (2 * TINY_BLOCK + unembed)  # spliced forward, resumed at block 1
        + (2 * TINY_BLOCK_BACK + unembed)  # backward from the logits to the SAE
        + TINY_SAE
    )
    assert result.metrics[names.COST_TRAIN_FLOPS] == 32 * 16 * per_token  # 32 sequences of 16 tokens
    assert result.metrics[names.COST_CACHED_MODEL_FLOPS] == 0.0
    assert result.metrics[names.COST_DEVICE_SECONDS] > 0


def test_cached_local_run_counts_the_model_forward_it_read_from_the_cache(
    tiny_bridge, tiny_model_dir, corpus_dir, tmp_path
):
    local = {"sparsity": {"coeff": 1.0}, "out_to_in": {"coeff": 1.0}}
    _, result = _tiny_run(
        tiny_bridge, tiny_model_dir, corpus_dir, tmp_path, loss=local, activation_cache="on"
    )
    model_forward = 32 * 16 * 2 * TINY_BLOCK  # blocks 0 and 1 (stop_at_layer 2), no backward
    assert result.metrics[names.COST_TRAIN_FLOPS] == model_forward + 32 * 16 * TINY_SAE
    assert result.metrics[names.COST_CACHED_MODEL_FLOPS] == model_forward
    assert result.metrics[names.COST_DEVICE_SECONDS] > 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_device_seconds_scale_with_ranks(world_size):
    from sparsify.training.state import TrainState

    state = TrainState(device_seconds=1.0)
    state.start_clock()
    assert state.loop_start is not None
    state.loop_start -= 2.0  # the loop ran 2 s
    state.stop_clock(world_size)
    assert state.device_seconds == pytest.approx(1.0 + 2.0 * world_size, abs=0.1)
