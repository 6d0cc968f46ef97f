"""The demo's three decoders: llmkernels and the pure-PyTorch path generate the same tokens."""

import pytest
import torch

from llmkernels import use_backend
from llmkernels.demo import check_agreement, run_demo
from llmkernels.models import MambaConfig, MambaLM, MistralConfig, MistralLM
from llmkernels.models.common import greedy_generate


def test_demo_runs_and_agrees(capsys):
    rows = run_demo(tokens=12, device="cpu", prompt_len=9)
    assert len(rows) == 3 and all(r["ours_tok_s"] > 0 for r in rows)
    assert "speedup" in capsys.readouterr().out


def test_agreement_check_catches_a_real_divergence():
    ref = torch.tensor([[1, 2, 3, 4]])
    margins = torch.full((1, 4), 0.5)
    assert check_agreement(ref.clone(), ref, margins)[0]
    ours = torch.tensor([[1, 2, 9, 4]])
    assert not check_agreement(ours, ref, margins)[0]
    margins[0, 2] = 1e-5  # a near-tie may go either way
    assert check_agreement(ours, ref, margins)[0]


def test_incremental_decoding_equals_one_prefill():
    """Feeding the sequence token by token through the caches gives the logits of one prefill call."""
    torch.manual_seed(0)
    for model in (MistralLM(MistralConfig(window=8)), MambaLM(MambaConfig())):
        model.eval()
        tokens = torch.randint(0, 256, (2, 21))
        with torch.no_grad(), use_backend("reference"):
            full = model(tokens, model.new_cache(2))
            cache = model.new_cache(2)
            model(tokens[:, :1], cache)
            steps = [model(tokens[:, t : t + 1], cache) for t in range(1, 21)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, 1:], rtol=1e-4, atol=1e-4)


def test_greedy_generate_shapes():
    model = MistralLM(MistralConfig(window=4)).eval()
    out, margins = greedy_generate(model, torch.randint(0, 256, (1, 5)), 6)
    assert out.shape == (1, 6) and margins.shape == (1, 6) and (margins >= 0).all()


def test_greedy_generate_zero_and_negative_tokens():
    model = MistralLM(MistralConfig(window=4)).eval()
    out, margins = greedy_generate(model, torch.randint(0, 256, (2, 5)), 0)
    assert out.shape == (2, 0) and margins.shape == (2, 0)
    with pytest.raises(ValueError, match="new_tokens must be >= 0"):
        greedy_generate(model, torch.randint(0, 256, (2, 5)), -1)


def test_agreement_check_reads_every_row():
    """A near-tie in row 0 must not end the check: row 1 differs where the reference margin is large."""
    ours, ref = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 9, 3], [4, 7, 7]])
    ok, why = check_agreement(ours, ref, torch.tensor([[1.0, 1e-5, 1.0], [1.0, 5.0, 1.0]]))
    assert not ok and "row 1" in why
    ok, why = check_agreement(ours, ref, torch.tensor([[1.0, 1e-5, 1.0], [1.0, 1e-5, 1.0]]))
    assert ok and "row 0" in why and "row 1" in why


def test_a_cache_of_fewer_layers_is_refused():
    torch.manual_seed(0)
    model = MistralLM(MistralConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, window=8, n_layers=2)).eval()
    with pytest.raises(ValueError, match="cache holds 1 layers' state, the model has 2 layers"):
        model(torch.randint(0, 256, (1, 4)), model.new_cache(1)[:1])


def test_quantized_bf16_mistral_generates():
    """After quantize_ the projections hold no float weight: the cache takes the embedding's dtype (it took the
    default fp32, and the bf16 decode step refused it)."""
    import llmkernels

    torch.manual_seed(0)
    model = MistralLM(MistralConfig(dim=32, n_heads=4, n_kv_heads=2, ffn_dim=48, window=8)).eval()
    llmkernels.quantize_(model)
    model.to(torch.bfloat16)
    prompt = torch.randint(0, 256, (1, 4))
    out, _ = greedy_generate(model, prompt, 4)
    assert out.shape == (1, 4)


def test_demo_command_line_refuses_bad_arguments(capsys):
    from llmkernels.__main__ import main

    with pytest.raises(SystemExit):
        main(["demo", "--tokens", "0"])
    assert "must be a positive number of tokens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["demo", "--device", "cuda"])
        assert "no CUDA GPU" in capsys.readouterr().err
